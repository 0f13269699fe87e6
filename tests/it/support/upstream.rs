//! In-process upstreams on loopback: an echo server that reports what reached it, a
//! streaming source and sink, a WebSocket echo, and upstreams that misbehave.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use ehrgate::body::Body;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// Starts an upstream serving `handler` on a loopback port.
pub async fn spawn<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    ehrgate::demo::spawn_http(listener, handler);
    addr
}

/// Starts an upstream serving `handler` over HTTPS with `tls` on a loopback port.
pub async fn spawn_tls<F, Fut>(tls: Arc<rustls::ServerConfig>, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    ehrgate::demo::spawn_https(listener, tls, handler);
    addr
}

/// An echo upstream named `name`; counts the requests it received.
pub struct Echo {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl Echo {
    pub async fn start(name: &'static str) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let addr = spawn(move |req| {
            counter.fetch_add(1, Ordering::SeqCst);
            echo(name, req)
        })
        .await;
        Self { addr, hits }
    }

    /// The same over HTTPS with `tls`.
    pub async fn start_tls(name: &'static str, tls: Arc<rustls::ServerConfig>) -> Self {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let addr = spawn_tls(tls, move |req| {
            counter.fetch_add(1, Ordering::SeqCst);
            echo(name, req)
        })
        .await;
        Self { addr, hits }
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Answers with JSON describing the request: method, path, query, version, headers,
/// body length (the body is read as a stream, never held whole). Special paths:
/// `/download?bytes=N` streams N bytes; `/ws` is a WebSocket echo;
/// `/hop` answers with hop-by-hop headers of its own.
pub async fn echo(name: &'static str, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    if path == "/ws" {
        return websocket_echo(&mut req);
    }
    if path == "/download" {
        let n: u64 = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("bytes="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        return download(n);
    }
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<serde_json::Value> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned().into())
            .collect();
        headers.insert(name.as_str().to_string(), values.into());
    }
    let method = req.method().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let version = format!("{:?}", req.version());
    let mut body = req.into_body();
    let mut len = 0u64;
    let mut head = Vec::new();
    let mut trailers = serde_json::Map::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            // A request cut short or malformed on its way here: say so, as a server would.
            let mut r = Response::new(Body::full(r#"{"body_error":true}"#));
            *r.status_mut() = StatusCode::BAD_REQUEST;
            return r;
        };
        match frame.into_data() {
            Ok(data) => {
                len += data.len() as u64;
                if head.len() < 4096 {
                    head.extend_from_slice(&data[..data.len().min(4096 - head.len())]);
                }
            }
            Err(frame) => {
                for (name, value) in frame.into_trailers().into_iter().flatten() {
                    let key = name.map_or_else(String::new, |n| n.to_string());
                    trailers.insert(key, String::from_utf8_lossy(value.as_bytes()).into());
                }
            }
        }
    }
    let v = serde_json::json!({
        "upstream": name,
        "method": method,
        "path": path,
        "query": query,
        "version": version,
        "headers": headers,
        "body_len": len,
        "body": String::from_utf8_lossy(&head),
        "trailers": trailers,
    });
    let mut resp = Response::new(Body::full(v.to_string()));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if path == "/hop" {
        let h = resp.headers_mut();
        h.insert("connection", "x-upstream-hop".parse().unwrap());
        h.insert("x-upstream-hop", "secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
    }
    resp
}

/// A body of `n` bytes produced 64 KiB at a time.
pub fn download(n: u64) -> Response<Body> {
    const CHUNK: usize = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let mut left = n;
    let stream = futures_util::stream::iter(std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let take = left.min(CHUNK as u64) as usize;
        left -= take as u64;
        Some(Ok::<_, Infallible>(Frame::data(chunk.slice(..take))))
    }));
    let mut resp = Response::new(Body::stream(StreamBody::new(stream)));
    resp.headers_mut()
        .insert("content-length", n.to_string().parse().unwrap());
    resp
}

fn websocket_echo(req: &mut Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        let mut r = Response::new(Body::full("not a websocket request"));
        *r.status_mut() = StatusCode::BAD_REQUEST;
        return r;
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_text() || msg.is_binary() {
                if ws.send(msg).await.is_err() {
                    break;
                }
            } else if msg.is_close() {
                break;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Body::empty())
        .unwrap()
}

/// A loopback address with nothing listening.
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// An upstream that accepts connections and reads, but never answers.
pub async fn silent() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}
