//! Enter (DESIGN §6): a launch ticket redeemed on the viewer host becomes (or renews) the
//! EHR session, and the viewer's launch page is fetched with the signed context.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, COOKIE, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::info;

use super::form;
use crate::audit::{Event, Record};
use crate::body::Body;
use crate::config::CookieMode;
use crate::context::{new_jti, Claims, PatientClaims};
use crate::problem::Problem;
use crate::proxy::cookies::{self, EHR_COOKIE};
use crate::proxy::route::Origin;
use crate::proxy::{ConnInfo, Ctx, Gateway};
use crate::session::decide::{self, EndReason, RedeemError};
use crate::session::{EhrSession, OpenedPatient, Token, TokenHash};

impl Gateway {
    pub(crate) async fn enter(
        &self,
        ctx: &Ctx,
        conn: &ConnInfo,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Problem> {
        let query = req.uri().query().unwrap_or("");
        let ticket =
            form::value(query, "ticket").and_then(|t| self.store.take_ticket(&TokenHash::of(&t)));
        let now = self.store.now();
        let emr_live = ticket
            .as_ref()
            .is_some_and(|t| self.store.emr(&t.emr).is_some());
        if let Err(e) = decide::redeem(ticket.as_ref(), now, emr_live) {
            let detail = match e {
                RedeemError::UnknownOrUsed => "enter: unknown or used ticket",
                RedeemError::Expired => "enter: expired ticket",
                RedeemError::EmrSessionEnded => "enter: EMR session ended",
            };
            let mut record = Record::new(Event::Deny, "refused")
                .request_id(ctx.id())
                .detail(detail);
            if let Some(t) = &ticket {
                record = record.user(&t.user).uao(&t.authority.id).patient(
                    &t.patient.demographic_no,
                    self.audit.hcn_hmac(&t.patient.hcn),
                );
            }
            self.audit_best_effort(&record);
            info!(detail, "enter refused");
            return Err(Problem::new(
                StatusCode::GONE,
                "ticket_invalid",
                "This EHR link has expired",
                "EHR links work once, for a short time, and only while the EMR session that made them lasts.",
            )
            .hint("Relaunch from the EMR: open the patient's chart and press EHR."));
        }
        let t = ticket.expect("redeemed");
        let hcn_hmac = self.audit.hcn_hmac(&t.patient.hcn);

        // The record comes before anything is granted.
        self.audit_or_refuse(
            &Record::new(Event::Enter, "ok")
                .user(&t.user)
                .uao(&t.authority.id)
                .patient(&t.patient.demographic_no, hcn_hmac.clone())
                .request_id(ctx.id())
                .detail(if t.mrp { "mrp" } else { "not_mrp" }),
        )?;

        let token = Token::generate().map_err(|_| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "rng_unavailable",
                "Service unavailable",
                "ehrgate could not make a secure random value.",
            )
        })?;
        // A fresh session id at every enter; the viewer's cookies (and so its login) stay.
        let session = match self.store.ehr_of_emr(&t.emr) {
            Some(s) if s.authority.id == t.authority.id => {
                self.store.rekey_ehr(&s, token.hash());
                s
            }
            other => {
                if other.is_some() {
                    self.end_ehr_of(&t.emr, EndReason::AuthorityChange, Some(ctx.id()))
                        .await;
                }
                let s = Arc::new(EhrSession::new(
                    t.emr,
                    t.user.clone(),
                    t.authority.clone(),
                    token.hash(),
                    now,
                ));
                self.store.insert_ehr(s.clone());
                s
            }
        };
        session.touch(now);
        *session.patient.lock().expect("patient lock") = OpenedPatient {
            demographic_no: t.patient.demographic_no.parse().unwrap_or_default(),
            hcn_hmac: self.audit.hcn_tag(&t.patient.hcn),
        };

        let unix = time::OffsetDateTime::now_utc().unix_timestamp();
        let aud = format!("https://{}", ctx.host);
        let jti = new_jti().unwrap_or_default();
        let p = &t.patient;
        let claims = Claims {
            iss: &self.config.context.issuer,
            aud: &aud,
            sub: &t.user,
            uao: &t.authority.id,
            uao_name: &t.authority.name,
            patient: PatientClaims {
                demographic_no: &p.demographic_no,
                hcn: &p.hcn,
                hcn_version: &p.hcn_version,
                birth_date: &p.birth_date,
                gender: &p.gender,
                family: &p.family,
                given: &p.given,
            },
            mrp: t.mrp,
            iat: unix,
            exp: unix + self.config.context.lifetime.get().as_secs() as i64,
            jti,
        };
        let assertion = self.signer.sign(&claims).map_err(|_| {
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "signing_failed",
                "Service unavailable",
                "ehrgate could not sign the patient context.",
            )
        })?;

        let mut out = self.prepare(ctx, Origin::Ehr, conn, req);
        out.parts.method = Method::GET;
        out.parts.uri = self.ehr.uri_for(Some(
            &self.config.ehr.launch_path.parse().expect("validated path"),
        ));
        out.body = Body::empty();
        let h = &mut out.parts.headers;
        h.remove(http::header::CONTENT_LENGTH);
        h.remove(http::header::CONTENT_TYPE);
        let header = HeaderName::from_bytes(self.config.ehr.context_header.as_bytes())
            .expect("validated name");
        h.insert(
            header,
            HeaderValue::from_str(&assertion).expect("JWS is base64url"),
        );
        if self.config.ehr.cookie_mode == CookieMode::Vault {
            h.remove(COOKIE);
            let jar = session.jar.lock().expect("jar lock");
            if let Some(c) = jar.header_for(&self.config.ehr.launch_path, unix) {
                if let Ok(v) = HeaderValue::from_str(&c) {
                    h.insert(COOKIE, v);
                }
            }
        }
        let inject = self.wants_injection(&mut out.parts.headers);
        let resp = self.exchange(Origin::Ehr, out, None).await?;
        let mut resp = self.viewer_response(resp, &session, inject);
        let h = resp.headers_mut();
        h.append(SET_COOKIE, cookies::set(EHR_COOKIE, token.as_str()));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        info!(mrp = t.mrp, "EHR session entered");
        Ok(resp)
    }
}
