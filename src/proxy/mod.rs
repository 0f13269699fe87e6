//! The request path: classify → ehrgate's own endpoint, a lifecycle flow, or plain
//! forwarding → request filter (strip, inject) → upstream → response filter → log.
//!
//! Owns what happens to one request once its connection is established: the phases and
//! the header rules. The lifecycle flows (`crate::lifecycle`) build on [`Gateway::prepare`]
//! and [`Gateway::exchange`]. It never reads or writes sockets directly and never lets a
//! client-sent copy of a header ehrgate vouches for, or an ehrgate cookie, reach an
//! upstream.

pub mod cookies;
pub mod headers;
pub mod path;
pub mod route;
pub mod upgrade;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::header::{HeaderValue, HOST};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use crate::audit::AuditLog;
use crate::body::Body;
use crate::config::{Config, ConfigError};
use crate::context::ContextSigner;
use crate::lifecycle::SessionLimits;
use crate::metrics::{Metrics, Route};
use crate::problem::{Problem, Side};
use crate::session::{MemoryStore, SessionStore};
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

    /// A fresh id, as the header value it travels in (logs and audit read it as text).
    fn next(&self) -> HeaderValue {
        let id = format!(
            "{:08x}-{:x}",
            self.prefix,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
            .expect("hex digits and a dash are a valid header value")
    }
}

/// Everything shared by all requests: configuration, upstream pools, the session store,
/// the audit log, the context signer and the counters.
pub struct Gateway {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<dyn SessionStore>,
    pub audit: AuditLog,
    pub signer: ContextSigner,
    pub(crate) limits: SessionLimits,
    /// The configured authorities, shared by every session that acts for them.
    authorities: Vec<Arc<crate::config::Authority>>,
    pub(crate) emr: Upstream,
    pub(crate) ehr: Upstream,
    trusted: TrustedHeaders,
    ids: RequestIds,
    /// `Strict-Transport-Security` for every response (both hosts are HTTPS only).
    hsts: Option<HeaderValue>,
    /// Turns `true` when the server begins to shut down.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Configured paths are compared with requests' canonical paths, so they must be written
/// in canonical form themselves (a path that is not could never match).
fn check_canonical_paths(config: &Config) -> Result<(), ConfigError> {
    let (emr, ehr) = (&config.emr, &config.ehr);
    let mut paths: Vec<(String, &str)> = vec![
        ("emr.launch_path".into(), &emr.launch_path),
        ("ehr.launch_path".into(), &ehr.launch_path),
        ("ehr.logout_path".into(), &ehr.logout_path),
        ("ehr.override_path".into(), &ehr.override_path),
    ];
    for (i, p) in emr.logout_paths.iter().enumerate() {
        paths.push((format!("emr.logout_paths[{i}]"), p));
    }
    for (key, p) in paths {
        // Only unreserved characters: a server such as Tomcat decodes other escapes that
        // the canonical form keeps, so such a path could be reached by another spelling.
        if let Some(c) = p
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "/-._~".contains(*c)))
        {
            return Err(ConfigError::new(
                key,
                format!("{p:?} contains {c:?}; a configured path may hold only letters, digits, '/', '-', '.', '_' and '~'"),
            ));
        }
        match path::canonical(p) {
            Ok(c) if c == *p => {}
            Ok(c) => {
                return Err(ConfigError::new(
                    key,
                    format!("{p:?} is not in canonical form; write {:?}", c.as_str()),
                ))
            }
            Err(e) => return Err(ConfigError::new(key, format!("{p:?}: {}", e.describe()))),
        }
    }
    Ok(())
}

/// Per-request context carried through the phases.
pub struct Ctx {
    /// The request id, as sent upstream and to the client (cheap to clone).
    pub id_header: HeaderValue,
    pub started: Instant,
    /// The client prefers JSON to HTML for error pages.
    pub json: bool,
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
    /// The request id as text.
    pub fn id(&self) -> &str {
        self.id_header.to_str().unwrap_or_default()
    }
}

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, ConfigError> {
        check_canonical_paths(&config)?;
        let s = &config.server;
        let emr = Upstream::new(
            Origin::Emr,
            &config.emr.upstream,
            &config.emr.upstream_ca,
            s,
        )?;
        let ehr = Upstream::new(
            Origin::Ehr,
            &config.ehr.upstream,
            &config.ehr.upstream_ca,
            s,
        )?;
        let signer = ContextSigner::load(&config.context.signing_key)?;
        let mut trusted = TrustedHeaders::new();
        trusted.add(&config.ehr.context_header, Severity::Forgery);
        Ok(Self {
            store: Arc::new(MemoryStore::new(config.session.max_sessions)),
            audit: AuditLog::open(&config.audit),
            limits: SessionLimits::from(&*config),
            authorities: config.authorities.iter().cloned().map(Arc::new).collect(),
            signer,
            metrics,
            emr,
            ehr,
            trusted,
            ids: RequestIds::new(),
            hsts: (!config.server.hsts.is_empty())
                .then(|| HeaderValue::from_str(&config.server.hsts).ok())
                .flatten(),
            shutdown,
            config,
        })
    }

    /// The shared copy of a configured authority.
    pub(crate) fn shared_authority(
        &self,
        a: &crate::config::Authority,
    ) -> Arc<crate::config::Authority> {
        self.authorities
            .iter()
            .find(|s| s.id == a.id)
            .cloned()
            .unwrap_or_else(|| Arc::new(a.clone()))
    }

    pub(crate) fn upstream(&self, origin: Origin) -> &Upstream {
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
        let mut ctx = Ctx {
            id_header: self.ids.next(),
            started: Instant::now(),
            json: crate::problem::wants_json(req.headers()),
            host: String::new(),
            path: path::CanonicalPath::default(),
        };
        // The canonical path only, recorded once known: query strings can carry patient
        // details, and path parameters a session id (`;jsessionid=`).
        let span = tracing::info_span!(
            "request",
            id = %ctx.id(),
            method = %req.method(),
            path = tracing::field::Empty,
            origin = tracing::field::Empty,
        );
        async move {
            let method = req.method().clone();
            let host = route::request_host(req.uri(), req.headers());
            let (route, mut resp) =
                match self.classify(&conn, req.method(), req.uri(), req.headers(), host) {
                    Err(problem) => {
                        let problem = self.refuse_unread(req, problem).await;
                        (Route::Unrouted, self.fail(&ctx, problem))
                    }
                    Ok(origin) => {
                        tracing::Span::current().record("origin", origin.as_str());
                        ctx.host = host.unwrap_or_default().to_owned();
                        let resp = match path::canonical(req.uri().path()) {
                            Err(e) => {
                                let problem = Problem::bad_request(e.describe());
                                let problem = self.refuse_unread(req, problem).await;
                                self.fail(&ctx, problem)
                            }
                            Ok(canonical) => {
                                ctx.path = canonical;
                                match self.serve(&ctx, origin, &conn, req).await {
                                    Ok(resp) => resp,
                                    Err(problem) => self.fail(&ctx, problem),
                                }
                            }
                        };
                        (origin.into(), resp)
                    }
                };
            let h = resp.headers_mut();
            h.insert(headers::X_REQUEST_ID.clone(), ctx.id_header.clone());
            if let Some(hsts) = &self.hsts {
                h.insert(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
            let status = resp.status().as_u16();
            self.metrics.response(route, status);
            info!(%method, status, ms = ctx.started.elapsed().as_secs_f64() * 1e3, "served");
            resp
        }
        .instrument(span)
        .await
    }

    fn classify(
        &self,
        conn: &ConnInfo,
        method: &Method,
        uri: &http::Uri,
        headers: &http::HeaderMap,
        host: Option<&str>,
    ) -> Result<Origin, Problem> {
        if method == Method::CONNECT {
            return Err(Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
                "ehrgate is a gateway to the EMR and the EHR viewer, not a forward proxy.",
            ));
        }
        if let Some(p) = route::ambiguous_host(uri, headers) {
            return Err(p);
        }
        route::classify(
            host,
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
    ) -> Result<Response<Body>, Problem> {
        let own = route::is_own_path(&ctx.path);
        let launch = origin == Origin::Emr && ctx.path == self.config.emr.launch_path;
        if own || launch {
            // ehrgate answers these itself and never needs their body: it is read and
            // discarded first (bounded), so every answer, refusals included, is read by
            // a client that was still sending.
            let (parts, body) = req.into_parts();
            let drained = http_body::Body::is_end_stream(&body)
                || crate::body::drain(body, self.config.server.client_body_timeout.get()).await;
            let req = Request::from_parts(parts, ());
            let answer = if own {
                self.own_endpoint(ctx, origin, conn, req).await
            } else {
                self.launch(ctx, conn, req).await
            };
            let close = HeaderValue::from_static("close");
            return match answer {
                _ if drained => answer,
                Ok(mut resp) => {
                    resp.headers_mut().insert(http::header::CONNECTION, close);
                    Ok(resp)
                }
                Err(p) => Err(p.with_header(http::header::CONNECTION, close)),
            };
        }
        match origin {
            Origin::Emr => self.emr_traffic(ctx, conn, req).await,
            Origin::Ehr => self.viewer_traffic(ctx, conn, req).await,
        }
    }

    /// The request filter: hop-by-hop fields and every client copy of a header ehrgate
    /// vouches for removed, ehrgate's cookies removed, forwarding headers set, and the
    /// target rewritten for the upstream.
    pub fn prepare(
        &self,
        ctx: &Ctx,
        origin: Origin,
        conn: &ConnInfo,
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
        headers::set_forwarded(
            &mut parts.headers,
            conn.peer.ip(),
            &ctx.host,
            &ctx.id_header,
        );
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
        let idle = self.config.server.client_body_timeout.get();
        req.map(|b| Body::from_client(b, idle))
    }

    /// Sends a prepared request and applies the response filter's common part. A
    /// protocol switch is tunnelled; `close` ends the tunnel when it turns `true`.
    pub async fn exchange(
        &self,
        origin: Origin,
        out: Outbound,
        close: Option<crate::session::CloseSignal>,
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
                        Box::pin(async move { crate::server::signalled(&mut shutdown).await })
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
    pub(crate) async fn refuse_unread(&self, req: Request<Incoming>, problem: Problem) -> Problem {
        let body = req.into_body();
        if http_body::Body::is_end_stream(&body)
            || crate::body::drain(body, self.config.server.client_body_timeout.get()).await
        {
            problem
        } else {
            problem.with_header(http::header::CONNECTION, HeaderValue::from_static("close"))
        }
    }

    pub(crate) fn fail(&self, ctx: &Ctx, problem: Problem) -> Response<Body> {
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
        problem.into_response(ctx.id(), ctx.json)
    }
}
