//! Reload without a restart (DESIGN §10): a certificate swapped on disk, SIGHUP with a
//! valid and with a broken file, live connections across a reload, and the signing-key
//! rotation walked through with a verifier that caches the JWKS.

use std::time::{Duration, Instant};

use ehrgate::body::Body;
use ehrgate::config::Config;
use ehrgate::tls::dev::{generate_signing_key_pem, DevPki};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio_tungstenite::tungstenite::Message;

use crate::support::client::TestClient;
use crate::support::clinic::{next_event, Browser, Clinic, FakeEmr, FakeViewer, DOCTOR};
use crate::support::{Child, Setup, EHR, EMR};

/// Only turns a hang into a failure.
const SOON: Duration = Duration::from_secs(60);
const RIVERSIDE: &str = "2.16.840.1.113883.3.239.9:102";

fn with_riverside(mut s: Setup) -> Setup {
    s.tail.push_str(&format!(
        "\n[[authority]]\nid = \"{RIVERSIDE}\"\nname = \"Riverside Walk-in Clinic\"\n"
    ));
    s
}

/// Waits until `check` holds, polling (a readiness wait).
async fn until<F: std::future::Future<Output = bool>>(what: &str, mut check: impl FnMut() -> F) {
    let deadline = Instant::now() + SOON;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real binary in front of a fake EMR and viewer, with a browser logged in.
async fn child_clinic(setup: impl Fn(Setup) -> Setup) -> (Child, FakeEmr, FakeViewer, Browser) {
    let (emr, viewer) = (FakeEmr::start().await, FakeViewer::start().await);
    let child = Child::start(setup(Setup::new(emr.addr, viewer.addr))).await;
    let jwks = child
        .client()
        .get(EHR, "/.well-known/ehrgate/jwks.json")
        .await
        .json();
    *viewer.state.jwks.lock().unwrap() = Some(jwks);
    let browser = Browser::new(child.client());
    browser.set_cookie(EMR, "JSESSIONID", &emr.login(DOCTOR));
    (child, emr, viewer, browser)
}

fn leaf(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// Replaces a file as certificate tools do: write aside, then rename over it.
fn replace_file(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_certificate_swapped_on_disk_reaches_new_connections_and_spares_open_ones() {
    let (child, _emr, _viewer, browser) = child_clinic(|s| s).await;
    let chart = {
        let r = browser.open_chart("1001", None).await;
        assert_eq!(r.status, 200, "{}", r.text());
        "/chart?patient=1001"
    };
    // A connection opened before the swap, kept alive.
    let mut before = child.client().h1(EHR).await;
    let req = browser
        .request(EHR, "GET", chart)
        .body(Body::empty())
        .unwrap();
    assert_eq!(before.fetch(req).await.status, 200);

    // The renewed certificate, from a new CA, written as a certificate tool does.
    let renewed = DevPki::generate(&[EMR, EHR]).unwrap();
    replace_file(&child.files.cert, &renewed.server_cert_pem);
    replace_file(&child.files.key, &renewed.server_key_pem);
    let both = TestClient::new(
        child.addr,
        &format!("{}{}", child.files.ca_pem, renewed.ca_cert_pem),
    );
    let new_leaf = leaf(&renewed.server_cert_pem);
    until("new connections see the renewed certificate", || {
        let both = both.clone();
        let new_leaf = new_leaf.clone();
        async move {
            let tls = both.tls(EHR, &[b"http/1.1"]).await;
            tls.get_ref().1.peer_certificates().unwrap()[0] == new_leaf
        }
    })
    .await;

    // The connection opened before still works, and the viewer session is still live.
    let req = browser
        .request(EHR, "GET", chart)
        .body(Body::empty())
        .unwrap();
    assert_eq!(before.fetch(req).await.status, 200);
    let again = Browser {
        client: both.clone(),
        cookies: browser.cookies.clone(),
    };
    assert_eq!(again.viewer_get(chart).await.status, 200);
    let (_, metrics) = crate::support::client::plain_get(child.admin, "/metrics").await;
    assert!(
        metrics.contains("ehrgate_config_reload_total{result=\"ok\"} 1")
            || metrics.contains("ehrgate_config_reload_total{result=\"ok\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sighup_applies_a_valid_change_at_once_and_keeps_serving_through_a_broken_one() {
    let (child, emr, viewer, browser) = child_clinic(|s| s).await;
    // Riverside is not an authority yet.
    assert_eq!(browser.launch("1001", Some(RIVERSIDE)).await.status, 400);

    // A second authority, and SIGHUP.
    let config = child.files.path("ehrgate.toml");
    let good = with_riverside(Setup::new(emr.addr, viewer.addr)).toml(
        &child.files,
        "127.0.0.1:0",
        "127.0.0.1:0",
    );
    std::fs::write(&config, &good).unwrap();
    child.signal("HUP");
    until("the new authority launches", || async {
        browser.launch("1002", Some(RIVERSIDE)).await.status == 303
    })
    .await;
    let (status, body) = crate::support::client::plain_get(child.admin, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // A broken file: the running configuration stays, the error is reported.
    std::fs::write(&config, good.replace("[emr]", "[emr]\nno_such_key = 1")).unwrap();
    child.signal("HUP");
    until("the refusal is reported", || async {
        let (status, body) = crate::support::client::plain_get(child.admin, "/readyz").await;
        status == 200 && body.contains("last reload refused") && body.contains("no_such_key")
    })
    .await;
    child.logged(&["reload refused", "no_such_key"]).await;
    // The last good configuration serves: Riverside still opens the viewer.
    assert_eq!(
        browser.open_chart("1001", Some(RIVERSIDE)).await.status,
        200
    );
    assert_eq!(browser.viewer_get("/chart?patient=1001").await.status, 200);
    let (_, metrics) = crate::support::client::plain_get(child.admin, "/metrics").await;
    assert!(
        metrics.contains("ehrgate_config_reload_total{result=\"ok\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ehrgate_config_reload_total{result=\"error\"} 1"),
        "{metrics}"
    );

    // A key that needs a restart is named, not silently ignored.
    std::fs::write(
        &config,
        good.replace("filter = \"warn\"", "filter = \"warn\"\nformat = \"json\""),
    )
    .unwrap();
    child.signal("HUP");
    until("the restart-only key is reported", || async {
        let (_, body) = crate::support::client::plain_get(child.admin, "/readyz").await;
        body.contains("need a restart") && body.contains("log.format")
    })
    .await;
}

#[tokio::test]
async fn a_websocket_and_an_event_stream_survive_a_reload() {
    let clinic = Clinic::start().await;
    let browser = clinic.browser(DOCTOR);
    assert_eq!(browser.open_chart("1001", None).await.status, 200);
    let mut stream = browser.open_events().await;
    let mut ws = browser.open_websocket().await;

    // A reload with another authority and other limits.
    let text = with_riverside(Setup::new(clinic.emr.addr, clinic.viewer.addr))
        .server("idle_timeout = \"61s\"")
        .toml(&clinic.gate.files, "127.0.0.1:0", "127.0.0.1:0");
    let restart = clinic
        .gate
        .running()
        .reload_with(Config::parse(&text).unwrap())
        .await
        .expect("valid reload");
    assert!(restart.is_empty(), "{restart:?}");
    // The new authority works at once (for another clinician: a launch for another
    // authority would end this browser's session, by design).
    let colleague = clinic.browser(DOCTOR);
    assert_eq!(colleague.launch("1002", Some(RIVERSIDE)).await.status, 303);

    // Both are still there, attached to the live session.
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "still here"
    );
    assert_eq!(browser.viewer_get("/chart?patient=1001").await.status, 200);
    assert_eq!(browser.emr_get("/oscar/logout.jsp").await.status, 302);
    let event = next_event(&mut stream, SOON).await;
    assert!(event.starts_with("event: logout"), "{event:?}");
    let end = tokio::time::timeout(SOON, ws.next()).await.unwrap();
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
}

/// The README's rotation procedure, with a viewer that caches the JWKS for its
/// `Cache-Control` max-age (time simulated: the cache is refreshed when a max-age has
/// passed). Not one assertion fails to verify at any step.
#[tokio::test]
async fn signing_key_rotation_never_fails_a_caching_verifier() {
    let clinic = Clinic::start().await;
    let files = &clinic.gate.files;
    let old_key = files.signing_key.clone();
    let new_key = files.path("signing-2.pem");
    std::fs::write(&new_key, generate_signing_key_pem().unwrap()).unwrap();
    let keys = |list: &[&std::path::Path]| {
        let list: Vec<String> = list
            .iter()
            .map(|p| format!("{:?}", p.display().to_string()))
            .collect();
        let text = Setup::new(clinic.emr.addr, clinic.viewer.addr).toml(
            files,
            "127.0.0.1:0",
            "127.0.0.1:0",
        );
        let one = format!("signing_key = {:?}", old_key.display().to_string());
        Config::parse(&text.replace(&one, &format!("signing_key = [{}]", list.join(", ")))).unwrap()
    };
    let fetch = || async {
        let r = clinic
            .gate
            .client()
            .get(EHR, "/.well-known/ehrgate/jwks.json")
            .await;
        let max_age: u64 = r
            .header("cache-control")
            .and_then(|v| v.split("max-age=").nth(1))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
            .expect("a max-age");
        (r.json(), max_age)
    };
    // The verifier's cache: what it fetched, and when (simulated seconds).
    let (jwks, max_age) = fetch().await;
    assert!(max_age >= 60, "a JWKS cache lifetime: {max_age}");
    *clinic.viewer.state.jwks.lock().unwrap() = Some(jwks);
    let browser = clinic.browser(DOCTOR);
    let mut opened = 0;
    let mut open = || {
        opened += 1;
        let b = &browser;
        async move {
            let r = b.open_chart("1001", None).await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
    };
    let kids = |jwks: &serde_json::Value| -> Vec<String> {
        jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_string())
            .collect()
    };
    open().await;

    // 1. Publish the new key second; the old one still signs. The cache is not renewed
    //    yet: it knows only the old key, which is what signs.
    let running = clinic.gate.running();
    running
        .reload_with(keys(&[&old_key, &new_key]))
        .await
        .unwrap();
    open().await;
    // Wait one max-age: the verifier refreshes and now knows both.
    let (jwks, _) = fetch().await;
    assert_eq!(kids(&jwks).len(), 2);
    *clinic.viewer.state.jwks.lock().unwrap() = Some(jwks);
    open().await;

    // 2. Move the new key first: it signs, and the verifier already knows it.
    running
        .reload_with(keys(&[&new_key, &old_key]))
        .await
        .unwrap();
    open().await;
    // 3. After one assertion lifetime, remove the old key; the cache still has both,
    //    then refreshes to the new one alone.
    running.reload_with(keys(&[&new_key])).await.unwrap();
    open().await;
    let (jwks, _) = fetch().await;
    assert_eq!(kids(&jwks).len(), 1);
    *clinic.viewer.state.jwks.lock().unwrap() = Some(jwks);
    open().await;

    assert_eq!(
        clinic
            .viewer
            .state
            .refused_launches
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the verifier never failed"
    );
    assert_eq!(clinic.viewer.launches().len(), opened);

    // The step the procedure forbids — moving a key first before verifiers have seen
    // it — is what fails: proof the test could.
    let third = files.path("signing-3.pem");
    std::fs::write(&third, generate_signing_key_pem().unwrap()).unwrap();
    running
        .reload_with(keys(&[&third, &new_key]))
        .await
        .unwrap();
    let launch = browser.launch("1001", None).await;
    let entered = browser.enter(&launch).await;
    assert_eq!(
        entered.status, 401,
        "an unknown kid is refused by the viewer"
    );
}

/// A token written to `admin.token_file` (a rotation by the IT staff) is in force at the
/// next admin action, and the token it replaced is refused: the file is watched.
#[tokio::test]
async fn a_new_admin_token_file_takes_effect_without_a_restart() {
    use crate::support::client::plain_request_with;
    const OLD: &str = "b2xkLWFkbWluLXRva2VuLWZvci10ZXN0cw";
    const NEW: &str = "bmV3LWFkbWluLXRva2VuLWZvci10ZXN0cw";
    let (child, _emr, _viewer, _browser) = child_clinic(|s| s).await;
    let token_file = child.files.path("admin-token");
    std::fs::write(&token_file, format!("alice:{OLD}\n")).unwrap();
    // The configuration names the token file from now on: SIGHUP.
    let config = child.files.path("ehrgate.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!(
            "{text}\n[admin]\ntoken_file = {:?}\n",
            token_file.display().to_string()
        ),
    )
    .unwrap();
    child.signal("HUP");
    let path = "/admin/logout?user=nobody";
    let with = |token: &'static str| {
        let bearer = format!("Bearer {token}");
        let admin = child.admin;
        async move {
            plain_request_with(admin, "POST", path, &[("authorization", &bearer)])
                .await
                .status
        }
    };
    until("the token file is in force", || async {
        plain_request_with(child.admin, "POST", path, &[])
            .await
            .status
            == 401
    })
    .await;
    assert_eq!(with(OLD).await, 200);
    // The IT staff rotate the token: the watcher reloads it.
    replace_file(&token_file, &format!("alice:{NEW}\n"));
    until("the new token is in force", || async {
        with(NEW).await == 200
    })
    .await;
    assert_eq!(with(OLD).await, 401, "the replaced token is refused");
}

/// A Kubernetes secret is updated by swapping a `..data` symlink: the certificate's own
/// path never changes. The watcher sees it anyway.
#[tokio::test]
async fn a_certificate_swapped_by_symlink_as_kubernetes_does_is_seen() {
    use std::os::unix::fs::symlink;
    let pki = DevPki::generate(&[EMR, EHR]).unwrap();
    let secret = tempfile::tempdir().unwrap();
    let d = secret.path();
    let version = |name: &str, cert: &str, key: &str| {
        let v = d.join(name);
        std::fs::create_dir(&v).unwrap();
        std::fs::write(v.join("tls.crt"), cert).unwrap();
        std::fs::write(v.join("tls.key"), key).unwrap();
    };
    version(
        "..2026_11_29_first",
        &pki.server_cert_pem,
        &pki.server_key_pem,
    );
    symlink("..2026_11_29_first", d.join("..data")).unwrap();
    symlink("..data/tls.crt", d.join("tls.crt")).unwrap();
    symlink("..data/tls.key", d.join("tls.key")).unwrap();
    let (cert, key) = (d.join("tls.crt"), d.join("tls.key"));
    let (emr, viewer) = (FakeEmr::start().await, FakeViewer::start().await);
    let mut setup = Setup::new(emr.addr, viewer.addr);
    setup.tls_files = Some((cert.clone(), key.clone()));
    let child = Child::start(setup).await;
    // Served from the secret from the start.
    let first = TestClient::new(child.addr, &pki.ca_cert_pem);
    assert_eq!(first.get(EMR, "/oscar/index.jsp").await.status, 200);

    // The update: a new version directory, then one atomic rename of `..data`.
    let renewed = DevPki::generate(&[EMR, EHR]).unwrap();
    version(
        "..2026_11_30_second",
        &renewed.server_cert_pem,
        &renewed.server_key_pem,
    );
    symlink("..2026_11_30_second", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    let second = TestClient::new(child.addr, &renewed.ca_cert_pem);
    let new_leaf = leaf(&renewed.server_cert_pem);
    until("the swapped secret is served", || {
        let second = second.clone();
        let new_leaf = new_leaf.clone();
        async move {
            match second
                .tls_with(EHR, second.config(&[b"http/1.1"], rustls::DEFAULT_VERSIONS))
                .await
            {
                Ok(tls) => tls.get_ref().1.peer_certificates().unwrap()[0] == new_leaf,
                Err(_) => false,
            }
        }
    })
    .await;
}
