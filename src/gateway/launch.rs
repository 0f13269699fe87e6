//! Launch (DESIGN §6): the EHR button's request on the EMR host becomes a single-use
//! ticket and a redirect to the viewer host, once the EMR has vouched for the user and
//! described the patient.

use http::header::{HeaderValue, CACHE_CONTROL, COOKIE, LOCATION, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use tracing::info;

use super::{form, pointer_text};
use crate::audit::{Event, Record};
use crate::body::Body;
use crate::gateway::Gateway;
use crate::problem::{escape_html, Problem, Side};
use crate::proxy::cookies::{self, EMR_MARKER_COOKIE};
use crate::proxy::route;
use crate::proxy::Ctx;
use crate::server::ConnInfo;
use crate::session::decide::{self, AuthorityError, EndReason};
use crate::session::{
    EmrSession, LaunchTicket, PatientContext, SessionStore, StoreError, Token, TokenHash,
};

/// What the audit says of a refused launch, and the page the clinician sees.
struct Denied {
    detail: String,
    problem: Problem,
}

fn denied(detail: impl Into<String>, problem: Problem) -> Denied {
    Denied {
        detail: detail.into(),
        problem,
    }
}

/// What is known of the launch so far, for the audit record of a refusal.
#[derive(Default)]
struct Known {
    user: Option<String>,
    uao: Option<String>,
    demographic_no: Option<String>,
    hcn_hmac: Option<String>,
}

impl Gateway {
    pub(crate) async fn launch(
        &self,
        ctx: &Ctx,
        conn: &ConnInfo,
        req: Request<()>,
    ) -> Result<Response<Body>, Problem> {
        let mut known = Known::default();
        match self.try_launch(ctx, conn, &req, &mut known).await {
            Ok(resp) => Ok(resp),
            Err(Denied { detail, problem }) => {
                let mut record = Record::new(Event::Deny, "refused")
                    .request_id(ctx.id())
                    .detail(format!("launch: {detail}"));
                record.user = known.user;
                record.uao = known.uao;
                record.demographic_no = known.demographic_no;
                record.hcn_hmac = known.hcn_hmac;
                self.audit_best_effort(&record);
                info!(detail, status = problem.status.as_u16(), "launch refused");
                Err(problem)
            }
        }
    }

    async fn try_launch(
        &self,
        ctx: &Ctx,
        conn: &ConnInfo,
        req: &Request<()>,
        known: &mut Known,
    ) -> Result<Response<Body>, Denied> {
        let cfg = &self.config;
        // GET only: a HEAD must not mint a ticket.
        if req.method() != Method::GET {
            return Err(denied(
                "method",
                Problem::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    "Method not allowed",
                    "The EHR launch is opened with GET.",
                ),
            ));
        }
        if let Some(why) = decide::same_origin_refusal(req.headers(), &cfg.emr.host) {
            return Err(denied(
                format!("cross-site request ({why})"),
                Problem::new(
                    StatusCode::FORBIDDEN,
                    "cross_site",
                    "Launch refused",
                    "The EHR can only be opened from the EMR itself.",
                )
                .hint("Open the patient's chart in the EMR and press EHR there."),
            ));
        }

        let Some(emr_cookie) = cookies::get(req.headers(), &cfg.emr.session_cookie) else {
            return Err(denied("no EMR session cookie", login_first()));
        };
        let emr_key = TokenHash::of(emr_cookie);
        // The clinician's own EMR cookies, every Cookie field (HTTP/2 splits them), with
        // ehrgate's taken out.
        let user_cookie = cookies::without_own(req.headers()).unwrap_or_else(|| {
            let mut folded = req.headers().clone();
            crate::proxy::headers::fold_cookies(&mut folded);
            folded.get(COOKIE).cloned()
        });
        let user_cookie = user_cookie.as_ref();

        // The EMR itself says whether this session is logged in, and who the user is.
        let (status, whoami) = self
            .emr_json(ctx, &cfg.emr.whoami_path, user_cookie, &conn.peer_ip)
            .await
            .map_err(|p| denied("EMR whoami failed", p))?;
        if status != StatusCode::OK {
            return Err(denied(
                format!("EMR whoami answered {}", status.as_u16()),
                login_first(),
            ));
        }
        let user = whoami
            .as_ref()
            .and_then(|v| pointer_text(v, &cfg.emr.whoami_user_field))
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                denied(
                    "EMR whoami named no user",
                    emr_misconfigured(
                        "The EMR did not say who is logged in.",
                        "emr.whoami_user_field",
                    ),
                )
            })?;
        known.user = Some(user.clone());

        let query = req.uri().query().unwrap_or("");
        let requested = form::value(query, &cfg.emr.launch_authority_param);
        let authority =
            decide::resolve_authority(&cfg.authorities, requested.as_deref()).map_err(|e| {
                let detail = match &e {
                    AuthorityError::Unknown(id) => format!("unknown authority {id:?}"),
                    AuthorityError::NoneChosen => "no authority chosen".into(),
                };
                denied(detail, self.authority_problem(&e))
            })?;
        known.uao = Some(authority.id.clone());

        let demographic_no = cfg
            .emr
            .launch_patient_params
            .iter()
            .find_map(|p| form::value(query, p))
            .map(|v| v.into_owned());
        let Some(demographic_no) = demographic_no.filter(|d| decide::valid_demographic_no(d))
        else {
            return Err(denied(
                "missing or invalid demographic number",
                Problem::bad_request(format!(
                    "The launch needs the patient's demographic number (a whole number) in {}.",
                    cfg.emr.launch_patient_params.join(" or ")
                ))
                .hint("Open the patient's chart in the EMR and press EHR there."),
            ));
        };
        known.demographic_no = Some(demographic_no.clone());

        let patient = self
            .fetch_patient(ctx, conn, &demographic_no, user_cookie)
            .await
            .map_err(|(detail, p)| denied(detail, p))?;
        known.hcn_hmac = self.audit.hcn_hmac(&patient.hcn);
        if !decide::valid_ontario_hcn(&patient.hcn) {
            return Err(denied(
                "HCN fails the Ontario check",
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_hcn",
                    "Health card number not valid",
                    "The patient's health card number in the EMR is not a valid Ontario number \
                     (10 digits with a correct check digit), so the EHR cannot be searched for them.",
                )
                .hint("Correct the health card number in the patient's demographics, then try again."),
            ));
        }
        let mrp = patient.mrp_provider == user;

        // The EMR session, registered at its first launch.
        let now = self.store.now();
        let down = |e: StoreError| {
            let detail = match e {
                StoreError::Full => "session store full",
                StoreError::Unavailable(_) => "session store unavailable",
            };
            denied(detail, self.store_problem(e))
        };
        let mut emr = self
            .store
            .insert_emr(EmrSession::new(emr_key, user.clone(), now))
            .await
            .map_err(down)?;
        if *emr.user != *user {
            // The same EMR cookie now belongs to another user: the old login is over.
            self.sign_out_emr(&emr_key, EndReason::EmrGone, Some(ctx.id()))
                .await;
            emr = self
                .store
                .insert_emr(EmrSession::new(emr_key, user.clone(), now))
                .await
                .map_err(down)?;
        }
        emr.touch(now);

        if let Some(existing) = self.store.ehr_of_emr(&emr_key).await.map_err(down)? {
            if decide::must_end_for_authority(Some(&existing), authority) {
                self.end_ehr_of(&emr_key, EndReason::AuthorityChange, Some(ctx.id()))
                    .await;
            }
        }

        let ticket = Token::generate().map_err(|_| denied("RNG failure", rng_failed()))?;
        let hcn_hmac = known.hcn_hmac.clone();
        self.store
            .put_ticket(
                ticket.hash(),
                LaunchTicket {
                    emr: emr_key,
                    user: emr.user.clone(),
                    authority: self.shared_authority(authority),
                    patient,
                    mrp,
                    expires: now + self.limits.ticket_ttl,
                    binding: None,
                    confirm_nonce: None,
                    redeem_code: None,
                },
            )
            .await
            .map_err(down)?;

        let record = Record::new(Event::Launch, "ok")
            .user(&user)
            .uao(&authority.id)
            .patient(&demographic_no, hcn_hmac)
            .request_id(ctx.id())
            .detail(if mrp { "mrp" } else { "not_mrp" });
        if let Err(p) = self.audit_or_refuse(&record) {
            if let Err(e) = self.store.take_ticket(&ticket.hash()).await {
                self.store_failed(&e);
            }
            return Err(denied("audit log unwritable", p));
        }

        // Keep the browser's marker if it already names this EMR session.
        let marker_names_this = match cookies::get(req.headers(), EMR_MARKER_COOKIE) {
            Some(m) => self
                .store
                .emr_by_marker(&TokenHash::of(m))
                .await
                .map_err(down)?
                .is_some_and(|s| s.key == emr_key),
            None => false,
        };
        let new_marker = if marker_names_this {
            None
        } else {
            let m = Token::generate().map_err(|_| denied("RNG failure", rng_failed()))?;
            self.store.add_marker(m.hash(), &emr).await.map_err(down)?;
            Some(m)
        };

        let port = route::host_port(&ctx.host)
            .map(|p| format!(":{p}"))
            .unwrap_or_default();
        let location = format!(
            "https://{}{port}/.ehrgate/enter?ticket={}",
            cfg.ehr.host,
            ticket.as_str()
        );
        let mut resp = Response::new(Body::full(format!(
            "<!doctype html><p>Opening the EHR: <a href=\"{0}\">continue</a></p>",
            escape_html(&location)
        )));
        *resp.status_mut() = StatusCode::SEE_OTHER;
        let h = resp.headers_mut();
        h.insert(
            LOCATION,
            HeaderValue::from_str(&location).expect("ticket is base64url"),
        );
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(
            http::header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        if let Some(m) = new_marker {
            h.append(SET_COOKIE, cookies::set(EMR_MARKER_COOKIE, m.as_str()));
        }
        info!(mrp, "launch ticket issued");
        Ok(resp)
    }

    /// The patient's demographics from the EMR, with the user's own cookies.
    async fn fetch_patient(
        &self,
        ctx: &Ctx,
        conn: &ConnInfo,
        demographic_no: &str,
        cookie: Option<&HeaderValue>,
    ) -> Result<PatientContext, (String, Problem)> {
        let cfg = &self.config.emr;
        let path = cfg.patient_path.replace("{demographicNo}", demographic_no);
        let (status, body) = self
            .emr_json(ctx, &path, cookie, &conn.peer_ip)
            .await
            .map_err(|p| ("EMR demographics failed".to_string(), p))?;
        match status.as_u16() {
            200 => {}
            401 => return Err(("EMR demographics answered 401".into(), login_first())),
            403 | 404 => {
                let detail = format!("EMR refused the patient ({})", status.as_u16());
                let p = Problem::new(
                    status,
                    if status == StatusCode::FORBIDDEN {
                        "patient_forbidden"
                    } else {
                        "patient_not_found"
                    },
                    if status == StatusCode::FORBIDDEN {
                        "Not permitted"
                    } else {
                        "Patient not found"
                    },
                    if status == StatusCode::FORBIDDEN {
                        "The EMR does not let you open this patient's record."
                    } else {
                        "The EMR has no patient with this demographic number."
                    },
                );
                return Err((detail, p));
            }
            other => {
                return Err((
                    format!("EMR demographics answered {other}"),
                    Problem::new(
                        StatusCode::BAD_GATEWAY,
                        "emr_error",
                        "Bad gateway",
                        format!("The EMR answered {other} when asked for the patient's details."),
                    )
                    .side(Side::Upstream),
                ))
            }
        }
        let f = &cfg.patient_fields;
        let v = body.ok_or_else(|| {
            (
                "EMR demographics not JSON".to_string(),
                emr_misconfigured(
                    "The EMR's patient details could not be read.",
                    "emr.patient_path",
                ),
            )
        })?;
        let text = |pointer: &str| pointer_text(&v, pointer).unwrap_or_default();
        let birth_date = decide::birth_date(&text(&f.birth_year), &text(&f.birth_month), &text(&f.birth_day))
            .ok_or_else(|| {
                (
                    "patient has no valid birth date".to_string(),
                    Problem::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_birth_date",
                        "Birth date missing",
                        "The patient's birth date in the EMR is missing or not a real date, so the EHR \
                         cannot be searched for them.",
                    )
                    .hint("Correct the birth date in the patient's demographics, then try again."),
                )
            })?;
        Ok(PatientContext {
            demographic_no: demographic_no.to_string(),
            hcn: text(&f.hcn).replace([' ', '-'], ""),
            hcn_version: text(&f.hcn_version),
            birth_date,
            gender: text(&f.gender),
            family: text(&f.family),
            given: text(&f.given),
            mrp_provider: text(&f.mrp),
        })
    }

    fn authority_problem(&self, e: &AuthorityError) -> Problem {
        let valid: Vec<String> = self
            .config
            .authorities
            .iter()
            .map(|a| format!("{} ({})", a.id, a.name))
            .collect();
        let what = match e {
            AuthorityError::Unknown(id) => {
                format!("{id:?} is not an authority this clinic acts for.")
            }
            AuthorityError::NoneChosen => {
                "Choose the authority you are accessing on behalf of.".into()
            }
        };
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_authority",
            "Choose an authority",
            format!("{what} Valid authorities: {}.", valid.join("; ")),
        )
        .hint("Pick one under \"Accessing on behalf of\" and press Connect to EHR again.")
    }
}

fn login_first() -> Problem {
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "emr_login_required",
        "Log in to the EMR first",
        "The EHR opens from a logged-in EMR session, and this browser has none (or it has ended).",
    )
    .hint("Log in to the EMR, open the patient's chart and press EHR again.")
}

pub(super) fn rng_failed() -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "rng_unavailable",
        "Service unavailable",
        "ehrgate could not make a secure random value.",
    )
}

fn emr_misconfigured(detail: &'static str, key: &'static str) -> Problem {
    Problem::new(
        StatusCode::BAD_GATEWAY,
        "emr_answer_unexpected",
        "Bad gateway",
        detail,
    )
    .hint(format!(
        "Tell your IT staff: check {key} in ehrgate's configuration."
    ))
    .side(Side::Upstream)
}
