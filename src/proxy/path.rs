//! Canonical request paths (DESIGN §2): the one form in which every configured path
//! (launch, logout, override, ehrgate's own) is compared, mirroring how the upstream
//! servers (Tomcat, Spring, nginx) read a path, so that no other spelling of a path can
//! reach them unobserved. The request is still forwarded as the client sent it.
//!
//! The rule: `;` path parameters removed from every segment (`;jsessionid=…`), percent
//! escapes of unreserved characters decoded (others kept, upper-cased), empty segments
//! (`//`) and `.` dropped, `..` resolved, and a trailing `/` dropped. Refused with 400: an
//! encoded `/` (`%2F`), a `\` (plain or encoded), NUL or another control character,
//! malformed percent-encoding, and a path that climbs above the root.

use std::fmt;

/// A request path in canonical form, with the path parameters it carried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CanonicalPath {
    path: String,
    /// `name=value` parameters from every segment, in order (`;jsessionid=ABC`).
    params: Vec<(String, String)>,
}

impl CanonicalPath {
    pub fn as_str(&self) -> &str {
        &self.path
    }

    /// The value of the first path parameter called `name` (ASCII case-insensitive).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether this path is `prefix` or lies under it (`prefix` itself canonical).
    pub fn is_under(&self, prefix: &str) -> bool {
        self.path == prefix
            || (self.path.starts_with(prefix)
                && self.path.as_bytes().get(prefix.len()) == Some(&b'/'))
    }
}

impl PartialEq<str> for CanonicalPath {
    fn eq(&self, other: &str) -> bool {
        self.path == other
    }
}

impl PartialEq<String> for CanonicalPath {
    fn eq(&self, other: &String) -> bool {
        &self.path == other
    }
}

impl fmt::Display for CanonicalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)
    }
}

/// Why a path cannot be put in canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    EncodedSlash,
    Backslash,
    Control,
    BadEscape,
    AboveRoot,
    NotAbsolute,
}

impl PathError {
    pub fn describe(self) -> &'static str {
        match self {
            PathError::EncodedSlash => "The path contains an encoded slash (%2F).",
            PathError::Backslash => "The path contains a backslash.",
            PathError::Control => "The path contains a NUL or control character.",
            PathError::BadEscape => "The path contains a malformed percent-escape.",
            PathError::AboveRoot => "The path climbs above the root with '..'.",
            PathError::NotAbsolute => "The request target is not a path starting with '/'.",
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decodes the escapes of unreserved characters in one segment, keeping the others
/// (upper-cased), and refuses what no upstream should see.
fn decode_segment(seg: &str, out: &mut String) -> Result<(), PathError> {
    let b = seg.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    b.get(i + 1).copied().and_then(hex),
                    b.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let byte = hi << 4 | lo;
                match byte {
                    b'/' => return Err(PathError::EncodedSlash),
                    b'\\' => return Err(PathError::Backslash),
                    0..=0x1f | 0x7f => return Err(PathError::Control),
                    c if unreserved(c) => out.push(c as char),
                    c => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.push('%');
                        out.push(HEX[(c >> 4) as usize] as char);
                        out.push(HEX[(c & 0xf) as usize] as char);
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::Control),
            _ => {
                // A whole UTF-8 sequence or one ASCII byte, as sent.
                let len = seg[i..].chars().next().map_or(1, char::len_utf8);
                out.push_str(&seg[i..i + len]);
                i += len;
            }
        }
    }
    Ok(())
}

/// Puts a request path (without its query) in canonical form.
pub fn canonical(raw: &str) -> Result<CanonicalPath, PathError> {
    // `OPTIONS *` matches no configured path; any other target must be a path (HTTP/2
    // lets a client send `:path` without its leading slash).
    if raw == "*" {
        return Ok(CanonicalPath {
            path: raw.to_owned(),
            params: Vec::new(),
        });
    }
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_plain(raw) {
        return Ok(CanonicalPath {
            path: raw.to_owned(),
            params: Vec::new(),
        });
    }
    decode_and_resolve(raw)
}

/// A path already in canonical form, the common case: nothing to decode (`%`), no path
/// parameters (`;`), no `\` or control character, and no empty, `.` or `..` segment (so
/// no `//` and no trailing `/`). One pass over the bytes, where the full work splits,
/// decodes and rebuilds every segment.
fn is_plain(raw: &str) -> bool {
    if raw == "/" {
        return true;
    }
    raw[1..].split('/').all(|seg| {
        !matches!(seg, "" | "." | "..")
            && seg
                .bytes()
                .all(|b| !matches!(b, b'%' | b';' | b'\\' | 0..=0x1f | 0x7f))
    })
}

/// The full canonicalisation: splits the segments, takes out their parameters, decodes
/// and resolves `.` and `..`.
fn decode_and_resolve(raw: &str) -> Result<CanonicalPath, PathError> {
    let mut segments: Vec<String> = Vec::new();
    let mut params = Vec::new();
    for seg in raw[1..].split('/') {
        let mut parts = seg.split(';');
        let name = parts.next().unwrap_or_default();
        for p in parts.filter(|p| !p.is_empty()) {
            // A parameter is part of the path too (DESIGN §2): what is refused in a
            // segment (`\`, a control character, `%2F`, a bad escape) is refused in it.
            decode_segment(p, &mut String::new())?;
            let (n, v) = p.split_once('=').unwrap_or((p, ""));
            params.push((n.to_owned(), v.to_owned()));
        }
        let mut decoded = String::with_capacity(name.len());
        decode_segment(name, &mut decoded)?;
        match decoded.as_str() {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
            }
            _ => segments.push(decoded),
        }
    }
    let mut path = String::with_capacity(raw.len());
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() {
        path.push('/');
    }
    Ok(CanonicalPath { path, params })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> String {
        canonical(p).unwrap().path
    }

    #[test]
    fn the_plain_path_shortcut_agrees_with_the_full_work_on_every_short_path() {
        // Every path of up to 5 characters after the `/` over the characters the
        // shortcut looks at, so each of its boundaries (`/.`, `/..`, `//`, a trailing
        // `/`, `;`, `%`, `\`, a control character, DEL) is met, and a character of
        // more than one byte beside them.
        let alphabet = ['/', '.', 'a', ';', '%', '\\', '\u{1}', '\u{7f}', 'é', '4'];
        let mut paths = vec![String::from("/")];
        let mut longest = paths.clone();
        for _ in 0..5 {
            longest = longest
                .iter()
                .flat_map(|p| alphabet.iter().map(move |ch| format!("{p}{ch}")))
                .collect();
            paths.extend(longest.iter().cloned());
        }
        for p in &paths {
            let full = decode_and_resolve(p);
            match canonical(p) {
                Ok(c) => {
                    let f = full.unwrap_or_else(|e| panic!("{p:?}: shortcut Ok, full {e:?}"));
                    assert_eq!(c.as_str(), f.as_str(), "{p:?}");
                    assert_eq!(c.params, f.params, "{p:?}");
                }
                Err(e) => assert_eq!(Err(e), full.map(|_| ()), "{p:?}"),
            }
        }
        assert!(paths.len() > 100_000, "{} paths", paths.len());
    }

    #[test]
    fn spellings_of_one_path_meet() {
        for p in [
            "/oscar/logout.jsp",
            "/oscar/logout.jsp;jsessionid=ABC123",
            "/oscar//logout.jsp",
            "/oscar/./logout.jsp",
            "/oscar/%6Cogout.jsp",
            "/oscar/%6cogout.jsp",
            "/oscar;x=1/logout.jsp",
            "/x/../oscar/logout.jsp",
            "/x/..;/oscar/logout.jsp",
            "/oscar/logout.jsp/",
            "/%6F%73%63%61%72/logout.jsp",
            "//oscar/logout.jsp;",
        ] {
            assert_eq!(c(p), "/oscar/logout.jsp", "{p}");
        }
        assert_eq!(c("/%2eehrgate/status"), "/.ehrgate/status");
        assert_eq!(c("/.ehrgate;x/status"), "/.ehrgate/status");
        assert_eq!(c("/"), "/");
        assert_eq!(c("//"), "/");
        assert_eq!(c("/a/.."), "/");
    }

    #[test]
    fn reserved_escapes_stay_escaped_and_case_counts() {
        assert_eq!(c("/a%20b"), "/a%20b");
        assert_eq!(c("/a%e9"), "/a%E9");
        assert_eq!(c("/a%3bb"), "/a%3Bb");
        assert_eq!(c("/a%252F"), "/a%252F");
        assert_eq!(c("/Oscar/Logout.jsp"), "/Oscar/Logout.jsp");
        assert_eq!(c("/caf\u{e9}"), "/caf\u{e9}");
    }

    #[test]
    fn path_parameters_are_kept_aside() {
        let p = canonical("/oscar/logout.jsp;jsessionid=ABC;x").unwrap();
        assert_eq!(p.param("JSESSIONID"), Some("ABC"));
        assert_eq!(p.param("x"), Some(""));
        assert_eq!(p.param("y"), None);
    }

    #[test]
    fn what_no_upstream_should_see_is_refused() {
        for (p, e) in [
            ("/a%2Fb", PathError::EncodedSlash),
            ("/a%2fb", PathError::EncodedSlash),
            ("/a\\b", PathError::Backslash),
            ("/a%5Cb", PathError::Backslash),
            ("/a%00b", PathError::Control),
            ("/a%0Ab", PathError::Control),
            ("/a%7f", PathError::Control),
            ("/a%zz", PathError::BadEscape),
            ("/a%2", PathError::BadEscape),
            ("/..", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/..;x/a", PathError::AboveRoot),
            ("/oscar/logout.jsp;x=\\", PathError::Backslash),
            ("/a;x=%2F/b", PathError::EncodedSlash),
            ("/a;%00", PathError::Control),
            ("/a;x=%5c", PathError::Backslash),
            ("/a;x=\u{1}", PathError::Control),
            ("/a;jsessionid=%zz", PathError::BadEscape),
            ("oscar/logout.jsp", PathError::NotAbsolute),
            ("", PathError::NotAbsolute),
        ] {
            assert_eq!(canonical(p), Err(e), "{p}");
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let p = canonical("/.ehrgate/status").unwrap();
        assert!(p.is_under("/.ehrgate"));
        assert!(!canonical("/.ehrgatex").unwrap().is_under("/.ehrgate"));
        assert!(canonical("/.ehrgate/").unwrap().is_under("/.ehrgate"));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Path segments as clients write them: letters, digits, dots, escapes, `;params`.
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9_~-]{1,8}",
            Just(".".to_string()),
            Just("..".to_string()),
            Just(String::new()),
            "[a-z]{1,4};[a-z]{1,4}=[A-Z0-9]{0,6}",
            "%[0-9A-Fa-f]{2}[a-z]{0,3}",
        ]
    }

    fn path() -> impl Strategy<Value = String> {
        proptest::collection::vec(segment(), 0..8).prop_map(|s| format!("/{}", s.join("/")))
    }

    proptest! {
        #[test]
        fn never_panics_on_any_text(raw in "\\PC{0,64}") {
            let _ = canonical(&raw);
        }

        #[test]
        fn the_plain_path_shortcut_agrees_with_the_full_work(
            raw in "/[a-z./;%\\\\2Fe\x01\u{e9}=]{0,24}",
        ) {
            let full = decode_and_resolve(&raw);
            match canonical(&raw) {
                Ok(c) => {
                    let f = full.unwrap();
                    prop_assert_eq!(c.as_str(), f.as_str());
                    prop_assert_eq!(&c.params, &f.params);
                }
                Err(e) => prop_assert_eq!(Err(e), full.map(|_| ())),
            }
        }

        #[test]
        fn configured_style_paths_are_their_own_canonical_form(
            segs in proptest::collection::vec("[a-zA-Z0-9_~-][a-zA-Z0-9_~.-]{0,8}", 1..6),
        ) {
            let p = format!("/{}", segs.join("/"));
            let c = canonical(&p).unwrap();
            prop_assert_eq!(c.as_str(), p.as_str());
        }

        #[test]
        fn canonical_form_is_a_fixed_point(p in path()) {
            if let Ok(c) = canonical(&p) {
                let again = canonical(c.as_str()).unwrap();
                prop_assert_eq!(again.as_str(), c.as_str());
                let s = c.as_str();
                prop_assert!(s.starts_with('/'));
                prop_assert!(!s.contains("//") && !s.contains(';') && !s.contains('\\'));
                prop_assert!(!s.split('/').any(|seg| seg == "." || seg == ".."));
                prop_assert!(s == "/" || !s.ends_with('/'));
            }
        }

        #[test]
        fn other_spellings_meet_the_same_form(
            segs in proptest::collection::vec("[a-zA-Z0-9_~.-]{1,8}", 1..6),
            param in "[a-z]{1,6}=[A-Za-z0-9]{0,8}",
            which in 0usize..6,
        ) {
            prop_assume!(segs.iter().all(|s| s != "." && s != ".."));
            let plain = format!("/{}", segs.join("/"));
            let want = canonical(&plain).unwrap();
            let i = which % segs.len();
            let mut with_param = segs.clone();
            with_param[i] = format!("{};{param}", segs[i]);
            let mut encoded = segs.clone();
            encoded[i] = segs[i].bytes().map(|b| format!("%{b:02X}")).collect();
            for spelling in [
                format!("/{}", with_param.join("/")),
                format!("/{}", encoded.join("/")),
                format!("//{}", segs.join("//")),
                format!("/./{}", segs.join("/./")),
                format!("/x/../{}", segs.join("/")),
                format!("{plain}/"),
            ] {
                let got = canonical(&spelling).unwrap();
                prop_assert_eq!(got.as_str(), want.as_str(), "{}", spelling);
            }
        }
    }
}
