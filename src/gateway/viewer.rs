//! Viewer traffic (DESIGN §6): every request to the viewer host needs a live EHR session.
//! Vault mode keeps the viewer's cookies here; the MRP override is audited; viewer pages
//! get the tab-closing script.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT, ACCEPT_ENCODING, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_TYPE, COOKIE, SET_COOKIE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use super::{form, inject};
use crate::audit::{Event, Record};
use crate::body::Body;
use crate::config::CookieMode;
use crate::gateway::Gateway;
use crate::problem::Problem;
use crate::proxy::cookies::{self, EHR_COOKIE};
use crate::proxy::route::Origin;
use crate::proxy::Ctx;
use crate::server::ConnInfo;
use crate::session::decide::{self, EndReason};
use crate::session::{EhrSession, SessionStore, StoreError, TokenHash, ViewerSession};

/// Copies of one of ehrgate's cookies looked up per request (a browser sends one; each
/// costs a store look-up, so a header full of them costs no more than this).
pub(crate) const MAX_COOKIE_COPIES: usize = 3;

/// Why a viewer response was cut.
const SIGNED_OUT: &str = "the EHR session ended while the viewer's response was streaming";

impl Gateway {
    /// The live EHR session the request's `__Host-ehrgate` names, after enforcing its
    /// limits and its EMR session's; `None` means the request must be refused. One store
    /// look-up (in Redis, one round trip for both sessions and the jar).
    pub(crate) async fn live_ehr_session(
        &self,
        headers: &HeaderMap,
        ctx: &Ctx,
    ) -> Result<Option<Arc<EhrSession>>, StoreError> {
        let now = self.store.now();
        let mut found = None;
        // A few copies at most: each costs a store look-up.
        for v in cookies::get_all(headers, EHR_COOKIE).take(MAX_COOKIE_COPIES) {
            if let Some(s) = self
                .store
                .viewer_session(&TokenHash::of(v), Some(now))
                .await?
            {
                found = Some(s);
                break;
            }
        }
        let Some(ViewerSession { ehr: session, emr }) = found else {
            return Ok(None);
        };
        // Its sign-out reached this replica after the store was read.
        if session.is_closed() {
            return Ok(None);
        }
        // A sign-out held back by a store outage is done before anything else.
        if let Some((emr_side, reason)) = self.pending.holds(&session.emr) {
            if emr_side {
                self.sign_out_emr(&session.emr, reason, Some(ctx.id()))
                    .await;
            } else {
                self.end_ehr_of(&session.emr, reason, Some(ctx.id())).await;
            }
            return Ok(None);
        }
        let l = &self.limits;
        if let Some(reason) = decide::ehr_expired(&session, now, l.ehr_idle, l.ehr_lifetime) {
            self.end_ehr_of(&session.emr, reason, Some(ctx.id())).await;
            return Ok(None);
        }
        match emr {
            None => {
                self.end_ehr_of(&session.emr, EndReason::EmrGone, Some(ctx.id()))
                    .await;
                return Ok(None);
            }
            Some(emr) if decide::emr_idle(&emr, now, l.emr_idle) => {
                self.sign_out_emr(&emr.key, EndReason::EmrIdle, Some(ctx.id()))
                    .await;
                return Ok(None);
            }
            Some(_) => {}
        }
        session.touch(now);
        Ok(Some(session))
    }

    /// A refusal of a viewer-host request because the session store cannot answer:
    /// 503, audited as `deny` (someone was refused access), nothing forwarded.
    pub(crate) fn refuse_store_down(&self, ctx: &Ctx, what: &str, e: StoreError) -> Problem {
        self.audit_best_effort(
            &Record::new(Event::Deny, "refused")
                .request_id(ctx.id())
                .detail(format!("{what}: session store unavailable")),
        );
        self.store_problem(e)
    }

    /// A viewer request, in phases: session check → request filter (the engine's rules,
    /// then the vault's cookies; the override observed and audited) → upstream →
    /// response filter (cookies into the jar, the session script, the cut at sign-out).
    pub(crate) async fn viewer_traffic(
        &self,
        ctx: &Ctx,
        conn: &ConnInfo,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Problem> {
        // Session check.
        let session = match self.live_ehr_session(req.headers(), ctx).await {
            Ok(Some(session)) => session,
            Ok(None) => {
                let problem = self.ehr_session_ended(req.headers());
                return Err(self.engine.refuse_unread(req, problem).await);
            }
            Err(e) => {
                let problem = self.refuse_store_down(ctx, "viewer request", e);
                return Err(self.engine.refuse_unread(req, problem).await);
            }
        };
        // Request filter.
        let path = req.uri().path().to_owned();
        let observe_override =
            req.method() == Method::POST && ctx.path == self.config.ehr.override_path;
        let vault = self.config.ehr.cookie_mode == CookieMode::Vault;
        let mut req = req;
        if vault {
            // The browser's cookies are replaced by the jar's: no need to filter them.
            req.headers_mut().remove(COOKIE);
        }
        let mut out = self.engine.prepare(
            ctx,
            Origin::Ehr,
            &conn.peer_ip,
            self.engine.client_request(req),
        );
        if vault {
            let unix = time::OffsetDateTime::now_utc().unix_timestamp();
            let jar = session.jar.lock().expect("jar lock");
            if let Some(c) = jar.header_for(&path, unix) {
                if let Ok(v) = HeaderValue::from_str(&c) {
                    out.parts.headers.insert(COOKIE, v);
                }
            }
        }
        if observe_override {
            let body = std::mem::replace(&mut out.body, Body::empty());
            out.body = self
                .observe_override(ctx, &session, &out.parts.headers, body)
                .await?;
        }
        let inject = self.wants_injection(&mut out.parts.headers);
        // Upstream, then the response filter.
        let resp = self
            .engine
            .exchange(Origin::Ehr, out, Some(session.close_signal()))
            .await?;
        self.viewer_response(resp, &session, inject).await
    }

    /// The 401 for a viewer request without a live session, expiring what the browser
    /// holds for the viewer host.
    pub(crate) fn ehr_session_ended(&self, headers: &HeaderMap) -> Problem {
        let mut p = Problem::new(
            StatusCode::UNAUTHORIZED,
            "ehr_session_ended",
            "EHR session ended — relaunch from the EMR",
            "Your EHR session has ended (signed out, disconnected, or unused for too long).",
        )
        .hint("Go back to the EMR, open the patient's chart and press EHR.");
        if let Some(v) = cookies::expire(EHR_COOKIE, "/") {
            p = p.with_header(SET_COOKIE, v);
        }
        if self.config.ehr.cookie_mode == CookieMode::Passthrough {
            // Every other cookie on the viewer host is the viewer's.
            for name in cookies::names(headers) {
                if name != EHR_COOKIE {
                    if let Some(v) = cookies::expire(&name, "/") {
                        p = p.with_header(SET_COOKIE, v);
                    }
                }
            }
        }
        p
    }

    /// Reads the override form (bounded), audits it with its reason, and gives back the
    /// body to forward. No record, no forward.
    async fn observe_override(
        &self,
        ctx: &Ctx,
        session: &EhrSession,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Body, Problem> {
        let limit = self.config.server.max_form_bytes;
        let too_large = || {
            Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "form_too_large",
                "Form too large",
                format!("The override form is larger than {limit} bytes."),
            )
        };
        let idle = self.config.server.client_body_timeout.get();
        // Too large: the rest is read and discarded (bounded) so the client reads the 413.
        let refuse_large = |body: Body| async move {
            if crate::body::drain_any(body, idle).await {
                too_large()
            } else {
                too_large().with_header(http::header::CONNECTION, HeaderValue::from_static("close"))
            }
        };
        if headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n > limit)
        {
            return Err(refuse_large(body).await);
        }
        let mut body = body;
        let mut form = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                if matches!(
                    crate::body::ClientBodyError::find(&*e),
                    Some(crate::body::ClientBodyError::Timeout)
                ) {
                    Problem::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "request_body_timeout",
                        "Request timeout",
                        "The override form stopped arriving before it was complete.",
                    )
                    .hint("Submit the form again.")
                } else {
                    Problem::bad_request("The override form could not be read.").cause(e)
                }
            })?;
            if let Ok(data) = frame.into_data() {
                if form.len() + data.len() > limit {
                    return Err(refuse_large(body).await);
                }
                form.extend_from_slice(&data);
            }
        }
        let bytes: Bytes = form.freeze();
        let is_form = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let reason = if is_form {
            std::str::from_utf8(&bytes)
                .ok()
                .and_then(|text| form::value(text, &self.config.ehr.override_reason_field))
                .map(|r| r.chars().take(500).collect::<String>())
        } else {
            None
        };
        let patient = *session.patient.lock().expect("patient lock");
        let mut record = Record::new(Event::Override, "ok")
            .user(&session.user)
            .uao(&session.authority.id)
            .patient(
                &patient.demographic_no.to_string(),
                patient.hcn_hmac.map(|t| crate::audit::hex(&t)),
            )
            .request_id(ctx.id());
        match &reason {
            Some(r) => record = record.reason(r),
            None => record = record.detail("no reason field in the form"),
        }
        self.audit_or_refuse(&record)?;
        Ok(Body::full(bytes))
    }

    /// For page requests, asks the viewer for an uncompressed answer so the session
    /// script can be added; returns whether to try adding it.
    pub(crate) fn wants_injection(&self, headers: &mut HeaderMap) -> bool {
        if !self.config.ehr.inject_session_script {
            return false;
        }
        let html = headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
        if html {
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        }
        html
    }

    /// The response filter for the viewer: its cookies into the jar (vault mode keeps
    /// them from the browser), and the session script into its pages.
    /// The body is cut the moment the session ends: nothing of the viewer flows after a
    /// sign-out, a report download or a long poll no more than a WebSocket.
    pub(crate) async fn viewer_response(
        &self,
        resp: Response<Body>,
        session: &Arc<EhrSession>,
        inject: bool,
    ) -> Result<Response<Body>, Problem> {
        let (mut parts, body) = resp.into_parts();
        if parts.headers.contains_key(SET_COOKIE) {
            let unix = time::OffsetDateTime::now_utc().unix_timestamp();
            {
                let mut jar = session.jar.lock().expect("jar lock");
                for v in parts.headers.get_all(SET_COOKIE) {
                    if let Ok(v) = v.to_str() {
                        jar.capture(v, unix);
                    }
                }
            }
            // Kept before the response goes on: the next request, on any replica, has them.
            let saved = self
                .store
                .save_ehr(session)
                .await
                .map_err(|e| self.store_problem(e))?;
            if !saved {
                // The session ended while the viewer answered: nothing of it goes on.
                session.close();
                return Err(self.ehr_session_ended(&HeaderMap::new()));
            }
            if self.config.ehr.cookie_mode == CookieMode::Vault {
                parts.headers.remove(SET_COOKIE);
            }
        }
        if !static_asset(&parts.headers) {
            // A chart, a result, a report: never kept by the browser, so Back after a
            // sign-out asks again (and is refused) instead of showing it from cache.
            parts
                .headers
                .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        }
        let html = parts
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/html"));
        let identity = parts
            .headers
            .get(CONTENT_ENCODING)
            .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
        if inject && html && identity && parts.status != StatusCode::NOT_MODIFIED {
            parts.headers.remove(CONTENT_LENGTH);
            // The page differs from what the viewer sent: its validators no longer apply.
            parts.headers.remove(http::header::ETAG);
            debug!("adding the session script to a viewer page");
            let body = inject::with_session_script(body);
            return Ok(Response::from_parts(
                parts,
                body.until(session.close_signal(), SIGNED_OUT),
            ));
        }
        Ok(Response::from_parts(
            parts,
            body.until(session.close_signal(), SIGNED_OUT),
        ))
    }
}

/// Scripts, styles, images and fonts: the viewer's own caching rules stand for them.
fn static_asset(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let ct = ct.trim_start().to_ascii_lowercase();
    ct.starts_with("text/css")
        || ct.contains("javascript")
        || ct.starts_with("image/")
        || ct.starts_with("font/")
}
