//! Sign-out: the effects of an ended session, in order. The session leaves the map
//! first (the very next viewer request is refused), then its watchers are told (event
//! streams get `logout`, tunnels close), then the viewer is signed out server-to-server
//! (bounded time; a failure is audited, the local sign-out stands), then the audit.

use std::sync::Arc;

use http::header::{HeaderValue, COOKIE};
use http::Request;
use tracing::{info, warn};

use crate::audit::{Event, Record};
use crate::body::Body;
use crate::gateway::Gateway;
use crate::proxy::route::Origin;
use crate::session::decide::EndReason;
use crate::session::{EhrSession, TokenHash};

impl Gateway {
    /// Ends an EMR session and everything linked to it. Returns whether there was one.
    pub async fn sign_out_emr(
        &self,
        key: &TokenHash,
        reason: EndReason,
        request_id: Option<&str>,
    ) -> bool {
        let Some(emr) = self.store.remove_emr(key) else {
            return false;
        };
        if !emr.end() {
            return false;
        }
        if let Some(ehr) = self.store.remove_ehr_of_emr(key) {
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
        match self.store.remove_ehr_of_emr(emr) {
            Some(ehr) => {
                self.finish_ehr(ehr, reason, request_id).await;
                true
            }
            None => false,
        }
    }

    /// Every EMR session of a user (admin sign-out); returns how many ended.
    pub async fn sign_out_user(&self, user: &str, request_id: Option<&str>) -> usize {
        let keys = self.store.emr_keys_of_user(user);
        let ends = keys
            .iter()
            .map(|k| self.sign_out_emr(k, EndReason::Admin, request_id));
        futures_util::future::join_all(ends)
            .await
            .into_iter()
            .filter(|ended| *ended)
            .count()
    }

    pub(crate) async fn finish_ehr(
        &self,
        ehr: Arc<EhrSession>,
        reason: EndReason,
        request_id: Option<&str>,
    ) {
        if !ehr.close() {
            return;
        }
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
