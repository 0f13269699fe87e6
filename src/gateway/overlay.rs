//! What the EMR's EHR overlay asks: `GET /.ehrgate/status` (connected? which authority?
//! which may be chosen?) and `POST /.ehrgate/disconnect` (end the EHR side only).

use http::{HeaderMap, Request, Response, StatusCode};
use serde_json::json;

use super::json_response;
use crate::audit::{Event, Record};
use crate::body::Body;
use crate::config::Authority;
use crate::gateway::Gateway;
use crate::problem::Problem;
use crate::proxy::cookies::{self, EMR_MARKER_COOKIE};
use crate::proxy::Ctx;
use crate::session::decide::EndReason;
use crate::session::{EhrSession, EmrSession, SessionStore, StoreError, TokenHash};

fn authority_json(a: &Authority) -> serde_json::Value {
    json!({"id": a.id, "name": a.name, "default": a.default})
}

impl Gateway {
    /// The EMR session the `__Host-ehrgate-emr` marker names, if still live.
    pub(crate) async fn emr_of_marker(
        &self,
        headers: &HeaderMap,
    ) -> Result<Option<std::sync::Arc<EmrSession>>, StoreError> {
        for m in cookies::get_all(headers, EMR_MARKER_COOKIE).take(super::viewer::MAX_COOKIE_COPIES)
        {
            if let Some(emr) = self.store.emr_by_marker(&TokenHash::of(m)).await? {
                return Ok(Some(emr));
            }
        }
        Ok(None)
    }

    fn status_json(&self, ehr: Option<&EhrSession>) -> serde_json::Value {
        json!({
            "connected": ehr.is_some(),
            "authority": ehr.map(|s| authority_json(&s.authority)),
            "authorities": self.config.authorities.iter().map(authority_json).collect::<Vec<_>>(),
        })
    }

    pub(crate) async fn status(&self, req: &Request<()>) -> Result<Response<Body>, Problem> {
        let ehr = match self.emr_of_marker(req.headers()).await {
            Ok(Some(emr)) => self.store.ehr_of_emr(&emr.key).await,
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        }
        .map_err(|e| self.store_problem(e))?;
        Ok(json_response(
            StatusCode::OK,
            &self.status_json(ehr.as_deref()),
        ))
    }

    pub(crate) async fn disconnect(
        &self,
        ctx: &Ctx,
        req: &Request<()>,
    ) -> Result<Response<Body>, Problem> {
        if let Some(why) =
            crate::session::decide::same_origin_refusal(req.headers(), &self.config.emr.host)
        {
            self.audit_best_effort(
                &Record::new(Event::Deny, "refused")
                    .request_id(ctx.id())
                    .detail(format!("disconnect: cross-site request ({why})")),
            );
            return Err(Problem::new(
                StatusCode::FORBIDDEN,
                "cross_site",
                "Disconnect refused",
                "Disconnect works only from the EMR's own pages.",
            ));
        }
        let emr = self
            .emr_of_marker(req.headers())
            .await
            .map_err(|e| self.store_problem(e))?;
        if let Some(emr) = emr {
            let ehr = self
                .store
                .ehr_of_emr(&emr.key)
                .await
                .map_err(|e| self.store_problem(e))?;
            let ended = self
                .end_ehr_of(&emr.key, EndReason::Disconnect, Some(ctx.id()))
                .await;
            if !ended && self.pending.holds(&emr.key).is_some() {
                // Not done yet: the clinician must not be told the EHR is disconnected.
                return Err(self.store_problem(StoreError::Unavailable(
                    "the disconnect could not be recorded".into(),
                )));
            }
            if ended {
                let mut record = Record::new(Event::Disconnect, "ok")
                    .user(&emr.user)
                    .request_id(ctx.id());
                if let Some(ehr) = ehr {
                    record = record.uao(&ehr.authority.id);
                }
                self.audit_best_effort(&record);
            }
        }
        Ok(json_response(StatusCode::OK, &self.status_json(None)))
    }
}
