//! Tab closing: `/.ehrgate/session.js` subscribes to `/.ehrgate/events` (Server-Sent
//! Events) and closes the viewer window on `logout`, or, where the browser will not let a
//! script close it, replaces the page with the ended notice.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use tokio::sync::mpsc;

use crate::body::Body;
use crate::gateway::Gateway;
use crate::problem::{BoxError, Problem};
use crate::proxy::cookies::{self, EHR_COOKIE};
use crate::proxy::Ctx;
use crate::session::{SessionStore, TokenHash};

/// A comment line keeps idle proxies and browsers from dropping the stream.
const HEARTBEAT: Duration = Duration::from_secs(20);

const SCRIPT: &str = r#"// ehrgate: close this viewer window when the EHR session ends.
(function () {
  if (window.__ehrgateSession) return;
  window.__ehrgateSession = true;
  var ended = false;
  // Leaving the page (a link, a form) aborts the stream too: that is not an ending.
  var leaving = false;
  window.addEventListener("beforeunload", function () { leaving = true; });
  window.addEventListener("pagehide", function () { leaving = true; });
  function showEnded() {
    document.title = "EHR session ended";
    document.documentElement.innerHTML =
      '<head><meta charset="utf-8"><title>EHR session ended</title></head>' +
      '<body style="font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto">' +
      '<h1 id="ehrgate-ended">EHR session ended \u2014 relaunch from the EMR</h1>' +
      '<p>You signed out of the EMR, or disconnected from the EHR. Open the patient\u2019s ' +
      'chart in the EMR and press EHR to continue.</p></body>';
  }
  function end() {
    if (ended || leaving) return;
    ended = true;
    try { source.close(); } catch (e) {}
    window.close();
    // Still open: the browser did not let a script close it.
    setTimeout(function () { if (!window.closed) showEnded(); }, 250);
  }
  var source = new EventSource("/.ehrgate/events");
  source.addEventListener("logout", end);
  source.onerror = function () {
    // CLOSED means the stream was refused (the session is gone); CONNECTING is a retry.
    if (source.readyState === 2) setTimeout(end, 200);
  };
})();
"#;

pub(super) fn script() -> Response<Body> {
    let mut resp = Response::new(Body::full(SCRIPT));
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/javascript; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Event streams one EHR session may hold open at once (one per viewer tab, and some to
/// spare); more are refused with 429.
pub const MAX_STREAMS_PER_SESSION: u32 = 16;

/// The event stream's body: frames sent by its task.
struct EventBody(mpsc::Receiver<Bytes>);

impl http_body::Body for EventBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

impl Gateway {
    pub(crate) async fn events(
        &self,
        ctx: &Ctx,
        req: &Request<()>,
    ) -> Result<Response<Body>, Problem> {
        let mut session = None;
        for v in cookies::get_all(req.headers(), EHR_COOKIE).take(super::viewer::MAX_COOKIE_COPIES)
        {
            let found = self
                .store
                .viewer_session(&TokenHash::of(v), None)
                .await
                .map_err(|e| self.refuse_store_down(ctx, "event stream", e))?;
            if let Some(found) = found {
                session = Some(found.ehr);
                break;
            }
        }
        let Some(session) = session else {
            return Err(self.ehr_session_ended(req.headers()));
        };
        let Some(slot) = session.open_stream(MAX_STREAMS_PER_SESSION) else {
            return Err(Problem::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_event_streams",
                "Too many viewer tabs",
                format!(
                    "This EHR session already has {MAX_STREAMS_PER_SESSION} open event streams."
                ),
            )
            .hint("Close some viewer tabs; the others keep working."));
        };
        let mut closed = session.close_signal();
        drop(session);
        let mut shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        tokio::spawn(async move {
            let _slot = slot;
            if tx
                .send(Bytes::from_static(b"retry: 3000\n: connected\n\n"))
                .await
                .is_err()
            {
                return;
            }
            let mut beat = tokio::time::interval(HEARTBEAT);
            beat.tick().await;
            loop {
                tokio::select! {
                    _ = &mut closed => {
                        let _ = tx.send(Bytes::from_static(b"event: logout\ndata: {}\n\n")).await;
                        return;
                    }
                    // The browser reconnects to another ehrgate (or this one, restarted).
                    _ = crate::shutdown::signalled(&mut shutdown) => return,
                    _ = tx.closed() => return,
                    _ = beat.tick() => {
                        if tx.send(Bytes::from_static(b": ping\n\n")).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut resp = Response::new(Body::stream(EventBody(rx)));
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        Ok(resp)
    }
}
