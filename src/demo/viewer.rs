//! The demo EHR viewer: verifies ehrgate's context assertion against its JWKS (refusing a
//! missing, forged or expired one), sends a browser without a viewer login to the demo
//! ONE ID and back, warns before opening a patient the clinician is not MRP for, and
//! shows a chart of made-up clinical data with a live element fed by a WebSocket.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::header::{HeaderValue, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::data::{self, OVERRIDE_REASONS};
use super::{oneid, page, read_form, redirect, App};
use crate::body::Body;
use crate::gateway::form::value as query_value;
use crate::problem::escape_html;
use crate::proxy::cookies;

const COOKIE: &str = "CCSESSION";

#[derive(Default)]
struct Session {
    password_ok: bool,
    logged_in: bool,
    /// The verified claims of the latest launch.
    current: Option<Value>,
    /// Patients (demographic numbers) whose override was performed.
    overridden: HashSet<String>,
}

#[derive(Default)]
pub struct Viewer {
    jwks: Mutex<Option<Value>>,
    sessions: Mutex<HashMap<String, Session>>,
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unix() -> u64 {
    time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64
}

fn refused(status: StatusCode, title: &str, text: &str) -> Response<Body> {
    let mut r = page(
        App::Viewer,
        title,
        &format!(
            "<h1>{}</h1><p>{}</p>",
            escape_html(title),
            escape_html(text)
        ),
    );
    *r.status_mut() = status;
    r
}

impl Viewer {
    /// The public keys to check assertions with (ehrgate's JWKS).
    pub fn set_jwks(&self, jwks: Value) {
        *self.jwks.lock().expect("jwks") = Some(jwks);
    }

    fn session_id(req: &Request<Incoming>) -> Option<String> {
        cookies::get(req.headers(), COOKIE).map(str::to_string)
    }

    /// Where a logged-in session goes next for its current patient.
    fn next(s: &Session) -> &'static str {
        match &s.current {
            Some(c) if c["mrp"] == false => {
                let no = c["patient"]["demographic_no"].as_str().unwrap_or_default();
                if s.overridden.contains(no) {
                    "/chart"
                } else {
                    "/override"
                }
            }
            _ => "/chart",
        }
    }

    pub async fn handle(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let id = Self::session_id(&req)
            .filter(|id| self.sessions.lock().expect("sessions").contains_key(id));
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/launch") => self.launch(&req, id),
            (Method::GET, "/logout") => {
                if let Some(id) = id {
                    self.sessions.lock().expect("sessions").remove(&id);
                }
                refused(
                    StatusCode::OK,
                    "Signed out of ClinicalConnect",
                    "Your viewer session has ended.",
                )
            }
            _ => {
                let Some(id) = id else {
                    return refused(
                        StatusCode::UNAUTHORIZED,
                        "ClinicalConnect",
                        "Open the viewer from your EMR's EHR button.",
                    );
                };
                match (req.method().clone(), path.as_str()) {
                    (Method::GET, "/oneid/login") => oneid_login(None),
                    (Method::POST, "/oneid/login") => self.password(&id, req).await,
                    (Method::GET, "/oneid/mfa") => oneid_mfa(None),
                    (Method::POST, "/oneid/mfa") => self.second_factor(&id, req).await,
                    (Method::GET, "/override") => self.override_page(&id),
                    (Method::POST, "/override") => self.perform_override(&id, req).await,
                    (Method::GET, "/chart") => self.chart(&id),
                    (Method::GET, "/ws/vitals") if self.logged_in(&id) => vitals(&mut req),
                    _ => refused(StatusCode::NOT_FOUND, "Not found", "No such viewer page."),
                }
            }
        }
    }

    fn logged_in(&self, id: &str) -> bool {
        self.sessions
            .lock()
            .expect("sessions")
            .get(id)
            .is_some_and(|s| s.logged_in)
    }

    fn launch(&self, req: &Request<Incoming>, id: Option<String>) -> Response<Body> {
        let jwks = self
            .jwks
            .lock()
            .expect("jwks")
            .clone()
            .unwrap_or(Value::Null);
        let claims = match req
            .headers()
            .get("x-ehr-context")
            .map(|v| v.to_str().unwrap_or(""))
        {
            None => Err("no context assertion".to_string()),
            Some(jws) => crate::context::verify(jws, &jwks, unix() as i64),
        };
        let claims = match claims {
            Ok(c) => c,
            Err(why) => {
                return refused(
                    StatusCode::UNAUTHORIZED,
                    "Launch refused",
                    &format!("The patient context could not be trusted: {why}."),
                )
            }
        };
        let mut sessions = self.sessions.lock().expect("sessions");
        let (id, fresh) = match id {
            Some(id) => (id, false),
            None => (new_id(), true),
        };
        let s = sessions.entry(id.clone()).or_default();
        s.current = Some(claims);
        let mut r = redirect(if s.logged_in {
            Self::next(s)
        } else {
            "/oneid/login"
        });
        if fresh {
            r.headers_mut().insert(
                SET_COOKIE,
                HeaderValue::from_str(&format!(
                    "{COOKIE}={id}; Path=/; HttpOnly; Secure; SameSite=Lax"
                ))
                .expect("hex"),
            );
        }
        r
    }

    async fn password(&self, id: &str, req: Request<Incoming>) -> Response<Body> {
        let form = read_form(req).await;
        let ok = query_value(&form, "username").as_deref() == Some(data::ONEID_USER)
            && query_value(&form, "password").as_deref() == Some(data::ONEID_PASSWORD);
        if !ok {
            let mut r = oneid_login(Some("That ONE ID username and password do not match."));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            return r;
        }
        if let Some(s) = self.sessions.lock().expect("sessions").get_mut(id) {
            s.password_ok = true;
        }
        redirect("/oneid/mfa")
    }

    async fn second_factor(&self, id: &str, req: Request<Incoming>) -> Response<Body> {
        let form = read_form(req).await;
        let code = query_value(&form, "code").unwrap_or_default();
        let mut sessions = self.sessions.lock().expect("sessions");
        let Some(s) = sessions.get_mut(id).filter(|s| s.password_ok) else {
            return redirect("/oneid/login");
        };
        if !oneid::check(data::TOTP_SECRET, unix(), &code) {
            drop(sessions);
            let mut r = oneid_mfa(Some(
                "That code is not valid. Enter the current 6-digit code.",
            ));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            return r;
        }
        s.logged_in = true;
        redirect(Self::next(s))
    }

    fn override_page(&self, id: &str) -> Response<Body> {
        let sessions = self.sessions.lock().expect("sessions");
        let Some((s, c)) = sessions
            .get(id)
            .filter(|s| s.logged_in)
            .and_then(|s| Some((s, s.current.as_ref()?)))
        else {
            return redirect("/oneid/login");
        };
        let _ = s;
        let options: String = OVERRIDE_REASONS
            .iter()
            .map(|(code, text)| format!("<option value=\"{code}\">{code} — {text}</option>"))
            .collect();
        page(
            App::Viewer,
            "ClinicalConnect — Override",
            &format!(
                r#"{bar}<div class="warning" id="mrp-warning"><h1>You are not this patient's most responsible provider</h1>
<p>{given} {family} has another most responsible provider. Opening this record is an override of the
patient's consent directives and is audited. State why you need access.</p>
<form method="post" action="/override">
<label>Override reason <select name="reason" id="reason">{options}</select></label>
<button type="submit" id="perform-override">Perform Override</button></form></div>"#,
                bar = viewer_bar(c),
                given = escape_html(c["patient"]["given"].as_str().unwrap_or("")),
                family = escape_html(c["patient"]["family"].as_str().unwrap_or("")),
            ),
        )
    }

    async fn perform_override(&self, id: &str, req: Request<Incoming>) -> Response<Body> {
        let form = read_form(req).await;
        let reason = query_value(&form, "reason")
            .unwrap_or_default()
            .into_owned();
        if !OVERRIDE_REASONS.iter().any(|(code, _)| *code == reason) {
            return refused(
                StatusCode::BAD_REQUEST,
                "Override reason needed",
                "Choose one of the listed reasons.",
            );
        }
        let mut sessions = self.sessions.lock().expect("sessions");
        let Some(s) = sessions.get_mut(id).filter(|s| s.logged_in) else {
            return redirect("/oneid/login");
        };
        if let Some(no) = s
            .current
            .as_ref()
            .and_then(|c| c["patient"]["demographic_no"].as_str())
        {
            s.overridden.insert(no.to_string());
        }
        redirect("/chart")
    }

    fn chart(&self, id: &str) -> Response<Body> {
        let sessions = self.sessions.lock().expect("sessions");
        let Some(s) = sessions.get(id).filter(|s| s.logged_in) else {
            return redirect("/oneid/login");
        };
        if Self::next(s) != "/chart" {
            return redirect(Self::next(s));
        }
        let Some(c) = &s.current else {
            return refused(
                StatusCode::NOT_FOUND,
                "No patient",
                "Open a patient from the EMR.",
            );
        };
        let no = c["patient"]["demographic_no"].as_str().unwrap_or_default();
        let Some(p) = data::patient(no) else {
            return refused(
                StatusCode::NOT_FOUND,
                "No records",
                "The EHR holds no records for this patient.",
            );
        };
        let labs: String = data::labs(p)
            .into_iter()
            .map(|(t, v, u, r, d)| {
                format!("<tr><td>{t}</td><td>{v} {u}</td><td>{r}</td><td>{d}</td></tr>")
            })
            .collect();
        let meds: String = data::medications(p)
            .iter()
            .map(|m| format!("<li>{m}</li>"))
            .collect();
        let visits: String = data::visits(p)
            .iter()
            .map(|(d, w, o)| format!("<tr><td>{d}</td><td>{w}</td><td>{o}</td></tr>"))
            .collect();
        page(
            App::Viewer,
            &format!("ClinicalConnect — {}, {}", p.family, p.given),
            &format!(
                r#"{bar}<header class="banner" id="patient-banner"><h1>{family}, {given}</h1>
<p>{sex} · DOB {birth} · HCN {hcn} · acting for {uao}</p></header>
<section class="cols">
<div><h2>Laboratory results</h2><table class="grid" id="labs"><tr><th>Test</th><th>Result</th><th>Reference</th><th>Date</th></tr>{labs}</table></div>
<div><h2>Medications (dispensed)</h2><ul id="meds">{meds}</ul>
<h2>Live monitor</h2><p class="live">Heart rate <strong id="vitals">…</strong> bpm</p></div>
</section>
<h2>Hospital visits</h2><table class="grid"><tr><th>Date</th><th>Where</th><th>Outcome</th></tr>{visits}</table>
<script>
(function () {{
  var ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws/vitals");
  ws.onmessage = function (e) {{ document.getElementById("vitals").textContent = JSON.parse(e.data).hr; }};
}})();
</script>"#,
                bar = viewer_bar(c),
                family = escape_html(p.family),
                given = escape_html(p.given),
                sex = p.sex,
                birth = c["patient"]["birth_date"].as_str().unwrap_or(""),
                hcn = p.hcn,
                uao = escape_html(c["uao_name"].as_str().unwrap_or("")),
            ),
        )
    }
}

fn viewer_bar(c: &Value) -> String {
    format!(
        r#"<nav class="bar"><span>ClinicalConnect</span><span class="who">{} · {}</span></nav>"#,
        escape_html(c["sub"].as_str().unwrap_or("")),
        escape_html(c["uao_name"].as_str().unwrap_or(""))
    )
}

fn oneid_login(error: Option<&str>) -> Response<Body> {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", escape_html(e)))
        .unwrap_or_default();
    page(
        App::OneId,
        "ONE ID — Log in",
        &format!(
            r#"<div class="login"><h1>ONE<sup>®</sup> ID</h1><p>Log in to continue to ClinicalConnect.</p>{error}
<form method="post" action="/oneid/login">
<label>Username <input name="username" id="oneid-username" autocomplete="username"></label>
<label>Password <input name="password" id="oneid-password" type="password"></label>
<button type="submit" id="oneid-next">Next</button></form></div>"#
        ),
    )
}

fn oneid_mfa(error: Option<&str>) -> Response<Body> {
    let error = error
        .map(|e| format!("<p class=\"error\">{}</p>", escape_html(e)))
        .unwrap_or_default();
    page(
        App::OneId,
        "ONE ID — Verify",
        &format!(
            r#"<div class="login"><h1>ONE<sup>®</sup> ID</h1><p>Enter the 6-digit code from your authenticator app.</p>{error}
<form method="post" action="/oneid/mfa">
<label>Code <input name="code" id="oneid-code" inputmode="numeric" autocomplete="one-time-code" maxlength="6"></label>
<button type="submit" id="oneid-verify">Verify</button></form></div>"#
        ),
    )
}

/// A WebSocket that sends a made-up heart rate every second.
fn vitals(req: &mut Request<Incoming>) -> Response<Body> {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return refused(
            StatusCode::BAD_REQUEST,
            "WebSocket expected",
            "Connect with a WebSocket.",
        );
    };
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(io) = upgrade.await else { return };
        let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(io), Role::Server, None).await;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for i in 0u32.. {
            tokio::select! {
                _ = tick.tick() => {
                    let hr = 68 + (i * 7) % 13;
                    if ws.send(Message::text(format!("{{\"hr\":{hr}}}"))).await.is_err() {
                        return;
                    }
                }
                msg = ws.next() => if !matches!(msg, Some(Ok(_))) { return },
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
        .body(Body::empty())
        .expect("valid response")
}
