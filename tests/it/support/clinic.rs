//! Fake EMR and viewer that behave like the real ones where ehrgate meets them, and a
//! browser with a cookie store, for the lifecycle flows.
//!
//! The EMR: `JSESSIONID` logins, whoami and demographics JSON (DESIGN §4 defaults), a
//! logout that expires `JSESSIONID`, and echo for every other path. The viewer: verifies
//! the context assertion against ehrgate's JWKS, sets its own `VSESSION`, records its
//! logout calls, serves a chart page and a WebSocket echo.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ehrgate::body::Body;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};

use super::client::{Resp, TestClient};
use super::pki::{TestCa, LOOPBACK};
use super::upstream::{self, echo};
use super::{Gate, Setup, EHR, EMR};

pub const DOCTOR: &str = "999998";
pub const OTHER_DOCTOR: &str = "111111";

/// The fake EMR's patients: (demographic no, HCN, MRP provider).
pub const PATIENTS: &[(&str, &str, &str)] = &[
    ("1001", "9876543217", DOCTOR),
    ("1002", "1234567897", OTHER_DOCTOR),
    ("1003", "1234567890", DOCTOR), // fails the Luhn check
    ("1004", "5554443332", DOCTOR), // the EMR refuses access (403)
    ("1005", "2468135799", DOCTOR),
];

fn random_id() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn cookie<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    ehrgate::proxy::cookies::get(req.headers(), name)
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(Body::full(body.to_string()));
    *r.status_mut() = status;
    r
}

fn json_resp(v: Value) -> Response<Body> {
    let mut r = Response::new(Body::full(v.to_string()));
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

#[derive(Default)]
pub struct EmrState {
    /// JSESSIONID → provider number.
    pub logins: Mutex<HashMap<String, String>>,
    pub whoami_calls: AtomicUsize,
}

pub struct FakeEmr {
    pub addr: std::net::SocketAddr,
    pub state: Arc<EmrState>,
}

impl FakeEmr {
    pub async fn start() -> Self {
        Self::start_on(None).await
    }

    /// Served over HTTPS with `tls` when given, else plain HTTP.
    pub async fn start_on(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let state = Arc::new(EmrState::default());
        let s = state.clone();
        let handler = move |req| emr(s.clone(), req);
        let addr = match tls {
            Some(tls) => upstream::spawn_tls(tls, handler).await,
            None => upstream::spawn(handler).await,
        };
        Self { addr, state }
    }

    /// Logs a provider in; returns the JSESSIONID.
    pub fn login(&self, provider: &str) -> String {
        let id = random_id();
        self.state
            .logins
            .lock()
            .unwrap()
            .insert(id.clone(), provider.into());
        id
    }
}

async fn emr(state: Arc<EmrState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let provider =
        cookie(&req, "JSESSIONID").and_then(|c| state.logins.lock().unwrap().get(c).cloned());
    if path == "/oscar/ws/rs/providerService/provider/me" {
        state.whoami_calls.fetch_add(1, Ordering::SeqCst);
        return match provider {
            Some(p) => json_resp(json!({"providerNo": p, "firstName": "Doc", "lastName": "Tor"})),
            None => text(StatusCode::UNAUTHORIZED, "not logged in"),
        };
    }
    if let Some(n) = path.strip_prefix("/oscar/ws/rs/demographics/") {
        if provider.is_none() {
            return text(StatusCode::UNAUTHORIZED, "not logged in");
        }
        let Some((no, hcn, mrp)) = PATIENTS.iter().find(|(no, _, _)| *no == n) else {
            return text(StatusCode::NOT_FOUND, "no such patient");
        };
        if *no == "1004" {
            return text(StatusCode::FORBIDDEN, "restricted record");
        }
        return json_resp(json!({
            "demographicNo": no.parse::<u32>().unwrap(), "hin": hcn, "ver": "AB",
            "dobYear": "1970", "dobMonth": "01", "dobDay": "31", "sex": "F",
            "lastName": format!("Testpatient{no}"), "firstName": "Alice", "providerNo": mrp,
        }));
    }
    if path == "/oscar/logout.jsp" || path == "/oscar/expire" {
        if let Some(c) = cookie(&req, "JSESSIONID") {
            state.logins.lock().unwrap().remove(c);
        }
        return Response::builder()
            .status(if path == "/oscar/logout.jsp" {
                302
            } else {
                200
            })
            .header("location", "/oscar/index.jsp")
            .header(
                "set-cookie",
                "JSESSIONID=; Max-Age=0; Path=/oscar; HttpOnly",
            )
            .body(Body::full("logged out"))
            .unwrap();
    }
    echo("emr", req).await
}

#[derive(Default)]
pub struct ViewerState {
    pub jwks: Mutex<Option<Value>>,
    /// VSESSION → the verified claims of the launch that made it.
    pub sessions: Mutex<HashMap<String, Value>>,
    /// Claims of every accepted launch, and whether it reused a viewer login.
    pub launches: Mutex<Vec<(Value, bool)>>,
    pub refused_launches: AtomicUsize,
    /// The Cookie header of each logout call.
    pub logouts: Mutex<Vec<Option<String>>>,
    pub logged_out: Mutex<HashSet<String>>,
    /// When set, the logout endpoint fails with 500.
    pub logout_fails: std::sync::atomic::AtomicBool,
}

pub struct FakeViewer {
    pub addr: std::net::SocketAddr,
    pub state: Arc<ViewerState>,
}

impl FakeViewer {
    pub async fn start() -> Self {
        Self::start_on(None).await
    }

    /// Served over HTTPS with `tls` when given, else plain HTTP.
    pub async fn start_on(tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let state = Arc::new(ViewerState::default());
        let s = state.clone();
        let handler = move |req| viewer(s.clone(), req);
        let addr = match tls {
            Some(tls) => upstream::spawn_tls(tls, handler).await,
            None => upstream::spawn(handler).await,
        };
        Self { addr, state }
    }

    pub fn logouts(&self) -> Vec<Option<String>> {
        self.state.logouts.lock().unwrap().clone()
    }

    pub fn launches(&self) -> Vec<(Value, bool)> {
        self.state.launches.lock().unwrap().clone()
    }
}

/// Verifies a compact JWS against the JWKS, now; returns the claims.
pub fn verify(jws: &str, jwks: &Value) -> Result<Value, String> {
    ehrgate::context::verify(jws, jwks, time::OffsetDateTime::now_utc().unix_timestamp())
}

async fn viewer(state: Arc<ViewerState>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let vsession = cookie(&req, "VSESSION").map(str::to_string);
    let known = vsession
        .as_ref()
        .is_some_and(|v| state.sessions.lock().unwrap().contains_key(v));
    match path.as_str() {
        "/launch" => {
            let jwks = state
                .jwks
                .lock()
                .unwrap()
                .clone()
                .expect("test set the JWKS");
            let claims = req
                .headers()
                .get("x-ehr-context")
                .ok_or_else(|| "no context".to_string())
                .and_then(|v| verify(v.to_str().unwrap(), &jwks));
            let claims = match claims {
                Ok(c) => c,
                Err(why) => {
                    state.refused_launches.fetch_add(1, Ordering::SeqCst);
                    return text(StatusCode::UNAUTHORIZED, &format!("context refused: {why}"));
                }
            };
            let demographic = claims["patient"]["demographic_no"]
                .as_str()
                .unwrap()
                .to_string();
            state.launches.lock().unwrap().push((claims.clone(), known));
            let mut resp = Response::builder()
                .status(302)
                .header("location", format!("/chart?patient={demographic}"));
            let id = if known {
                vsession.unwrap()
            } else {
                let id = random_id();
                resp = resp.header(
                    "set-cookie",
                    format!("VSESSION={id}; Path=/; Secure; HttpOnly"),
                );
                id
            };
            state.sessions.lock().unwrap().insert(id, claims);
            resp.body(Body::empty()).unwrap()
        }
        "/chart" => {
            if !known {
                return text(StatusCode::UNAUTHORIZED, "viewer login required");
            }
            let mut r = Response::new(Body::full(format!(
                "<!doctype html><html><head><title>Chart</title></head><body><h1>Chart</h1><p id=v>{}</p></body></html>",
                vsession.unwrap()
            )));
            r.headers_mut()
                .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
            r
        }
        "/logout" => {
            let header = req
                .headers()
                .get("cookie")
                .map(|v| v.to_str().unwrap().to_string());
            state.logouts.lock().unwrap().push(header);
            if state.logout_fails.load(Ordering::SeqCst) {
                return text(StatusCode::INTERNAL_SERVER_ERROR, "viewer logout broke");
            }
            if let Some(v) = vsession {
                state.sessions.lock().unwrap().remove(&v);
                state.logged_out.lock().unwrap().insert(v);
            }
            text(StatusCode::OK, "viewer logged out")
        }
        "/gzpage" => Response::builder()
            .header("content-type", "text/html")
            .header("content-encoding", "gzip")
            .body(Body::full(&GZ_PAGE[..]))
            .unwrap(),
        // A report download or a long poll: a line every 20 ms, for at most a minute.
        "/stream" => {
            let ticks = futures_util::stream::unfold(0u32, |n| async move {
                if n >= 3000 {
                    return None;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                let line = bytes::Bytes::from(format!("tick {n}\n"));
                Some((
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(line)),
                    n + 1,
                ))
            });
            Response::builder()
                .header("content-type", "text/plain")
                .body(Body::stream(http_body_util::StreamBody::new(ticks)))
                .unwrap()
        }
        _ => echo("ehr", req).await,
    }
}

/// A gzip-encoded page a viewer might send even when asked for identity.
pub const GZ_PAGE: [u8; 12] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, b'<', b'h'];

/// Cookies by host: (name, value) pairs.
type CookieStore = HashMap<&'static str, Vec<(String, String)>>;

/// A browser: one cookie store per host, a fresh connection per request.
#[derive(Clone)]
pub struct Browser {
    pub client: TestClient,
    pub cookies: Arc<Mutex<CookieStore>>,
}

impl Browser {
    pub fn new(client: TestClient) -> Self {
        Self {
            client,
            cookies: Default::default(),
        }
    }

    pub fn set_cookie(&self, host: &'static str, name: &str, value: &str) {
        let mut jar = self.cookies.lock().unwrap();
        let list = jar.entry(host).or_default();
        list.retain(|(n, _)| n != name);
        list.push((name.into(), value.into()));
    }

    pub fn cookie(&self, host: &'static str, name: &str) -> Option<String> {
        let jar = self.cookies.lock().unwrap();
        jar.get(host)?
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }

    fn absorb(&self, host: &'static str, resp: &Resp) {
        for v in resp.headers.get_all("set-cookie") {
            let c = cookie::Cookie::parse(v.to_str().unwrap().to_string()).unwrap();
            let mut jar = self.cookies.lock().unwrap();
            let list = jar.entry(host).or_default();
            list.retain(|(n, _)| n != c.name());
            let expired =
                c.max_age().is_some_and(|a| a.is_zero() || a.is_negative()) || c.value().is_empty();
            if !expired {
                list.push((c.name().into(), c.value().into()));
            }
        }
    }

    pub fn request(&self, host: &'static str, method: &str, path: &str) -> http::request::Builder {
        // As a browser does: the port is part of the Host it sends.
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", format!("{host}:{}", self.client.addr.port()));
        let jar = self.cookies.lock().unwrap();
        if let Some(list) = jar.get(host).filter(|l| !l.is_empty()) {
            let header: Vec<String> = list.iter().map(|(n, v)| format!("{n}={v}")).collect();
            b = b.header("cookie", header.join("; "));
        }
        b
    }

    pub async fn send(&self, host: &'static str, req: Request<Body>) -> Resp {
        let mut c = self.client.h1(host).await;
        let r = c.fetch(req).await;
        self.absorb(host, &r);
        r
    }

    pub async fn get(&self, host: &'static str, path: &str) -> Resp {
        let req = self.request(host, "GET", path).body(Body::empty()).unwrap();
        self.send(host, req).await
    }

    /// A request as the EMR page's own script or navigation makes it.
    pub async fn emr_get(&self, path: &str) -> Resp {
        let req = self
            .request(EMR, "GET", path)
            .header("sec-fetch-site", "same-origin")
            .header(
                "referer",
                format!("https://{EMR}/oscar/demographic/chart.jsp"),
            )
            .body(Body::empty())
            .unwrap();
        self.send(EMR, req).await
    }

    pub async fn emr_post(&self, path: &str) -> Resp {
        let req = self
            .request(EMR, "POST", path)
            .header("sec-fetch-site", "same-origin")
            .header(
                "origin",
                format!("https://{EMR}:{}", self.client.addr.port()),
            )
            .body(Body::empty())
            .unwrap();
        self.send(EMR, req).await
    }

    /// Presses EHR: the launch (303 to enter), then the enter (the viewer's answer).
    pub async fn launch(&self, demographic: &str, uao: Option<&str>) -> Resp {
        let mut path = format!("/oscar/clinicalConnectEHRViewer.do?demographicNo={demographic}");
        if let Some(u) = uao {
            path.push_str(&format!("&uao={u}"));
        }
        self.emr_get(&path).await
    }

    /// Follows a launch's redirect to the viewer host's enter endpoint, through the
    /// binding round trip (enter → EMR host's confirm → enter) as a browser does.
    pub async fn enter(&self, launch: &Resp) -> Resp {
        assert_eq!(launch.status, 303, "launch refused: {}", launch.text());
        let first = self.viewer_get(path_of(launch)).await;
        if first.status != 303 {
            return first;
        }
        let confirmed = self.get(EMR, path_of(&first)).await;
        if confirmed.status != 303 {
            return confirmed;
        }
        self.viewer_get(path_of(&confirmed)).await
    }

    /// EHR button, enter, and the viewer's redirect to the chart.
    pub async fn open_chart(&self, demographic: &str, uao: Option<&str>) -> Resp {
        let launch = self.launch(demographic, uao).await;
        let entered = self.enter(&launch).await;
        assert_eq!(entered.status, 302, "enter: {}", entered.text());
        let chart = entered.header("location").unwrap().to_string();
        self.viewer_get(&chart).await
    }

    pub async fn viewer_get(&self, path: &str) -> Resp {
        let req = self
            .request(EHR, "GET", path)
            .header("accept", "text/html,*/*")
            .body(Body::empty())
            .unwrap();
        self.send(EHR, req).await
    }

    /// Opens the tab-closing event stream (`/.ehrgate/events`) as `session.js` does and
    /// reads its first frame; returns the stream.
    pub async fn open_events(&self) -> Incoming {
        use http_body_util::BodyExt;
        let mut events =
            super::client::H1::handshake(self.client.tls(EHR, &[b"http/1.1"]).await).await;
        let req = self
            .request(EHR, "GET", "/.ehrgate/events")
            .body(Body::empty())
            .unwrap();
        let resp = events.send(req).await;
        assert_eq!(resp.status(), 200, "event stream refused");
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let mut stream = resp.into_body();
        let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(String::from_utf8_lossy(&first).contains(": connected"));
        stream
    }

    /// A WebSocket to the viewer's `/ws` through ehrgate, with this browser's session.
    pub async fn open_websocket(
        &self,
    ) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>
    {
        let tls = self.client.tls(EHR, &[b"http/1.1"]).await;
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("wss://{EHR}:{}/ws", self.client.addr.port()),
            )
            .unwrap();
        let cookie = format!(
            "__Host-ehrgate={}",
            self.cookie(EHR, "__Host-ehrgate").unwrap()
        );
        req.headers_mut().insert("cookie", cookie.parse().unwrap());
        tokio_tungstenite::client_async(req, tls)
            .await
            .expect("WebSocket through ehrgate")
            .0
    }
}

/// The next event of an event stream, heartbeat comments skipped.
pub async fn next_event(stream: &mut Incoming, within: std::time::Duration) -> String {
    use http_body_util::BodyExt;
    loop {
        let frame = tokio::time::timeout(within, stream.frame())
            .await
            .expect("an event in time");
        let data = frame.unwrap().unwrap().into_data().unwrap();
        if !data.starts_with(b":") {
            return String::from_utf8_lossy(&data).into_owned();
        }
    }
}

/// The path and query of a redirect's `Location`.
pub fn path_of(resp: &Resp) -> &str {
    let location = resp.header("location").expect("a Location");
    let rest = location.split_once("://").map_or(location, |(_, r)| r);
    &rest[rest.find('/').unwrap_or(rest.len())..]
}

/// ehrgate in front of a fake EMR and viewer.
pub struct Clinic {
    pub gate: Gate,
    pub emr: FakeEmr,
    pub viewer: FakeViewer,
    /// The upstreams' private CA, when they are served over HTTPS.
    _upstream_ca: Option<tempfile::TempDir>,
}

impl Clinic {
    pub async fn start() -> Self {
        Self::start_with(|s| s).await
    }

    pub async fn start_with(f: impl FnOnce(Setup) -> Setup) -> Self {
        let emr = FakeEmr::start().await;
        let viewer = FakeViewer::start().await;
        let gate = Gate::start(f(Setup::new(emr.addr, viewer.addr))).await;
        Self::ready(gate, emr, viewer, None).await
    }

    /// Both upstreams over HTTPS, as the regional viewer always is, with certificates
    /// for 127.0.0.1 from a private CA made now and named in `upstream_ca`.
    pub async fn start_tls_with(f: impl FnOnce(Setup) -> Setup) -> Self {
        let ca = TestCa::new("clinic upstream test CA");
        let dir = tempfile::tempdir().unwrap();
        let ca_path = ca.write(dir.path(), "upstream-ca.pem");
        let emr = FakeEmr::start_on(Some(ca.server(&[LOOPBACK]))).await;
        let viewer = FakeViewer::start_on(Some(ca.server(&[LOOPBACK]))).await;
        let mut setup = Setup::new(emr.addr, viewer.addr)
            .emr(&format!("upstream_ca = {ca_path:?}"))
            .ehr(&format!("upstream_ca = {ca_path:?}"));
        setup.emr_upstream = format!("https://{}", emr.addr);
        setup.ehr_upstream = format!("https://{}", viewer.addr);
        let gate = Gate::start(f(setup)).await;
        Self::ready(gate, emr, viewer, Some(dir)).await
    }

    /// Gives the viewer ehrgate's published keys, as a real viewer fetches them.
    async fn ready(
        gate: Gate,
        emr: FakeEmr,
        viewer: FakeViewer,
        upstream_ca: Option<tempfile::TempDir>,
    ) -> Self {
        let jwks = gate
            .client()
            .get(EHR, "/.well-known/ehrgate/jwks.json")
            .await
            .json();
        *viewer.state.jwks.lock().unwrap() = Some(jwks);
        Self {
            gate,
            emr,
            viewer,
            _upstream_ca: upstream_ca,
        }
    }

    /// A browser logged in to the EMR as `provider`.
    pub fn browser(&self, provider: &str) -> Browser {
        let b = Browser::new(self.gate.client());
        b.set_cookie(EMR, "JSESSIONID", &self.emr.login(provider));
        b
    }

    /// The audit log's records.
    pub fn audit(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.gate.files.path("audit.jsonl")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn audit_events(&self, event: &str) -> Vec<Value> {
        self.audit()
            .into_iter()
            .filter(|r| r["event"] == event)
            .collect()
    }
}
