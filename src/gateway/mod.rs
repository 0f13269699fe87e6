//! The gateway: the clinic's policy. It owns the configuration in force, the session
//! store, the audit log, the context signer and the counters, and every flow of DESIGN §6,
//! built on the forwarding engine ([`crate::proxy::Engine`]) and served by the listener
//! ([`crate::server`]) through [`Handler`].
//!
//! One request ([`Gateway::serve_request`]): classify (host, SNI, canonical path) →
//! ehrgate's own endpoint or the launch (answered here, body discarded) or forwarding
//! by origin → log. Where each behaviour of DESIGN §6 lives:
//!
//! | behaviour | file |
//! | --- | --- |
//! | Launch (`emr.launch_path`): whoami, patient, authority, ticket, marker | `launch.rs` |
//! | Enter and the binding round trip (`/.ehrgate/enter`, `/.ehrgate/confirm`), the context assertion | `enter.rs` |
//! | Viewer traffic: session check → request filter (vault cookies) → upstream → response filter (jar, script, cut at sign-out); override audit | `viewer.rs`, `inject.rs` |
//! | EMR traffic: forward → watch for the session's end (logout paths, expiring cookie, idle) | `emr.rs` |
//! | Sign-out effects, in order; admin sign-out of a user | `signout.rs` |
//! | Disconnect and status for the overlay | `overlay.rs` |
//! | Tab closing: `session.js` and the event stream | `events.rs` |
//! | Idle and lifetime limits, orphaned sessions | `sweep.rs` |
//!
//! The decisions themselves are plain functions in `crate::session::decide`. It must
//! never grant an access without its audit record written first (a failure to write it
//! refuses the access), never forward a request the engine has not filtered, and never
//! let a viewer response outlive its session.

mod emr;
mod enter;
mod events;
pub use events::MAX_STREAMS_PER_SESSION;
pub(crate) mod form;
mod inject;
mod launch;
mod overlay;
mod pending;
mod signout;
mod sweep;
mod viewer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE, COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::watch;
use tracing::{debug, info, warn, Instrument};

use crate::audit::{AuditLog, Record};
use crate::body::Body;
use crate::config::{Config, ConfigError};
use crate::context::ContextSigner;
use crate::metrics::{Metrics, Route};
use crate::problem::{Problem, Side};
use crate::proxy::route::{self, Origin};
use crate::proxy::{headers, path, Ctx, Engine};
use crate::server::{ConnInfo, Handler};
use crate::session::{MemoryStore, Millis, RedisStore, Sessions, StoreError, StoreLimits};

pub use sweep::spawn_sweeper;

/// With a shared store: listens for sign-outs published by every replica (closing this
/// replica's event streams, tunnels and streaming responses of those sessions).
pub fn spawn_store_listener(store: Arc<Sessions>) {
    if store.is_shared() {
        tokio::spawn(async move {
            if let Sessions::Redis(r) = &*store {
                r.listen().await;
            }
        });
    }
}

impl Handler for Gateway {
    fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = Response<Body>> + Send + 'static {
        self.serve_request(conn, req)
    }
}

/// The gateway in force, replaced whole on reload (DESIGN §10). Each request takes the
/// one in force when it arrives (one atomic load) and finishes under it; sessions, the
/// audit log and live connections are shared by every generation.
pub struct Current(arc_swap::ArcSwap<Gateway>);

impl Current {
    pub fn new(gateway: Gateway) -> Self {
        Self(arc_swap::ArcSwap::from_pointee(gateway))
    }

    pub fn get(&self) -> Arc<Gateway> {
        self.0.load_full()
    }

    pub fn replace(&self, gateway: Gateway) {
        self.0.store(Arc::new(gateway));
    }
}

impl Handler for Current {
    fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<hyper::body::Incoming>,
    ) -> impl std::future::Future<Output = Response<Body>> + Send + 'static {
        self.get().serve_request(conn, req)
    }
}

/// The configured session limits, in store milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub emr_idle: Millis,
    pub ehr_idle: Millis,
    pub ehr_lifetime: Millis,
    pub ticket_ttl: Millis,
    /// Bound on the server-to-server viewer logout call.
    pub viewer_logout: std::time::Duration,
}

impl SessionLimits {
    pub fn store(&self) -> StoreLimits {
        StoreLimits {
            emr_idle: self.emr_idle,
            ehr_idle: self.ehr_idle,
            ehr_lifetime: self.ehr_lifetime,
            ticket_ttl: self.ticket_ttl,
        }
    }
}

impl From<&Config> for SessionLimits {
    fn from(c: &Config) -> Self {
        let ms = |d: crate::config::ConfigDuration| d.get().as_millis() as Millis;
        Self {
            emr_idle: ms(c.emr.idle_timeout),
            ehr_idle: ms(c.session.idle_timeout),
            ehr_lifetime: ms(c.session.max_lifetime),
            ticket_ttl: ms(c.session.ticket_ttl),
            viewer_logout: c
                .server
                .upstream_response_timeout
                .get()
                .min(std::time::Duration::from_secs(5)),
        }
    }
}

/// Refuses every method but GET (HEAD included) with 405.
fn get_only(method: &Method, path: &str) -> Result<(), Problem> {
    if method == Method::GET {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed",
        format!("{path} answers GET only."),
    ))
}

/// Request ids: a random per-process prefix and a counter. Unique and cheap; not secret.
struct RequestIds {
    /// The prefix as text with its dash: `xxxxxxxx-`.
    prefix: [u8; 9],
    next: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut b = [0u8; 4];
        // A failed RNG leaves the prefix zero: ids stay unique within this process.
        let _ = aws_lc_rs::rand::fill(&mut b);
        Self::with_prefix(u32::from_be_bytes(b))
    }

    fn with_prefix(prefix: u32) -> Self {
        let mut text = [b'-'; 9];
        for (i, digit) in text[..8].iter_mut().enumerate() {
            *digit = HEX_DIGITS[(prefix >> (28 - 4 * i)) as usize & 0xf];
        }
        Self {
            prefix: text,
            next: AtomicU64::new(1),
        }
    }

    /// A fresh id, as the header value it travels in (logs and audit read it as text):
    /// the prefix, then the counter in lowercase hex without leading zeros. Written by
    /// hand: `format!` cost more than the rest of building a request's context.
    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let digits = (u64::BITS - n.leading_zeros()).div_ceil(4).max(1);
        let mut id = Vec::with_capacity(self.prefix.len() + digits as usize);
        id.extend_from_slice(&self.prefix);
        id.extend(
            (0..digits)
                .rev()
                .map(|i| HEX_DIGITS[(n >> (4 * i)) as usize & 0xf]),
        );
        HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
            .expect("hex digits and a dash are a valid header value")
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The clinic's gateway: everything shared by all requests — configuration, the
/// forwarding engine, the session store, the audit log, the context signer and the
/// counters — and the flows of DESIGN §6 over them.
pub struct Gateway {
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    pub store: Arc<Sessions>,
    /// Sign-outs a shared-store outage held back, retried until they land.
    pub(crate) pending: Arc<pending::PendingSignOuts>,
    pub audit: Arc<AuditLog>,
    pub signer: ContextSigner,
    pub(crate) limits: SessionLimits,
    /// The configured authorities, shared by every session that acts for them.
    authorities: Vec<Arc<crate::config::Authority>>,
    pub(crate) engine: Engine,
    ids: Arc<RequestIds>,
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

impl Gateway {
    pub fn new(
        config: Arc<Config>,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, ConfigError> {
        check_canonical_paths(&config)?;
        let engine = Engine::new(&config, metrics.clone(), shutdown.clone())?;
        let signer = ContextSigner::load(config.context.signing_key.paths())?;
        let limits = SessionLimits::from(&*config);
        let authorities: Vec<Arc<crate::config::Authority>> =
            config.authorities.iter().cloned().map(Arc::new).collect();
        let store = match config.session.store {
            crate::config::StoreKind::Memory => {
                Sessions::Memory(MemoryStore::new(config.session.max_sessions))
            }
            crate::config::StoreKind::Redis => Sessions::Redis(Box::new(RedisStore::new(
                &config.session,
                limits.store(),
                authorities.clone(),
                shutdown.clone(),
            )?)),
        };
        Ok(Self {
            store: Arc::new(store),
            pending: Arc::default(),
            audit: Arc::new(AuditLog::open(&config.audit)),
            limits,
            authorities,
            signer,
            metrics,
            engine,
            ids: Arc::new(RequestIds::new()),
            hsts: (!config.server.hsts.is_empty())
                .then(|| HeaderValue::from_str(&config.server.hsts).ok())
                .flatten(),
            shutdown,
            config,
        })
    }

    /// This gateway under a new configuration (a reload): new policy, engine (upstream
    /// pools), signer and limits; the same sessions, audit log, held-back sign-outs and
    /// request ids. Requests already under way finish under the gateway they started in.
    pub fn reloaded(&self, config: Arc<Config>) -> Result<Self, ConfigError> {
        check_canonical_paths(&config)?;
        let engine = Engine::new(&config, self.metrics.clone(), self.shutdown.clone())?;
        let signer = ContextSigner::load(config.context.signing_key.paths())?;
        let limits = SessionLimits::from(&*config);
        Ok(Self {
            store: self.store.clone(),
            pending: self.pending.clone(),
            audit: self.audit.clone(),
            limits,
            authorities: config.authorities.iter().cloned().map(Arc::new).collect(),
            signer,
            metrics: self.metrics.clone(),
            engine,
            ids: self.ids.clone(),
            hsts: (!config.server.hsts.is_empty())
                .then(|| HeaderValue::from_str(&config.server.hsts).ok())
                .flatten(),
            shutdown: self.shutdown.clone(),
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

    /// Serves one request from a client connection. Never fails: every problem becomes a
    /// page with the request id.
    pub async fn serve_request(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> Response<Body> {
        let mut ctx = Ctx {
            id_header: self.ids.next(),
            started: Instant::now(),
            accept: req.headers().get(http::header::ACCEPT).cloned(),
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
                        let problem = self.engine.refuse_unread(req, problem).await;
                        (Route::Unrouted, self.fail(&ctx, problem))
                    }
                    Ok(origin) => {
                        tracing::Span::current().record("origin", origin.as_str());
                        ctx.host = host.unwrap_or_default().to_owned();
                        let resp = match path::canonical(req.uri().path()) {
                            Err(e) => {
                                let problem = Problem::bad_request(e.describe());
                                let problem = self.engine.refuse_unread(req, problem).await;
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
        problem.into_response(ctx.id(), ctx.wants_json())
    }
}

/// Largest JSON answer ehrgate reads from the EMR (whoami, demographics).
const MAX_EMR_JSON: usize = 1024 * 1024;

/// Path of the tab-closing script on the EHR host.
pub const SESSION_SCRIPT_PATH: &str = "/.ehrgate/session.js";

impl Gateway {
    /// `/.ehrgate/…` and `/.well-known/ehrgate/…`: answered here, never forwarded.
    pub(crate) async fn own_endpoint(
        &self,
        ctx: &Ctx,
        origin: Origin,
        conn: &ConnInfo,
        req: Request<()>,
    ) -> Result<Response<Body>, Problem> {
        let path = ctx.path.as_str();
        let method = req.method();
        let known = |m: &Method| {
            if method == m || (*m == Method::GET && method == Method::HEAD) {
                Ok(())
            } else {
                Err(Problem::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "Method not allowed",
                    format!("{path} answers {m} only."),
                ))
            }
        };
        match (origin, path) {
            (_, "/.well-known/ehrgate/jwks.json") => {
                known(&Method::GET)?;
                let mut resp = Response::new(Body::full(self.signer.jwks()));
                let h = resp.headers_mut();
                h.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/jwk-set+json"),
                );
                h.insert(
                    CACHE_CONTROL,
                    HeaderValue::from_static("public, max-age=300"),
                );
                Ok(resp)
            }
            (Origin::Emr, "/.ehrgate/status") => {
                known(&Method::GET)?;
                self.status(&req).await
            }
            (Origin::Emr, "/.ehrgate/confirm") => {
                // Only GET: a HEAD would spend or confirm a ticket for a response nobody sees.
                get_only(method, path)?;
                self.confirm(ctx, &req).await
            }
            (Origin::Emr, "/.ehrgate/disconnect") => {
                known(&Method::POST)?;
                self.disconnect(ctx, &req).await
            }
            (Origin::Ehr, "/.ehrgate/enter") => {
                // Only GET: a HEAD would spend or confirm a ticket for a response nobody sees.
                get_only(method, path)?;
                self.enter(ctx, conn, req).await
            }
            (Origin::Ehr, SESSION_SCRIPT_PATH) => {
                known(&Method::GET)?;
                Ok(events::script())
            }
            (Origin::Ehr, "/.ehrgate/events") => {
                known(&Method::GET)?;
                self.events(ctx, &req).await
            }
            _ => Err(
                Problem::not_found(format!("{path} is not an ehrgate endpoint."))
                    .hint("Open the EMR from its usual address."),
            ),
        }
    }

    /// Counts a failure of the shared session store (and logs it, without its secrets).
    pub(crate) fn store_failed(&self, e: &StoreError) {
        self.metrics.store_error();
        warn!(error = %e, "session store failed");
    }

    /// The 503 for a request that needs the session store while it cannot answer: fail
    /// closed, nothing is forwarded.
    pub(crate) fn store_problem(&self, e: StoreError) -> Problem {
        match e {
            StoreError::Full => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "sessions_full",
                "Too many sessions",
                "ehrgate holds as many sessions as it is configured for (session.max_sessions).",
            )
            .hint("Try again in a few minutes; tell your IT staff if it persists."),
            StoreError::Unavailable(_) => {
                self.store_failed(&e);
                Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sessions_unavailable",
                    "Sessions are unavailable",
                    "Sessions are unavailable; try again shortly. ehrgate cannot reach its session store, so no EHR access is granted meanwhile.",
                )
                .hint("Try again in a minute; tell your IT staff if it persists (the session store, Redis, is unreachable).")
                .with_header(http::header::RETRY_AFTER, HeaderValue::from_static("5"))
                .cause(e)
            }
        }
    }

    /// Writes an audit record, or refuses the access it would have recorded (503).
    pub(crate) fn audit_or_refuse(&self, record: &Record) -> Result<(), Problem> {
        self.audit.record(record).map_err(|e| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                "Service unavailable",
                "Access to patient records is paused: ehrgate cannot write its audit log.",
            )
            .hint("Tell your IT staff: the audit log is unwritable (disk full or permissions).")
            .cause(e)
        })
    }

    /// Writes an audit record whose failure cannot undo what happened (a sign-out, a
    /// refusal): the failure is logged loudly instead.
    pub(crate) fn audit_best_effort(&self, record: &Record) {
        if let Err(e) = self.audit.record(record) {
            tracing::error!(error = %e, event = ?record.event, "audit record lost");
        }
    }

    /// GET a JSON resource from the EMR with the clinician's own cookies. Returns the
    /// EMR's status, and the parsed body when it answered 200.
    pub(crate) async fn emr_json(
        &self,
        ctx: &Ctx,
        path: &str,
        cookie: Option<&HeaderValue>,
        peer: &HeaderValue,
    ) -> Result<(StatusCode, Option<serde_json::Value>), Problem> {
        let uri = self
            .engine
            .upstream(Origin::Emr)
            .uri_for(Some(&path.parse().map_err(|_| {
                Problem::bad_request("The request names a patient the EMR cannot be asked about.")
            })?));
        let mut req = Request::get(uri)
            .body(Body::empty())
            .expect("valid request");
        let h = req.headers_mut();
        h.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(cookie) = cookie {
            h.insert(COOKIE, cookie.clone());
        }
        headers::set_forwarded(h, peer, &ctx.host, &ctx.id_header);
        let resp = self
            .engine
            .upstream(Origin::Emr)
            .send(req)
            .await
            .map_err(|e| {
                if let Some(kind) = e.failure_kind() {
                    self.metrics.upstream_failure(Origin::Emr, kind);
                }
                e.into_problem(Origin::Emr)
            })?;
        let status = resp.status();
        if status != StatusCode::OK {
            return Ok((status, None));
        }
        let body = http_body_util::Limited::new(resp.into_body(), MAX_EMR_JSON)
            .collect()
            .await
            .map_err(|e| {
                Problem::new(
                    StatusCode::BAD_GATEWAY,
                    "emr_answer_unreadable",
                    "Bad gateway",
                    "The EMR's answer could not be read.",
                )
                .side(Side::Upstream)
                .cause(e)
            })?
            .to_bytes();
        Ok((status, serde_json::from_slice(&body).ok()))
    }
}

/// A JSON response that is never cached.
pub(crate) fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Body::full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A string or number at a JSON pointer, as text.
pub(crate) fn pointer_text(v: &serde_json::Value, pointer: &str) -> Option<String> {
    match v.pointer(pointer)? {
        serde_json::Value::String(s) => Some(s.trim().to_string()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_the_prefix_and_the_counter_in_hex() {
        for prefix in [0, 0x5cb7_0788, u32::MAX] {
            let ids = RequestIds::with_prefix(prefix);
            for n in [1, 9, 0xf, 0x10, 0xabc, 0x1234_5678_9abc, u64::MAX] {
                ids.next.store(n, Ordering::Relaxed);
                assert_eq!(ids.next(), format!("{prefix:08x}-{n:x}").as_str());
            }
        }
        let ids = RequestIds::new();
        assert_ne!(ids.next(), ids.next(), "each id is new");
    }
}
