//! The request path: classify → ehrgate's own endpoint, or forward → request filter
//! (strip, inject) → upstream → response filter → log and count.
//!
//! Owns what happens to one request once its connection is established. It never reads
//! or writes sockets directly (the server module does) and never lets a client-sent copy
//! of a header ehrgate vouches for reach an upstream.

pub mod headers;
pub mod route;
pub mod upgrade;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, HOST};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tracing::{debug, info, warn, Instrument};

use crate::body::Body;
use crate::config::{Config, ConfigError};
use crate::metrics::{Metrics, Route};
use crate::problem::{Problem, Side};
use headers::{Severity, TrustedHeaders};
use route::Origin;
use upstream::Upstream;

/// What the server knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The TLS SNI, lowercase; `None` when the client sent none (e.g. connected by IP).
    pub sni: Option<Box<str>>,
}

/// Request ids: a random per-process prefix and a counter. Unique and cheap; not secret.
struct RequestIds {
    prefix: u32,
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut b = [0u8; 4];
        // A failed RNG leaves the prefix zero: ids stay unique within this process.
        let _ = aws_lc_rs::rand::fill(&mut b);
        Self {
            prefix: u32::from_be_bytes(b),
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> String {
        format!(
            "{:08x}-{:x}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        )
    }
}

/// Everything shared by all requests: configuration, upstream pools, counters.
pub struct Gateway {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    emr: Upstream,
    ehr: Upstream,
    trusted: TrustedHeaders,
    ids: RequestIds,
}

/// Per-request context carried through the phases.
struct Ctx {
    id: String,
    started: Instant,
}

impl Gateway {
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>) -> Result<Self, ConfigError> {
        let s = &config.server;
        let emr = Upstream::new(
            Origin::Emr,
            "emr",
            &config.emr.upstream,
            &config.emr.upstream_ca,
            s,
        )?;
        let ehr = Upstream::new(
            Origin::Ehr,
            "ehr",
            &config.ehr.upstream,
            &config.ehr.upstream_ca,
            s,
        )?;
        let mut trusted = TrustedHeaders::new();
        trusted.add(&config.ehr.context_header, Severity::Forgery);
        Ok(Self {
            config,
            metrics,
            emr,
            ehr,
            trusted,
            ids: RequestIds::new(),
        })
    }

    fn upstream(&self, origin: Origin) -> &Upstream {
        match origin {
            Origin::Emr => &self.emr,
            Origin::Ehr => &self.ehr,
        }
    }

    /// Serves one request from a client connection. Never fails: every problem becomes a
    /// page with the request id.
    pub async fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let ctx = Ctx {
            id: self.ids.next(),
            started: Instant::now(),
        };
        // The path only: query strings can carry patient details.
        let span = tracing::info_span!(
            "request",
            id = %ctx.id,
            method = %req.method(),
            path = req.uri().path(),
            origin = tracing::field::Empty,
        );
        async move {
            let method = req.method().clone();
            let (route, mut resp) = match self.classify(&conn, &req) {
                Err(problem) => (Route::Unrouted, self.fail(&ctx, problem, req.headers())),
                Ok(origin) => {
                    tracing::Span::current().record("origin", origin.as_str());
                    (origin.into(), self.serve(&ctx, origin, &conn, req).await)
                }
            };
            if let Ok(v) = HeaderValue::from_str(&ctx.id) {
                resp.headers_mut().insert(headers::X_REQUEST_ID.clone(), v);
            }
            let status = resp.status().as_u16();
            self.metrics.response(route, status);
            info!(%method, status, ms = ctx.started.elapsed().as_secs_f64() * 1e3, "served");
            resp
        }
        .instrument(span)
        .await
    }

    fn classify(&self, conn: &ConnInfo, req: &Request<Incoming>) -> Result<Origin, Problem> {
        if req.method() == Method::CONNECT {
            return Err(Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
                "ehrgate is a gateway to the EMR and the EHR viewer, not a forward proxy.",
            ));
        }
        route::classify(
            route::request_host(req.uri(), req.headers()),
            conn.sni.as_deref(),
            &self.config.emr.host,
            &self.config.ehr.host,
        )
    }

    async fn serve(
        &self,
        ctx: &Ctx,
        origin: Origin,
        conn: &ConnInfo,
        req: Request<Incoming>,
    ) -> Response<Body> {
        if route::is_own_path(req.uri().path()) {
            return self.own_endpoint(ctx, origin, req);
        }
        let request_headers = req.headers().clone();
        match self.forward(ctx, origin, conn, req).await {
            Ok(resp) => resp,
            Err(problem) => self.fail(ctx, problem, &request_headers),
        }
    }

    /// `/.ehrgate/` and `/.well-known/ehrgate/`: answered here, never forwarded.
    fn own_endpoint(&self, ctx: &Ctx, _origin: Origin, req: Request<Incoming>) -> Response<Body> {
        let problem =
            Problem::not_found(format!("{} is not an ehrgate endpoint.", req.uri().path()))
                .hint("Open the EMR from its usual address.");
        self.fail(ctx, problem, req.headers())
    }

    /// Request filter, upstream exchange and response filter.
    async fn forward(
        &self,
        ctx: &Ctx,
        origin: Origin,
        conn: &ConnInfo,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, Problem> {
        let upstream = self.upstream(origin);
        let upgrade =
            req.version() == Version::HTTP_11 && headers::is_upgrade_request(req.headers());
        let client_upgrade: Option<OnUpgrade> = if upgrade {
            req.extensions_mut().remove::<OnUpgrade>()
        } else {
            None
        };

        let (mut parts, body) = req.into_parts();
        let original_host = route::request_host(&parts.uri, &parts.headers)
            .unwrap_or_default()
            .to_owned();
        self.filter_request(&mut parts.headers, upgrade);
        headers::set_forwarded(&mut parts.headers, conn.peer.ip(), &original_host, &ctx.id);
        // The upstream client names the upstream's own host, as its certificate expects.
        parts.headers.remove(HOST);
        parts.uri = upstream.uri_for(parts.uri.path_and_query());
        parts.version = Version::HTTP_11;
        let up_req = Request::from_parts(parts, Body::from(body));

        let sent = Instant::now();
        let mut resp = match upstream.send(up_req).await {
            Ok(resp) => resp,
            Err(e) => {
                self.metrics.upstream_failure(origin, e.failure_kind());
                return Err(e.into_problem(origin));
            }
        };
        self.metrics.upstream_latency(origin, sent.elapsed());

        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            match (client_upgrade, resp.extensions_mut().remove::<OnUpgrade>()) {
                (Some(client), Some(server)) => {
                    upgrade::spawn_tunnel(client, server, self.metrics.clone(), None);
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
        Ok(resp.map(Body::from))
    }

    /// Removes hop-by-hop fields and every client copy of a header ehrgate vouches for.
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
    }

    fn fail(
        &self,
        ctx: &Ctx,
        problem: Problem,
        request_headers: &http::HeaderMap,
    ) -> Response<Body> {
        let cause = problem.cause_chain();
        match problem.side {
            Side::Downstream => debug!(
                status = problem.status.as_u16(),
                code = problem.code,
                "refused"
            ),
            Side::Upstream => {
                warn!(status = problem.status.as_u16(), code = problem.code, cause = %cause, "upstream failed")
            }
            Side::Internal => {
                warn!(status = problem.status.as_u16(), code = problem.code, cause = %cause, "internal error")
            }
        }
        problem.to_response(&ctx.id, request_headers)
    }
}
