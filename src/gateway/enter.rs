//! Enter (DESIGN §6): a launch ticket redeemed on the viewer host becomes (or renews) the
//! EHR session, and the viewer's launch page is fetched with the signed context.

use std::sync::Arc;

use http::header::{HeaderName, HeaderValue, CACHE_CONTROL, COOKIE, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use tracing::info;

use super::form;
use super::launch::rng_failed;
use crate::audit::{Event, Record};
use crate::body::Body;
use crate::config::CookieMode;
use crate::context::{new_jti, Claims, PatientClaims};
use crate::gateway::Gateway;
use crate::problem::Problem;
use crate::proxy::cookies::{self, BIND_COOKIE, EHR_COOKIE};
use crate::proxy::route::{self, Origin};
use crate::proxy::Ctx;
use crate::server::ConnInfo;
use crate::session::decide::{self, EndReason, EnterStep, RedeemError};
use crate::session::{
    EhrSession, LaunchTicket, Linked, OpenedPatient, SessionStore, Token, TokenHash,
};

impl Gateway {
    pub(crate) async fn enter(
        &self,
        ctx: &Ctx,
        conn: &ConnInfo,
        req: Request<()>,
    ) -> Result<Response<Body>, Problem> {
        let Presented {
            value: ticket_value,
            hash,
            ticket,
            now,
            emr_live,
        } = self.presented_ticket(ctx, &req, "enter").await?;
        // A binding cookie is reused for every launch of its browser, if it is one of ours.
        let bound_cookie = cookies::get(req.headers(), BIND_COOKIE)
            .filter(|v| Token::is_well_formed(v))
            .map(str::to_owned);
        let binding = bound_cookie.as_deref().map(TokenHash::of);
        let code = form::value(req.uri().query().unwrap_or(""), "code").map(|c| TokenHash::of(&c));
        let step = match decide::enter_step(
            ticket.as_ref(),
            now,
            emr_live,
            binding.as_ref(),
            code.as_ref(),
        ) {
            Ok(step) => step,
            Err(e) => {
                return Err(self
                    .refuse_ticket(ctx, &hash, ticket.as_ref(), e, "enter")
                    .await)
            }
        };
        let t = match (step, binding, code) {
            (EnterStep::Redeem, Some(mine), Some(code)) => {
                let taken = self
                    .store
                    .take_confirmed_ticket(&hash, &mine, &code)
                    .await
                    .map_err(|e| self.refuse_store_down(ctx, "enter", e))?;
                match taken {
                    Some(t) => t,
                    // Redeemed by a concurrent request of the same browser.
                    None => {
                        let e = RedeemError::UnknownOrUsed;
                        return Err(self.refuse_ticket(ctx, &hash, None, e, "enter").await);
                    }
                }
            }
            _ => {
                let value = match bound_cookie {
                    Some(v) => v,
                    None => Token::generate()
                        .map_err(|_| rng_failed())?
                        .as_str()
                        .to_owned(),
                };
                let mine = TokenHash::of(&value);
                let nonce = Token::generate().map_err(|_| rng_failed())?;
                let bound = self
                    .store
                    .bind_ticket(&hash, mine, nonce.hash())
                    .await
                    .map_err(|e| self.refuse_store_down(ctx, "enter", e))?;
                if !bound
                    .as_ref()
                    .and_then(|t| t.binding.as_ref())
                    .is_some_and(|b| b.ct_eq(&mine))
                {
                    // Another browser came first, or the ticket went meanwhile.
                    let e = if bound.is_some() {
                        RedeemError::OtherBrowser
                    } else {
                        RedeemError::UnknownOrUsed
                    };
                    return Err(self
                        .refuse_ticket(ctx, &hash, bound.as_ref(), e, "enter")
                        .await);
                }
                // The nonce goes to this browser alone, in a redirect no page can read.
                let confirm = ("confirm", "nonce", nonce.as_str());
                let mut resp = round_trip(&self.config.emr.host, ctx, &ticket_value, confirm);
                resp.headers_mut().append(
                    SET_COOKIE,
                    cookies::set_for(BIND_COOKIE, &value, self.config.session.ticket_ttl.get()),
                );
                return Ok(resp);
            }
        };
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

        let token = Token::generate().map_err(|_| rng_failed())?;
        // A fresh session id at every enter; the viewer's cookies (and so its login) stay.
        let down = |e| self.refuse_store_down(ctx, "enter", e);
        let existing = self.store.ehr_of_emr(&t.emr).await.map_err(down)?;
        let reused = match existing {
            Some(s) if s.authority.id == t.authority.id => {
                // False: it ended meanwhile; a new one is made below.
                self.store
                    .rekey_ehr(&s, token.hash())
                    .await
                    .map_err(down)?
                    .then_some(s)
            }
            Some(_) => {
                self.end_ehr_of(&t.emr, EndReason::AuthorityChange, Some(ctx.id()))
                    .await;
                None
            }
            None => None,
        };
        let mut emr_gone = false;
        let session = match reused {
            Some(s) => s,
            None => {
                let s = Arc::new(EhrSession::new(
                    t.emr,
                    t.user.clone(),
                    t.authority.clone(),
                    token.hash(),
                    now,
                ));
                match self.store.insert_ehr(s.clone()).await.map_err(down)? {
                    Linked::New => {}
                    // A concurrent enter of the same EMR session (a double click): the
                    // one replaced ends with every effect, never silently.
                    Linked::Replaced(replaced) => {
                        self.finish_ehr(replaced, EndReason::AuthorityChange, Some(ctx.id()))
                            .await
                    }
                    Linked::EmrGone => emr_gone = true,
                }
                s
            }
        };
        // Signed out while this enter was under way: the sign-out may not have seen the
        // session just linked, so this enter ends it itself and grants nothing.
        let emr_gone = emr_gone
            || self
                .store
                .emr(&t.emr)
                .await
                .map_err(down)?
                .is_none_or(|e| e.is_ended());
        if emr_gone {
            self.end_ehr_of(&t.emr, EndReason::EmrGone, Some(ctx.id()))
                .await;
            let e = RedeemError::EmrSessionEnded;
            return Err(self.refuse_ticket(ctx, &hash, Some(&t), e, "enter").await);
        }
        session.touch(now);
        *session.patient.lock().expect("patient lock") = OpenedPatient {
            demographic_no: t.patient.demographic_no.parse().unwrap_or_default(),
            hcn_hmac: self.audit.hcn_tag(&t.patient.hcn),
        };
        if !self.store.save_ehr(&session).await.map_err(down)? {
            // Ended meanwhile (a Disconnect or sign-out on another replica).
            let e = RedeemError::EmrSessionEnded;
            return Err(self.refuse_ticket(ctx, &hash, Some(&t), e, "enter").await);
        }

        let unix = time::OffsetDateTime::now_utc().unix_timestamp();
        // The viewer's origin as configured (with the port the browser used), never the
        // client's own spelling of the host.
        let aud = format!("https://{}{}", self.config.ehr.host, port_suffix(&ctx.host));
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

        let mut out =
            self.engine
                .prepare(ctx, Origin::Ehr, &conn.peer_ip, req.map(|()| Body::empty()));
        out.parts.method = Method::GET;
        out.parts.uri = self.engine.upstream(Origin::Ehr).uri_for(Some(
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
        let resp = self.engine.exchange(Origin::Ehr, out, None).await?;
        let mut resp = self.viewer_response(resp, &session, inject).await?;
        let h = resp.headers_mut();
        h.append(SET_COOKIE, cookies::set(EHR_COOKIE, token.as_str()));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        info!(mrp = t.mrp, "EHR session entered");
        Ok(resp)
    }

    /// `GET emr.host/.ehrgate/confirm?ticket=T`: the middle of the binding round trip.
    /// The browser's EMR marker must name the ticket's EMR session; then the ticket is
    /// confirmed and the browser sent back to enter, where only its binding redeems it.
    pub(crate) async fn confirm(
        &self,
        ctx: &Ctx,
        req: &Request<()>,
    ) -> Result<Response<Body>, Problem> {
        let Presented {
            value: ticket_value,
            hash,
            ticket,
            now,
            emr_live,
        } = self.presented_ticket(ctx, req, "confirm").await?;
        let marker_emr = self
            .emr_of_marker(req.headers())
            .await
            .map_err(|e| self.refuse_store_down(ctx, "confirm", e))?
            .map(|emr| emr.key);
        let nonce =
            form::value(req.uri().query().unwrap_or(""), "nonce").map(|n| TokenHash::of(&n));
        let decided = decide::confirm(
            ticket.as_ref(),
            now,
            emr_live,
            marker_emr.as_ref(),
            nonce.as_ref(),
        );
        if let Err(e) = decided {
            return Err(self
                .refuse_ticket(ctx, &hash, ticket.as_ref(), e, "confirm")
                .await);
        }
        let code = Token::generate().map_err(|_| rng_failed())?;
        let spent = match nonce {
            Some(n) => self
                .store
                .confirm_ticket(&hash, &n, code.hash())
                .await
                .map_err(|e| self.refuse_store_down(ctx, "confirm", e))?,
            None => false,
        };
        if !spent {
            // The nonce was used meanwhile: this is not the round trip it was made for.
            let e = RedeemError::OtherBrowser;
            return Err(self
                .refuse_ticket(ctx, &hash, ticket.as_ref(), e, "confirm")
                .await);
        }
        // The code goes to this browser alone; with the binding it redeems the ticket.
        let enter = ("enter", "code", code.as_str());
        Ok(round_trip(&self.config.ehr.host, ctx, &ticket_value, enter))
    }

    /// The ticket a request to enter or confirm presents, as the store has it now.
    async fn presented_ticket(
        &self,
        ctx: &Ctx,
        req: &Request<()>,
        step: &str,
    ) -> Result<Presented, Problem> {
        let query = req.uri().query().unwrap_or("");
        let Some(value) = form::value(query, "ticket") else {
            let nothing = TokenHash::of("");
            let e = RedeemError::UnknownOrUsed;
            return Err(self.refuse_ticket(ctx, &nothing, None, e, step).await);
        };
        let value = value.into_owned();
        let hash = TokenHash::of(&value);
        let down = |e| self.refuse_store_down(ctx, step, e);
        let ticket = self.store.peek_ticket(&hash).await.map_err(down)?;
        let emr_live = match &ticket {
            Some(t) => self.store.emr(&t.emr).await.map_err(down)?.is_some(),
            None => false,
        };
        Ok(Presented {
            value,
            hash,
            ticket,
            now: self.store.now(),
            emr_live,
        })
    }

    /// A refused ticket: 410 when it is unknown, used, expired or its EMR session ended
    /// ("relaunch from the EMR"); 403 when another browser presented it, and then the
    /// ticket is spent, so that nothing another browser did can make it work later.
    /// Audited as `deny`.
    async fn refuse_ticket(
        &self,
        ctx: &Ctx,
        hash: &TokenHash,
        ticket: Option<&LaunchTicket>,
        e: RedeemError,
        step: &str,
    ) -> Problem {
        if e == RedeemError::OtherBrowser {
            // Best effort: with the store down the ticket expires on its own.
            if let Err(e) = self.store.take_ticket(hash).await {
                self.store_failed(&e);
            }
        }
        let why = match e {
            RedeemError::UnknownOrUsed => "unknown or used ticket",
            RedeemError::Expired => "expired ticket",
            RedeemError::EmrSessionEnded => "EMR session ended",
            RedeemError::OtherBrowser => "ticket launched by another browser",
        };
        let detail = format!("{step}: {why}");
        let mut record = Record::new(Event::Deny, "refused")
            .request_id(ctx.id())
            .detail(detail.clone());
        if let Some(t) = ticket {
            record = record.user(&t.user).uao(&t.authority.id).patient(
                &t.patient.demographic_no,
                self.audit.hcn_hmac(&t.patient.hcn),
            );
        }
        self.audit_best_effort(&record);
        info!(detail = %detail, "ticket refused");
        if e == RedeemError::OtherBrowser {
            return Problem::new(
                StatusCode::FORBIDDEN,
                "ticket_other_browser",
                "This EHR link belongs to another browser",
                "An EHR link opens the viewer only in the browser whose EMR session made it.",
            )
            .hint("Relaunch from the EMR: open the patient's chart and press EHR.");
        }
        Problem::new(
            StatusCode::GONE,
            "ticket_invalid",
            "This EHR link has expired",
            "EHR links work once, for a short time, and only while the EMR session that made them lasts.",
        )
        .hint("Relaunch from the EMR: open the patient's chart and press EHR.")
    }
}

/// A ticket as presented to enter or confirm.
struct Presented {
    value: String,
    hash: TokenHash,
    ticket: Option<LaunchTicket>,
    now: crate::session::Millis,
    emr_live: bool,
}

/// `:port` when the browser's Host named one, so the demo and tests on high ports work.
fn port_suffix(host: &str) -> String {
    route::host_port(host)
        .map(|p| format!(":{p}"))
        .unwrap_or_default()
}

/// The next leg of the binding round trip: a redirect to `https://host[:port]/.ehrgate/
/// {step}?ticket=T&{name}={value}`, on the port the browser used.
fn round_trip(
    host: &str,
    ctx: &Ctx,
    ticket: &str,
    (step, name, value): (&str, &str, &str),
) -> Response<Body> {
    let port = port_suffix(&ctx.host);
    redirect(&format!(
        "https://{host}{port}/.ehrgate/{step}?ticket={ticket}&{name}={value}"
    ))
}

/// A 303 that no cache keeps and that sends no Referer (the URL carries a ticket).
fn redirect(location: &str) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SEE_OTHER;
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(location) {
        h.insert(http::header::LOCATION, v);
    }
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}
