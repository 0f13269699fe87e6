//! `ehrgate demo`: ehrgate in front of small built-in EMR and viewer servers on loopback,
//! with development certificates generated under `certs/dev/` on first use. Needs no
//! set-up and touches nothing outside the working directory.
//!
//! The demo servers are stand-ins for showing the proxy at work; they hold only made-up
//! data and must never be pointed at anything real.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::Body;
use crate::config::Config;
use crate::problem::{escape_html, page};
use crate::server;
use crate::tls::dev::{ensure_dev_files, DevFiles};

pub const EMR_HOST: &str = "emr.localhost";
pub const EHR_HOST: &str = "ehr.localhost";

/// Serves plain HTTP/1.1 on `listener` with `handler` until the task is dropped.
pub fn spawn_http<F, Fut>(listener: TcpListener, handler: F)
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
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}

pub fn html(body: String) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// The configuration the demo runs with.
pub fn config(listen: SocketAddr, files: &DevFiles, emr: SocketAddr, ehr: SocketAddr) -> Config {
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
upstream = "http://{ehr}"

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
path = "audit/demo-audit.jsonl"
"#,
        cert = files.server_cert.display().to_string(),
        key = files.server_key.display().to_string(),
        signing = files.signing_key.display().to_string(),
    );
    Config::parse(&text).expect("the demo configuration is valid")
}

async fn loopback() -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", 0)).await
}

pub async fn run(listen: SocketAddr) -> ExitCode {
    let dir = Path::new("certs/dev");
    let (files, generated) = match ensure_dev_files(dir, &[EMR_HOST, EHR_HOST]) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "ehrgate demo: cannot prepare development certificates in {}: {e}",
                dir.display()
            );
            return ExitCode::from(1);
        }
    };
    let (emr, ehr) = match (loopback().await, loopback().await) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("ehrgate demo: cannot open a loopback port: {e}");
            return ExitCode::from(1);
        }
    };
    let (emr_addr, ehr_addr) = (
        emr.local_addr().expect("bound"),
        ehr.local_addr().expect("bound"),
    );
    spawn_http(emr, |req| async move { stand_in_page("Demo EMR", &req) });
    spawn_http(
        ehr,
        |req| async move { stand_in_page("Demo EHR viewer", &req) },
    );

    let stop = crate::cli::Signals::install();
    let running = match server::start(config(listen, &files, emr_addr, ehr_addr)).await {
        Ok(r) => r,
        Err(e) => {
            if matches!(e, server::StartError::Bind { .. }) {
                eprintln!("ehrgate demo: {e}\n  (another program uses that port: try --listen 127.0.0.1:0)");
                return ExitCode::from(1);
            }
            return crate::cli::start_failed(e);
        }
    };
    let port = running.proxy_addr.port();
    println!("ehrgate demo is running (Ctrl-C stops it)\n");
    println!("  EMR:        https://{EMR_HOST}:{port}/");
    println!("  EHR viewer: https://{EHR_HOST}:{port}/");
    println!("  admin:      http://{}/metrics\n", running.admin_addr);
    println!(
        "  Development CA: {}{}",
        files.ca_cert.display(),
        if generated { " (new)" } else { " (reused)" }
    );
    println!("  Trust it in a test browser profile only, or use curl:");
    println!(
        "    curl --cacert {} https://{EMR_HOST}:{port}/",
        files.ca_cert.display()
    );
    stop.wait().await;
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
}

fn stand_in_page(title: &str, req: &Request<Incoming>) -> Response<Body> {
    html(page(
        title,
        &format!(
            "<h1>{}</h1><p>Reached through ehrgate: <code>{} {}</code></p>",
            escape_html(title),
            req.method(),
            escape_html(req.uri().path())
        ),
    ))
}
