//! One upstream (the EMR or the viewer): keep-alive HTTP/1.1 connections kept per
//! worker thread (see [`super::pool`]) over plain TCP or verified TLS, HTTP/2 where the
//! configuration offers it and the upstream accepts it in ALPN, with the configured
//! connect and response-header time limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::uri::{PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use hyper::client::conn::http2;

use super::pool::{H2Stream, Held, Pool, Stream, H1, H2, H2_KEPT, H2_STREAMS};
use crate::body::Body;
use crate::config::{ConfigError, ServerConfig, UpstreamUrl};
use crate::metrics::UpstreamFailure;
use crate::problem::{BoxError, Problem, Side};
use crate::proxy::route::Origin;
use crate::tls;

/// Idle HTTP/1.1 connections kept per upstream and per worker thread.
const POOL_MAX_IDLE: usize = 256;

/// TCP keep-alive probes on upstream connections start after this much silence.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// An HTTP/2 upstream connection with streams open is pinged this often, and closed
/// when a ping goes unanswered this long.
const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Upstream {
    scheme: Scheme,
    authority: http::uri::Authority,
    /// `Host` of every HTTP/1.1 request: the upstream's own name, as its certificate
    /// expects.
    host: HeaderValue,
    tls: Option<UpstreamTls>,
    pool: Arc<Pool>,
    connect_timeout: Duration,
    max_buf_size: usize,
    /// HTTP/2 stream window (`stream_buffer_bytes`) and header limit.
    h2_window: u32,
    max_header_bytes: u32,
    response_timeout: Duration,
    body_timeout: Duration,
}

/// How an https upstream is reached.
struct UpstreamTls {
    name: ServerName<'static>,
    /// ALPN `http/1.1` only.
    h1: TlsConnector,
    /// ALPN `h2` then `http/1.1`, when `upstream_http2` is on.
    h2: Option<TlsConnector>,
}

/// A new connection: HTTP/1.1, or HTTP/2 where the upstream chose it.
enum Fresh {
    H1(H1),
    H2(H2),
}

/// Why an upstream gave no response.
#[derive(Debug)]
pub enum UpstreamError {
    /// Connected, but no response header within `upstream_response_timeout`.
    ResponseTimeout,
    /// No connection within `upstream_connect_timeout`.
    ConnectTimeout(BoxError),
    /// The upstream's TLS certificate was refused (no configured CA vouches for it, its
    /// name does not match, it has expired, ...): nothing was sent to it.
    Certificate { reason: String, cause: BoxError },
    /// Connection refused, name not resolved, TLS handshake failed, ...
    Connect(BoxError),
    /// The connection broke before a response header arrived.
    Other(BoxError),
    /// Not the upstream's fault: the client's request body was too slow or malformed
    /// while it was being forwarded (the upstream connection was dropped, so the
    /// upstream never takes a truncated request for a whole one).
    ClientBody { timeout: bool, cause: BoxError },
}

impl UpstreamError {
    /// How the metrics count it; `None` when the client, not the upstream, failed.
    pub fn failure_kind(&self) -> Option<UpstreamFailure> {
        Some(match self {
            UpstreamError::ClientBody { .. } => return None,
            UpstreamError::ResponseTimeout | UpstreamError::ConnectTimeout(_) => {
                UpstreamFailure::Timeout
            }
            UpstreamError::Connect(_) | UpstreamError::Certificate { .. } => {
                UpstreamFailure::Connect
            }
            UpstreamError::Other(_) => UpstreamFailure::Other,
        })
    }

    /// The page a browser gets: 504 for time limits, 502 otherwise.
    pub fn into_problem(self, origin: Origin) -> Problem {
        let who = origin.display();
        let (status, code, detail, cause): (_, _, String, Option<BoxError>) = match self {
            UpstreamError::ClientBody { timeout, cause } => {
                return client_body_problem(timeout, cause)
            }
            UpstreamError::ResponseTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!("{who} did not answer in time."),
                None,
            ),
            UpstreamError::ConnectTimeout(e) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_connect_timeout",
                format!("ehrgate could not connect to {who} in time."),
                Some(e),
            ),
            UpstreamError::Certificate { reason, cause } => (
                StatusCode::BAD_GATEWAY,
                "upstream_certificate_refused",
                format!(
                    "ehrgate refused the TLS certificate of {who} ({reason}) and sent it nothing."
                ),
                Some(cause),
            ),
            UpstreamError::Connect(e) => (
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                format!("ehrgate could not reach {who}."),
                Some(e),
            ),
            UpstreamError::Other(e) => (
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                format!("{who} closed the connection without answering."),
                Some(e),
            ),
        };
        let title = if status == StatusCode::GATEWAY_TIMEOUT {
            "Gateway timeout"
        } else {
            "Bad gateway"
        };
        let mut p = Problem::new(status, code, title, detail)
            .hint("Try again in a moment. If it keeps happening, tell your IT staff and quote the request id.")
            .side(Side::Upstream);
        p.cause = cause;
        p
    }
}

/// The answer when the client's own request body failed while it was forwarded.
fn client_body_problem(timeout: bool, cause: BoxError) -> Problem {
    let p = if timeout {
        Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_body_timeout",
            "Request timeout",
            "The request body stopped arriving before it was complete.",
        )
        .hint("Try again; if you are on a slow connection, try a smaller upload.")
    } else {
        Problem::bad_request("The request body is malformed (bad chunked framing or cut short).")
    };
    let mut p = p.side(Side::Downstream);
    p.cause = Some(cause);
    p
}

impl Upstream {
    /// The upstream of `origin`; configuration errors name `emr.…` or `ehr.…` keys.
    /// `http2` offers HTTP/2 in ALPN to an https upstream.
    pub fn new(
        origin: Origin,
        url: &str,
        ca: &str,
        http2: bool,
        server: &ServerConfig,
    ) -> Result<Self, ConfigError> {
        let key = origin.as_str();
        let parsed = UpstreamUrl::parse(&format!("{key}.upstream"), url)?;
        if http2 && !parsed.https {
            return Err(ConfigError::new(
                format!("{key}.upstream_http2"),
                "applies to an https:// upstream only (HTTP/2 is agreed in the TLS handshake); \
                 set it to false or use https://",
            ));
        }
        let host = parsed.authority.host();
        let tls = if parsed.https {
            let config = tls::upstream_client_config(&format!("{key}.upstream_ca"), ca)?;
            let with_alpn = |protocols: &[&[u8]]| {
                let mut c = config.clone();
                c.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
                TlsConnector::from(Arc::new(c))
            };
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(bare.to_owned()).map_err(|_| {
                ConfigError::new(
                    format!("{key}.upstream"),
                    format!("{host} is not a host name a TLS certificate can be checked against"),
                )
            })?;
            Some(UpstreamTls {
                name,
                h1: with_alpn(&[b"http/1.1"]),
                h2: http2.then(|| with_alpn(&[b"h2", b"http/1.1"])),
            })
        } else {
            None
        };
        let (scheme, default_port) = if parsed.https {
            (Scheme::HTTPS, 443)
        } else {
            (Scheme::HTTP, 80)
        };
        // As browsers and the legacy client write it: the port only when not the default.
        let host_header = match parsed.authority.port_u16() {
            Some(p) if p != default_port => parsed.authority.as_str().to_owned(),
            _ => host.to_owned(),
        };
        Ok(Self {
            scheme,
            host: HeaderValue::from_str(&host_header)
                .map_err(|e| ConfigError::new(format!("{key}.upstream"), e.to_string()))?,
            // `:authority` of HTTP/2 requests as `Host` of HTTP/1.1 ones.
            authority: host_header
                .parse()
                .map_err(|_| ConfigError::new(format!("{key}.upstream"), "not a host and port"))?,
            tls,
            pool: Pool::new(POOL_MAX_IDLE, server.upstream_idle_timeout.get()),
            connect_timeout: server.upstream_connect_timeout.get(),
            max_buf_size: server.h1_buffer_bytes(),
            h2_window: u32::try_from(server.stream_buffer_bytes).unwrap_or(u32::MAX),
            max_header_bytes: u32::try_from(server.max_header_bytes).unwrap_or(u32::MAX),
            response_timeout: server.upstream_response_timeout.get(),
            body_timeout: server.upstream_body_timeout.get(),
        })
    }

    /// The upstream URI for a client's path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            path_and_query
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
    }

    /// Sends a request and waits for the response header within the configured limits.
    /// The response body streams afterwards, as long as a download takes, but a pause
    /// longer than `upstream_body_timeout` between two reads ends it visibly.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        match tokio::time::timeout(self.response_timeout, self.exchange(req)).await {
            Err(_) => Err(UpstreamError::ResponseTimeout),
            Ok(r) => r,
        }
    }

    async fn exchange(&self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        // A protocol switch (WebSocket) needs HTTP/1.1 end to end.
        let h2 = self.offers_h2() && !req.headers().contains_key(http::header::UPGRADE);
        let mut req = req;
        let mut h2_refusals = 0;
        loop {
            let outcome = if let Some(stream) = h2.then(|| self.pool.h2()).flatten() {
                self.send_h2(stream, req).await
            } else if let Some(conn) = self.pool.checkout() {
                self.send_h1(conn, true, req).await
            } else {
                // Boxed: a new connection's TLS and handshake state is kilobytes, and
                // would otherwise be part of (and copied with) every request's future.
                match Box::pin(self.connect(h2)).await? {
                    Fresh::H1(conn) => self.send_h1(conn, false, req).await,
                    Fresh::H2(conn) => self.send_h2(self.pool.add_h2(conn), req).await,
                }
            };
            req = match outcome {
                Outcome::Done(result) => return result,
                Outcome::Again(req, Protocol::H1) => req,
                // An HTTP/2 connection that was going away (GOAWAY) or had closed did
                // not take it. Each kept one that refused is closed, and so leaves the
                // pool; beyond those, a few new ones, should every new one refuse too.
                Outcome::Again(req, Protocol::H2) if h2_refusals < H2_KEPT + 3 => {
                    h2_refusals += 1;
                    req
                }
                Outcome::Again(..) => {
                    return Err(UpstreamError::Other(
                        "the upstream's HTTP/2 connections kept refusing new requests".into(),
                    ))
                }
            };
        }
    }

    fn offers_h2(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.h2.is_some())
    }

    /// Sends on an HTTP/1.1 connection; a request a kept connection (`reused`) never
    /// took comes back to go out on another.
    async fn send_h1(&self, mut conn: H1, reused: bool, req: Request<Body>) -> Outcome {
        let req = origin_form(req, &self.host);
        let done = match conn.send(req).await {
            Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // The connection goes on alone to hand its socket to the tunnel.
                conn.detach();
                Ok(resp.map(|b| Body::from_upstream(b, self.body_timeout, None)))
            }
            Ok(resp) => {
                let lease = Box::new(Held::new(conn, self.pool.clone()));
                Ok(resp.map(|b| Body::from_upstream(b, self.body_timeout, Some(lease))))
            }
            Err(mut e) => match e.take_message() {
                // A kept connection the upstream had closed: it never saw the request.
                Some(again) if reused => return Outcome::Again(again, Protocol::H1),
                _ => Err(classify(e.into_error())),
            },
        };
        Outcome::Done(done)
    }

    /// Sends on an HTTP/2 connection; a request it did not take (it was going away, or
    /// had closed) comes back to go out on another.
    async fn send_h2(&self, mut stream: H2Stream, req: Request<Body>) -> Outcome {
        let (mut parts, body) = req.into_parts();
        parts.uri = absolute_uri(&parts.uri, &self.scheme, &self.authority);
        parts.headers.remove(HOST);
        parts.version = Version::HTTP_2;
        let req = Request::from_parts(parts, body);
        if stream.sender().ready().await.is_err() {
            return Outcome::Again(req, Protocol::H2);
        }
        match stream.sender().try_send_request(req).await {
            Ok(resp) => {
                Outcome::Done(Ok(resp.map(|b| {
                    Body::from_upstream(b, self.body_timeout, Some(Box::new(stream)))
                })))
            }
            Err(mut e) => match e.take_message() {
                Some(again) => Outcome::Again(again, Protocol::H2),
                None => Outcome::Done(Err(classify(e.into_error()))),
            },
        }
    }

    /// A new connection: TCP, TLS for https and the HTTP handshake, all within
    /// `upstream_connect_timeout`.
    async fn connect(&self, h2: bool) -> Result<Fresh, UpstreamError> {
        match tokio::time::timeout(self.connect_timeout, self.connect_within(h2)).await {
            Ok(fresh) => fresh,
            Err(_) => Err(UpstreamError::ConnectTimeout(Box::new(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no connection within upstream_connect_timeout",
                ),
            ))),
        }
    }

    async fn connect_within(&self, h2: bool) -> Result<Fresh, UpstreamError> {
        let tcp = self.connect_tcp().await?;
        let Some(tls) = &self.tls else {
            return self.handshake_h1(Stream::Plain(tcp)).await;
        };
        let connector = match (&tls.h2, h2) {
            (Some(c), true) => c,
            _ => &tls.h1,
        };
        let stream = connector
            .connect(tls.name.clone(), tcp)
            .await
            .map_err(connect_error)?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // Windows as on the client side (`stream_buffer_bytes` a stream), the
                // connection's large enough for every stream it carries, so streams
                // nobody reads cannot stall the others.
                .adaptive_window(false)
                .initial_stream_window_size(self.h2_window)
                .initial_connection_window_size(self.h2_window.saturating_mul(H2_STREAMS as u32))
                .max_send_buf_size(self.h2_window as usize)
                .max_header_list_size(self.max_header_bytes)
                // A connection that stops answering is found and closed.
                .keep_alive_interval(H2_PING_INTERVAL)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(Stream::Tls(Box::new(stream))))
                .await
                .map_err(|e| UpstreamError::Connect(Box::new(e)))?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            return Ok(Fresh::H2(H2::new(sender)));
        }
        self.handshake_h1(Stream::Tls(Box::new(stream))).await
    }

    async fn handshake_h1(&self, io: Stream) -> Result<Fresh, UpstreamError> {
        H1::handshake(io, self.max_buf_size)
            .await
            .map(Fresh::H1)
            .map_err(|e| UpstreamError::Connect(Box::new(e)))
    }

    /// TCP to the first of the upstream's addresses that answers, each tried for an
    /// equal share of the connect time (so an unreachable first address, such as an
    /// IPv6 one on a network without IPv6, leaves time for the next).
    async fn connect_tcp(&self) -> Result<TcpStream, UpstreamError> {
        let host = self.authority.host();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self.authority.port_u16().unwrap_or(match self.tls {
            Some(_) => 443,
            None => 80,
        });
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
            .await
            .map_err(connect_error)?
            .collect();
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let mut last = None;
        let count = addrs.len();
        for (i, addr) in addrs.into_iter().enumerate() {
            // What is left, shared by the addresses not tried yet.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let share = left / (count - i) as u32;
            match tokio::time::timeout(share, TcpStream::connect(addr)).await {
                Ok(Ok(tcp)) => {
                    let _ = tcp.set_nodelay(true);
                    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
                    let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
                    return Ok(tcp);
                }
                Ok(Err(e)) => last = Some(e),
                Err(_) => {
                    last = Some(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("{addr} did not answer in its share of upstream_connect_timeout"),
                    ))
                }
            }
        }
        Err(connect_error(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{host} resolved to no address"),
            )
        })))
    }
}

/// What became of a request sent on one connection.
enum Outcome {
    Done(Result<Response<Body>, UpstreamError>),
    /// The connection never took the request: send it on another.
    Again(Request<Body>, Protocol),
}

enum Protocol {
    H1,
    H2,
}

/// An HTTP/1.1 request line names only the path; the upstream's name goes in `Host`.
fn origin_form(req: Request<Body>, host: &HeaderValue) -> Request<Body> {
    let (mut parts, body) = req.into_parts();
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = Uri::from(pq);
    }
    parts.headers.insert(HOST, host.clone());
    Request::from_parts(parts, body)
}

/// An HTTP/2 request names scheme and authority (`:scheme`, `:authority`), no `Host`.
fn absolute_uri(uri: &Uri, scheme: &Scheme, authority: &http::uri::Authority) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(authority.clone());
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).expect("scheme, authority and path make a valid URI")
}

/// Why no connection could be made: a refused certificate, a time limit, or the rest.
fn connect_error(e: std::io::Error) -> UpstreamError {
    let timed_out = e.kind() == std::io::ErrorKind::TimedOut;
    let mut certificate = None;
    let mut next: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|i| i as _);
    while let Some(err) = next {
        if let Some(rustls::Error::InvalidCertificate(why)) = err.downcast_ref::<rustls::Error>() {
            certificate = Some(certificate_reason(why));
        }
        next = err.source();
    }
    match certificate {
        Some(reason) => UpstreamError::Certificate {
            reason,
            cause: Box::new(e),
        },
        None if timed_out => UpstreamError::ConnectTimeout(Box::new(e)),
        None => UpstreamError::Connect(Box::new(e)),
    }
}

/// Why an exchange on an established connection failed.
fn classify(e: hyper::Error) -> UpstreamError {
    if let Some(client) = crate::body::ClientBodyError::find(&e) {
        let timeout = matches!(client, crate::body::ClientBodyError::Timeout);
        return UpstreamError::ClientBody {
            timeout,
            cause: Box::new(e),
        };
    }
    UpstreamError::Other(Box::new(e))
}

/// What an IT person needs to hear about a refused upstream certificate.
fn certificate_reason(e: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer => "no configured CA vouches for it: check upstream_ca".into(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "it is not valid for the upstream's host name".into()
        }
        C::Expired | C::ExpiredContext { .. } => "it has expired".into(),
        C::NotValidYet | C::NotValidYetContext { .. } => "it is not valid yet".into(),
        C::Revoked => "it has been revoked".into(),
        other => format!("{other:?}"),
    }
}
