//! Hostile and unusual spellings (DESIGN §2, §8): every configured path is matched in
//! canonical form, so a logout, a launch, an override or one of ehrgate's own paths
//! cannot reach an upstream unobserved by writing it another way.

use std::time::Duration;

use ehrgate::body::Body;
use futures_util::StreamExt;

use crate::support::clinic::{path_of, Browser, Clinic, DOCTOR, OTHER_DOCTOR};
use crate::support::{EHR, EMR};

/// Only turns a hang into a failure.
const SOON: Duration = Duration::from_secs(60);

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
        // The same inside a path parameter, which Tomcat strips but DESIGN §2 still
        // counts as part of the path.
        "/oscar/logout.jsp;x=%5C",
        "/oscar/logout.jsp;x=%2F",
        "/oscar/logout.jsp;jsessionid=%00",
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

/// The enter URL of a launch, as the path to request on the viewer host.
fn enter_path(launch: &crate::support::client::Resp) -> String {
    path_of(launch).to_string()
}

#[tokio::test]
async fn a_ticket_sent_to_another_browser_opens_nothing() {
    let clinic = Clinic::start().await;
    let b = clinic.browser(DOCTOR);
    // A colleague logged in to the EMR on another browser, with an EHR marker of her own.
    let a = clinic.browser(OTHER_DOCTOR);
    assert_eq!(a.open_chart("1001", None).await.status, 200);
    let launches_before = clinic.viewer.launches().len();

    // B launches and sends the link to A before opening it.
    let launch = b.launch("1002", None).await;
    let first = a.viewer_get(&enter_path(&launch)).await;
    assert_eq!(first.status, 303, "the first visit binds, whoever makes it");
    let confirm = a.get(EMR, path_of(&first)).await;
    assert_eq!(confirm.status, 403, "{}", confirm.text());
    assert!(confirm.text().contains("Relaunch from the EMR"));
    // The refusal spends the ticket: coming back opens nothing, for A or for B.
    assert_eq!(a.viewer_get(&enter_path(&launch)).await.status, 410);
    assert_eq!(b.enter(&launch).await.status, 410);
    assert_eq!(
        clinic.viewer.launches().len(),
        launches_before,
        "nothing signed for A"
    );
    let denies = clinic.audit_events("deny");
    assert!(
        denies
            .iter()
            .any(|d| d["detail"].as_str().unwrap().contains("another browser")),
        "{denies:?}"
    );
    // B relaunches and gets in.
    assert_eq!(b.open_chart("1002", None).await.status, 200);
}

#[tokio::test]
async fn a_ticket_bound_to_its_browser_refuses_every_other() {
    let clinic = Clinic::start().await;
    let b = clinic.browser(DOCTOR);
    for stranger in [
        Browser::new(clinic.gate.client()),
        clinic.browser(OTHER_DOCTOR),
    ] {
        let launch = b.launch("1001", None).await;
        let first = b.viewer_get(&enter_path(&launch)).await;
        assert_eq!(first.status, 303);
        // A page navigates another browser to the same ticket: refused at once, and
        // the ticket is spent.
        let r = stranger.viewer_get(&enter_path(&launch)).await;
        assert_eq!(r.status, 403, "{}", r.text());
        assert!(stranger.cookie(EHR, "__Host-ehrgate").is_none());
        assert_eq!(b.get(EMR, path_of(&first)).await.status, 410);
    }
    // Undisturbed, B's own round trip completes.
    let launch = b.launch("1001", None).await;
    let first = b.viewer_get(&enter_path(&launch)).await;
    let confirmed = b.get(EMR, path_of(&first)).await;
    assert_eq!(confirmed.status, 303);
    let entered = b.viewer_get(path_of(&confirmed)).await;
    assert_eq!(entered.status, 302, "{}", entered.text());
    assert_eq!(clinic.viewer.launches().len(), 1);
    assert_eq!(clinic.viewer.launches()[0].0["sub"], DOCTOR);
}

/// A page of the attacker's navigates the victim's browser to the attacker's own ticket,
/// and the attacker confirms it himself: the victim must not enter the attacker's EHR
/// session (where the victim's ONE ID login would land in the attacker's vault).
#[tokio::test]
async fn a_victim_cannot_be_entered_into_an_attackers_session() {
    let clinic = Clinic::start().await;
    let attacker = clinic.browser(OTHER_DOCTOR);
    let victim = clinic.browser(DOCTOR);
    let launch = attacker.launch("1002", None).await;
    let enter = enter_path(&launch);
    // The victim's browser binds the ticket and is sent to confirm (which it fails).
    let first = victim.viewer_get(&enter).await;
    assert_eq!(first.status, 303);
    // The attacker confirms with his own marker, without the nonce only the victim saw.
    let bare_confirm = enter.replace("/enter?", "/confirm?");
    assert_eq!(attacker.get(EMR, &bare_confirm).await.status, 403);
    // The victim's browser, sent to enter again, is not let in.
    assert_ne!(victim.viewer_get(&enter).await.status, 302);
    assert!(victim.cookie(EHR, "__Host-ehrgate").is_none());
    assert!(clinic.viewer.launches().is_empty());
}

/// A colleague binds the owner's ticket and sends the owner a confirm link: the owner's
/// confirmation does not make the colleague's browser redeem it.
#[tokio::test]
async fn a_confirm_link_sent_to_the_owner_does_not_open_the_colleagues_browser() {
    let clinic = Clinic::start().await;
    let owner = clinic.browser(DOCTOR);
    let colleague = clinic.browser(OTHER_DOCTOR);
    let launch = owner.launch("1001", None).await;
    let enter = enter_path(&launch);
    // The colleague binds it and stops at the redirect, keeping the confirm URL.
    let first = colleague.viewer_get(&enter).await;
    assert_eq!(first.status, 303);
    // The owner opens that confirm link: its answer (with the code) goes to the owner.
    let confirmed = owner.get(EMR, path_of(&first)).await;
    assert_eq!(confirmed.status, 303);
    // The colleague, without the code, gets nothing; the owner, without the binding,
    // neither.
    assert_ne!(colleague.viewer_get(&enter).await.status, 302);
    assert_ne!(owner.viewer_get(path_of(&confirmed)).await.status, 302);
    assert!(clinic.viewer.launches().is_empty());
    assert!(colleague.cookie(EHR, "__Host-ehrgate").is_none());
    assert!(owner.cookie(EHR, "__Host-ehrgate").is_none());
}

#[tokio::test]
async fn confirm_needs_a_bound_ticket_and_only_get_redeems() {
    let clinic = Clinic::start().await;
    let b = clinic.browser(DOCTOR);
    let launch = b.launch("1001", None).await;
    let confirm_path = enter_path(&launch).replace("/enter?", "/confirm?");
    let req = b
        .request(EMR, "POST", &confirm_path)
        .body(Body::empty())
        .unwrap();
    assert_eq!(b.send(EMR, req).await.status, 405);
    // Straight to confirm, before enter bound the ticket: refused, and the ticket spent.
    assert_eq!(b.get(EMR, &confirm_path).await.status, 403);
    assert_eq!(b.enter(&launch).await.status, 410);
}

#[tokio::test]
async fn both_hosts_send_hsts_and_patient_pages_are_never_cached() {
    let clinic = Clinic::start().await;
    let browser = connected(&clinic).await;
    let chart = browser.viewer_get("/chart").await;
    assert_eq!(chart.status, 200);
    assert_eq!(chart.header("cache-control"), Some("no-store"));
    let emr = browser.emr_get("/oscar/provider/providercontrol.jsp").await;
    for r in [&chart, &emr] {
        assert_eq!(
            r.header("strict-transport-security"),
            Some("max-age=31536000")
        );
    }
    browser.emr_get("/oscar/logout.jsp").await;
    let refused = browser.viewer_get("/chart").await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("cache-control"), Some("no-store"));
    assert_eq!(
        refused.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    // An error ehrgate gives before routing to a flow carries it too.
    let refused_path = clinic.gate.client().get(EMR, "/%2F").await;
    assert_eq!(refused_path.status, 400);
    assert!(refused_path.header("strict-transport-security").is_some());

    let quiet = Clinic::start_with(|s| s.server("hsts = \"\"")).await;
    let r = quiet.gate.client().get(EMR, "/oscar/").await;
    assert!(r.header("strict-transport-security").is_none());
}

#[tokio::test]
async fn the_audience_is_the_configured_viewer_origin() {
    let clinic = Clinic::start().await;
    let b = clinic.browser(DOCTOR);
    let launch = b.launch("1001", None).await;
    let first = b.viewer_get(&enter_path(&launch)).await;
    let confirmed = b.get(EMR, path_of(&first)).await;
    // The redeeming request names the viewer host in its own spelling.
    let mut req = b
        .request(EHR, "GET", path_of(&confirmed))
        .body(Body::empty())
        .unwrap();
    let spelling = format!("EHR.Localhost.:{}", clinic.gate.addr.port());
    req.headers_mut().insert("host", spelling.parse().unwrap());
    assert_eq!(b.send(EHR, req).await.status, 302);
    assert_eq!(
        clinic.viewer.launches()[0].0["aud"],
        format!("https://{EHR}:{}", clinic.gate.addr.port())
    );
}

#[tokio::test]
async fn a_launch_reads_every_cookie_field_of_an_http2_request() {
    let clinic = Clinic::start().await;
    let id = clinic.emr.login(DOCTOR);
    let mut h2 = clinic.gate.client().h2(EMR).await;
    let req = h2
        .request(EMR, "/oscar/clinicalConnectEHRViewer.do?demographicNo=1001")
        .header("sec-fetch-site", "same-origin")
        .header("cookie", "theme=dark")
        .header("cookie", format!("JSESSIONID={id}"))
        .body(Body::empty())
        .unwrap();
    let r = h2.fetch(req).await;
    assert_eq!(r.status, 303, "{}", r.text());
}

#[tokio::test]
async fn an_emr_session_holds_a_bounded_number_of_tickets() {
    let clinic = Clinic::start().await;
    let b = clinic.browser(DOCTOR);
    let mut launches = Vec::new();
    for _ in 0..10 {
        launches.push(b.launch("1001", None).await);
    }
    // The two oldest gave way to newer ones; the newest works.
    assert_eq!(b.enter(&launches[0]).await.status, 410);
    assert_eq!(b.enter(&launches[1]).await.status, 410);
    assert_eq!(b.enter(&launches[9]).await.status, 302);
}

#[tokio::test]
async fn a_refused_upload_still_gets_its_answer() {
    let clinic = Clinic::start().await;
    let browser = connected(&clinic).await;
    let session = format!(
        "__Host-ehrgate={}",
        browser.cookie(EHR, "__Host-ehrgate").unwrap()
    );
    // (host, path, cookie, the answer a client still sending 8 MiB must read)
    let cases: [(&'static str, &str, Option<&str>, u16); 6] = [
        (EHR, "/upload", None, 401),
        (EHR, "/.ehrgate/enter?ticket=x", None, 405),
        (EMR, "/.ehrgate/status", None, 405),
        (EMR, "/oscar/clinicalConnectEHRViewer.do", None, 405),
        (EMR, "/.ehrgate/nothing", None, 404),
        (EHR, "/override", Some(&session), 413),
    ];
    for (host, path, cookie, status) in cases {
        use futures_util::stream;
        use http_body::Frame;
        let mut c = clinic.gate.client().h1(host).await;
        let chunk = bytes::Bytes::from(vec![b'u'; 64 * 1024]);
        let body = stream::iter(
            std::iter::repeat_n(chunk, 128).map(|c| Ok::<_, std::io::Error>(Frame::data(c))),
        );
        let mut req = http::Request::post(path)
            .header("host", host)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("content-length", (8 * 1024 * 1024).to_string());
        if let Some(cookie) = cookie {
            req = req.header("cookie", cookie);
        }
        let req = req
            .body(Body::stream(http_body_util::StreamBody::new(body)))
            .unwrap();
        let r = c.fetch(req).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
    }
}

#[tokio::test]
async fn a_slow_request_body_is_cut_off_with_408() {
    let clinic = Clinic::start_with(|s| s.server("client_body_timeout = \"300ms\"")).await;
    let browser = connected(&clinic).await;
    let cookie = format!(
        "__Host-ehrgate={}",
        browser.cookie(EHR, "__Host-ehrgate").unwrap()
    );
    // The override form announces 1,000 bytes and sends 10.
    let head = format!(
        "POST /override HTTP/1.1\r\nHost: {EHR}\r\nCookie: {cookie}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\nreason=abc"
    );
    let answer = clinic.gate.client().raw(EHR, head.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        clinic.audit_events("override").is_empty(),
        "no record of a form never read"
    );
    // The same on the forwarding path (EMR host), where the upstream has begun.
    let answer = clinic
        .gate
        .client()
        .raw(
            EMR,
            b"POST /oscar/form HTTP/1.1\r\nHost: emr.localhost\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn malformed_chunked_bodies_get_400_and_never_a_whole_request_upstream() {
    let clinic = Clinic::start().await;
    let long_extension = format!("5;{}=x\r\nhello\r\n0\r\n\r\n", "e".repeat(64 * 1024));
    let bodies: Vec<String> = vec![
        "zz\r\nhello\r\n0\r\n\r\n".into(),
        "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n".into(),
        "5\r\nhelloXX0\r\n\r\n".into(),
        long_extension,
    ];
    for (i, body) in bodies.into_iter().enumerate() {
        let request = format!(
            "POST /oscar/form HTTP/1.1\r\nHost: {EMR}\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let answer = clinic.gate.client().raw(EMR, request.as_bytes()).await;
        let shown = &answer[..answer.len().min(300)];
        // The 64 KiB extension is refused while the client is still sending it; the
        // close that follows may reset the connection before the 400 is read.
        let still_sending = i == 3 && answer.is_empty();
        if !still_sending {
            assert!(answer.starts_with("HTTP/1.1 400"), "{shown}");
            assert!(answer.contains("malformed"), "ehrgate's own page: {shown}");
        }
        assert!(
            !answer.contains("body_len"),
            "the upstream answered a whole request: {shown}"
        );
    }
}

#[tokio::test]
async fn an_upstream_that_stalls_mid_body_is_cut_off() {
    use crate::support::upstream;
    use http_body_util::BodyExt;
    // Headers and one chunk, then nothing, for ever.
    let addr = upstream::spawn(|_req| async {
        let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(
            bytes::Bytes::from_static(b"first chunk\n"),
        ))])
        .chain(futures_util::stream::pending());
        http::Response::new(Body::stream(http_body_util::StreamBody::new(stream)))
    })
    .await;
    let gate = crate::support::Gate::start(
        crate::support::Setup::new(addr, addr)
            .server("upstream_response_timeout = \"5s\"\nupstream_body_timeout = \"300ms\""),
    )
    .await;
    let client = gate.client();
    let mut h1 = client.h1(EMR).await;
    let resp = h1
        .send(
            crate::support::client::H1::request(EMR, "/report")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let mut h2 = client.h2(EMR).await;
    let req = h2.request(EMR, "/report").body(Body::empty()).unwrap();
    h2.send.ready().await.unwrap();
    let resp2 = h2.send.send_request(req).await.unwrap();
    for (i, resp) in [resp, resp2].into_iter().enumerate() {
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first chunk\n");
        let end = tokio::time::timeout(SOON, body.frame())
            .await
            .expect("the stalled response is ended, not left open");
        assert!(
            matches!(end, Some(Err(_))),
            "response {i} must end visibly, not as if complete: {end:?}"
        );
    }
}

#[tokio::test]
async fn a_client_that_reads_nothing_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = crate::support::upstream::Echo::start("emr").await;
    let gate = crate::support::Gate::start(
        crate::support::Setup::new(echo.addr, echo.addr).server("send_timeout = \"500ms\""),
    )
    .await;
    let mut tls = gate.client().tls(EMR, &[b"http/1.1"]).await;
    tls.write_all(b"GET /download?bytes=268435456 HTTP/1.1\r\nHost: emr.localhost\r\n\r\n")
        .await
        .unwrap();
    // Read nothing: ehrgate must give up on this client and close its connection.
    no_open_connections(&gate).await;
    // What was already in flight can be read; then the connection ends, short of 256 MiB.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while let Ok(Ok(n)) = tokio::time::timeout(SOON, tls.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got += n;
    }
    assert!(got < 64 << 20, "{got} bytes");
}

#[tokio::test]
async fn admin_actions_need_the_token_when_one_is_configured() {
    use crate::support::client::plain_request_with;
    const TOKEN: &str = "aXQtc3RhZmYtdG9rZW4tZm9yLXRlc3Rz";
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("alice:{TOKEN}\n")).unwrap();
    let clinic = Clinic::start_with(|mut s| {
        s.tail.push_str(&format!(
            "\n[admin]\ntoken_file = {:?}\n",
            token_file.display().to_string()
        ));
        s
    })
    .await;
    let browser = connected(&clinic).await;
    let path = format!("/admin/logout?user={DOCTOR}");
    let admin = clinic.gate.admin;
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-token-wrong-token-wrong")],
        vec![("authorization", TOKEN)],
    ] {
        let r = plain_request_with(admin, "POST", &path, &headers).await;
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text());
        assert!(r.header("www-authenticate").is_some());
    }
    assert_eq!(
        browser.viewer_get("/chart").await.status,
        200,
        "nobody signed out"
    );
    assert_eq!(clinic.audit_events("deny").len(), 3);
    // Health and metrics stay open.
    assert_eq!(clinic.gate.admin_get("/metrics").await.0, 200);

    let bearer = format!("Bearer {TOKEN}");
    let r = plain_request_with(admin, "POST", &path, &[("authorization", &bearer)]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(browser.viewer_get("/chart").await.status, 401);
    let records = clinic.audit_events("admin");
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["detail"], "logout requested by alice");
    assert_eq!(records[0]["user"], DOCTOR);
}

#[tokio::test]
async fn an_http2_client_with_closed_windows_holds_nothing_for_long() {
    use hyper::client::conn::http2;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let echo = crate::support::upstream::Echo::start("emr").await;
    let gate = crate::support::Gate::start(
        crate::support::Setup::new(echo.addr, echo.addr)
            .server("send_timeout = \"500ms\"\nmax_streams_per_connection = 20"),
    )
    .await;
    let tls = gate.client().tls(EMR, &[b"h2"]).await;
    // Every stream's window closed, and never opened: the client reads nothing.
    let (send, conn) = http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .initial_connection_window_size(65_535)
        .handshake(TokioIo::new(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut held = Vec::new();
    for _ in 0..30 {
        let mut send = send.clone();
        let req = http::Request::get(format!(
            "https://{EMR}:{}/download?bytes=16777216",
            gate.addr.port()
        ))
        .body(Body::empty())
        .unwrap();
        held.push(tokio::spawn(async move {
            send.ready().await.ok()?;
            send.send_request(req).await.ok()
        }));
    }
    // ehrgate gives up on the connection: its streams and their upstream requests end.
    tokio::time::timeout(SOON, conn)
        .await
        .expect("the connection of a client that reads nothing is closed")
        .unwrap()
        .ok();
    // The client sees the connection end a moment before ehrgate's task has finished
    // with it (and counted it closed).
    no_open_connections(&gate).await;
    assert!(
        echo.hits() <= 20,
        "{} upstream requests for 20 allowed streams",
        echo.hits()
    );
}

/// Waits until ehrgate counts no open client connection (a readiness wait, bounded).
async fn no_open_connections(gate: &crate::support::Gate) {
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let (_, metrics) = gate.admin_get("/metrics").await;
        if metrics.contains("ehrgate_open_connections 0") {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_streamed_viewer_response_is_cut_at_sign_out() {
    use http_body_util::BodyExt;
    let clinic = Clinic::start().await;
    let browser = connected(&clinic).await;
    let client = clinic.gate.client();
    // Over HTTP/1.1 and HTTP/2 at once.
    let mut h1 = client.h1(EHR).await;
    let mut h2 = client.h2(EHR).await;
    let req = browser
        .request(EHR, "GET", "/stream")
        .body(Body::empty())
        .unwrap();
    let one = h1.send(req).await;
    let (mut parts, body) = browser
        .request(EHR, "GET", "/stream")
        .body(Body::empty())
        .unwrap()
        .into_parts();
    parts.uri = format!("https://{EHR}:{}/stream", clinic.gate.addr.port())
        .parse()
        .unwrap();
    parts.headers.remove("host");
    h2.send.ready().await.unwrap();
    let two = h2
        .send
        .send_request(http::Request::from_parts(parts, body))
        .await
        .unwrap();
    let mut bodies = [one.into_body(), two.into_body()];
    for b in bodies.iter_mut() {
        let first = b.frame().await.unwrap().unwrap();
        assert!(first.into_data().unwrap().starts_with(b"tick"));
    }

    assert_eq!(browser.emr_get("/oscar/logout.jsp").await.status, 302);
    for (i, b) in bodies.iter_mut().enumerate() {
        // What was already on its way may still arrive; then the stream ends visibly.
        let mut after = 0;
        let end = loop {
            match tokio::time::timeout(SOON, b.frame())
                .await
                .expect("cut, not left open")
            {
                Some(Ok(_)) => after += 1,
                Some(Err(e)) => break Some(e),
                None => break None,
            }
        };
        assert!(
            end.is_some(),
            "stream {i} ended as if complete after {after} chunks"
        );
        assert!(after <= 5, "stream {i}: {after} chunks after the sign-out");
    }
}

#[tokio::test]
async fn event_streams_are_capped_per_session() {
    let clinic = Clinic::start().await;
    let browser = connected(&clinic).await;
    let mut open = Vec::new();
    let mut h2 = clinic.gate.client().h2(EHR).await;
    let cookie = format!(
        "__Host-ehrgate={}",
        browser.cookie(EHR, "__Host-ehrgate").unwrap()
    );
    let mut statuses = Vec::new();
    for _ in 0..ehrgate::gateway::MAX_STREAMS_PER_SESSION + 3 {
        let req = h2
            .request(EHR, "/.ehrgate/events")
            .header("cookie", &cookie)
            .body(Body::empty())
            .unwrap();
        h2.send.ready().await.unwrap();
        let resp = h2.send.send_request(req).await.unwrap();
        statuses.push(resp.status().as_u16());
        open.push(resp);
    }
    let max = ehrgate::gateway::MAX_STREAMS_PER_SESSION as usize;
    assert!(statuses[..max].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses[max..].iter().all(|s| *s == 429), "{statuses:?}");
    // Closing one frees its place.
    open.truncate(max - 1);
    let mut again = 0;
    for _ in 0..200 {
        let req = h2
            .request(EHR, "/.ehrgate/events")
            .header("cookie", &cookie)
            .body(Body::empty())
            .unwrap();
        h2.send.ready().await.unwrap();
        let resp = h2.send.send_request(req).await.unwrap();
        again = resp.status().as_u16();
        if again == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(again, 200);
}
