//! Sign-out: the effects of an ended session, in order. The session leaves the map
//! first (the very next viewer request is refused), then its watchers are told (event
//! streams get `logout`, tunnels close), then the viewer is signed out server-to-server
//! (bounded time; a failure is audited, the local sign-out stands), then the audit.
//!
//! With a shared store that cannot be reached, a sign-out cannot leave the map: it is
//! kept here and retried (every sweep, and before any viewer request of that session is
//! let through), so a logout seen while Redis was down still ends the EHR session the
//! moment Redis is back.

use std::sync::Arc;

use http::header::{HeaderValue, COOKIE};
use http::Request;
use tracing::{info, warn};

use crate::audit::{Event, Record};
use crate::body::Body;
use crate::gateway::Gateway;
use crate::proxy::route::Origin;
use crate::session::decide::EndReason;
use crate::session::{EhrSession, SessionStore, TokenHash};

impl Gateway {
    /// Ends an EMR session and everything linked to it. Returns whether there was one.
    pub async fn sign_out_emr(
        &self,
        key: &TokenHash,
        reason: EndReason,
        request_id: Option<&str>,
    ) -> bool {
        let (emr, ehr) = match self.store.end_emr(key).await {
            Ok(Some(ended)) => ended,
            Ok(None) => {
                // Ended already (by another replica, say): nothing is owed any more.
                self.pending.forget(key);
                return false;
            }
            Err(e) => {
                self.store_failed(&e);
                self.pending.remember(*key, true, reason);
                warn!(session = %key.label(), "EMR sign-out kept to retry: the session store is unavailable");
                return false;
            }
        };
        self.pending.forget(key);
        if let Some(ehr) = ehr {
            self.finish_ehr(ehr, reason, request_id).await;
        }
        let mut record = Record::new(Event::EmrLogout, "ok")
            .user(&emr.user)
            .detail(reason.as_str());
        if let Some(id) = request_id {
            record = record.request_id(id);
        }
        self.audit_best_effort(&record);
        info!(reason = reason.as_str(), session = %emr.key.label(), "EMR session signed out");
        true
    }

    /// Ends the EHR side of an EMR session only (Disconnect, a new authority, limits).
    pub async fn end_ehr_of(
        &self,
        emr: &TokenHash,
        reason: EndReason,
        request_id: Option<&str>,
    ) -> bool {
        match self.store.remove_ehr_of_emr(emr).await {
            Ok(Some(ehr)) => {
                self.pending.forget_ehr(emr);
                self.finish_ehr(ehr, reason, request_id).await;
                true
            }
            Ok(None) => {
                self.pending.forget_ehr(emr);
                false
            }
            Err(e) => {
                self.store_failed(&e);
                self.pending.remember(*emr, false, reason);
                warn!(session = %emr.label(), "EHR sign-out kept to retry: the session store is unavailable");
                false
            }
        }
    }

    /// Retries the sign-outs a store outage held back; returns how many remain.
    pub(crate) async fn retry_pending(&self) -> usize {
        for (key, emr_side, reason) in self.pending.all() {
            if emr_side {
                self.sign_out_emr(&key, reason, None).await;
            } else {
                self.end_ehr_of(&key, reason, None).await;
            }
        }
        self.pending.len()
    }

    /// Every EMR session of a user (admin sign-out); returns how many ended.
    pub async fn sign_out_user(
        &self,
        user: &str,
        request_id: Option<&str>,
    ) -> Result<usize, crate::session::StoreError> {
        let keys = self
            .store
            .emr_keys_of_user(user)
            .await
            .inspect_err(|e| self.store_failed(e))?;
        let ends = keys
            .iter()
            .map(|k| self.sign_out_emr(k, EndReason::Admin, request_id));
        let ended = futures_util::future::join_all(ends)
            .await
            .into_iter()
            .filter(|ended| *ended)
            .count();
        let held = keys
            .iter()
            .filter(|k| self.pending.holds(k).is_some())
            .count();
        if held > 0 {
            // Not all done: the caller must not be told the user is signed out.
            return Err(crate::session::StoreError::Unavailable(format!(
                "{held} of the user's sessions could not be signed out yet (kept, retried)"
            )));
        }
        Ok(ended)
    }

    pub(crate) async fn finish_ehr(
        &self,
        ehr: Arc<EhrSession>,
        reason: EndReason,
        request_id: Option<&str>,
    ) {
        // The store handed this session to this caller alone (its removal is atomic), so
        // the effects run once here; a handle that a sign-out message from another
        // replica already closed is closed again harmlessly.
        ehr.close();
        let (result, detail) = match self.viewer_logout(&ehr).await {
            Ok(status) => (
                "ok",
                format!("{}; viewer logout answered {status}", reason.as_str()),
            ),
            Err(why) => {
                warn!(error = %why, "viewer logout failed; the local sign-out stands");
                (
                    "error",
                    format!("{}; viewer logout failed: {why}", reason.as_str()),
                )
            }
        };
        let mut record = Record::new(Event::EhrLogout, result)
            .user(&ehr.user)
            .uao(&ehr.authority.id)
            .detail(detail);
        if let Some(id) = request_id {
            record = record.request_id(id);
        }
        self.audit_best_effort(&record);
        info!(reason = reason.as_str(), "EHR session signed out");
    }

    /// Calls the viewer's logout path with the session's viewer cookies, bounded in time.
    async fn viewer_logout(&self, ehr: &EhrSession) -> Result<u16, String> {
        let path = &self.config.ehr.logout_path;
        let uri = self.engine.upstream(Origin::Ehr).uri_for(Some(
            &path.parse().map_err(|_| "bad logout path".to_string())?,
        ));
        let mut req = Request::get(uri)
            .body(Body::empty())
            .expect("valid request");
        let unix = time::OffsetDateTime::now_utc().unix_timestamp();
        let cookie = ehr.jar.lock().expect("jar lock").header_for(path, unix);
        if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
            req.headers_mut().insert(COOKIE, c);
        }
        match tokio::time::timeout(
            self.limits.viewer_logout,
            self.engine.upstream(Origin::Ehr).send(req),
        )
        .await
        {
            Err(_) => Err("no answer in time".into()),
            Ok(Err(e)) => Err(e
                .into_problem(crate::proxy::route::Origin::Ehr)
                .detail
                .into_owned()),
            Ok(Ok(resp)) if resp.status().is_server_error() => {
                Err(format!("status {}", resp.status().as_u16()))
            }
            Ok(Ok(resp)) => Ok(resp.status().as_u16()),
        }
    }
}
