//! One upstream (the EMR or the viewer): a pooled keep-alive HTTP/1.1 client over plain
//! TCP or verified TLS, with the configured connect and response-header time limits.

use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::{ConfigError, ServerConfig, UpstreamUrl};
use crate::metrics::UpstreamFailure;
use crate::problem::{BoxError, Problem, Side};
use crate::proxy::route::Origin;
use crate::tls;

/// Idle connections kept per upstream; the clinic's upstreams are one host each.
const POOL_MAX_IDLE: usize = 512;

pub struct Upstream {
    scheme: Scheme,
    authority: http::uri::Authority,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    response_timeout: Duration,
    body_timeout: Duration,
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
    pub fn new(
        origin: Origin,
        url: &str,
        ca: &str,
        server: &ServerConfig,
    ) -> Result<Self, ConfigError> {
        let key = origin.as_str();
        let parsed = UpstreamUrl::parse(&format!("{key}.upstream"), url)?;
        let tls = if parsed.https {
            tls::upstream_client_config(&format!("{key}.upstream_ca"), ca)?
        } else {
            // Never used for http://, but the connector type wants one.
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| ConfigError::new(key, e.to_string()))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(server.upstream_connect_timeout.get()));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(server.upstream_idle_timeout.get())
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .http1_max_buf_size(server.h1_buffer_bytes())
            .build(connector);
        Ok(Self {
            scheme: if parsed.https {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            authority: parsed.authority,
            client,
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
        match tokio::time::timeout(self.response_timeout, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::ResponseTimeout),
            Ok(Ok(resp)) => Ok(resp.map(|b| Body::from_upstream(b, self.body_timeout))),
            Ok(Err(e)) => Err(classify(e)),
        }
    }
}

fn classify(e: hyper_util::client::legacy::Error) -> UpstreamError {
    let mut timed_out = false;
    let mut certificate = None;
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = next {
        next = err.source();
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            timed_out |= io.kind() == std::io::ErrorKind::TimedOut;
            // An I/O error's `source` skips the error it wraps: step into that instead.
            if let Some(inner) = io.get_ref() {
                next = Some(inner as &(dyn std::error::Error + 'static));
            }
        }
        if let Some(rustls::Error::InvalidCertificate(why)) = err.downcast_ref::<rustls::Error>() {
            certificate = Some(certificate_reason(why));
        }
    }
    if let Some(client) = crate::body::ClientBodyError::find(&e) {
        let timeout = matches!(client, crate::body::ClientBodyError::Timeout);
        return UpstreamError::ClientBody {
            timeout,
            cause: Box::new(e),
        };
    }
    match certificate {
        Some(reason) => UpstreamError::Certificate {
            reason,
            cause: Box::new(e),
        },
        None if e.is_connect() && timed_out => UpstreamError::ConnectTimeout(Box::new(e)),
        None if e.is_connect() => UpstreamError::Connect(Box::new(e)),
        None => UpstreamError::Other(Box::new(e)),
    }
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
