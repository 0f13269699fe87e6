//! Which origin a request is for, decided from its host and the TLS SNI, and which paths
//! are ehrgate's own. Plain functions: no sockets, no state.

use http::header::HOST;
use http::{HeaderMap, StatusCode, Uri};

use crate::problem::Problem;
use crate::proxy::path::CanonicalPath;

/// The two origins ehrgate serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Emr,
    Ehr,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Emr => "emr",
            Origin::Ehr => "ehr",
        }
    }

    /// The name a clinician knows the system by.
    pub fn display(self) -> &'static str {
        match self {
            Origin::Emr => "the EMR",
            Origin::Ehr => "the EHR viewer",
        }
    }
}

/// The host a request names, as sent (port included): the URI's authority (HTTP/2, or an
/// absolute-form HTTP/1.1 target), else the `Host` header.
pub fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    match uri.authority() {
        Some(a) => Some(a.as_str()),
        None => headers.get(HOST).and_then(|v| v.to_str().ok()),
    }
}

/// A request that names its host ambiguously is refused (RFC 9112 §3.2: more than one
/// `Host` field is a 400), as is one whose `Host` disagrees with its URI's authority:
/// the upstream and ehrgate must never route one request by two different hosts.
pub fn ambiguous_host(uri: &Uri, headers: &HeaderMap) -> Option<Problem> {
    let mut hosts = headers.get_all(HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Some(Problem::bad_request(
            "The request has more than one Host field.",
        ));
    }
    match (uri.authority(), first) {
        (Some(a), Some(h)) if !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes()) => Some(
            Problem::bad_request("The request's Host field disagrees with its target's host."),
        ),
        _ => None,
    }
}

/// A host without its port (`[::1]:8443` → `[::1]`, `emr.x:8443` → `emr.x`).
pub fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The port in a `Host` value, if any.
pub fn host_port(host: &str) -> Option<u16> {
    let rest = if host.starts_with('[') {
        &host[host.find(']')? + 1..]
    } else {
        host.rfind(':').map_or("", |i| &host[i..])
    };
    rest.strip_prefix(':')?.parse().ok()
}

/// Routes by host, refusing with 421 a host that is neither origin or that disagrees
/// with the SNI the TLS client sent.
pub fn classify(
    host: Option<&str>,
    sni: Option<&str>,
    emr_host: &str,
    ehr_host: &str,
) -> Result<Origin, Problem> {
    let Some(host) = host else {
        return Err(Problem::bad_request(
            "The request names no host (no Host header or :authority).",
        ));
    };
    let name = host_name(host).trim_end_matches('.');
    if let Some(sni) = sni {
        if !sni.trim_end_matches('.').eq_ignore_ascii_case(name) {
            return Err(misdirected(
                "The host this request names differs from the one the connection was opened for.",
            ));
        }
    }
    if name.eq_ignore_ascii_case(emr_host) {
        Ok(Origin::Emr)
    } else if name.eq_ignore_ascii_case(ehr_host) {
        Ok(Origin::Ehr)
    } else {
        Err(misdirected(
            "This server does not serve the host the request names.",
        ))
    }
}

fn misdirected(detail: &'static str) -> Problem {
    Problem::new(
        StatusCode::MISDIRECTED_REQUEST,
        "misdirected_request",
        "Misdirected request",
        detail,
    )
    .hint("Open the EMR or the EHR viewer from its usual address or bookmark.")
}

/// ehrgate's own path prefixes; never forwarded upstream.
pub const OWN_PREFIX: &str = "/.ehrgate/";
pub const WELL_KNOWN_PREFIX: &str = "/.well-known/ehrgate/";

/// Whether a path is ehrgate's own. The path is canonical, so every spelling an upstream
/// would read as one of these (`/%2eehrgate/…`, `/x/../.ehrgate/…`, `/.ehrgate;x/…`)
/// counts.
pub fn is_own_path(path: &CanonicalPath) -> bool {
    path.is_under(OWN_PREFIX.trim_end_matches('/'))
        || path.is_under(WELL_KNOWN_PREFIX.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMR: &str = "emr.clinic.example";
    const EHR: &str = "ehr.clinic.example";

    #[test]
    fn routes_by_host_ignoring_case_port_and_trailing_dot() {
        assert_eq!(
            classify(Some("emr.clinic.example"), None, EMR, EHR).unwrap(),
            Origin::Emr
        );
        assert_eq!(
            classify(Some("EHR.Clinic.Example:8443"), None, EMR, EHR).unwrap(),
            Origin::Ehr
        );
        assert_eq!(
            classify(Some("ehr.clinic.example."), None, EMR, EHR).unwrap(),
            Origin::Ehr
        );
    }

    #[test]
    fn unknown_host_and_sni_mismatch_are_misdirected() {
        let e = classify(Some("other.example"), None, EMR, EHR).unwrap_err();
        assert_eq!(e.status, 421);
        let e = classify(
            Some("ehr.clinic.example"),
            Some("emr.clinic.example"),
            EMR,
            EHR,
        )
        .unwrap_err();
        assert_eq!(e.status, 421);
        assert!(classify(
            Some("emr.clinic.example:443"),
            Some("EMR.clinic.example"),
            EMR,
            EHR
        )
        .is_ok());
        let e = classify(None, None, EMR, EHR).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn host_parts() {
        assert_eq!(host_name("[::1]:8443"), "[::1]");
        assert_eq!(host_name("emr.x:8443"), "emr.x");
        assert_eq!(host_name("emr.x"), "emr.x");
        assert_eq!(host_port("emr.x:8443"), Some(8443));
        assert_eq!(host_port("[::1]:9"), Some(9));
        assert_eq!(host_port("emr.x"), None);
    }

    fn own(p: &str) -> bool {
        is_own_path(&crate::proxy::path::canonical(p).unwrap())
    }

    #[test]
    fn own_paths_in_every_spelling() {
        for p in [
            "/.ehrgate/status",
            "/.ehrgate",
            "/.well-known/ehrgate/jwks.json",
            "/%2eehrgate/status",
            "/%2Eehrgate/enter",
            "//.ehrgate/x",
            "/oscar/../.ehrgate/x",
            "/./.well-known/ehrgate/jwks.json",
            "/.ehrgate;x/status",
            "/.well-known;x/ehrgate/jwks.json",
            "/.ehrgate/",
        ] {
            assert!(own(p), "{p}");
        }
        // Not canonicalisable at all: refused before any routing.
        assert!(crate::proxy::path::canonical("/.well-known%2Fehrgate%2Fjwks.json").is_err());
        for p in [
            "/",
            "/oscar/index.jsp",
            "/.ehrgatex",
            "/.well-known/other",
            "/a%20b",
            "/x/.hidden",
        ] {
            assert!(!own(p), "{p}");
        }
    }
}
