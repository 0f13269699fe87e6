//! `ehrgate demo`: the whole clinician's flow on one machine. ehrgate in front of a demo
//! EMR (OSCAR/Juno shape), a demo ONE ID and a demo ClinicalConnect viewer, all in this
//! process on loopback, with development certificates generated under `certs/dev/` on
//! first use. Needs no set-up and touches nothing outside the working directory.
//!
//! The demo servers hold only made-up data and must never be pointed at anything real.

pub mod data;
mod emr;
pub mod oneid;
mod viewer;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::app::{self, Prepared, Running, StartError};
use crate::body::Body;
use crate::config::{Config, ConfigError};
use crate::problem::escape_html;
use crate::tls::dev::{ensure_dev_files, DevFiles};

pub const EMR_HOST: &str = "emr.localhost";
pub const EHR_HOST: &str = "ehr.localhost";

/// Serves plain HTTP/1.1 on `listener` with `handler` until the task is dropped.
pub fn spawn_http<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    spawn_server(listener, None, handler)
}

/// Serves HTTPS (HTTP/1.1 and HTTP/2, by ALPN) on `listener` with `tls` and `handler`,
/// as a real viewer does, until the task is dropped.
pub fn spawn_https<F, Fut>(listener: TcpListener, tls: Arc<rustls::ServerConfig>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    spawn_server(
        listener,
        Some(tokio_rustls::TlsAcceptor::from(tls)),
        handler,
    )
}

fn spawn_server<F, Fut>(listener: TcpListener, tls: Option<tokio_rustls::TlsAcceptor>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = match tls {
                    None => {
                        builder
                            .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                            .await
                    }
                    Some(tls) => match tls.accept(tcp).await {
                        Ok(stream) => {
                            builder
                                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                                .await
                        }
                        Err(_) => return,
                    },
                };
            });
        }
    });
}

/// Which demo system a page belongs to: each has its own look.
#[derive(Clone, Copy)]
pub(crate) enum App {
    Emr,
    Viewer,
    OneId,
}

const BASE_STYLE: &str = "[hidden]{display:none!important}body{font-family:system-ui,sans-serif;margin:0;color:#1d2733}\
main{max-width:64rem;margin:0 auto;padding:1rem}\
.bar{display:flex;gap:1.2rem;align-items:center;padding:.6rem 1rem;color:#fff}\
.bar a{color:#fff}.bar .who{margin-left:auto}\
table.grid{border-collapse:collapse;width:100%}.grid td,.grid th{border:1px solid #ccd4dc;padding:.35rem .5rem;text-align:left}\
.login{max-width:22rem;margin:3rem auto}.login label{display:block;margin:.6rem 0}.login input{display:block;width:100%;padding:.4rem}\
button{padding:.45rem 1rem;font-size:1rem;cursor:pointer}\
.error{color:#a00;font-weight:600}.muted{color:#5a6773}\
.demo{max-width:34rem;margin:2rem auto;background:#fff8dc;border:1px solid #e6d38a;padding:.4rem 1rem}\
.chart-head{display:flex;justify-content:space-between;align-items:flex-start;border-bottom:1px solid #ccd4dc}\
.ehr{position:relative}#ehr-button{background:#0b5394;color:#fff;border:0;font-weight:700}\
.overlay{position:absolute;right:0;top:2.6rem;width:20rem;background:#fff;border:1px solid #8aa;box-shadow:0 4px 14px #0003;padding:.8rem;z-index:2}\
.overlay label{display:block;margin:.4rem 0}.overlay select{width:100%}#disconnect{display:block;margin-top:.5rem}\
.warning{border:2px solid #c60;background:#fff4e5;padding:1rem;margin-top:1rem}\
.banner{background:#eef4fb;padding:.5rem 1rem;border-left:6px solid #2b6cb0}\
.cols{display:grid;grid-template-columns:2fr 1fr;gap:1.5rem}.live strong{font-size:1.6rem;color:#b00}";

/// A demo page, server-rendered.
pub(crate) fn page(app: App, title: &str, body: &str) -> Response<Body> {
    let accent = match app {
        App::Emr => "#3a6ea5",
        App::Viewer => "#1f6f5c",
        App::OneId => "#4b2c83",
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>{BASE_STYLE}.bar{{background:{accent}}}h1{{color:{accent}}}</style></head>\
         <body><main>{body}</main></body></html>",
        escape_html(title)
    );
    let mut r = Response::new(Body::full(html));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

pub(crate) fn redirect(location: &str) -> Response<Body> {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut().insert(
        LOCATION,
        HeaderValue::from_str(location).expect("demo paths are ASCII"),
    );
    r
}

/// A small form body, as text (at most 16 KiB read).
pub(crate) async fn read_form(req: Request<Incoming>) -> String {
    let body = http_body_util::Limited::new(req.into_body(), 16 * 1024);
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_else(|_| Bytes::new());
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The demo ONE ID's current code.
pub(crate) fn totp_now() -> String {
    let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    oneid::totp(data::TOTP_SECRET, now)
}

/// Where the demo keeps its files, and where it listens.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: SocketAddr,
    /// Development certificates and keys (generated once, then reused).
    pub cert_dir: PathBuf,
    pub audit_path: PathBuf,
}

impl DemoOptions {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            cert_dir: PathBuf::from("certs/dev"),
            audit_path: PathBuf::from("audit/demo-audit.jsonl"),
        }
    }
}

/// A running demo.
pub struct Demo {
    pub running: Running,
    pub files: DevFiles,
    /// Whether the development certificates were made by this start.
    pub generated: bool,
    pub options: DemoOptions,
}

impl Demo {
    pub fn emr_url(&self) -> String {
        format!("https://{EMR_HOST}:{}/", self.running.proxy_addr.port())
    }

    pub fn ehr_url(&self) -> String {
        format!("https://{EHR_HOST}:{}/", self.running.proxy_addr.port())
    }
}

/// The configuration the demo runs with: two authorities, vault mode.
pub fn config(
    options: &DemoOptions,
    files: &DevFiles,
    emr: SocketAddr,
    ehr: SocketAddr,
) -> Result<Config, ConfigError> {
    let text = format!(
        r#"
[server]
listen = "{listen}"
admin_listen = "127.0.0.1:0"
tls_cert = {cert:?}
tls_key = {key:?}

[emr]
host = "{EMR_HOST}"
upstream = "http://{emr}"

[ehr]
host = "{EHR_HOST}"
upstream = "https://localhost:{ehr_port}"
upstream_ca = {ca:?}

[[authority]]
id = "2.16.840.1.113883.3.239.9:101"
name = "Maple Family Health Team"
default = true

[[authority]]
id = "2.16.840.1.113883.3.239.9:102"
name = "Riverside Walk-in Clinic"

[context]
signing_key = {signing:?}

[audit]
path = {audit:?}
"#,
        listen = options.listen,
        cert = files.server_cert.display().to_string(),
        key = files.server_key.display().to_string(),
        signing = files.signing_key.display().to_string(),
        audit = options.audit_path.display().to_string(),
        ca = files.ca_cert.display().to_string(),
        ehr_port = ehr.port(),
    );
    Config::parse(&text)
}

/// Errors starting the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot prepare development certificates in {dir}: {source}")]
    Certs { dir: String, source: std::io::Error },
    #[error("cannot open a loopback port: {0}")]
    Loopback(std::io::Error),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Starts the demo systems and ehrgate in front of them.
pub async fn start(options: DemoOptions) -> Result<Demo, DemoError> {
    let (files, generated) =
        ensure_dev_files(&options.cert_dir, &[EMR_HOST, EHR_HOST]).map_err(|source| {
            DemoError::Certs {
                dir: options.cert_dir.display().to_string(),
                source,
            }
        })?;
    let emr_listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(DemoError::Loopback)?;
    let ehr_listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .map_err(DemoError::Loopback)?;
    let emr_addr = emr_listener.local_addr().map_err(DemoError::Loopback)?;
    let ehr_addr = ehr_listener.local_addr().map_err(DemoError::Loopback)?;

    let prepared =
        Prepared::new(config(&options, &files, emr_addr, ehr_addr).map_err(StartError::from)?)
            .map_err(StartError::from)?;
    let viewer = Arc::new(viewer::Viewer::default());
    viewer.set_jwks(
        serde_json::from_slice(&prepared.gateway.get().signer.jwks()).expect("JWKS is JSON"),
    );
    let emr = Arc::new(emr::Emr::default());
    spawn_http(emr_listener, move |req| emr.clone().handle(req));
    // The regional viewer is only ever served over HTTPS; so is the demo's, with the
    // development certificate (it names localhost), verified against the development CA.
    let viewer_tls = crate::tls::server_config(&files.server_cert, &files.server_key)
        .map_err(StartError::from)?
        .config;
    spawn_https(ehr_listener, viewer_tls, move |req| {
        viewer.clone().handle(req)
    });

    let running = app::start_prepared(prepared).await?;
    Ok(Demo {
        running,
        files,
        generated,
        options,
    })
}

pub async fn run(listen: SocketAddr) -> ExitCode {
    let stop = crate::cli::Signals::install();
    let demo = match start(DemoOptions::new(listen)).await {
        Ok(d) => d,
        Err(DemoError::Start(e @ StartError::Bind { .. })) => {
            eprintln!(
                "ehrgate demo: {e}\n  (another program uses that port: try --listen 127.0.0.1:0)"
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("ehrgate demo: {e}");
            return ExitCode::from(1);
        }
    };
    print_welcome(&demo);
    stop.wait().await;
    demo.running.shutdown();
    demo.running.wait().await;
    ExitCode::SUCCESS
}

fn print_welcome(demo: &Demo) {
    let ca = demo.files.ca_cert.display();
    println!("ehrgate demo is running (Ctrl-C stops it)\n");
    println!("  EMR:        {}   (start here)", demo.emr_url());
    println!("  EHR viewer: {}", demo.ehr_url());
    println!("  admin:      http://{}/metrics", demo.running.admin_addr);
    println!("  audit log:  {}\n", demo.options.audit_path.display());
    println!(
        "  EMR login:    {} / {}, PIN {}",
        data::EMR_USER,
        data::EMR_PASSWORD,
        data::EMR_PIN
    );
    println!(
        "  ONE ID login: {} / {}",
        data::ONEID_USER,
        data::ONEID_PASSWORD
    );
    println!(
        "  ONE ID code:  shown on the EMR login page (TOTP secret {})\n",
        data::TOTP_SECRET_BASE32
    );
    println!(
        "  Development CA: {ca}{}",
        if demo.generated {
            " (new)"
        } else {
            " (reused)"
        }
    );
    println!("  Trust it in a throw-away browser profile only, for example:");
    println!("    chromium --user-data-dir=$(mktemp -d) --ignore-certificate-errors-spki-list=$(openssl x509 -in {} -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -binary | base64) {}", demo.files.server_cert.display(), demo.emr_url());
    println!("    curl --cacert {ca} {}oscar/index.jsp", demo.emr_url());
}
