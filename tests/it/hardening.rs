//! Hostile and unusual spellings (DESIGN §2, §8): every configured path is matched in
//! canonical form, so a logout, a launch, an override or one of ehrgate's own paths
//! cannot reach an upstream unobserved by writing it another way.

use ehrgate::body::Body;

use crate::support::clinic::{Browser, Clinic, DOCTOR};
use crate::support::{EHR, EMR};

/// A browser with a live viewer session.
async fn connected(clinic: &Clinic) -> Browser {
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    browser
}

#[tokio::test]
async fn logout_by_any_spelling_ends_the_viewer_session() {
    let clinic = Clinic::start().await;
    for spelling in [
        "/oscar/logout.jsp;jsessionid={ID}",
        "/oscar//logout.jsp",
        "/oscar/./logout.jsp",
        "/oscar/%6Cogout.jsp",
        "/oscar/x/../logout.jsp",
        "/oscar/logout.do/",
    ] {
        let browser = connected(&clinic).await;
        let id = browser.cookie(EMR, "JSESSIONID").unwrap();
        let path = spelling.replace("{ID}", &id);
        // The fake EMR, like Tomcat, answers these without expiring its cookie.
        browser.emr_get(&path).await;
        assert_eq!(
            browser.viewer_get("/chart").await.status,
            401,
            "{spelling} left the viewer open"
        );
    }
}

#[tokio::test]
async fn logout_naming_the_session_only_in_the_path_ends_it() {
    let clinic = Clinic::start().await;
    let browser = connected(&clinic).await;
    let id = browser.cookie(EMR, "JSESSIONID").unwrap();
    // As Tomcat writes it for a browser that refuses cookies: no Cookie header at all.
    let r = clinic
        .gate
        .client()
        .get(EMR, &format!("/oscar/logout.jsp;jsessionid={id}"))
        .await;
    assert_ne!(r.status, 400);
    assert_eq!(browser.viewer_get("/chart").await.status, 401);
    assert_eq!(clinic.audit_events("emr_logout").len(), 1);
}

#[tokio::test]
async fn launch_by_any_spelling_is_mediated_and_audited() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    for (i, spelling) in [
        "/oscar/clinicalConnectEHRViewer.do;x=1",
        "/oscar//clinicalConnectEHRViewer.do",
        "/oscar/%63linicalConnectEHRViewer.do",
        "/oscar/./clinicalConnectEHRViewer.do",
    ]
    .into_iter()
    .enumerate()
    {
        let r = browser
            .emr_get(&format!("{spelling}?demographicNo=1001"))
            .await;
        assert_eq!(r.status, 303, "{spelling} reached the EMR: {}", r.text());
        assert!(r
            .header("location")
            .unwrap()
            .contains("/.ehrgate/enter?ticket="));
        assert_eq!(clinic.audit_events("launch").len(), i + 1, "{spelling}");
    }
}

#[tokio::test]
async fn an_override_by_any_spelling_is_audited() {
    let clinic = Clinic::start().await;
    let browser = connected(&clinic).await;
    let spellings = [
        "/override",
        "/override;x",
        "//override",
        "/override/",
        "/%6Fverride",
        "/x/../override",
    ];
    for (i, spelling) in spellings.iter().enumerate() {
        let req = browser
            .request(EHR, "POST", spelling)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::full(format!("reason=case+{i}")))
            .unwrap();
        browser.send(EHR, req).await;
        let overrides = clinic.audit_events("override");
        assert_eq!(overrides.len(), i + 1, "{spelling} escaped the audit");
        assert_eq!(overrides[i]["reason"], format!("case {i}"));
    }
}

#[tokio::test]
async fn own_paths_by_any_spelling_are_answered_here() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    let status = browser.emr_get("/.ehrgate;x/status").await;
    assert_eq!(status.status, 200);
    assert_eq!(status.json()["connected"], false, "{}", status.text());
    for host in [EMR, EHR] {
        let jwks = clinic
            .gate
            .client()
            .get(host, "/.well-known;x/ehrgate/jwks.json")
            .await;
        assert!(jwks.json()["keys"].is_array(), "{}", jwks.text());
    }
}

#[tokio::test]
async fn paths_no_upstream_should_see_are_refused() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    for path in [
        "/oscar%2Flogout.jsp",
        "/oscar/%5Clogout.jsp",
        "/oscar/%00",
        "/oscar/%zz",
        "/../oscar/logout.jsp",
    ] {
        let r = browser.emr_get(path).await;
        assert_eq!(r.status, 400, "{path}: {}", r.text());
    }
    // Nothing reached the EMR: no echo answered.
    assert_eq!(
        clinic
            .emr
            .state
            .whoami_calls
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
}

#[tokio::test]
async fn head_on_enter_spends_no_ticket() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    let launch = browser.launch("1001", None).await;
    let location = launch.header("location").unwrap().to_string();
    let path = &location[location.find("/.ehrgate/").unwrap()..];
    let req = browser
        .request(EHR, "HEAD", path)
        .body(Body::empty())
        .unwrap();
    assert_eq!(browser.send(EHR, req).await.status, 405);
    assert!(
        clinic.viewer.launches().is_empty(),
        "nothing signed, nothing sent"
    );
    assert_eq!(
        browser.enter(&launch).await.status,
        302,
        "the ticket still works"
    );
}

#[tokio::test]
async fn request_trailers_never_reach_the_upstream() {
    let clinic = Clinic::start().await;
    let answer = clinic
        .gate
        .client()
        .raw(
            EMR,
            b"POST /oscar/form HTTP/1.1\r\nHost: emr.localhost\r\n\
              Transfer-Encoding: chunked\r\nTrailer: X-EHR-Context, X-Forwarded-For\r\n\r\n\
              5\r\nhello\r\n0\r\nX-EHR-Context: forged\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["body"], "hello");
    assert_eq!(body["trailers"], serde_json::json!({}), "{body}");
    assert!(body["headers"].get("trailer").is_none(), "{body}");
    assert!(body["headers"].get("x-ehr-context").is_none(), "{body}");
    assert_ne!(body["headers"]["x-forwarded-for"][0], "6.6.6.6");
}

#[tokio::test]
async fn only_same_origin_requests_launch() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    let path = "/oscar/clinicalConnectEHRViewer.do?demographicNo=1001";
    let launch = |headers: &'static [(&'static str, &'static str)]| {
        let mut req = browser.request(EMR, "GET", path);
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let req = req.body(Body::empty()).unwrap();
        let browser = &browser;
        async move { browser.send(EMR, req).await.status }
    };
    // A page on the viewer host is a sibling site.
    assert_eq!(launch(&[("sec-fetch-site", "same-site")]).await, 403);
    // No fetch metadata and nothing that names the EMR page.
    assert_eq!(launch(&[]).await, 403);
    assert_eq!(
        launch(&[
            ("sec-fetch-site", "same-origin"),
            ("origin", "https://ehr.localhost")
        ])
        .await,
        403
    );
    // Older browsers: a Referer on the EMR host is enough; a typed address too.
    assert_eq!(
        launch(&[(
            "referer",
            "https://emr.localhost/oscar/demographic/chart.jsp"
        )])
        .await,
        303
    );
    assert_eq!(launch(&[("sec-fetch-site", "none")]).await, 303);
    let denies = clinic.audit_events("deny");
    assert_eq!(denies.len(), 3, "{denies:?}");
}

#[tokio::test]
async fn only_websocket_upgrades_are_relayed() {
    let clinic = Clinic::start().await;
    let answer = clinic
        .gate
        .client()
        .raw(
            EMR,
            b"GET /oscar/index.jsp HTTP/1.1\r\nHost: emr.localhost\r\n\
              Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
              HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer.split_once("\r\n\r\n").unwrap().1).unwrap();
    for name in ["upgrade", "connection", "http2-settings"] {
        assert!(body["headers"].get(name).is_none(), "{name}: {body}");
    }
}
