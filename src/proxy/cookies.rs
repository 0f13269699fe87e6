//! Reading and rewriting `Cookie` request headers, and writing ehrgate's own cookies.

use http::header::{HeaderValue, COOKIE};
use http::HeaderMap;

/// The cookie on the EHR host that names the EHR session.
pub const EHR_COOKIE: &str = "__Host-ehrgate";
/// The cookie on the EMR host that names the EMR session to `/.ehrgate/` endpoints.
pub const EMR_MARKER_COOKIE: &str = "__Host-ehrgate-emr";

/// The short-lived cookie on the EHR host that binds launch tickets to the browser that
/// first brought them to enter (DESIGN §6).
pub const BIND_COOKIE: &str = "__Host-ehrgate-bind";

/// Every ehrgate cookie starts so; none is ever forwarded upstream.
const OWN_PREFIX: &str = "__Host-ehrgate";

fn pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            Some((name.trim(), value.trim()))
        })
}

/// The value of the first cookie called `name`.
pub fn get<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    pairs(headers).find(|(n, _)| *n == name).map(|(_, v)| v)
}

/// Every cookie value called `name` (a browser may send several with different paths).
pub fn get_all<'a>(headers: &'a HeaderMap, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
    pairs(headers)
        .filter(move |(n, _)| *n == name)
        .map(|(_, v)| v)
}

/// Names of every cookie sent.
pub fn names(headers: &HeaderMap) -> Vec<String> {
    pairs(headers).map(|(n, _)| n.to_string()).collect()
}

/// Removes ehrgate's own cookies from the `Cookie` header (one field left, or none).
pub fn strip_own(headers: &mut HeaderMap) {
    if let Some(without) = without_own(headers) {
        headers.remove(COOKIE);
        if let Some(v) = without {
            headers.insert(COOKIE, v);
        }
    }
}

/// The `Cookie` value to send upstream: `None` when the request carries no ehrgate
/// cookie (send it as it is); otherwise the other cookies, if any are left.
pub fn without_own(headers: &HeaderMap) -> Option<Option<HeaderValue>> {
    let has_own = headers.get_all(COOKIE).iter().any(|v| {
        v.as_bytes()
            .windows(OWN_PREFIX.len())
            .any(|w| w == OWN_PREFIX.as_bytes())
    });
    if !has_own {
        return None;
    }
    let kept: Vec<String> = pairs(headers)
        .filter(|(n, _)| !n.starts_with(OWN_PREFIX))
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    Some(if kept.is_empty() {
        None
    } else {
        HeaderValue::from_str(&kept.join("; ")).ok()
    })
}

/// Removes an upstream's `Set-Cookie` for any of ehrgate's cookie names: no upstream may
/// plant or replace a cookie ehrgate relies on.
pub fn strip_own_set_cookie(headers: &mut HeaderMap) {
    use http::header::SET_COOKIE;
    let own = |v: &HeaderValue| {
        v.as_bytes()
            .trim_ascii_start()
            .starts_with(OWN_PREFIX.as_bytes())
    };
    if !headers.get_all(SET_COOKIE).iter().any(own) {
        return;
    }
    let kept: Vec<HeaderValue> = headers
        .get_all(SET_COOKIE)
        .iter()
        .filter(|v| !own(v))
        .cloned()
        .collect();
    headers.remove(SET_COOKIE);
    for v in kept {
        headers.append(SET_COOKIE, v);
    }
}

/// `Set-Cookie` for one of ehrgate's `__Host-` cookies (a browser session cookie).
pub fn set(name: &str, value: &str) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Lax"
    ))
    .expect("token values are base64url")
}

/// `Set-Cookie` for one of ehrgate's `__Host-` cookies that lives `max_age`.
pub fn set_for(name: &str, value: &str, max_age: std::time::Duration) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Lax",
        max_age.as_secs().max(1)
    ))
    .unwrap_or_else(|_| set(name, value))
}

/// `Set-Cookie` that expires a cookie in the browser.
pub fn expire(name: &str, path: &str) -> Option<HeaderValue> {
    let secure = if name.starts_with("__Host-") || name.starts_with("__Secure-") {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{name}=; Path={path}; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT{secure}"
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(COOKIE, v.parse().unwrap());
        m
    }

    #[test]
    fn reads_cookies() {
        let m = h("JSESSIONID=abc; __Host-ehrgate-emr=m1;pref=x=y");
        assert_eq!(get(&m, "JSESSIONID"), Some("abc"));
        assert_eq!(get(&m, "__Host-ehrgate-emr"), Some("m1"));
        assert_eq!(get(&m, "pref"), Some("x=y"));
        assert_eq!(get(&m, "__Host-ehrgate"), None);
    }

    #[test]
    fn own_cookies_never_pass() {
        let mut m = h("a=1; __Host-ehrgate=s; __Host-ehrgate-emr=m; b=2");
        strip_own(&mut m);
        assert_eq!(m[COOKIE], "a=1; b=2");
        let mut only = h("__Host-ehrgate=s");
        strip_own(&mut only);
        assert!(only.get(COOKIE).is_none());
        let mut untouched = h("a=1;b=2");
        strip_own(&mut untouched);
        assert_eq!(untouched[COOKIE], "a=1;b=2");
    }

    #[test]
    fn upstreams_cannot_set_ehrgate_cookies() {
        let mut m = HeaderMap::new();
        for v in [
            "JSESSIONID=a; Path=/oscar",
            "__Host-ehrgate=forged; Path=/; Secure",
            " __Host-ehrgate-emr=x",
            "__Host-ehrgate-bind=y",
            "theme=dark",
        ] {
            m.append(http::header::SET_COOKIE, HeaderValue::from_static(v));
        }
        strip_own_set_cookie(&mut m);
        let left: Vec<&str> = m
            .get_all(http::header::SET_COOKIE)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(left, ["JSESSIONID=a; Path=/oscar", "theme=dark"]);
    }

    #[test]
    fn writes_host_prefixed_cookies() {
        let v = set(EHR_COOKIE, "tok");
        assert_eq!(
            v,
            "__Host-ehrgate=tok; Path=/; Secure; HttpOnly; SameSite=Lax"
        );
        let e = expire(EHR_COOKIE, "/").unwrap();
        assert!(e.to_str().unwrap().contains("Max-Age=0"));
        assert!(e.to_str().unwrap().contains("Secure"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    fn pair() -> impl Strategy<Value = (String, String)> {
        (
            prop_oneof![
                "[A-Za-z0-9_-]{1,10}",
                Just(EHR_COOKIE.to_string()),
                Just(EMR_MARKER_COOKIE.to_string()),
                Just(BIND_COOKIE.to_string()),
                "__Host-ehrgate[a-z-]{0,6}",
            ],
            "[A-Za-z0-9_=-]{0,12}",
        )
    }

    proptest! {
        #[test]
        fn ehrgate_cookies_never_pass_however_the_header_is_split(
            sent in proptest::collection::vec(pair(), 0..10),
            split in 1usize..4,
            spaces in any::<bool>(),
        ) {
            let sep = if spaces { "; " } else { ";" };
            let mut headers = HeaderMap::new();
            for chunk in sent.chunks(split) {
                let text: Vec<String> = chunk.iter().map(|(n, v)| format!("{n}={v}")).collect();
                headers.append(COOKIE, HeaderValue::from_str(&text.join(sep)).unwrap());
            }
            strip_own(&mut headers);
            let left: Vec<(String, String)> = pairs(&headers)
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            prop_assert!(!left.iter().any(|(n, _)| n.starts_with(OWN_PREFIX)));
            let kept: Vec<(String, String)> = sent
                .iter()
                .filter(|(n, _)| !n.starts_with(OWN_PREFIX))
                .cloned()
                .collect();
            prop_assert_eq!(left, kept);
        }

        #[test]
        fn reading_any_cookie_header_never_panics(raw in "[ -~]{0,80}") {
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&raw) {
                headers.insert(COOKIE, v);
            }
            let _ = get(&headers, EHR_COOKIE);
            let _ = names(&headers);
            strip_own(&mut headers);
        }
    }
}
