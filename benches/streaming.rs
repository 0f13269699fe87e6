//! Memory held per in-flight stream, under concurrency: `STREAMS` (default 50) transfers
//! of `MIB` (default 16) MiB each through the real `ehrgate` binary at once — half
//! uploads over HTTP/1.1 to an upstream that reads slowly, half downloads over HTTP/2 to
//! a client that reads slowly — while the proxy's resident memory is sampled.
//!
//! Reports the proxy's RSS before, its peak during, the growth, and the growth per stream
//! (the figure BENCHMARKS.md compares with the configured per-stream bound).
//! Run: `cargo bench --bench streaming` (`STREAMS=… MIB=… REPEATS=…` to vary the load,
//! `STREAM_BUFFER=…` for `server.stream_buffer_bytes`, `PAUSE_US=0` for fast readers).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ehrgate::body::Body;
use ehrgate::tls::dev::{generate_signing_key_pem, DevPki};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;

const HOST: &str = "emr.localhost";
const CHUNK: usize = 64 * 1024;
/// How slowly the slow sides read: a pause after every this many bytes.
const PAUSE_EVERY: u64 = 256 * 1024;
/// The pause (`PAUSE_US`, default 2000; 0: read as fast as possible).
fn pause() -> Duration {
    Duration::from_micros(env_or("PAUSE_US", 2000))
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// A body of `n` bytes made on the fly, `CHUNK` at a time.
fn generated(n: u64) -> Body {
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let mut left = n;
    Body::stream(StreamBody::new(futures_util::stream::iter(
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let take = left.min(CHUNK as u64) as usize;
            left -= take as u64;
            Some(Ok::<_, Infallible>(Frame::data(chunk.slice(..take))))
        }),
    )))
}

/// Reads a body to its end, pausing as a slow reader does; returns its length.
async fn read_slowly(mut body: Incoming) -> u64 {
    let (mut got, mut since_pause) = (0u64, 0u64);
    while let Some(frame) = body.frame().await {
        if let Ok(d) = frame.expect("body").into_data() {
            got += d.len() as u64;
            since_pause += d.len() as u64;
            if since_pause >= PAUSE_EVERY && !pause().is_zero() {
                since_pause = 0;
                tokio::time::sleep(pause()).await;
            }
        }
    }
    got
}

/// The upstream: `/download?bytes=N` streams N bytes; anything else reads the request
/// body slowly and answers with its length.
async fn upstream(req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == "/download" {
        let n = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        return Response::new(generated(n));
    }
    let len = read_slowly(req.into_body()).await;
    Response::new(Body::full(len.to_string()))
}

struct Proxy {
    child: tokio::process::Child,
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    _dir: tempfile::TempDir,
}

async fn start_proxy(upstream: SocketAddr) -> Proxy {
    let dir = tempfile::tempdir().unwrap();
    let pki = DevPki::generate(&[HOST, "ehr.localhost"]).unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    std::fs::write(p("server.crt"), &pki.server_cert_pem).unwrap();
    std::fs::write(p("server.key"), &pki.server_key_pem).unwrap();
    std::fs::write(p("signing.pem"), generate_signing_key_pem().unwrap()).unwrap();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
tls_cert = {cert:?}
tls_key = {key:?}
stream_buffer_bytes = {buffer}
[emr]
host = "{HOST}"
upstream = "http://{upstream}"
[ehr]
host = "ehr.localhost"
upstream = "http://{upstream}"
[[authority]]
id = "2.16.840.1.113883.3.239.9:101"
name = "Maple Family Health Team"
[context]
signing_key = {signing:?}
[audit]
path = {audit:?}
[log]
filter = "warn"
"#,
        cert = p("server.crt"),
        key = p("server.key"),
        signing = p("signing.pem"),
        audit = p("audit.jsonl"),
        buffer = env_or("STREAM_BUFFER", 64 * 1024),
    );
    std::fs::write(p("ehrgate.toml"), config).unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ehrgate"))
        .args(["run", "--config", &p("ehrgate.toml")])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("ehrgate starts");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = lines.next_line().await.unwrap().expect("serving line");
    let addr = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_cert_pem.as_bytes()).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    Proxy {
        child,
        addr,
        tls,
        _dir: dir,
    }
}

impl Proxy {
    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    async fn connect(&self, alpn: &[u8]) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await.unwrap();
        let mut config = self.tls.clone();
        config.alpn_protocols = vec![alpn.to_vec()];
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from(HOST).unwrap(), tcp)
            .await
            .unwrap()
    }

    async fn upload(&self, bytes: u64) -> u64 {
        let io = TokioIo::new(self.connect(b"http/1.1").await);
        let (mut send, conn) = http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::put("/upload")
            .header("host", HOST)
            .body(generated(bytes))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&body).parse().unwrap_or(0)
    }

    async fn download(&self, bytes: u64) -> u64 {
        let io = TokioIo::new(self.connect(b"h2").await);
        let (mut send, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
        tokio::spawn(conn);
        let req = Request::get(format!("https://{HOST}/download?bytes={bytes}"))
            .body(Body::empty())
            .unwrap();
        send.ready().await.unwrap();
        let resp = send.send_request(req).await.unwrap();
        read_slowly(resp.into_body()).await
    }
}

async fn one_run(proxy: Arc<Proxy>, streams: u64, bytes: u64) -> (u64, u64, f64) {
    // Warm up: one of each, then let the allocator settle.
    assert_eq!(proxy.upload(1 << 20).await, 1 << 20);
    assert_eq!(proxy.download(1 << 20).await, 1 << 20);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = proxy.pid();
    let before = rss_kib(pid, "VmRSS:");

    let done = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(AtomicU64::new(before));
    let sampler = {
        let (done, peak) = (done.clone(), peak.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_kib(pid, "VmRSS:"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                proxy.upload(bytes).await
            } else {
                proxy.download(bytes).await
            }
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), bytes, "every transfer arrives whole");
    }
    let secs = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    (before, peak.load(Ordering::Relaxed), secs)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let streams = env_or("STREAMS", 50);
    let mib = env_or("MIB", 16);
    let repeats = env_or("REPEATS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        ehrgate::demo::spawn_http(listener, upstream);
        println!(
            "{streams} concurrent transfers of {mib} MiB (half HTTP/1.1 uploads, half HTTP/2 \
             downloads, readers pausing {} us per 256 KiB), stream_buffer_bytes = {}, \
             {repeats} runs, each on a fresh ehrgate",
            pause().as_micros(),
            env_or("STREAM_BUFFER", 64 * 1024)
        );
        println!(
            "{:>4} {:>12} {:>12} {:>12} {:>16} {:>8}",
            "run", "before KiB", "peak KiB", "growth KiB", "per stream KiB", "secs"
        );
        let mut per_stream = Vec::new();
        for run in 1..=repeats {
            let proxy = Arc::new(start_proxy(up).await);
            let (before, peak, secs) = one_run(proxy.clone(), streams, mib << 20).await;
            let growth = peak.saturating_sub(before);
            per_stream.push(growth / streams);
            println!(
                "{run:>4} {before:>12} {peak:>12} {growth:>12} {:>16} {secs:>8.1}",
                growth / streams
            );
        }
        per_stream.sort_unstable();
        println!(
            "median growth per stream: {} KiB",
            per_stream[per_stream.len() / 2]
        );
    });
}
