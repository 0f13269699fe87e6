//! Header rules applied on the way through: hop-by-hop removal, the headers ehrgate vouches
//! for (client copies always removed, ehrgate's own value inserted), and HTTP/2 to
//! HTTP/1.1 folding.

use http::header::{self, HeaderName, HeaderValue};
use http::HeaderMap;

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// RFC 9110 §7.6.1: "a proxy or gateway MUST parse a received Connection header field
/// before a message is forwarded and, for each connection-option in this field, remove
/// any header or trailer field(s) from the message with the same name as the
/// connection-option, and then remove the Connection header field itself".
///
/// With `keep_upgrade`, an `Upgrade` handshake is being relayed: `Upgrade` is kept and
/// `Connection: upgrade` is set again after the removal.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names finds which hop-by-hop fields are there (usually none, or
    // Connection alone): removing only those saves hashing every name of the list.
    let mut present: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name) && !(keep_upgrade && name == header::UPGRADE) {
            present.push(name.clone());
        }
    }
    if present.is_empty() {
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        return;
    }
    let mut named: Vec<HeaderName> = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        let Ok(value) = value.to_str() else { continue };
        for option in value.split(',') {
            let option = option.trim();
            if option.is_empty() || (keep_upgrade && option.eq_ignore_ascii_case("upgrade")) {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(option.as_bytes()) {
                named.push(name);
            }
        }
    }
    for name in named.into_iter().chain(present) {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Fields that are meaningful for one connection only. RFC 9110 §7.6.1: "Intermediaries
/// SHOULD remove or replace fields that are known to require removal before forwarding,
/// whether or not they appear as a connection-option ... Proxy-Connection, Keep-Alive, TE,
/// Transfer-Encoding, and Upgrade." Proxy-Authorization is credentials meant for a proxy,
/// never for the origin.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare by identity; the two non-standard ones by text.
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        // DESIGN §8: trailers are dropped before forwarding, so is their announcement.
        || name == header::TRAILER
        || matches!(name.as_str(), "keep-alive" | "proxy-connection")
}

/// Whether a request asks for an HTTP/1.1 upgrade to WebSocket, the only protocol
/// ehrgate relays (DESIGN §8): any other `Upgrade` (`h2c`, ...) is stripped as
/// hop-by-hop and the request forwarded as an ordinary one.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    let mut upgrades = headers.get_all(header::UPGRADE).iter();
    let websocket = match (upgrades.next(), upgrades.next()) {
        (Some(v), None) => v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket"),
        _ => false,
    };
    websocket
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|o| o.trim().eq_ignore_ascii_case("upgrade"))
}

/// The headers ehrgate vouches for. A client's copy of any of them is never forwarded:
/// names are matched case-insensitively with `-` and `_` alike, because some servers
/// (CGI-style environments among them) read `X_EHR_Context` as `X-EHR-Context`.
#[derive(Debug, Clone)]
pub struct TrustedHeaders {
    names: Vec<(String, Severity)>,
}

/// How to log a stripped client copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Routine: a client behind another proxy sends these.
    Routine,
    /// A client has no business sending this: a forgery attempt, logged as a warning.
    Forgery,
}

impl TrustedHeaders {
    pub fn new() -> Self {
        let mut t = Self { names: Vec::new() };
        for name in [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-port",
            "x-real-ip",
            "forwarded",
            "x-request-id",
        ] {
            t.add(name, Severity::Routine);
        }
        t
    }

    pub fn add(&mut self, name: &str, severity: Severity) {
        let normal = normalise(name);
        if !self.names.iter().any(|(n, _)| *n == normal) {
            self.names.push((normal, severity));
        }
    }

    fn lookup(&self, name: &str) -> Option<Severity> {
        self.names
            .iter()
            .find(|(n, _)| same_name(n, name))
            .map(|(_, s)| *s)
    }

    /// Removes every client copy of a trusted header; returns what was removed.
    pub fn strip(&self, headers: &mut HeaderMap) -> Vec<(HeaderName, Severity)> {
        let mut found = Vec::new();
        for name in headers.keys() {
            if let Some(sev) = self.lookup(name.as_str()) {
                found.push((name.clone(), sev));
            }
        }
        for (name, _) in &found {
            headers.remove(name);
        }
        found
    }
}

impl Default for TrustedHeaders {
    fn default() -> Self {
        Self::new()
    }
}

fn normalise(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// `expected` is already normalised; header names from hyper are lowercase.
fn same_name(expected: &str, name: &str) -> bool {
    expected.len() == name.len()
        && expected.bytes().zip(name.bytes()).all(|(e, n)| {
            let n = match n.to_ascii_lowercase() {
                b'_' => b'-',
                other => other,
            };
            e == n
        })
}

/// Sets the forwarded headers ehrgate vouches for.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    original_host: &str,
    request_id: &HeaderValue,
) {
    headers.insert(X_FORWARDED_FOR.clone(), client_ip.clone());
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    if let Ok(v) = HeaderValue::from_str(original_host) {
        headers.insert(X_FORWARDED_HOST.clone(), v);
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// HTTP/2 lets a client split `Cookie` into several fields; an HTTP/1.1 upstream needs
/// one. RFC 9113 §8.2.3: they "MUST be concatenated into a single octet string using the
/// two-octet delimiter of 0x3b, 0x20 (the ASCII string "; ")".
pub fn fold_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(_), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let joined: Vec<u8> = headers
        .get_all(header::COOKIE)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("te", "trailers"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn upgrade_is_kept_when_relaying_a_handshake() {
        let mut h = map(&[
            ("connection", "Upgrade, x-hop"),
            ("upgrade", "websocket"),
            ("x-hop", "1"),
            ("sec-websocket-key", "abc"),
        ]);
        assert!(is_upgrade_request(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("x-hop"));
        assert!(h.contains_key("sec-websocket-key"));
    }

    #[test]
    fn trusted_headers_match_case_and_underscore_insensitively() {
        let mut t = TrustedHeaders::new();
        t.add("X-EHR-Context", Severity::Forgery);
        let mut h = map(&[
            ("x-ehr-context", "forged"),
            ("x_ehr_context", "forged"),
            ("x_forwarded_for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("forwarded", "for=10.0.0.3"),
            ("x-ehr-contexts", "not ours"),
            ("cookie", "a=b"),
        ]);
        let removed = t.strip(&mut h);
        assert_eq!(removed.len(), 5);
        assert!(removed
            .iter()
            .any(|(n, s)| n == "x_ehr_context" && *s == Severity::Forgery));
        assert_eq!(h.len(), 2);
        assert!(h.contains_key("x-ehr-contexts"));
    }

    #[test]
    fn forwarded_values_replace_client_ones() {
        let mut h = map(&[("x-forwarded-for", "6.6.6.6")]);
        TrustedHeaders::new().strip(&mut h);
        set_forwarded(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            "emr.localhost:8443",
            &HeaderValue::from_static("r1"),
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "emr.localhost:8443");
        assert_eq!(h["x-request-id"], "r1");
    }

    #[test]
    fn split_cookies_are_folded() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        fold_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
        let mut one = map(&[("cookie", "a=1")]);
        fold_cookies(&mut one);
        assert_eq!(one["cookie"], "a=1");
    }
}
