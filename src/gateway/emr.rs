//! EMR traffic: forwarded as it is, while watching for the EMR session's end (a logout
//! path, or a response that expires its cookie) and keeping its `last_seen` fresh.

use http::header::SET_COOKIE;
use http::{Request, Response};
use hyper::body::Incoming;

use crate::body::Body;
use crate::gateway::Gateway;
use crate::problem::Problem;
use crate::proxy::cookies;
use crate::proxy::route::Origin;
use crate::proxy::Ctx;
use crate::server::ConnInfo;
use crate::session::decide::{self, EndReason};
use crate::session::{EmrSeen, SessionStore, TokenHash};

impl Gateway {
    /// An EMR request, in phases: a sign-out trigger in the request (a logout path, an
    /// idle session) → forward through the engine → a sign-out trigger in the response
    /// (the session cookie expired), acted on before the response reaches the browser.
    pub(crate) async fn emr_traffic(
        &self,
        ctx: &Ctx,
        conn: &ConnInfo,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Problem> {
        let cfg = &self.config.emr;
        let key = cookies::get(req.headers(), &cfg.session_cookie).map(TokenHash::of);
        if cfg.logout_paths.iter().any(|p| ctx.path == *p) {
            // Before the EMR even answers: the viewer is closed whatever it says. Tomcat
            // also takes the session from `;jsessionid=` in the path (browsers that refuse
            // cookies), and logs that one out too.
            let in_path = ctx
                .path
                .param(&cfg.session_cookie)
                .map(TokenHash::of)
                .filter(|k| Some(k) != key.as_ref());
            for key in key.iter().chain(in_path.iter()) {
                self.sign_out_emr(key, EndReason::EmrLogoutPath, Some(ctx.id()))
                    .await;
            }
        } else if let Some(key) = &key {
            let now = self.store.now();
            match self.store.touch_emr(key, now, self.limits.emr_idle).await {
                Ok(EmrSeen::Idle) => {
                    self.sign_out_emr(key, EndReason::EmrIdle, Some(ctx.id()))
                        .await;
                }
                Ok(EmrSeen::Live | EmrSeen::Unknown) => {}
                // EMR traffic flows whatever the session store does: the EMR is the
                // clinician's own system, and its sessions are its own.
                Err(e) => self.store_failed(&e),
            }
        }
        let out = self.engine.prepare(
            ctx,
            Origin::Emr,
            &conn.peer_ip,
            self.engine.client_request(req),
        );
        let resp = self.engine.exchange(Origin::Emr, out, None).await?;
        if let Some(key) = &key {
            let unix = time::OffsetDateTime::now_utc().unix_timestamp();
            let expired = resp
                .headers()
                .get_all(SET_COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| decide::set_cookie_expires(v, &cfg.session_cookie, unix));
            if expired {
                // Before the response reaches the browser.
                self.sign_out_emr(key, EndReason::EmrCookieExpired, Some(ctx.id()))
                    .await;
            }
        }
        Ok(resp)
    }
}
