//! ehrgate's side of the upstream connections: kept and reused per worker, a kept
//! connection the upstream closed costs no request, HTTP/2 where it is offered.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use ehrgate::body::Body;

use crate::support::client::H1;
use crate::support::pki::ClinicCa;
use crate::support::upstream::{echo, Echo};
use crate::support::{Gate, Setup, EHR, EMR};

/// An echo upstream that counts the connections it accepts.
async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(|req| async move {
                    Ok::<_, std::convert::Infallible>(echo("emr", req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn upstream_connections_are_kept_and_reused() {
    let (addr, accepted) = counting_upstream().await;
    // Connections are kept per worker thread: with one worker, every client connection
    // lands on the same pool.
    let gate = Gate::start(Setup::new(addr, addr).server("workers = 1")).await;
    let mut h1 = gate.client().h1(EMR).await;
    for i in 0..20 {
        let r = h1.get(EMR, &format!("/oscar/index.jsp?n={i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["query"], format!("n={i}"));
    }
    // Bodies of every size end cleanly and give the connection back: empty, small, and
    // one that spans many reads.
    for path in [
        "/download?bytes=0",
        "/download?bytes=10",
        "/download?bytes=300000",
    ] {
        let r = h1.get(EMR, path).await;
        assert_eq!(r.status, 200);
    }
    let mut h2 = gate.client().h2(EMR).await;
    for _ in 0..5 {
        assert_eq!(h2.get(EMR, "/oscar/h2").await.status, 200);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection served every request, one after another"
    );
}

#[tokio::test]
async fn a_kept_connection_the_upstream_closed_costs_no_request() {
    // Answers each request on a connection, then closes it when the test says so (as an
    // upstream's own keep-alive timeout does), without a `Connection: close`.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (close_tx, mut close_rx) = mpsc::unbounded_channel::<()>();
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<()>();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .unwrap();
            close_rx.recv().await;
            drop(tcp);
            closed_tx.send(()).unwrap();
        }
    });
    let gate = Gate::start(Setup::new(addr, addr).server("workers = 1")).await;
    let mut h1 = gate.client().h1(EMR).await;
    let r = h1.get(EMR, "/oscar/a").await;
    assert_eq!((r.status.as_u16(), r.text().as_str()), (200, "ok"));
    close_tx.send(()).unwrap();
    closed_rx.recv().await.unwrap();
    // The kept connection is gone: the request goes out on a new one, never a 502.
    let r = h1.get(EMR, "/oscar/b").await;
    assert_eq!(
        (r.status.as_u16(), r.text().as_str()),
        (200, "ok"),
        "{}",
        r.text()
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    close_tx.send(()).unwrap();
}

#[tokio::test]
async fn http2_to_an_https_upstream_that_offers_it_when_configured() {
    let ca = ClinicCa::new();
    let echo = Echo::start_tls("ehr", ca.loopback_server()).await;
    let mut setup = ca
        .emr_setup(echo.addr, "upstream_http2 = true")
        .ehr(&format!("upstream_ca = {:?}", ca.path));
    setup.ehr_upstream = format!("https://{}", echo.addr);
    let gate = Gate::start(setup).await;
    let client = gate.client();
    let mut h1 = client.h1(EMR).await;
    for i in 0..3 {
        let r = h1.get(EMR, &format!("/oscar/x?n={i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["version"], "HTTP/2.0", "offered and accepted");
        assert_eq!(r.json()["query"], format!("n={i}"));
        assert!(r.json()["headers"]["x-forwarded-for"].is_array());
    }
    let post = H1::request(EMR, "/oscar/form")
        .method("POST")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::full("a=1&b=2"))
        .unwrap();
    let r = h1.fetch(post).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["body_len"], 7);
    // Not offered (the viewer's side here): HTTP/1.1, as before.
    let r = client.get(EHR, "/chart").await;
    assert_eq!(r.status, 401, "the viewer host wants a session first");
    // A WebSocket needs HTTP/1.1 end to end: it still goes through.
    let tls = client.tls(EMR, &[b"http/1.1"]).await;
    let url = format!("wss://{EMR}:{}/ws", gate.addr.port());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, tls)
        .await
        .expect("WebSocket handshake through ehrgate to an h2 upstream");
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("over h1")).await.unwrap();
    let back = ws.next().await.unwrap().unwrap();
    assert_eq!(back.into_text().unwrap().as_str(), "over h1");
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn an_https_upstream_without_the_option_is_reached_over_http1() {
    let ca = ClinicCa::new();
    let echo = Echo::start_tls("emr", ca.loopback_server()).await;
    let gate = Gate::start(ca.emr_setup(echo.addr, "")).await;
    let r = gate.client().get(EMR, "/oscar/x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/1.1");
}

/// An HTTPS upstream speaking HTTP/2 only, that ends each connection gracefully (GOAWAY)
/// after `per_connection` requests, as servers do on a request limit or a reload.
/// Returns its address, the requests it answered and the connections it accepted.
async fn h2_upstream_with_goaway(
    tls: Arc<rustls::ServerConfig>,
    per_connection: usize,
) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (answered, accepted) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (total, conns) = (answered.clone(), accepted.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            conns.fetch_add(1, Ordering::SeqCst);
            let (acceptor, total) = (acceptor.clone(), total.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let served = Arc::new(AtomicUsize::new(0));
                let enough = Arc::new(tokio::sync::Notify::new());
                let (count, full) = (served.clone(), enough.clone());
                let service = service_fn(move |req| {
                    let (count, full, total) = (count.clone(), full.clone(), total.clone());
                    async move {
                        total.fetch_add(1, Ordering::SeqCst);
                        if count.fetch_add(1, Ordering::SeqCst) + 1 == per_connection {
                            full.notify_one();
                        }
                        Ok::<_, std::convert::Infallible>(echo("emr", req).await)
                    }
                });
                let conn =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = enough.notified() => conn.as_mut().graceful_shutdown(),
                }
                let _ = conn.await;
            });
        }
    });
    (addr, answered, accepted)
}

#[tokio::test]
async fn an_http2_upstream_going_away_costs_no_request() {
    let ca = ClinicCa::new();
    let (addr, answered, accepted) = h2_upstream_with_goaway(ca.loopback_server(), 3).await;
    let setup = ca
        .emr_setup(addr, "upstream_http2 = true")
        .server("workers = 1");
    let gate = Gate::start(setup).await;
    let client = gate.client();
    let mut h1 = client.h1(EMR).await;
    for i in 0..12 {
        let r = h1.get(EMR, &format!("/oscar/one?n={i}")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.json()["version"], "HTTP/2.0");
    }
    // At once, so that some are queued on a connection when its GOAWAY arrives.
    let many = (0..24).map(|i| {
        let client = client.clone();
        async move { client.get(EMR, &format!("/oscar/many?n={i}")).await }
    });
    for (i, r) in futures_util::future::join_all(many)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(r.status, 200, "concurrent request {i}: {}", r.text());
    }
    assert_eq!(
        answered.load(Ordering::SeqCst),
        36,
        "each request answered once"
    );
    let accepted = accepted.load(Ordering::SeqCst);
    assert!(accepted >= 2, "connections went away: {accepted}");
}

#[tokio::test]
async fn clients_that_do_not_read_cannot_stall_others_on_a_shared_http2_upstream() {
    let ca = ClinicCa::new();
    let echo = Echo::start_tls("emr", ca.loopback_server()).await;
    let setup = ca
        .emr_setup(echo.addr, "upstream_http2 = true")
        .server("workers = 1");
    let gate = Gate::start(setup).await;
    let client = gate.client();
    // Downloads whose clients never read past the response header, each larger than
    // what the sockets on the way hold: once those are full, what the upstream sends
    // waits in ehrgate's receive windows.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut c = client.h1(EMR).await;
        let resp = c
            .send(
                H1::request(EMR, "/download?bytes=24000000")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await;
        assert_eq!(resp.status(), 200);
        stalled.push((c, resp));
    }
    // Another clinician's request still goes through at once (the limit is a wide
    // margin: a stall would last until send_timeout, 60 s).
    let r = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        client.get(EMR, "/oscar/x"),
    )
    .await
    .expect("not stalled behind streams nobody reads");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2.0");
}
