//! One error type for everything a request can run into, and the one page it becomes.
//!
//! A [`Problem`] says what the person at the browser should read (status, title, what
//! happened, what to do) and, apart from that, where it came from and its cause for the
//! log. A user sees a short page (HTML, or JSON when the client asks for JSON) carrying
//! the request id; the log sees the cause; nobody sees a panic or an internal detail.

use std::borrow::Cow;
use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, Response, StatusCode};

pub use crate::error::BoxError;

/// Which side a problem came from: the browser's request, an upstream, or ehrgate itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    /// A stable machine-readable code, e.g. `upstream_timeout`.
    pub code: &'static str,
    pub title: Cow<'static, str>,
    /// What happened, in the clinic's words.
    pub detail: Cow<'static, str>,
    /// What the person should do next.
    pub hint: Cow<'static, str>,
    pub side: Side,
    pub cause: Option<BoxError>,
    /// Headers the page carries (e.g. a `Set-Cookie` that expires a dead session).
    pub headers: Option<Box<HeaderMap>>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        code: &'static str,
        title: impl Into<Cow<'static, str>>,
        detail: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            title: title.into(),
            detail: detail.into(),
            hint: Cow::Borrowed(""),
            side: if status.is_server_error() {
                Side::Internal
            } else {
                Side::Downstream
            },
            cause: None,
            headers: None,
        }
    }

    pub fn with_header(mut self, name: http::HeaderName, value: HeaderValue) -> Self {
        self.headers
            .get_or_insert_with(Default::default)
            .append(name, value);
        self
    }

    pub fn hint(mut self, hint: impl Into<Cow<'static, str>>) -> Self {
        self.hint = hint.into();
        self
    }

    pub fn side(mut self, side: Side) -> Self {
        self.side = side;
        self
    }

    pub fn cause(mut self, cause: impl Into<BoxError>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn bad_request(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "Bad request",
            detail,
        )
    }

    pub fn not_found(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", "Not found", detail)
    }

    /// The cause chain, for the log only.
    pub fn cause_chain(&self) -> String {
        let mut out = String::new();
        let mut next: Option<&(dyn std::error::Error + 'static)> = self
            .cause
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static));
        while let Some(e) = next {
            if !out.is_empty() {
                out.push_str(": ");
            }
            let _ = write!(out, "{e}");
            next = e.source();
        }
        out
    }

    /// The page for the browser: JSON if it prefers JSON, else HTML.
    /// The page (or JSON) for a client, in whatever body type the caller sends.
    pub fn into_response<B: From<Bytes>>(self, request_id: &str, json: bool) -> Response<B> {
        let (content_type, body) = if json {
            ("application/json", self.json(request_id))
        } else {
            ("text/html; charset=utf-8", self.html(request_id))
        };
        let mut resp = Response::new(B::from(body));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(extra) = self.headers {
            for (name, value) in extra.iter() {
                h.append(name, value.clone());
            }
        }
        resp
    }

    fn json(&self, request_id: &str) -> Bytes {
        let v = serde_json::json!({
            "error": self.code,
            "status": self.status.as_u16(),
            "title": self.title,
            "detail": self.detail,
            "hint": self.hint,
            "request_id": request_id,
        });
        Bytes::from(v.to_string())
    }

    fn html(&self, request_id: &str) -> Bytes {
        let hint = if self.hint.is_empty() {
            String::new()
        } else {
            format!("<p class=\"hint\">{}</p>", escape_html(&self.hint))
        };
        Bytes::from(page(
            &format!("{} — {}", self.status.as_u16(), self.title),
            &format!(
                "<h1>{}</h1>\n<p>{}</p>\n{hint}\n<p class=\"rid\">Request id: <code>{}</code> \
                 (quote it to your IT staff)</p>",
                escape_html(&self.title),
                escape_html(&self.detail),
                escape_html(request_id),
            ),
        ))
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.detail)
    }
}

/// Whether the client asked for JSON rather than a page.
pub fn wants_json(headers: &HeaderMap) -> bool {
    prefers_json(headers.get(ACCEPT))
}

/// [`wants_json`] of an `Accept` value (or its absence).
pub fn prefers_json(accept: Option<&HeaderValue>) -> bool {
    let Some(accept) = accept.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let json = accept.find("application/json");
    let html = accept.find("text/html");
    match (json, html) {
        (Some(_), None) => true,
        (Some(j), Some(h)) => j < h,
        _ => false,
    }
}

/// A small self-contained HTML page in ehrgate's plain style.
pub fn page(title: &str, body_html: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>\
         body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;color:#1d2733}}\
         h1{{font-size:1.4rem}} .hint{{background:#eef4fb;border-left:4px solid #2b6cb0;padding:.6rem .8rem}}\
         .rid{{color:#5a6773;font-size:.85rem}}</style></head>\n<body>\n{body_html}\n</body></html>\n",
        escape_html(title)
    )
}

pub fn escape_html(s: &str) -> Cow<'_, str> {
    if !s.contains(['<', '>', '&', '"', '\'']) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn json_only_when_preferred() {
        assert!(wants_json(&accept("application/json")));
        assert!(wants_json(&accept("application/json, text/html;q=0.5")));
        assert!(!wants_json(&accept(
            "text/html,application/xhtml+xml,application/json;q=0.8"
        )));
        assert!(!wants_json(&accept("*/*")));
        assert!(!wants_json(&HeaderMap::new()));
    }

    #[test]
    fn page_escapes_and_carries_the_request_id() {
        let p = Problem::bad_request("bad <input>").hint("fix & retry");
        let html = String::from_utf8(p.html("rid-1").to_vec()).unwrap();
        let resp: http::Response<Bytes> = p.into_response("rid-1", false);
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(html.contains("bad &lt;input&gt;"));
        assert!(html.contains("fix &amp; retry"));
        assert!(html.contains("rid-1"));
    }

    #[test]
    fn json_form_has_code_and_request_id() {
        let p = Problem::not_found("no such endpoint");
        let v: serde_json::Value = serde_json::from_slice(&p.json("rid-2")).unwrap();
        assert_eq!(v["error"], "not_found");
        assert_eq!(v["status"], 404);
        assert_eq!(v["request_id"], "rid-2");
    }

    #[test]
    fn cause_chain_is_for_the_log() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let p = Problem::bad_request("x").cause(io);
        assert_eq!(p.cause_chain(), "refused");
    }
}
