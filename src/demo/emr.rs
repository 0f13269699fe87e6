//! The demo EMR, in the OSCAR/Juno shape ehrgate meets: a login form setting
//! `JSESSIONID` (scoped to `/oscar`), a day schedule, a patient chart with the **EHR**
//! button and its overlay, a logout that expires `JSESSIONID`, and the whoami and
//! demographics JSON endpoints of DESIGN §4's defaults.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::header::{HeaderValue, CONTENT_TYPE, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use super::data::{self, Patient};
use super::{page, read_form, redirect, totp_now, App};
use crate::body::Body;
use crate::gateway::form::value as query_value;
use crate::problem::escape_html;
use crate::proxy::cookies;

#[derive(Default)]
pub struct Emr {
    /// JSESSIONID → provider number.
    sessions: Mutex<HashMap<String, String>>,
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    let _ = aws_lc_rs::rand::fill(&mut b);
    b.iter().map(|x| format!("{x:02X}")).collect()
}

fn json(v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Body::full(v.to_string()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn status(code: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(body));
    *r.status_mut() = code;
    r
}

impl Emr {
    fn provider(&self, req: &Request<Incoming>) -> Option<String> {
        let id = cookies::get(req.headers(), "JSESSIONID")?;
        self.sessions.lock().ok()?.get(id).cloned()
    }

    pub async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let provider = self.provider(&req);
        match (req.method().clone(), path.as_str(), provider) {
            (_, "/" | "/oscar", _) => redirect("/oscar/index.jsp"),
            (Method::GET, "/oscar/index.jsp", Some(_)) => {
                redirect("/oscar/provider/providercontrol.jsp")
            }
            (Method::GET, "/oscar/index.jsp", None) => login_page(None),
            (Method::POST, "/oscar/login.do", _) => self.login(req).await,
            (_, "/oscar/logout.jsp", _) => {
                if let Some(id) = cookies::get(req.headers(), "JSESSIONID") {
                    self.sessions.lock().expect("sessions").remove(id);
                }
                let mut r = redirect("/oscar/index.jsp");
                r.headers_mut().insert(
                    SET_COOKIE,
                    HeaderValue::from_static(
                        "JSESSIONID=; Path=/oscar; Max-Age=0; HttpOnly; Secure",
                    ),
                );
                r
            }
            (Method::GET, "/oscar/ws/rs/providerService/provider/me", Some(p)) => {
                json(json!({"providerNo": p, "firstName": "Oscar", "lastName": "Doctor"}))
            }
            (Method::GET, p, Some(_)) if p.starts_with("/oscar/ws/rs/demographics/") => {
                match data::patient(&p["/oscar/ws/rs/demographics/".len()..]) {
                    Some(pt) => json(demographics(pt)),
                    None => status(StatusCode::NOT_FOUND, "no such patient"),
                }
            }
            (_, p, None) if p.starts_with("/oscar/ws/") => {
                status(StatusCode::UNAUTHORIZED, "not logged in")
            }
            (_, _, None) => redirect("/oscar/index.jsp"),
            (Method::GET, "/oscar/provider/providercontrol.jsp", Some(_)) => schedule(),
            (Method::GET, "/oscar/demographic/chart.jsp", Some(_)) => {
                let n = req
                    .uri()
                    .query()
                    .and_then(|q| query_value(q, "demographic_no"));
                match n.as_deref().and_then(data::patient) {
                    Some(p) => chart(p),
                    None => page(App::Emr, "Not found", "<h1>No such patient</h1>")
                        .with_status(StatusCode::NOT_FOUND),
                }
            }
            _ => {
                page(App::Emr, "Not found", "<h1>Not found</h1>").with_status(StatusCode::NOT_FOUND)
            }
        }
    }

    async fn login(&self, req: Request<Incoming>) -> Response<Body> {
        let form = read_form(req).await;
        let field = |name: &str| query_value(&form, name).unwrap_or_default().into_owned();
        if field("username") != data::EMR_USER
            || field("password") != data::EMR_PASSWORD
            || field("pin") != data::EMR_PIN
        {
            return login_page(Some("Username, password or PIN is not correct."))
                .with_status(StatusCode::UNAUTHORIZED);
        }
        let id = new_id();
        self.sessions
            .lock()
            .expect("sessions")
            .insert(id.clone(), data::PROVIDER_NO.into());
        let mut r = redirect("/oscar/provider/providercontrol.jsp");
        r.headers_mut().insert(
            SET_COOKIE,
            HeaderValue::from_str(&format!(
                "JSESSIONID={id}; Path=/oscar; HttpOnly; Secure; SameSite=Lax"
            ))
            .expect("hex id"),
        );
        r
    }
}

trait WithStatus {
    fn with_status(self, s: StatusCode) -> Self;
}

impl WithStatus for Response<Body> {
    fn with_status(mut self, s: StatusCode) -> Self {
        *self.status_mut() = s;
        self
    }
}

fn demographics(p: &Patient) -> serde_json::Value {
    json!({
        "demographicNo": p.demographic_no.parse::<u32>().unwrap_or(0),
        "lastName": p.family, "firstName": p.given,
        "hin": p.hcn, "ver": p.hcn_version,
        "dobYear": format!("{:04}", p.dob.0), "dobMonth": format!("{:02}", p.dob.1), "dobDay": format!("{:02}", p.dob.2),
        "sex": p.sex, "providerNo": p.mrp,
    })
}

fn login_page(error: Option<&str>) -> Response<Body> {
    let error = error
        .map(|e| {
            format!(
                "<p class=\"error\" id=\"login-error\">{}</p>",
                escape_html(e)
            )
        })
        .unwrap_or_default();
    page(
        App::Emr,
        "OSCAR EMR — Login",
        &format!(
            r#"<div class="login">
<h1>OSCAR EMR</h1>{error}
<form method="post" action="/oscar/login.do">
<label>Username <input name="username" id="username" autocomplete="username"></label>
<label>Password <input name="password" id="password" type="password"></label>
<label>2nd Level Passcode (PIN) <input name="pin" id="pin" type="password"></label>
<button type="submit" id="login">Sign in</button>
</form></div>
<aside class="demo"><h2>Demo logins (made-up)</h2>
<p>EMR: <code>{eu}</code> / <code>{ep}</code>, PIN <code>{pin}</code></p>
<p>ONE ID: <code>{ou}</code> / <code>{op}</code></p>
<p>ONE ID code right now: <code id="totp">{code}</code> (TOTP, secret <code>{secret}</code>; reload for a new one)</p></aside>"#,
            eu = data::EMR_USER,
            ep = data::EMR_PASSWORD,
            pin = data::EMR_PIN,
            ou = data::ONEID_USER,
            op = data::ONEID_PASSWORD,
            code = totp_now(),
            secret = data::TOTP_SECRET_BASE32,
        ),
    )
}

fn schedule() -> Response<Body> {
    let rows: String = data::PATIENTS
        .iter()
        .map(|p| {
            format!(
                "<tr><td>{}</td><td><a class=\"patient\" href=\"/oscar/demographic/chart.jsp?demographic_no={}\">{}, {}</a></td><td>{}</td><td>{}</td></tr>",
                p.appointment, p.demographic_no, p.family, p.given, p.reason,
                if p.mrp == data::PROVIDER_NO { "you" } else { "another provider" },
            )
        })
        .collect();
    page(
        App::Emr,
        "OSCAR EMR — Schedule",
        &format!(
            r#"{bar}<h1>Today's schedule — {name}</h1>
<table class="grid"><tr><th>Time</th><th>Patient</th><th>Reason</th><th>MRP</th></tr>{rows}</table>"#,
            bar = emr_bar(),
            name = data::PROVIDER_NAME,
        ),
    )
}

fn emr_bar() -> String {
    format!(
        r#"<nav class="bar"><span>OSCAR EMR</span><a href="/oscar/provider/providercontrol.jsp">Schedule</a><span class="who">{}</span><a id="logout" href="/oscar/logout.jsp">Log out</a></nav>"#,
        data::PROVIDER_NAME
    )
}

fn chart(p: &Patient) -> Response<Body> {
    page(
        App::Emr,
        &format!("OSCAR EMR — {}, {}", p.family, p.given),
        &format!(
            r##"{bar}
<header class="chart-head">
<div><h1 id="patient-name">{family}, {given}</h1>
<p>{sex} · born {y:04}-{m:02}-{d:02} · HCN {hcn} {ver} · demographic #{no} · MRP: {mrp}</p></div>
<div class="ehr"><button id="ehr-button" type="button">EHR</button>
<div id="ehr-overlay" class="overlay" hidden>
<label><input type="radio" name="ehr-system" checked> ClinicalConnect Viewer</label>
<div id="authority-row" hidden><label>Accessing on behalf of
<select id="authority"></select></label></div>
<button id="connect" type="button">Connect to EHR</button>
<a id="disconnect" href="#" hidden>Disconnect</a>
<p id="ehr-state" class="muted"></p>
</div></div>
</header>
<section><h2>Encounter notes</h2><p class="muted">{reason}. Vitals stable. Plan discussed with patient.</p></section>
<script>
(function () {{
  var N = "{no}";
  var overlay = document.getElementById("ehr-overlay");
  var select = document.getElementById("authority");
  var row = document.getElementById("authority-row");
  var disconnect = document.getElementById("disconnect");
  var state = document.getElementById("ehr-state");
  function refresh() {{
    return fetch("/.ehrgate/status", {{credentials: "same-origin"}}).then(function (r) {{ return r.json(); }}).then(function (s) {{
      if (select.options.length === 0) {{
        s.authorities.forEach(function (a) {{
          var o = document.createElement("option");
          o.value = a.id; o.textContent = a.name; o.selected = a.default;
          select.appendChild(o);
        }});
      }}
      row.hidden = s.authorities.length < 2;
      disconnect.hidden = !s.connected;
      state.textContent = s.connected ? "Connected for " + s.authority.name : "Not connected";
    }});
  }}
  document.getElementById("ehr-button").onclick = function () {{ overlay.hidden = !overlay.hidden; refresh(); }};
  document.getElementById("connect").onclick = function () {{
    var url = "/oscar/clinicalConnectEHRViewer.do?demographicNo=" + N;
    if (!row.hidden && select.value) url += "&uao=" + encodeURIComponent(select.value);
    window.open(url, "CC_EHR_" + N);
    setTimeout(refresh, 1500);
  }};
  disconnect.onclick = function (e) {{
    e.preventDefault();
    fetch("/.ehrgate/disconnect", {{method: "POST", credentials: "same-origin"}}).then(refresh);
  }};
  window.addEventListener("focus", refresh);
}})();
</script>"##,
            bar = emr_bar(),
            family = escape_html(p.family),
            given = escape_html(p.given),
            sex = p.sex,
            y = p.dob.0,
            m = p.dob.1,
            d = p.dob.2,
            hcn = p.hcn,
            ver = p.hcn_version,
            no = p.demographic_no,
            mrp = if p.mrp == data::PROVIDER_NO {
                "you"
            } else {
                "another provider"
            },
            reason = escape_html(p.reason),
        ),
    )
}
