//! Start, stream, stop: large bodies stream without being held, and shutdown lets a
//! request in flight finish, in-process and as the real binary on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ehrgate::body::Body;
use http::Response;
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tokio::sync::{oneshot, Mutex, Notify};

use crate::support::upstream::{self, Echo};
use crate::support::{Child, Gate, Setup, EMR};

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn streams_64_mib_both_ways_with_small_proxy_memory() {
    let echo = Echo::start("any").await;
    let child = Child::start(Setup::new(echo.addr, echo.addr)).await;
    let client = child.client();
    let before = child.peak_rss();

    // Upload: 64 MiB produced on the fly, counted by the upstream as it streams.
    let size = 64 * MIB;
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = (size / chunk.len() as u64) as usize;
    let stream = futures_util::stream::iter(
        std::iter::repeat_n(chunk, chunks).map(|c| Ok::<_, std::io::Error>(Frame::data(c))),
    );
    let mut c = client.h1(EMR).await;
    let req = http::Request::put("/upload")
        .header("host", EMR)
        .body(Body::stream(StreamBody::new(stream)))
        .unwrap();
    let r = c.fetch(req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], size);

    // Download: 64 MiB over HTTP/2, counted here frame by frame, never collected.
    let mut h2 = client.h2(EMR).await;
    let req = h2
        .request(EMR, &format!("/download?bytes={size}"))
        .body(Body::empty())
        .unwrap();
    h2.send.ready().await.unwrap();
    let resp = h2.send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.unwrap().into_data() {
            got += d.len() as u64;
        }
    }
    assert_eq!(got, size);

    let peak = child.peak_rss();
    eprintln!(
        "proxy peak RSS: {} KiB before, {} KiB after 2 x 64 MiB",
        before / 1024,
        peak / 1024
    );
    // Measured: a few MiB (BENCHMARKS.md, `cargo bench --bench streaming`). The bound is
    // half the body: wide enough for any machine and allocator, and still broken by a
    // body held whole.
    assert!(
        peak < before + size / 2,
        "proxy memory grew by {} MiB while streaming 64 MiB each way",
        (peak - before) / MIB
    );
}

#[tokio::test]
async fn graceful_shutdown_finishes_the_request_in_flight() {
    // An upstream that holds its answer until the test releases it.
    let arrived = Arc::new(Notify::new());
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let release_rx = Arc::new(Mutex::new(Some(release_rx)));
    let addr = {
        let arrived = arrived.clone();
        upstream::spawn(move |_req| {
            let arrived = arrived.clone();
            let release_rx = release_rx.clone();
            async move {
                arrived.notify_one();
                if let Some(rx) = release_rx.lock().await.take() {
                    let _ = rx.await;
                }
                Response::new(Body::full("finished"))
            }
        })
        .await
    };
    let mut gate = Gate::start(Setup::new(addr, addr)).await;
    let mut c = gate.client().h1(EMR).await;
    let in_flight = tokio::spawn(async move { c.get(EMR, "/slow").await });
    arrived.notified().await;

    let running = gate.running.take().unwrap();
    running.shutdown();
    assert_eq!(
        gate.admin_get("/readyz").await.0,
        503,
        "not ready while draining"
    );
    // New connections are no longer accepted (the listener is closed once the accept
    // loop sees the signal).
    let refused = async {
        loop {
            if tokio::net::TcpStream::connect(gate.addr).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), refused)
        .await
        .expect("listener closed");

    release_tx.send(()).unwrap();
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "finished");
    tokio::time::timeout(Duration::from_secs(60), running.wait())
        .await
        .expect("server stopped after its last request");
}

#[tokio::test]
async fn sigterm_stops_the_binary_cleanly() {
    let echo = Echo::start("any").await;
    let mut child = Child::start(Setup::new(echo.addr, echo.addr)).await;
    assert_eq!(child.client().get(EMR, "/").await.status, 200);
    child.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(60), child.child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
