//! Several replicas on one real Redis (DESIGN §9): the whole flow with requests spread
//! over replicas, sign-out anywhere seen everywhere with no window, tickets single-use
//! across replicas, live connections closed on every replica, nothing readable at rest,
//! and an outage that fails closed and recovers by itself.

use std::time::{Duration, Instant};

use ehrgate::body::Body;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::clinic::{next_event, path_of, Browser, DOCTOR, PATIENTS};
use crate::support::clinic::{FakeEmr, FakeViewer};
use crate::support::redis::Redis;
use crate::support::replicas::Replicas;
use crate::support::{Child, Setup, EHR, EMR};

/// Only turns a hang into a failure: generous, so a loaded machine never trips it.
const SOON: Duration = Duration::from_secs(60);

/// Launch on `a`, the binding round trip over `b` (enter), `c` (confirm) and `a` (enter
/// again); returns the viewer chart's path.
async fn enter_spread(r: &Replicas, browser: &Browser, a: usize, b: usize, c: usize) -> String {
    let launch = r.via(browser, a).launch("1001", None).await;
    assert_eq!(launch.status, 303, "{}", launch.text());
    let first = r.via(browser, b).viewer_get(path_of(&launch)).await;
    assert_eq!(first.status, 303, "{}", first.text());
    let confirmed = r.via(browser, c).get(EMR, path_of(&first)).await;
    assert_eq!(confirmed.status, 303, "{}", confirmed.text());
    let entered = r.via(browser, a).viewer_get(path_of(&confirmed)).await;
    assert_eq!(entered.status, 302, "{}", entered.text());
    entered.header("location").unwrap().to_string()
}

#[tokio::test]
async fn the_whole_flow_spread_over_three_replicas_and_sign_out_seen_by_all() {
    let r = Replicas::start(3).await;
    let browser = r.browser(DOCTOR);
    let status = r.via(&browser, 2).emr_get("/.ehrgate/status").await.json();
    assert_eq!(status["connected"], false);

    let chart = enter_spread(&r, &browser, 0, 1, 2).await;
    // The viewer's login cookie was captured by replica 0 and is used by 1 and 2.
    for i in [1, 2, 0, 2, 1] {
        let page = r.via(&browser, i).viewer_get(&chart).await;
        assert_eq!(page.status, 200, "replica {i}: {}", page.text());
    }
    assert!(
        browser.cookie(EHR, "VSESSION").is_none(),
        "vault: never in the browser"
    );
    let status = r.via(&browser, 1).emr_get("/.ehrgate/status").await.json();
    assert_eq!(status["connected"], true);

    // EHR again from another chart, on another replica: no new viewer login.
    let chart = enter_spread(&r, &browser, 2, 0, 1).await;
    assert_eq!(r.viewer.launches().len(), 2);
    assert!(r.viewer.launches()[1].1, "the viewer login was kept");

    // The override, observed on replica 1, is audited.
    let form = r
        .via(&browser, 1)
        .request(EHR, "POST", "/override")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::full("reason=Covering+for+Dr+Smith"))
        .unwrap();
    r.via(&browser, 1).send(EHR, form).await;
    assert_eq!(
        r.audit_events("override")[0]["reason"],
        "Covering for Dr Smith"
    );

    // EMR logout on replica 0: the very next request on 1 and on 2 is refused.
    assert_eq!(
        r.via(&browser, 0).emr_get("/oscar/logout.jsp").await.status,
        302
    );
    for i in [1, 2] {
        let page = r.via(&browser, i).viewer_get(&chart).await;
        assert_eq!(
            page.status,
            401,
            "replica {i} after sign-out: {}",
            page.text()
        );
    }
    let logouts = r.viewer.logouts();
    assert_eq!(logouts.len(), 1, "the viewer is signed out once");
    assert!(logouts[0].as_deref().unwrap().contains("VSESSION="));
    assert_eq!(r.audit_events("emr_logout").len(), 1);
    assert_eq!(r.audit_events("ehr_logout").len(), 1);
}

#[tokio::test]
async fn disconnect_admin_sign_out_and_authority_change_are_seen_by_every_replica() {
    let riverside = "2.16.840.1.113883.3.239.9:102";
    let r = Replicas::start_with(2, |mut s| {
        s.tail.push_str(&format!(
            "\n[[authority]]\nid = \"{riverside}\"\nname = \"Riverside Walk-in Clinic\"\n"
        ));
        s
    })
    .await;
    let browser = r.browser(DOCTOR);

    // Disconnect on 0, refused on 1.
    let chart = enter_spread(&r, &browser, 0, 1, 0).await;
    assert_eq!(r.via(&browser, 1).viewer_get(&chart).await.status, 200);
    assert_eq!(
        r.via(&browser, 0)
            .emr_post("/.ehrgate/disconnect")
            .await
            .status,
        200
    );
    assert_eq!(r.via(&browser, 1).viewer_get(&chart).await.status, 401);

    // An authority change on 1 ends the session entered on 0, for replica 0 too.
    let chart = enter_spread(&r, &browser, 0, 0, 0).await;
    let old = browser.cookie(EHR, "__Host-ehrgate").unwrap();
    let launch = r.via(&browser, 1).launch("1001", Some(riverside)).await;
    assert_eq!(launch.status, 303);
    let stale = r
        .via(&browser, 0)
        .request(EHR, "GET", &chart)
        .header("cookie", format!("__Host-ehrgate={old}"))
        .body(Body::empty())
        .unwrap();
    assert_eq!(r.via(&browser, 0).send(EHR, stale).await.status, 401);

    // Admin sign-out through replica 1's admin listener; refused on 0.
    let chart = enter_spread(&r, &browser, 0, 1, 0).await;
    let resp = crate::support::client::plain_request(
        r.gates[1].admin,
        "POST",
        &format!("/admin/logout?user={DOCTOR}"),
    )
    .await;
    let body = resp.text();
    assert_eq!(resp.status, 200, "{body}");
    assert!(body.contains("\"signed_out\":1"), "{body}");
    assert_eq!(r.via(&browser, 0).viewer_get(&chart).await.status, 401);
}

#[tokio::test]
async fn a_ticket_redeemed_on_two_replicas_at_once_opens_exactly_one_session() {
    let r = Replicas::start(3).await;
    for round in 0..5 {
        let browser = r.browser(DOCTOR);
        let launch = r.via(&browser, 0).launch("1001", None).await;
        let first = r.via(&browser, 1).viewer_get(path_of(&launch)).await;
        let confirmed = r.via(&browser, 2).get(EMR, path_of(&first)).await;
        assert_eq!(confirmed.status, 303);
        let enter = path_of(&confirmed).to_string();
        let (a, b) = (r.via(&browser, 1), r.via(&browser, 2));
        let (x, y) = tokio::join!(a.viewer_get(&enter), b.viewer_get(&enter));
        let mut statuses = [x.status.as_u16(), y.status.as_u16()];
        statuses.sort();
        assert_eq!(
            statuses,
            [302, 410],
            "round {round}: exactly one redemption wins"
        );
    }
    assert_eq!(r.viewer.launches().len(), 5);
}

#[tokio::test]
async fn event_streams_and_websockets_on_other_replicas_close_at_sign_out() {
    let r = Replicas::start(3).await;
    let browser = r.browser(DOCTOR);
    enter_spread(&r, &browser, 0, 0, 0).await;

    // An event stream through replica 1, a WebSocket through replica 2.
    let mut stream = r.via(&browser, 1).open_events().await;
    let mut ws = r.via(&browser, 2).open_websocket().await;
    ws.send(Message::text("ping")).await.unwrap();
    assert!(matches!(ws.next().await, Some(Ok(Message::Text(_)))));

    // Sign-out on replica 0.
    let signed_out = Instant::now();
    assert_eq!(
        r.via(&browser, 0).emr_get("/oscar/logout.jsp").await.status,
        302
    );
    let event = next_event(&mut stream, SOON).await;
    assert!(event.starts_with("event: logout"), "{event:?}");
    let end = tokio::time::timeout(SOON, ws.next())
        .await
        .expect("WebSocket closed in time");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    // Measured, not asserted tightly: the bench reports the distribution.
    eprintln!(
        "sign-out on replica 0 reached replicas 1 and 2 in {:?}",
        signed_out.elapsed()
    );
}

#[tokio::test]
async fn redis_holds_no_cookie_value_hcn_or_name() {
    let r = Replicas::start(2).await;
    let browser = r.browser(DOCTOR);
    let chart = enter_spread(&r, &browser, 0, 1, 0).await;
    let page = r.via(&browser, 1).viewer_get(&chart).await;
    assert_eq!(page.status, 200);
    // The viewer's own session cookie, as its page shows it.
    let vsession = page
        .text()
        .split("<p id=v>")
        .nth(1)
        .and_then(|s| s.split('<').next())
        .unwrap()
        .to_string();
    // A launch whose ticket is never redeemed stays in the store with its patient.
    let pending = r.via(&browser, 0).launch("1002", None).await;
    assert_eq!(pending.status, 303);

    let secrets = [
        ("the viewer's cookie", vsession),
        (
            "the EMR session cookie",
            browser.cookie(EMR, "JSESSIONID").unwrap(),
        ),
        (
            "ehrgate's session cookie",
            browser.cookie(EHR, "__Host-ehrgate").unwrap(),
        ),
        (
            "the EMR marker",
            browser.cookie(EMR, "__Host-ehrgate-emr").unwrap(),
        ),
        ("an HCN", PATIENTS[0].1.to_string()),
        ("an HCN", PATIENTS[1].1.to_string()),
        ("a family name", "Testpatient".to_string()),
        ("a given name", "Alice".to_string()),
        ("a birth date", "1970-01-31".to_string()),
    ];
    let dump = r.redis.dump();
    assert!(
        dump.len() > 5,
        "the store holds the sessions: {}",
        dump.len()
    );
    for (key, values) in &dump {
        for (what, secret) in &secrets {
            let s = secret.as_bytes();
            let found = |b: &[u8]| b.windows(s.len()).any(|w| w == s);
            assert!(
                !found(key),
                "{what} in a key: {}",
                String::from_utf8_lossy(key)
            );
            for v in values {
                assert!(
                    !found(v),
                    "{what} in the value of {}",
                    String::from_utf8_lossy(key)
                );
            }
        }
    }
}

#[tokio::test]
async fn with_redis_down_ehr_access_fails_closed_and_resumes_without_a_restart() {
    let mut r = Replicas::start(2).await;
    let browser = r.browser(DOCTOR);
    let chart = enter_spread(&r, &browser, 0, 1, 0).await;
    assert_eq!(r.admin_get(1, "/readyz").await.0, 200);

    r.redis.stop();
    // The viewer: 503 with a clear page, nothing forwarded, the refusal audited.
    let page = r.via(&browser, 1).viewer_get(&chart).await;
    assert_eq!(page.status, 503, "{}", page.text());
    assert!(
        page.text().contains("Sessions are unavailable"),
        "{}",
        page.text()
    );
    assert!(r.audit_events("deny").iter().any(|d| d["detail"]
        .as_str()
        .unwrap()
        .contains("session store unavailable")));
    // A launch: 503, audited as a refused launch.
    let launch = r.via(&browser, 0).launch("1001", None).await;
    assert_eq!(launch.status, 503, "{}", launch.text());
    // The EMR still works.
    let emr = r
        .via(&browser, 0)
        .emr_get("/oscar/provider/appointments")
        .await;
    assert_eq!(emr.status, 200, "{}", emr.text());
    // Disconnect cannot be recorded: the clinician is told so, not "disconnected".
    let disconnect = r.via(&browser, 1).emr_post("/.ehrgate/disconnect").await;
    assert_eq!(disconnect.status, 503, "{}", disconnect.text());
    // Readiness says why; the metric counts it.
    let (status, body) = r.admin_get(1, "/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("session store"), "{body}");
    let (_, metrics) = r.admin_get(1, "/metrics").await;
    let errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ehrgate_store_errors_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(errors > 0, "{metrics}");

    // Back: the same session works again on both replicas, without a restart (the
    // Disconnect was refused, not taken: the clinician was told to try again).
    r.redis.restart();
    let back = Instant::now();
    for i in [1, 0] {
        let deadline = Instant::now() + SOON;
        loop {
            let page = r.via(&browser, i).viewer_get(&chart).await;
            if page.status == 200 {
                break;
            }
            assert_eq!(page.status, 503, "{}", page.text());
            assert!(Instant::now() < deadline, "replica {i} never resumed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!(
        "both replicas served again {:?} after Redis came back",
        back.elapsed()
    );
    // And new launches work again.
    let chart = enter_spread(&r, &browser, 0, 1, 0).await;
    assert_eq!(r.via(&browser, 1).viewer_get(&chart).await.status, 200);
    let deadline = Instant::now() + SOON;
    while r.admin_get(1, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "readiness never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_logout_seen_while_redis_is_down_ends_the_session_when_it_is_back() {
    let mut r = Replicas::start(2).await;
    let browser = r.browser(DOCTOR);
    let chart = enter_spread(&r, &browser, 0, 0, 0).await;

    r.redis.stop();
    // The EMR logs the clinician out; ehrgate cannot record it yet.
    assert_eq!(
        r.via(&browser, 0).emr_get("/oscar/logout.jsp").await.status,
        302
    );
    r.redis.restart();
    // Replica 0 lands the sign-out as soon as it reaches Redis again: from then on no
    // replica lets the session through (503 while it reconnects, then 401).
    let deadline = Instant::now() + SOON;
    loop {
        let page = r.via(&browser, 0).viewer_get(&chart).await;
        if page.status == 401 {
            break;
        }
        assert_eq!(
            page.status,
            503,
            "never a 200 after the logout: {}",
            page.text()
        );
        assert!(Instant::now() < deadline, "the sign-out never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(r.via(&browser, 1).viewer_get(&chart).await.status, 401);
    // The viewer's logout call follows the removal (by a request or by the sweeper).
    let deadline = Instant::now() + SOON;
    while r.viewer.logouts().is_empty() {
        assert!(Instant::now() < deadline, "the viewer was never signed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.viewer.logouts().len(), 1);
}

#[tokio::test]
async fn a_tls_redis_with_a_private_ca_and_a_password_serves_the_flow() {
    let redis = Redis::start_with(Some("pw-a8f3c2e9d1"), true);
    assert!(redis.url().starts_with("rediss://"));
    let r = Replicas::start_on(redis, 2, |s| s).await;
    let browser = r.browser(DOCTOR);
    let chart = enter_spread(&r, &browser, 0, 1, 0).await;
    assert_eq!(r.via(&browser, 1).viewer_get(&chart).await.status, 200);
    assert_eq!(
        r.via(&browser, 1).emr_get("/oscar/logout.jsp").await.status,
        302
    );
    assert_eq!(r.via(&browser, 0).viewer_get(&chart).await.status, 401);
}

#[tokio::test]
async fn the_redis_password_never_reaches_the_log() {
    const PASSWORD: &str = "pw-4b7e1f0c93";
    let mut redis = Redis::start_with(Some(PASSWORD), false);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("store.key");
    std::fs::write(&key, [9u8; 32]).unwrap();
    let (emr, viewer) = (FakeEmr::start().await, FakeViewer::start().await);
    let child = Child::start(Setup::new(emr.addr, viewer.addr).session(&format!(
        "store = \"redis\"\nredis_url = \"{}\"\nstore_key = {:?}",
        redis.url(),
        key.display().to_string()
    )))
    .await;
    redis.stop();
    // A viewer request needs the store: refused, and the failure is logged.
    let req = http::Request::get("/chart")
        .header("host", format!("{EHR}:{}", child.addr.port()))
        .header(
            "cookie",
            "__Host-ehrgate=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .body(Body::empty())
        .unwrap();
    let resp = child.client().h1(EHR).await.fetch(req).await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    child.logged(&["session store"]).await;
    for line in child.logs() {
        assert!(!line.contains(PASSWORD), "the password was logged: {line}");
    }
}

#[tokio::test]
async fn an_emr_record_that_expired_first_still_ends_its_ehr_session_at_logout() {
    let r = Replicas::start(2).await;
    let browser = r.browser(DOCTOR);
    let chart = enter_spread(&r, &browser, 0, 1, 0).await;
    // The EMR session's record expires (its TTL ran out while no sweeper ran).
    let mut conn = r.redis.conn();
    let keys: Vec<String> = redis::cmd("KEYS").arg("test:e:*").query(&mut conn).unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = redis::cmd("DEL").arg(&keys[0]).query(&mut conn).unwrap();
    // The EMR logout still ends the EHR session, with its effects, before it answers.
    assert_eq!(
        r.via(&browser, 1).emr_get("/oscar/logout.jsp").await.status,
        302
    );
    assert_eq!(
        r.viewer.logouts().len(),
        1,
        "viewer signed out at the logout"
    );
    assert_eq!(r.via(&browser, 0).viewer_get(&chart).await.status, 401);
}

#[tokio::test]
async fn a_sign_out_published_while_a_replica_was_unsubscribed_still_closes_its_tabs() {
    // Limits long enough that the regular sweep comes only every 30 s: what closes the
    // tab here is the re-check on subscribing again.
    let r = Replicas::start_with(2, |s| s.session("ticket_ttl = \"600s\"")).await;
    let browser = r.browser(DOCTOR);
    enter_spread(&r, &browser, 0, 0, 0).await;
    let mut stream = r.via(&browser, 1).open_events().await;

    // Every subscription is cut (a network blip, a failover); the sign-out on replica 0
    // is published before replica 1 has subscribed again, so its message is lost there.
    let mut conn = r.redis.conn();
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut conn)
        .unwrap();
    assert_eq!(killed, 2, "one subscription per replica");
    let logout = r.via(&browser, 0).emr_get("/oscar/logout.jsp").await;
    assert_eq!(logout.status, 302);

    // Replica 1 re-checks what it holds once it is subscribed again (within a second
    // or so): well before its next regular sweep (30 s here).
    let event = next_event(&mut stream, Duration::from_secs(25)).await;
    assert!(event.starts_with("event: logout"), "{event:?}");
}

/// Launches and sign-outs of many clinicians at once, each on a different replica: the
/// store stays consistent (no marker, id, user-index entry or EHR session left pointing
/// at an EMR session that is gone).
#[tokio::test]
async fn concurrent_launches_and_sign_outs_on_different_replicas_leave_the_store_consistent() {
    let r = Replicas::start(3).await;
    let browsers: Vec<Browser> = (0..12).map(|_| r.browser(DOCTOR)).collect();
    let rounds = browsers.iter().enumerate().map(|(i, b)| {
        let r = &r;
        async move {
            let chart = enter_spread(r, b, i % 3, (i + 1) % 3, (i + 2) % 3).await;
            // A new launch on one replica races the logout on another.
            let (x, y) = (r.via(b, (i + 1) % 3), r.via(b, (i + 2) % 3));
            let (launch, logout) =
                tokio::join!(x.launch("1001", None), y.emr_get("/oscar/logout.jsp"));
            assert_eq!(logout.status, 302);
            assert!(
                matches!(launch.status.as_u16(), 303 | 401),
                "{}",
                launch.status
            );
            assert_eq!(r.via(b, i % 3).viewer_get(&chart).await.status, 401);
        }
    });
    futures_util::future::join_all(rounds).await;

    let dump = r.redis.dump();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let exists = |key: &str| dump.iter().any(|(k, _)| text(k) == key);
    for (k, values) in &dump {
        let k = text(k);
        if k.starts_with("test:m:") {
            let e = text(&values[0]);
            assert!(
                exists(&format!("test:e:{e}")),
                "marker {k} → gone EMR session"
            );
        } else if k.starts_with("test:x:") {
            let e = text(&values[0]);
            assert!(exists(&format!("test:h:{e}")), "id {k} → gone EHR session");
        } else if let Some(e) = k.strip_prefix("test:h:") {
            assert!(
                exists(&format!("test:e:{e}")),
                "EHR session {k} of a gone EMR session"
            );
        } else if k.starts_with("test:u:") {
            for e in values {
                assert!(
                    exists(&format!("test:e:{}", text(e))),
                    "user index {k} → gone"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_idle_sweep_on_any_replica_is_seen_by_every_replica() {
    let r = Replicas::start_with(2, |s| s.emr("idle_timeout = \"2s\"")).await;
    let browser = r.browser(DOCTOR);
    let chart = enter_spread(&r, &browser, 0, 1, 0).await;
    let mut stream = r.via(&browser, 1).open_events().await;
    // Nobody uses the EMR: a sweeper, on whichever replica, ends the session with its
    // effects (the viewer signed out, the tab told), with no request to trigger it.
    let event = next_event(&mut stream, SOON).await;
    assert!(event.starts_with("event: logout"), "{event:?}");
    for i in [0, 1] {
        assert_eq!(r.via(&browser, i).viewer_get(&chart).await.status, 401);
    }
    // The viewer's logout call and the record follow the message (waited for).
    let deadline = Instant::now() + SOON;
    while r.audit_events("emr_logout").is_empty() {
        assert!(Instant::now() < deadline, "no emr_logout record");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(r.viewer.logouts().len(), 1);
    let logouts = r.audit_events("emr_logout");
    assert_eq!(logouts.len(), 1, "ended once, by one replica");
    assert!(
        logouts[0]["detail"].as_str().unwrap().contains("idle"),
        "{:?}",
        logouts[0]
    );
}
