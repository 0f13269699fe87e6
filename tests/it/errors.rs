//! Refusals and failures: wrong hosts, old TLS, broken and slow upstreams, and the limits
//! that protect the proxy from slow or greedy clients. Each ends in a clear answer or a
//! closed connection, never a hang.

use std::time::Duration;

use ehrgate::body::Body;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::client::H1;
use crate::support::pki::{ClinicCa, Name, TestCa, LOOPBACK};
use crate::support::upstream::{self, Echo};
use crate::support::{Child, Gate, Setup, EHR, EMR};

/// Generous upper bound for things that must happen "soon"; tests wait on events, and
/// this only turns a hang into a failure.
/// Only turns a hang into a failure: generous, so a loaded machine never trips it.
const SOON: Duration = Duration::from_secs(60);

async fn echo_gate(server: &str) -> (Gate, Echo) {
    let echo = Echo::start("any").await;
    let gate = Gate::start(Setup::new(echo.addr, echo.addr).server(server)).await;
    (gate, echo)
}

#[tokio::test]
async fn unknown_host_is_misdirected() {
    let (gate, echo) = echo_gate("").await;
    // Connected by IP address: no SNI, routed by Host alone.
    let tls = gate.client().tls("127.0.0.1", &[b"http/1.1"]).await;
    let mut c = H1::handshake(tls).await;
    let r = c.get("other.example", "/").await;
    assert_eq!(r.status, 421);
    assert!(r.text().contains("Misdirected request"));
    let r = c.get(EMR, "/ok").await;
    assert_eq!(r.status, 200, "no SNI: the Host decides");
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn sni_and_host_must_agree() {
    let (gate, echo) = echo_gate("").await;
    let mut c = gate.client().h1(EMR).await;
    let r = c.get(EHR, "/").await;
    assert_eq!(r.status, 421);
    let mut c = gate.client().h2(EMR).await;
    let r = c.get(EHR, "/").await;
    assert_eq!(r.status, 421);
    let r = c.get(EMR, "/").await;
    assert_eq!(r.status, 200);
    assert_eq!(echo.hits(), 1);
}

#[tokio::test]
async fn tls_1_1_is_refused_and_1_2_accepted() {
    let (gate, _echo) = echo_gate("").await;
    // A TLS 1.1 ClientHello (no supported_versions extension).
    let mut hello = vec![0x03, 0x02];
    hello.extend([7u8; 32]);
    hello.push(0); // session id
    hello.extend([0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // two CBC suites
    hello.extend([0x01, 0x00]); // null compression
    let sni = b"emr.localhost";
    let mut ext = vec![0x00, 0x00]; // server_name
    let list_len = sni.len() + 3;
    ext.extend([
        0,
        (list_len + 2) as u8,
        0,
        list_len as u8,
        0,
        0,
        sni.len() as u8,
    ]);
    ext.extend(sni);
    ext.extend([0x00, 0x0a, 0, 4, 0, 2, 0x00, 0x17]); // supported_groups: secp256r1
    ext.extend([0x00, 0x0b, 0, 2, 1, 0]); // ec_point_formats: uncompressed
    hello.extend([(ext.len() >> 8) as u8, ext.len() as u8]);
    hello.extend(ext);
    let mut handshake = vec![0x01, 0, (hello.len() >> 8) as u8, hello.len() as u8];
    handshake.extend(hello);
    let mut record = vec![
        0x16,
        0x03,
        0x01,
        (handshake.len() >> 8) as u8,
        handshake.len() as u8,
    ];
    record.extend(handshake);

    let mut tcp = TcpStream::connect(gate.addr).await.unwrap();
    tcp.write_all(&record).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(SOON, tcp.read_to_end(&mut answer))
        .await
        .expect("server answers")
        .ok();
    assert!(!answer.is_empty(), "expected an alert");
    assert_eq!(
        answer[0], 0x15,
        "an alert record, not a ServerHello: {answer:?}"
    );
    assert_eq!(answer.get(5), Some(&2), "a fatal alert: {answer:?}");
    // protocol_version, or handshake_failure where no TLS 1.2+ parameters match.
    assert!(matches!(answer.get(6), Some(70 | 40)), "alert: {answer:?}");

    let client = gate.client();
    let config = client.config(&[b"http/1.1"], &[&rustls::version::TLS12]);
    let tls = client
        .tls_with(EMR, config)
        .await
        .expect("TLS 1.2 accepted");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test]
async fn refused_upstream_is_502_with_a_clear_page() {
    let dead = upstream::closed_port().await;
    let gate = Gate::start(Setup::new(dead, dead)).await;
    let mut c = gate.client().h1(EMR).await;
    let r = c.get(EMR, "/oscar/").await;
    assert_eq!(r.status, 502);
    let rid = r.header("x-request-id").unwrap().to_string();
    let page = r.text();
    assert!(page.contains("could not reach the EMR"), "{page}");
    assert!(page.contains(&rid));

    let req = H1::request(EMR, "/oscar/")
        .header("accept", "application/json")
        .body(Body::empty())
        .unwrap();
    let v = c.fetch(req).await.json();
    assert_eq!(v["status"], 502);
    assert_eq!(v["error"], "upstream_unreachable");
    let (_, metrics) = gate.admin_get("/metrics").await;
    assert!(
        metrics.contains("ehrgate_upstream_errors_total{origin=\"emr\",kind=\"connect\"} 2"),
        "{metrics}"
    );
}

/// ehrgate (the real binary, to read its log) in front of `echo` over HTTPS, verified
/// against `ca` or, without one, the system's roots. The EMR host is used: it forwards
/// without a session.
async fn https_gate(echo: &Echo, ca: Option<&str>) -> Child {
    let mut setup = Setup::new(echo.addr, echo.addr);
    if let Some(ca) = ca {
        setup = setup.emr(&format!("upstream_ca = {ca:?}"));
    }
    setup.emr_upstream = format!("https://{}", echo.addr);
    setup.ehr_upstream = format!("https://{}", echo.addr);
    Child::start(setup).await
}

#[tokio::test]
async fn an_upstream_certificate_no_configured_ca_vouches_for_is_refused() {
    let trusted = TestCa::new("the clinic's CA");
    let stranger = TestCa::new("someone else's CA");
    let echo = Echo::start_tls("any", stranger.server(&[LOOPBACK])).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = trusted.write(dir.path(), "ca.pem");
    // A private CA that is not the upstream's, then the system's roots.
    for gate in [
        https_gate(&echo, Some(&ca)).await,
        https_gate(&echo, None).await,
    ] {
        let mut c = gate.client().h1(EMR).await;
        let r = c.get(EMR, "/oscar/index.jsp").await;
        assert_eq!(r.status, 502, "{}", r.text());
        let page = r.text();
        assert!(
            page.contains("refused the TLS certificate of the EMR")
                && page.contains("no configured CA vouches for it"),
            "{page}"
        );
        let req = H1::request(EMR, "/oscar/index.jsp")
            .header("accept", "application/json")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            c.fetch(req).await.json()["error"],
            "upstream_certificate_refused"
        );
        gate.logged(&[
            "upstream failed",
            "upstream_certificate_refused",
            "UnknownIssuer",
        ])
        .await;
    }
    assert_eq!(
        echo.hits(),
        0,
        "nothing reached an upstream it could not verify"
    );
}

#[tokio::test]
async fn an_upstream_certificate_for_another_name_is_refused() {
    let ca = TestCa::new("the clinic's CA");
    // Signed by the trusted CA, but for another host than the configured 127.0.0.1.
    let echo = Echo::start_tls("any", ca.server(&[Name::Dns("emr.example")])).await;
    let dir = tempfile::tempdir().unwrap();
    let gate = https_gate(&echo, Some(&ca.write(dir.path(), "ca.pem"))).await;
    let r = gate.client().get(EMR, "/oscar/index.jsp").await;
    assert_eq!(r.status, 502);
    assert!(
        r.text()
            .contains("it is not valid for the upstream&#39;s host name"),
        "{}",
        r.text()
    );
    assert_eq!(echo.hits(), 0);
    gate.logged(&[
        "upstream_certificate_refused",
        "certificate not valid for name",
    ])
    .await;
}

#[tokio::test]
async fn an_https_upstream_with_a_private_ca_is_reached_over_kept_connections() {
    let ca = ClinicCa::new();
    let echo = Echo::start_tls("emr", ca.loopback_server()).await;
    let gate = Gate::start(ca.emr_setup(echo.addr, "")).await;
    let mut h1 = gate.client().h1(EMR).await;
    let mut h2 = gate.client().h2(EMR).await;
    for i in 0..3 {
        let r = h1.get(EMR, &format!("/oscar/index.jsp?n={i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["upstream"], "emr");
        assert_eq!(r.json()["query"], format!("n={i}"));
        let r = h2.get(EMR, "/oscar/h2").await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(echo.hits(), 6);
}

#[tokio::test]
async fn silent_upstream_is_504() {
    let silent = upstream::silent().await;
    let gate =
        Gate::start(Setup::new(silent, silent).server("upstream_response_timeout = \"300ms\""))
            .await;
    let r = gate.client().get(EMR, "/chart").await;
    assert_eq!(r.status, 504);
    assert!(r.text().contains("did not answer in time"));
}

#[tokio::test]
async fn connect_method_is_refused() {
    let (gate, echo) = echo_gate("").await;
    let mut c = gate.client().h1(EMR).await;
    let req = Request::connect("emr.localhost:443")
        .header("host", EMR)
        .body(Body::empty())
        .unwrap();
    let r = c.fetch(req).await;
    assert_eq!(r.status, 405);
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn oversized_header_is_431() {
    let (gate, echo) = echo_gate("max_header_bytes = 16384").await;
    let mut c = gate.client().h1(EMR).await;
    let req = H1::request(EMR, "/")
        .header("x-big", "a".repeat(20_000))
        .body(Body::empty())
        .unwrap();
    let r = c.fetch(req).await;
    assert_eq!(r.status, 431);
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn slow_header_client_is_cut_off() {
    let (gate, echo) = echo_gate("header_read_timeout = \"300ms\"").await;
    let mut tls = gate.client().tls(EMR, &[b"http/1.1"]).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: emr.localhost\r\nX-Slow: ")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(SOON, tls.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the connection must be closed, not left hanging"
    );
    let text = String::from_utf8_lossy(&rest);
    assert!(
        rest.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(echo.hits(), 0);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (gate, _echo) = echo_gate("idle_timeout = \"300ms\"").await;
    let mut h2 = gate.client().h2(EMR).await;
    assert_eq!(h2.get(EMR, "/").await.status, 200);
    tokio::time::timeout(SOON, &mut h2.done)
        .await
        .expect("idle HTTP/2 connection closed by the server")
        .unwrap();
    let mut h1 = gate.client().h1(EMR).await;
    assert_eq!(h1.get(EMR, "/").await.status, 200);
    tokio::time::timeout(SOON, &mut h1.done)
        .await
        .expect("idle HTTP/1.1 connection closed by the server")
        .unwrap();
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_accept() {
    let (gate, _echo) = echo_gate("max_connections = 2").await;
    let client = gate.client();
    let mut a = client.h1(EMR).await;
    let mut b = client.h1(EMR).await;
    assert_eq!(a.get(EMR, "/").await.status, 200);
    assert_eq!(b.get(EMR, "/").await.status, 200);
    let third = client
        .tls_with(EMR, client.config(&[b"http/1.1"], rustls::DEFAULT_VERSIONS))
        .await;
    assert!(third.is_err(), "a third connection must not be served");
    let (_, metrics) = gate.admin_get("/metrics").await;
    assert!(
        metrics.contains("ehrgate_connections_rejected_total 1"),
        "{metrics}"
    );

    // Once one closes, its slot is free again.
    drop(a);
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let (_, m) = gate.admin_get("/metrics").await;
        if m.contains("ehrgate_open_connections 1") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection slot never freed: {m}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client.get(EMR, "/").await.status, 200);
}
