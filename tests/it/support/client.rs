//! TLS test clients over HTTP/1.1 and HTTP/2, with the SNI, ALPN and TLS versions a test
//! chooses.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use ehrgate::body::Body;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

#[derive(Clone)]
pub struct TestClient {
    pub addr: SocketAddr,
    roots: Arc<RootCertStore>,
}

/// A collected response.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub async fn collect(resp: Response<Incoming>) -> Self {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("response body").to_bytes();
        Self {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

impl TestClient {
    pub fn new(addr: SocketAddr, ca_pem: &str) -> Self {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        Self {
            addr,
            roots: Arc::new(roots),
        }
    }

    pub fn config(
        &self,
        alpn: &[&[u8]],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> ClientConfig {
        let mut c = ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        c
    }

    /// A TLS connection; `server_name` is a host name (sent as SNI) or an IP address
    /// (no SNI; the certificate's IP entry is checked).
    pub async fn tls_with(
        &self,
        server_name: &str,
        config: ClientConfig,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
    }

    pub async fn tls(&self, server_name: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let config = self.config(alpn, rustls::DEFAULT_VERSIONS);
        self.tls_with(server_name, config)
            .await
            .expect("TLS connection")
    }

    /// An HTTP/1.1 connection whose SNI is `sni`.
    pub async fn h1(&self, sni: &str) -> H1 {
        let tls = self.tls(sni, &[b"http/1.1"]).await;
        H1::handshake(tls).await
    }

    /// An HTTP/2 connection whose SNI is `sni`.
    pub async fn h2(&self, sni: &str) -> H2 {
        let tls = self.tls(sni, &[b"h2"]).await;
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
        let done = tokio::spawn(async move {
            let _ = conn.await;
        });
        H2 {
            send,
            port: self.addr.port(),
            done,
        }
    }

    /// One request on a fresh HTTP/1.1 connection to `host` (also its SNI).
    pub async fn get(&self, host: &str, path: &str) -> Resp {
        self.h1(host).await.get(host, path).await
    }
}

pub struct H1 {
    pub send: http1::SendRequest<Body>,
    pub done: tokio::task::JoinHandle<()>,
}

impl H1 {
    pub async fn handshake<T>(io: T) -> Self
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = http1::handshake(TokioIo::new(io))
            .await
            .expect("h1 handshake");
        let done = tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Self { send, done }
    }

    pub fn request(host: &str, path: &str) -> http::request::Builder {
        Request::get(path).header("host", host)
    }

    pub async fn send(&mut self, req: Request<Body>) -> Response<Incoming> {
        self.send.ready().await.expect("connection ready");
        self.send.send_request(req).await.expect("response")
    }

    pub async fn fetch(&mut self, req: Request<Body>) -> Resp {
        Resp::collect(self.send(req).await).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Resp {
        self.fetch(Self::request(host, path).body(Body::empty()).unwrap())
            .await
    }
}

pub struct H2 {
    pub send: http2::SendRequest<Body>,
    pub port: u16,
    pub done: tokio::task::JoinHandle<()>,
}

impl H2 {
    pub fn request(&self, host: &str, path: &str) -> http::request::Builder {
        Request::get(format!("https://{host}:{}{path}", self.port))
    }

    pub async fn fetch(&mut self, req: Request<Body>) -> Resp {
        self.send.ready().await.expect("connection ready");
        Resp::collect(self.send.send_request(req).await.expect("response")).await
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Resp {
        let req = self.request(host, path).body(Body::empty()).unwrap();
        self.fetch(req).await
    }
}

impl TestClient {
    /// Writes `request` as raw bytes on a new HTTP/1.1 TLS connection to `host` and reads
    /// until the server closes it or `SOON` passes; returns what came back, as text.
    pub async fn raw(&self, host: &str, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = self.tls(host, &[b"http/1.1"]).await;
        // A server may answer and close before a long request is all sent: read anyway.
        let _ = tls.write_all(request).await;
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => {
                    answer.extend_from_slice(&buf[..n]);
                    // One complete answer is enough when the server keeps the connection.
                    if complete_answer(&answer) {
                        break;
                    }
                }
                Err(_) => panic!("no complete answer to a raw request: {answer:?}"),
            }
        }
        String::from_utf8_lossy(&answer).into_owned()
    }
}

/// Whether `bytes` hold a whole HTTP/1.1 response with a Content-Length body.
fn complete_answer(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .is_some_and(|len| body.len() >= len)
}

/// A plain-HTTP GET (the admin listener): (status, body).
pub async fn plain_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(addr).await.expect("admin connect");
    let mut h1 = H1::handshake(tcp).await;
    let r = h1.get(&addr.to_string(), path).await;
    (r.status.as_u16(), r.text())
}

/// A plain-HTTP request with a method (the admin listener).
pub async fn plain_request(addr: SocketAddr, method: &str, path: &str) -> Resp {
    plain_request_with(addr, method, path, &[]).await
}

/// The same with extra header fields.
pub async fn plain_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Resp {
    let tcp = TcpStream::connect(addr).await.expect("admin connect");
    let mut h1 = H1::handshake(tcp).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    h1.fetch(req.body(Body::empty()).unwrap()).await
}
