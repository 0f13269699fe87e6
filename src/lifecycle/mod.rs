//! The lifecycle flows of DESIGN §6 on the wire: launch, enter, viewer traffic, EMR
//! traffic (sign-out triggers), Disconnect and status, the event stream that closes
//! tabs, and the sweeper.
//!
//! Each flow carries bytes and calls the decisions in `crate::session::decide`; the
//! audit record of an access is written before the response that grants it, and a
//! failure to write it refuses the access.

mod emr;
mod enter;
mod events;
pub use events::MAX_STREAMS_PER_SESSION;
pub(crate) mod form;
mod inject;
mod launch;
mod overlay;
mod signout;
mod sweep;
mod viewer;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE, COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::audit::Record;
use crate::body::Body;
use crate::config::Config;
use crate::problem::{Problem, Side};
use crate::proxy::route::Origin;
use crate::proxy::{headers, ConnInfo, Ctx, Gateway};
use crate::session::Millis;

pub use sweep::spawn_sweeper;

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
                Ok(self.status(&req))
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
                self.events(&req)
            }
            _ => Err(
                Problem::not_found(format!("{path} is not an ehrgate endpoint."))
                    .hint("Open the EMR from its usual address."),
            ),
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
        peer: std::net::IpAddr,
    ) -> Result<(StatusCode, Option<serde_json::Value>), Problem> {
        let uri = self.emr.uri_for(Some(&path.parse().map_err(|_| {
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
        let resp = self.emr.send(req).await.map_err(|e| {
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
