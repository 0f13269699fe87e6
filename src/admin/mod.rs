//! The admin listener (plain HTTP, loopback by default): `/healthz`, `/readyz`,
//! `/metrics`, open to anyone who can reach it, and admin actions (`POST /admin/*`),
//! which need a bearer token from `admin.token_file` (see [`auth`]) and are audited with
//! who took them. It carries no patient data, and accepts nothing a web page could send.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

pub mod auth;

use crate::audit::{Event, Record};
use crate::body::Body;
use crate::gateway::Current;
use crate::metrics::Metrics;
use crate::problem::Problem;
use crate::server::Health;
use crate::session::SessionStore;

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    /// The gateway in force (replaced on reload).
    pub gateway: Arc<Current>,
    /// The admin tokens in force (replaced on reload).
    pub auth: Arc<arc_swap::ArcSwap<auth::AdminAuth>>,
    pub reload: Arc<crate::reload::ReloadStatus>,
}

pub async fn serve(listener: TcpListener, state: AdminState, mut shutdown: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = crate::shutdown::signalled(&mut shutdown) => return,
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            let conn = builder.serve_connection(TokioIo::new(tcp), svc);
            let mut conn = std::pin::pin!(conn);
            let mut shutdown = shutdown;
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "admin connection error") },
                _ = crate::shutdown::signalled(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if !state.health.is_ready() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else if let Some(why) = state.gateway.get().store.unhealthy() {
                // A load balancer sends clinicians to a replica that can serve them.
                let mut resp = Response::new(Body::full(format!(
                    "not ready: the session store is unavailable ({why})\n"
                )));
                *resp.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                resp
            } else {
                // Still ready after a refused reload (the old configuration serves),
                // but the body says so.
                let mut resp =
                    Response::new(Body::full(format!("ready\n{}", state.reload.describe())));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                resp
            }
        }
        (&Method::GET, "/metrics") => {
            let mut text = state.metrics.render();
            match state.gateway.get().store.counts().await {
                Ok(c) => {
                    text.push_str(
                        "# HELP ehrgate_sessions Sessions and launch tickets held now.\n",
                    );
                    text.push_str("# TYPE ehrgate_sessions gauge\n");
                    for (kind, n) in [("emr", c.emr), ("ehr", c.ehr), ("ticket", c.tickets)] {
                        text.push_str(&format!("ehrgate_sessions{{kind=\"{kind}\"}} {n}\n"));
                    }
                }
                Err(e) => state.gateway.get().store_failed(&e),
            }
            text.push_str(&format!(
                "# HELP ehrgate_store_up Whether the session store answers (1) or not (0).\n# TYPE ehrgate_store_up gauge\nehrgate_store_up {}\n",
                u8::from(state.gateway.get().store.unhealthy().is_none())
            ));
            let mut resp = Response::new(Body::full(Bytes::from(text)));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::POST, "/admin/logout") => admin_logout(state, &req).await,
        _ => Problem::not_found(format!(
            "{} {} is not an admin endpoint (try /healthz, /readyz or /metrics).",
            req.method(),
            req.uri().path()
        ))
        .into_response("admin", crate::problem::wants_json(req.headers())),
    }
}

/// `POST /admin/logout?user=U`: signs out every EMR session of the user, with all its
/// effects, and says how many ended. Refused for anything a browser page could send.
async fn admin_logout(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let json = crate::problem::wants_json(req.headers());
    let h = req.headers();
    let from_a_page = h.contains_key(http::header::ORIGIN)
        || h.contains_key(http::header::REFERER)
        || h.get("sec-fetch-site")
            .is_some_and(|v| v.as_bytes() != b"none");
    if from_a_page {
        return Problem::new(
            StatusCode::FORBIDDEN,
            "cross_site",
            "Refused",
            "Admin actions are not accepted from web pages.",
        )
        .into_response("admin", json);
    }
    let who = match state.auth.load().who(
        h.get(http::header::AUTHORIZATION)
            .map(HeaderValue::as_bytes),
    ) {
        Ok(who) => who,
        Err(refusal) => {
            let (problem, detail) = match refusal {
                auth::Refusal::BadToken => (
                    Problem::new(
                        StatusCode::UNAUTHORIZED,
                        "admin_token_required",
                        "Admin token required",
                        "Admin actions need Authorization: Bearer with a token from admin.token_file.",
                    )
                    .with_header(
                        http::header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"ehrgate admin\""),
                    ),
                    "admin: missing or wrong token",
                ),
                auth::Refusal::NoTokenOffLoopback => (
                    Problem::new(
                        StatusCode::FORBIDDEN,
                        "admin_token_not_configured",
                        "Admin actions refused",
                        "The admin listener is not on a loopback address and admin.token_file is not set.",
                    )
                    .hint("Set admin.token_file, or keep server.admin_listen on 127.0.0.1."),
                    "admin: no token file on a non-loopback listener",
                ),
            };
            state.gateway.get().audit_best_effort(
                &Record::new(Event::Deny, "refused").detail(format!(
                    "{detail} ({} {})",
                    req.method(),
                    req.uri().path()
                )),
            );
            return problem.into_response("admin", json);
        }
    };
    let user = req
        .uri()
        .query()
        .and_then(|q| crate::gateway::form::value(q, "user"))
        .filter(|u| !u.trim().is_empty());
    let Some(user) = user else {
        return Problem::bad_request(
            "Name the EMR user to sign out: POST /admin/logout?user=PROVIDER_NO",
        )
        .into_response("admin", json);
    };
    // The record of who asked comes before the action.
    if let Err(p) = state.gateway.get().audit_or_refuse(
        &Record::new(Event::Admin, "ok")
            .user(user.trim())
            .detail(format!("logout requested by {who}")),
    ) {
        return p.into_response("admin", json);
    }
    let n = match state.gateway.get().sign_out_user(user.trim(), None).await {
        Ok(n) => n,
        Err(e) => {
            return state
                .gateway
                .get()
                .store_problem(e)
                .into_response("admin", json)
        }
    };
    let body = serde_json::json!({"user": user.trim(), "signed_out": n});
    let mut resp = Response::new(Body::full(body.to_string()));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
