//! The forwarding engine: upstream pools, the header rules, canonical paths and tunnels.
//! It takes a request the application has decided to forward, filters it (hop-by-hop
//! fields, every client copy of a header ehrgate vouches for, ehrgate's cookies,
//! trailers; forwarding headers set), sends it to the upstream of an origin, and filters
//! the response's common part.
//!
//! It knows nothing of sessions, audit or the clinic's flows: an origin is only a key to
//! an upstream. It never lets a client-sent copy of a header ehrgate vouches for, or an
//! ehrgate cookie, reach an upstream, and never lets an upstream set an ehrgate cookie.

pub mod cookies;
pub mod headers;
pub mod path;
pub mod pool;
pub mod route;
pub mod upgrade;
pub mod upstream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{HeaderValue, HOST};
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::body::Body;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::problem::{Problem, Side};
use headers::{Severity, TrustedHeaders};
use route::Origin;
use upstream::Upstream;

/// Resolves when a tunnel must close (its session ended, or the server stops).
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Per-request context carried through the phases.
pub struct Ctx {
    /// The request id, as sent upstream and to the client (cheap to clone).
    pub id_header: HeaderValue,
    pub started: Instant,
    /// The client's `Accept`, kept to choose JSON or HTML for an error page only when
    /// there is one.
    pub accept: Option<HeaderValue>,
    /// The host the client named, port included.
    pub host: String,
    /// The request's path in canonical form (DESIGN §2), which every configured path is
    /// compared with. The request is forwarded with the path as sent.
    pub path: path::CanonicalPath,
}

/// A request on its way upstream, after the request filter.
pub struct Outbound {
    pub parts: Parts,
    pub body: Body,
    client_upgrade: Option<OnUpgrade>,
}

impl Ctx {
    /// The client prefers JSON to HTML for error pages.
    pub fn wants_json(&self) -> bool {
        crate::problem::prefers_json(self.accept.as_ref())
    }

    /// The request id as text.
    pub fn id(&self) -> &str {
        self.id_header.to_str().unwrap_or_default()
    }
}

/// The upstreams of both origins and the rules every forwarded request follows.
pub struct Engine {
    emr: Upstream,
    ehr: Upstream,
    trusted: TrustedHeaders,
    metrics: Arc<Metrics>,
    client_body_timeout: Duration,
    /// Turns `true` when the server begins to shut down (ends tunnels nothing else ends).
    shutdown: watch::Receiver<bool>,
}

impl Engine {
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, ConfigError> {
        let s = &config.server;
        let emr = Upstream::new(
            Origin::Emr,
            &config.emr.upstream,
            &config.emr.upstream_ca,
            config.emr.upstream_http2,
            s,
        )?;
        let ehr = Upstream::new(
            Origin::Ehr,
            &config.ehr.upstream,
            &config.ehr.upstream_ca,
            config.ehr.upstream_http2,
            s,
        )?;
        let mut trusted = TrustedHeaders::new();
        trusted.add(&config.ehr.context_header, Severity::Forgery);
        Ok(Self {
            emr,
            ehr,
            trusted,
            metrics,
            client_body_timeout: s.client_body_timeout.get(),
            shutdown,
        })
    }

    pub fn upstream(&self, origin: Origin) -> &Upstream {
        match origin {
            Origin::Emr => &self.emr,
            Origin::Ehr => &self.ehr,
        }
    }

    /// The request filter: hop-by-hop fields and every client copy of a header ehrgate
    /// vouches for removed, ehrgate's cookies removed, forwarding headers set, and the
    /// target rewritten for the upstream.
    pub fn prepare(
        &self,
        ctx: &Ctx,
        origin: Origin,
        peer: &HeaderValue,
        mut req: Request<Body>,
    ) -> Outbound {
        let upgrade =
            req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
        let client_upgrade = if upgrade {
            req.extensions_mut().remove::<OnUpgrade>()
        } else {
            None
        };
        let (mut parts, body) = req.into_parts();
        self.filter_request(&mut parts.headers, upgrade);
        headers::set_forwarded(&mut parts.headers, peer, &ctx.host, &ctx.id_header);
        // The upstream client names the upstream's own host, as its certificate expects.
        parts.headers.remove(HOST);
        parts.uri = self.upstream(origin).uri_for(parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        Outbound {
            parts,
            body,
            client_upgrade,
        }
    }

    /// A client's request with its body ready to forward: idle-limited, no trailers.
    pub fn client_request(&self, req: Request<Incoming>) -> Request<Body> {
        let idle = self.client_body_timeout;
        req.map(|b| Body::from_client(b, idle))
    }

    /// Sends a prepared request and applies the response filter's common part. A
    /// protocol switch is tunnelled; `close` ends the tunnel when it resolves.
    pub async fn exchange(
        &self,
        origin: Origin,
        out: Outbound,
        close: Option<StopSignal>,
    ) -> Result<Response<Body>, Problem> {
        let upstream = self.upstream(origin);
        let sent = Instant::now();
        let mut resp = match upstream
            .send(Request::from_parts(out.parts, out.body))
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                if let Some(kind) = e.failure_kind() {
                    self.metrics.upstream_failure(origin, kind);
                }
                return Err(e.into_problem(origin));
            }
        };
        self.metrics.upstream_latency(origin, sent.elapsed());

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            match (
                out.client_upgrade,
                resp.extensions_mut().remove::<OnUpgrade>(),
            ) {
                (Some(client), Some(server)) => {
                    let mut shutdown = self.shutdown.clone();
                    let close = close.unwrap_or_else(|| {
                        // No session to follow: the tunnel ends with the server.
                        Box::pin(async move { crate::shutdown::signalled(&mut shutdown).await })
                    });
                    upgrade::spawn_tunnel(client, server, self.metrics.clone(), close);
                }
                _ => {
                    return Err(Problem::new(
                        StatusCode::BAD_GATEWAY,
                        "unexpected_upgrade",
                        "Bad gateway",
                        format!(
                            "{} switched protocols without being asked to.",
                            origin.display()
                        ),
                    )
                    .side(Side::Upstream));
                }
            }
        }
        headers::strip_hop_by_hop(resp.headers_mut(), switching);
        cookies::strip_own_set_cookie(resp.headers_mut());
        Ok(resp)
    }

    /// Removes hop-by-hop fields, every client copy of a header ehrgate vouches for, and
    /// ehrgate's own cookies.
    fn filter_request(&self, headers: &mut http::HeaderMap, upgrade: bool) {
        headers::strip_hop_by_hop(headers, upgrade);
        for (name, severity) in self.trusted.strip(headers) {
            match severity {
                Severity::Forgery => {
                    warn!(header = %name, "removed a client-sent copy of a header ehrgate vouches for")
                }
                Severity::Routine => {
                    debug!(header = %name, "replaced a client-sent forwarding header")
                }
            }
        }
        headers::fold_cookies(headers);
        cookies::strip_own(headers);
    }

    /// A refusal of a request whose body will not be forwarded: the body is read and
    /// discarded first (bounded in bytes and time), so a client still sending it reads
    /// the answer rather than a reset; if it could not be, the connection closes after.
    pub async fn refuse_unread(&self, req: Request<Incoming>, problem: Problem) -> Problem {
        let body = req.into_body();
        if http_body::Body::is_end_stream(&body)
            || crate::body::drain(body, self.client_body_timeout).await
        {
            problem
        } else {
            problem.with_header(http::header::CONNECTION, HeaderValue::from_static("close"))
        }
    }
}
