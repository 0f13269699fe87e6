//! The lifecycle flows of DESIGN §1 and §6 against a fake EMR and viewer: launch, enter,
//! viewer traffic, Disconnect, each sign-out trigger and effect, and every refusal.

use std::time::Duration;

use ehrgate::body::Body;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::support::client::{plain_request, H1};
use crate::support::clinic::{path_of, Browser, Clinic, DOCTOR};
use crate::support::{EHR, EMR};

/// Only turns a hang into a failure: generous, so a loaded machine never trips it.
const SOON: Duration = Duration::from_secs(60);
const MAPLE: &str = "2.16.840.1.113883.3.239.9:101";
const RIVERSIDE: &str = "2.16.840.1.113883.3.239.9:102";

/// Two authorities, Maple the default.
fn two_authorities(s: crate::support::Setup) -> crate::support::Setup {
    let mut s = s;
    s.tail.push_str(&format!(
        "\n[[authority]]\nid = \"{RIVERSIDE}\"\nname = \"Riverside Walk-in Clinic\"\n"
    ));
    s
}

/// Polls `check` until it holds (a readiness wait, not a sleep-for-time).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + SOON;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_whole_clinician_flow_of_design_section_1() {
    the_whole_flow(Clinic::start_with(two_authorities).await).await;
}

/// The same with both upstreams over HTTPS, verified against a private CA.
#[tokio::test]
async fn the_whole_clinician_flow_over_https_upstreams() {
    the_whole_flow(Clinic::start_tls_with(two_authorities).await).await;
}

async fn the_whole_flow(clinic: Clinic) {
    let browser = clinic.browser(DOCTOR);

    // The overlay asks for the authorities before the first launch.
    let status = browser.emr_get("/.ehrgate/status").await.json();
    assert_eq!(status["connected"], false);
    assert_eq!(status["authorities"].as_array().unwrap().len(), 2);

    // 1-3. EHR for a patient whose MRP is another provider: launch, enter, viewer login.
    let launch = browser.launch("1002", Some(RIVERSIDE)).await;
    assert_eq!(launch.status, 303, "{}", launch.text());
    assert!(launch.header("location").unwrap().starts_with(&format!(
        "https://{EHR}:{}/.ehrgate/enter?ticket=",
        clinic.gate.addr.port()
    )));
    assert!(browser.cookie(EMR, "__Host-ehrgate-emr").is_some());
    let entered = browser.enter(&launch).await;
    assert_eq!(entered.status, 302, "{}", entered.text());
    assert!(browser.cookie(EHR, "__Host-ehrgate").is_some());
    assert!(
        browser.cookie(EHR, "VSESSION").is_none(),
        "vault: viewer cookies stay in ehrgate"
    );
    let (claims, reused) = clinic.viewer.launches()[0].clone();
    assert!(!reused, "first launch: a new viewer login");
    assert_eq!(claims["sub"], DOCTOR);
    assert_eq!(claims["uao"], RIVERSIDE);
    assert_eq!(claims["uao_name"], "Riverside Walk-in Clinic");
    assert_eq!(claims["mrp"], false);
    assert_eq!(claims["patient"]["demographic_no"], "1002");
    assert_eq!(claims["patient"]["hcn"], "1234567897");
    assert_eq!(claims["patient"]["birth_date"], "1970-01-31");
    assert_eq!(
        claims["aud"],
        format!("https://{EHR}:{}", clinic.gate.addr.port())
    );

    // 4. Not the MRP: the override, with its reason, is audited.
    let req = browser
        .request(EHR, "POST", "/override")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::full("reason=Patient+consented&demographic=1002"))
        .unwrap();
    let r = browser.send(EHR, req).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json()["body"],
        "reason=Patient+consented&demographic=1002"
    );
    let overrides = clinic.audit_events("override");
    assert_eq!(overrides.len(), 1);
    assert_eq!(overrides[0]["reason"], "Patient consented");
    assert_eq!(overrides[0]["demographic_no"], "1002");
    assert_eq!(overrides[0]["uao"], RIVERSIDE);

    let chart = browser
        .viewer_get(entered.header("location").unwrap())
        .await;
    assert_eq!(chart.status, 200);
    assert!(
        chart
            .text()
            .contains("<head><script src=\"/.ehrgate/session.js\"></script>"),
        "{}",
        chart.text()
    );
    let status = browser.emr_get("/.ehrgate/status").await.json();
    assert_eq!(status["connected"], true);
    assert_eq!(status["authority"]["id"], RIVERSIDE);

    // 5. Tab closed; EHR on another patient opens without a new viewer login.
    let chart = browser.open_chart("1001", Some(RIVERSIDE)).await;
    assert_eq!(chart.status, 200);
    let (claims, reused) = clinic.viewer.launches()[1].clone();
    assert!(reused, "the viewer login is kept");
    assert_eq!(claims["patient"]["demographic_no"], "1001");
    assert_eq!(claims["mrp"], true);

    // 7. Disconnect: the EHR side ends, the EMR stays usable.
    let r = browser.emr_post("/.ehrgate/disconnect").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["connected"], false);
    let logouts = clinic.viewer.logouts();
    assert_eq!(logouts.len(), 1, "viewer signed out server-to-server");
    assert!(
        logouts[0].as_deref().unwrap().starts_with("VSESSION="),
        "{logouts:?}"
    );
    assert_eq!(browser.viewer_get("/chart").await.status, 401);
    assert_eq!(
        browser
            .emr_get("/oscar/provider/providercontrol.jsp")
            .await
            .status,
        200
    );
    assert_eq!(
        browser.emr_get("/.ehrgate/status").await.json()["connected"],
        false
    );

    // After Disconnect the viewer asks for its login again.
    let chart = browser.open_chart("1001", None).await;
    assert_eq!(chart.status, 200);
    assert!(
        !clinic.viewer.launches()[2].1,
        "a new viewer login after Disconnect"
    );
    assert_eq!(
        clinic.viewer.launches()[2].0["uao"],
        MAPLE,
        "the default authority"
    );

    // 6. EMR logout ends viewer access on the very next request.
    let out = browser.emr_get("/oscar/logout.jsp").await;
    assert_eq!(out.status, 302);
    let refused = browser.viewer_get("/chart").await;
    assert_eq!(refused.status, 401);
    assert!(refused
        .text()
        .contains("EHR session ended — relaunch from the EMR"));
    assert!(refused
        .headers
        .get_all("set-cookie")
        .iter()
        .any(|v| v.to_str().unwrap().starts_with("__Host-ehrgate=;")));
    assert_eq!(clinic.viewer.logouts().len(), 2);

    let events: Vec<String> = clinic
        .audit()
        .iter()
        .map(|r| r["event"].as_str().unwrap().to_string())
        .collect();
    for e in [
        "launch",
        "enter",
        "override",
        "disconnect",
        "ehr_logout",
        "emr_logout",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} missing from {events:?}");
    }
    let text = std::fs::read_to_string(clinic.gate.files.path("audit.jsonl")).unwrap();
    assert!(
        !text.contains("1234567897") && !text.contains("9876543217"),
        "no raw HCN in the audit log"
    );
}

#[tokio::test]
async fn an_emr_response_expiring_its_cookie_signs_out() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    let r = browser.emr_get("/oscar/expire").await;
    assert_eq!(r.status, 200);
    assert_eq!(browser.viewer_get("/chart").await.status, 401);
    let logouts = clinic.audit_events("emr_logout");
    assert_eq!(logouts[0]["detail"], "emr_cookie_expired");
}

#[tokio::test]
async fn an_idle_emr_session_is_signed_out_by_the_sweeper() {
    // Long enough that even a loaded machine opens the chart before the EMR session
    // idles out; short enough for the sweeper (a quarter of it) to act soon after.
    let clinic = Clinic::start_with(|s| s.emr("idle_timeout = \"3s\"")).await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    // Nobody uses the EMR: the sweeper signs out, and the viewer is told.
    eventually("viewer logout after EMR idle", || {
        clinic.viewer.logouts().len() == 1
    })
    .await;
    assert_eq!(browser.viewer_get("/chart").await.status, 401);
    assert_eq!(
        clinic.audit_events("emr_logout")[0]["detail"],
        "emr_idle_timeout"
    );
}

#[tokio::test]
async fn admin_logout_signs_out_every_session_of_the_user() {
    let clinic = Clinic::start().await;
    let (a, b) = (clinic.browser(DOCTOR), clinic.browser(DOCTOR));
    let other = clinic.browser("222222");
    for br in [&a, &b, &other] {
        assert_eq!(br.open_chart("1001", None).await.status, 200);
    }
    let r = plain_request(
        clinic.gate.admin,
        "POST",
        &format!("/admin/logout?user={DOCTOR}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["signed_out"], 2);
    assert_eq!(a.viewer_get("/chart").await.status, 401);
    assert_eq!(b.viewer_get("/chart").await.status, 401);
    assert_eq!(
        other.viewer_get("/chart").await.status,
        200,
        "another user is untouched"
    );
    assert_eq!(clinic.viewer.logouts().len(), 2);

    let r = plain_request(clinic.gate.admin, "POST", "/admin/logout").await;
    assert_eq!(r.status, 400);
}

#[tokio::test]
async fn sign_out_tells_event_streams_and_closes_websockets() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);

    // The tab-closing script and its event stream.
    let js = browser.viewer_get("/.ehrgate/session.js").await;
    assert_eq!(js.status, 200);
    assert!(js.text().contains("new EventSource(\"/.ehrgate/events\")"));
    let mut events = H1::handshake(browser.client.tls(EHR, &[b"http/1.1"]).await).await;
    let req = browser
        .request(EHR, "GET", "/.ehrgate/events")
        .body(Body::empty())
        .unwrap();
    let resp = events.send(req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.into_body();
    let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&first).contains(": connected"));

    // A WebSocket to the viewer, through ehrgate, with the session's cookie.
    let tls = browser.client.tls(EHR, &[b"http/1.1"]).await;
    let mut ws_req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "wss://{EHR}:{}/ws",
            clinic.gate.addr.port()
        ))
        .unwrap();
    ws_req.headers_mut().insert(
        "cookie",
        format!(
            "__Host-ehrgate={}",
            browser.cookie(EHR, "__Host-ehrgate").unwrap()
        )
        .parse()
        .unwrap(),
    );
    let (mut ws, _) = tokio_tungstenite::client_async(ws_req, tls)
        .await
        .expect("WebSocket through ehrgate");
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "ping"
    );

    assert_eq!(browser.emr_get("/oscar/logout.jsp").await.status, 302);

    let next = tokio::time::timeout(SOON, stream.frame())
        .await
        .expect("logout event in time");
    let data = next.unwrap().unwrap().into_data().unwrap();
    assert!(
        String::from_utf8_lossy(&data).starts_with("event: logout"),
        "{data:?}"
    );
    let end = tokio::time::timeout(SOON, ws.next())
        .await
        .expect("WebSocket closed in time");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");

    // The stream is refused from now on: the script shows the ended notice.
    let r = browser.viewer_get("/.ehrgate/events").await;
    assert_eq!(r.status, 401);
}

#[tokio::test]
async fn forged_context_headers_never_reach_the_viewer() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    let launch = browser.launch("1001", None).await;
    let ticket_path = launch
        .header("location")
        .unwrap()
        .split_once(".localhost:")
        .unwrap()
        .1
        .to_string();
    let ticket_path = &ticket_path[ticket_path.find('/').unwrap()..];
    // The binding round trip first; then the redeeming enter carries forged copies.
    let first = browser.viewer_get(ticket_path).await;
    assert_eq!(first.status, 303);
    let confirmed = browser.get(EMR, path_of(&first)).await;
    assert_eq!(confirmed.status, 303, "{}", confirmed.text());
    // A forged assertion on the enter request itself is replaced by ehrgate's.
    let req = browser
        .request(EHR, "GET", path_of(&confirmed))
        .header("x-ehr-context", "eyJhbGciOiJub25lIn0.e30.")
        .header("x_ehr_context", "eyJhbGciOiJub25lIn0.e30.")
        .body(Body::empty())
        .unwrap();
    assert_eq!(browser.send(EHR, req).await.status, 302);
    assert_eq!(
        clinic
            .viewer
            .state
            .refused_launches
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    for name in ["X-EHR-Context", "x_ehr_context", "X_Ehr-Context"] {
        let req = browser
            .request(EHR, "GET", "/anything")
            .header(name, "forged")
            .body(Body::empty())
            .unwrap();
        let r = browser.send(EHR, req).await;
        assert_eq!(r.status, 200);
        let headers = r.json()["headers"].clone();
        let names: Vec<&String> = headers.as_object().unwrap().keys().collect();
        assert!(
            !names.iter().any(|n| n.replace('_', "-") == "x-ehr-context"),
            "{name} reached the viewer: {names:?}"
        );
        assert!(!headers["cookie"][0]
            .as_str()
            .unwrap_or("")
            .contains("__Host-ehrgate"));
    }
}

#[tokio::test]
async fn tickets_work_once_in_time_and_only_while_the_emr_session_lasts() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    let launch = browser.launch("1001", None).await;
    assert_eq!(browser.enter(&launch).await.status, 302);
    let replay = browser.enter(&launch).await;
    assert_eq!(replay.status, 410);
    assert!(replay.text().contains("Relaunch from the EMR"));

    let launch = browser.launch("1001", None).await;
    assert_eq!(browser.emr_get("/oscar/logout.jsp").await.status, 302);
    assert_eq!(
        browser.enter(&launch).await.status,
        410,
        "EMR session ended"
    );

    let forged = browser
        .viewer_get("/.ehrgate/enter?ticket=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
        .await;
    assert_eq!(forged.status, 410);
    let denies = clinic.audit_events("deny");
    assert!(denies
        .iter()
        .any(|d| d["detail"] == "enter: unknown or used ticket"));
    assert!(denies
        .iter()
        .any(|d| d["detail"] == "enter: EMR session ended"));

    let expiring = Clinic::start_with(|s| s.session("ticket_ttl = \"1ms\"")).await;
    let browser = expiring.browser(DOCTOR);
    let launch = browser.launch("1001", None).await;
    // The ticket lives 1 ms: the condition under test is that time has passed.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(browser.enter(&launch).await.status, 410, "expired ticket");
    assert!(expiring
        .audit_events("deny")
        .iter()
        .any(|d| d["detail"] == "enter: expired ticket"));
}

#[tokio::test]
async fn launch_refusals_are_clear_and_audited() {
    let clinic = Clinic::start_with(two_authorities).await;
    let browser = clinic.browser(DOCTOR);

    let r = browser.launch("1001", Some("1.2.3:999")).await;
    assert_eq!(r.status, 400);
    assert!(
        r.text().contains(MAPLE) && r.text().contains(RIVERSIDE),
        "lists the valid ones"
    );
    let r = browser
        .emr_get("/oscar/clinicalConnectEHRViewer.do?uao=x")
        .await;
    assert_eq!(r.status, 400, "no demographic number");
    let r = browser.launch("12ab", None).await;
    assert_eq!(r.status, 400);
    let r = browser.launch("1004", None).await;
    assert_eq!(r.status, 403, "the EMR refuses the patient");
    let r = browser.launch("9999", None).await;
    assert_eq!(r.status, 404);
    let r = browser.launch("1003", None).await;
    assert_eq!(r.status, 422, "HCN fails the Luhn check");
    assert!(r.text().contains("health card number"));

    let stranger = Browser::new(clinic.gate.client());
    let r = stranger.launch("1001", None).await;
    assert_eq!(r.status, 401);
    assert!(r.text().contains("Log in to the EMR first"));
    stranger.set_cookie(EMR, "JSESSIONID", "not-a-login");
    assert_eq!(stranger.launch("1001", None).await.status, 401);

    let denies = clinic.audit_events("deny");
    assert_eq!(denies.len(), 8, "{denies:#?}");
    let hcn = denies
        .iter()
        .find(|d| d["detail"] == "launch: HCN fails the Ontario check")
        .unwrap();
    assert_eq!(hcn["demographic_no"], "1003");
    assert_eq!(hcn["hcn_hmac"].as_str().unwrap().len(), 64);
    assert_eq!(clinic.viewer.launches().len(), 0);

    // Several authorities, none given, none default.
    let no_default = Clinic::start_with(|s| {
        let mut s = two_authorities(s);
        s.default_authority = false;
        s
    })
    .await;
    let r = no_default.browser(DOCTOR).launch("1001", None).await;
    assert_eq!(r.status, 400);
    assert!(r.text().contains("Choose the authority"));
}

#[tokio::test]
async fn cross_site_launch_and_disconnect_are_refused() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    let path = "/oscar/clinicalConnectEHRViewer.do?demographicNo=1001";
    for (name, value) in [
        ("sec-fetch-site", "cross-site"),
        ("origin", "https://evil.example"),
        ("referer", "https://evil.example/page"),
    ] {
        let req = browser
            .request(EMR, "GET", path)
            .header(name, value)
            .body(Body::empty())
            .unwrap();
        let r = browser.send(EMR, req).await;
        assert_eq!(r.status, 403, "{name}: {value}");
    }
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    let req = browser
        .request(EMR, "POST", "/.ehrgate/disconnect")
        .header("origin", "https://evil.example")
        .body(Body::empty())
        .unwrap();
    assert_eq!(browser.send(EMR, req).await.status, 403);
    assert_eq!(
        browser.viewer_get("/chart").await.status,
        200,
        "still connected"
    );
}

#[tokio::test]
async fn a_new_authority_ends_the_old_ehr_session_first() {
    let clinic = Clinic::start_with(two_authorities).await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", Some(MAPLE)).await.status, 200);
    assert_eq!(
        browser.open_chart("1001", Some(RIVERSIDE)).await.status,
        200
    );
    assert_eq!(
        clinic.viewer.logouts().len(),
        1,
        "the Maple session was signed out"
    );
    let launches = clinic.viewer.launches();
    assert!(!launches[1].1, "a new viewer login for the new authority");
    let ended = clinic.audit_events("ehr_logout");
    assert!(ended[0]["detail"]
        .as_str()
        .unwrap()
        .starts_with("authority_change"));
    assert_eq!(
        browser.emr_get("/.ehrgate/status").await.json()["authority"]["id"],
        RIVERSIDE
    );
}

#[tokio::test]
async fn unwritable_audit_log_refuses_launches() {
    let clinic = Clinic::start_with(|mut s| {
        s.audit_blocked = true;
        s
    })
    .await;
    let browser = clinic.browser(DOCTOR);
    let r = browser.launch("1001", None).await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("audit log"));
    assert_eq!(clinic.viewer.launches().len(), 0);
    assert_eq!(
        browser.emr_get("/oscar/index.jsp").await.status,
        200,
        "the EMR itself still works"
    );
}

#[tokio::test]
async fn a_full_store_refuses_new_launches_but_keeps_live_sessions() {
    let clinic = Clinic::start_with(|s| s.session("max_sessions = 2")).await;
    let (a, b, c) = (
        clinic.browser(DOCTOR),
        clinic.browser("2"),
        clinic.browser("3"),
    );
    assert_eq!(a.open_chart("1001", None).await.status, 200);
    assert_eq!(b.open_chart("1001", None).await.status, 200);
    let r = c.launch("1001", None).await;
    assert_eq!(r.status, 503);
    assert!(clinic
        .audit_events("deny")
        .iter()
        .any(|d| d["detail"] == "launch: session store full"));
    assert_eq!(a.viewer_get("/chart").await.status, 200);
    assert_eq!(b.viewer_get("/chart").await.status, 200);
    // One leaves, and there is room again.
    assert_eq!(a.emr_get("/oscar/logout.jsp").await.status, 302);
    assert_eq!(c.open_chart("1001", None).await.status, 200);
}

#[tokio::test]
async fn passthrough_mode_lets_viewer_cookies_through_and_expires_them() {
    let clinic = Clinic::start_with(|s| s.ehr("cookie_mode = \"passthrough\"")).await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    assert!(
        browser.cookie(EHR, "VSESSION").is_some(),
        "passthrough: the browser holds it"
    );
    assert_eq!(browser.emr_get("/oscar/logout.jsp").await.status, 302);
    assert!(clinic.viewer.logouts()[0]
        .as_deref()
        .unwrap_or("")
        .starts_with("VSESSION="));
    let r = browser.viewer_get("/chart").await;
    assert_eq!(r.status, 401);
    assert!(
        browser.cookie(EHR, "VSESSION").is_none(),
        "expired by the 401"
    );
}

#[tokio::test]
async fn script_is_added_to_pages_only() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    // JSON (the echo) is left alone, and the viewer was asked for identity on pages.
    let r = browser.viewer_get("/data.json").await;
    assert_eq!(r.status, 200);
    let v: Value = r.json();
    assert_eq!(v["headers"]["accept-encoding"][0], "identity");
    let req = browser
        .request(EHR, "GET", "/api")
        .header("accept", "application/json")
        .header("accept-encoding", "gzip")
        .body(Body::empty())
        .unwrap();
    let r = browser.send(EHR, req).await;
    assert_eq!(
        r.json()["headers"]["accept-encoding"][0],
        "gzip",
        "non-page requests keep theirs"
    );
}

#[tokio::test]
async fn a_compressed_page_passes_unchanged() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    let r = browser.viewer_get("/gzpage").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(&r.body[..], &crate::support::clinic::GZ_PAGE[..]);
}

#[tokio::test]
async fn a_failing_viewer_logout_is_audited_and_the_local_sign_out_stands() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    clinic
        .viewer
        .state
        .logout_fails
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(browser.emr_get("/oscar/logout.jsp").await.status, 302);
    assert_eq!(browser.viewer_get("/chart").await.status, 401);
    let ended = clinic.audit_events("ehr_logout");
    assert_eq!(ended[0]["result"], "error");
    assert!(ended[0]["detail"]
        .as_str()
        .unwrap()
        .contains("viewer logout failed: status 500"));
}

#[tokio::test]
async fn jwks_is_published_on_both_hosts() {
    let clinic = Clinic::start().await;
    let client = clinic.gate.client();
    let a = client.get(EMR, "/.well-known/ehrgate/jwks.json").await;
    let b = client.get(EHR, "/.well-known/ehrgate/jwks.json").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body, b.body);
    assert_eq!(a.json()["keys"][0]["alg"], "ES256");
}

#[tokio::test]
async fn a_thousand_concurrent_sessions_never_cross() {
    let clinic = Clinic::start().await;
    let browsers: Vec<(usize, Browser)> = (0..1000)
        .map(|i| (i, clinic.browser(&format!("{}", 500_000 + i))))
        .collect();

    // All launch; all are live at once.
    futures_util::stream::iter(browsers.iter())
        .for_each_concurrent(64, |(_, b)| async move {
            assert_eq!(b.open_chart("1001", None).await.status, 200);
        })
        .await;
    let (_, metrics) = clinic.gate.admin_get("/metrics").await;
    assert!(
        metrics.contains("ehrgate_sessions{kind=\"ehr\"} 1000"),
        "{metrics}"
    );

    // Each viewer request reaches the viewer with its own session's viewer cookie only.
    let viewer = &clinic.viewer;
    futures_util::stream::iter(browsers.iter())
        .for_each_concurrent(64, |(i, b)| async move {
            let r = b.viewer_get("/whoami").await;
            assert_eq!(r.status, 200);
            let cookie = r.json()["headers"]["cookie"][0]
                .as_str()
                .unwrap()
                .to_string();
            let vsession = cookie
                .strip_prefix("VSESSION=")
                .expect("only the viewer's cookie");
            let claims = viewer
                .state
                .sessions
                .lock()
                .unwrap()
                .get(vsession)
                .cloned()
                .unwrap();
            assert_eq!(claims["sub"], format!("{}", 500_000 + i), "cross-talk");
        })
        .await;

    // All sign out; each is refused at once.
    futures_util::stream::iter(browsers.iter())
        .for_each_concurrent(64, |(_, b)| async move {
            assert_eq!(b.emr_get("/oscar/logout.jsp").await.status, 302);
            assert_eq!(b.viewer_get("/chart").await.status, 401);
        })
        .await;
    assert_eq!(clinic.viewer.logouts().len(), 1000);
    let (_, metrics) = clinic.gate.admin_get("/metrics").await;
    assert!(metrics.contains("ehrgate_sessions{kind=\"ehr\"} 0"));
    assert!(metrics.contains("ehrgate_sessions{kind=\"emr\"} 0"));
}
