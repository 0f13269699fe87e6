//! The viewer's cookies for one EHR session. In vault mode they live only here and are
//! added to upstream requests; in passthrough mode the browser has them too and ehrgate
//! keeps a copy to expire them and to sign the session out upstream.

use cookie::Cookie;

/// One cookie, kept compact: a million sessions hold one each.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Stored {
    /// `name=value`, as it goes into a `Cookie` header.
    pair: Box<str>,
    name_len: u32,
    /// `None` for `/`, by far the most common.
    path: Option<Box<str>>,
    /// Unix seconds; `None` for a session cookie.
    expires: Option<i64>,
}

impl Stored {
    fn name(&self) -> &str {
        &self.pair[..self.name_len as usize]
    }

    fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }
}

/// At most this many cookies per session: a viewer sets a handful.
const MAX_COOKIES: usize = 50;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct CookieJar {
    cookies: Vec<Stored>,
}

impl CookieJar {
    /// The jar as bytes, for a shared store (which encrypts them).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// A jar from [`CookieJar::to_bytes`]; `None` if the bytes are not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let jar: Self = serde_json::from_slice(bytes).ok()?;
        // Only what `capture` could have made: no oversized or malformed entries.
        (jar.cookies.len() <= MAX_COOKIES
            && jar.cookies.iter().all(|c| {
                (c.name_len as usize) <= c.pair.len()
                    && c.pair.is_char_boundary(c.name_len as usize)
            }))
        .then_some(jar)
    }

    /// Takes in one `Set-Cookie` value from the viewer. An expired cookie is removed.
    pub fn capture(&mut self, set_cookie: &str, now_unix: i64) {
        let Ok(c) = Cookie::parse(set_cookie) else {
            return;
        };
        let path = c.path().filter(|p| p.starts_with('/')).unwrap_or("/");
        let expires = match (c.max_age(), c.expires_datetime()) {
            (Some(age), _) => Some(now_unix.saturating_add(age.whole_seconds())),
            (None, Some(at)) => Some(at.unix_timestamp()),
            (None, None) => None,
        };
        self.cookies
            .retain(|s| !(s.name() == c.name() && s.path() == path));
        if expires.is_some_and(|e| e <= now_unix) {
            return;
        }
        if self.cookies.len() >= MAX_COOKIES {
            self.cookies.remove(0);
        }
        self.cookies.reserve_exact(1);
        self.cookies.push(Stored {
            pair: format!("{}={}", c.name(), c.value()).into_boxed_str(),
            name_len: c.name().len() as u32,
            path: (path != "/").then(|| path.into()),
            expires,
        });
    }

    /// The `Cookie` header for a request to `path` (RFC 6265 §5.4: path-matching
    /// cookies, longer paths first), or `None` if no cookie applies.
    pub fn header_for(&self, path: &str, now_unix: i64) -> Option<String> {
        let mut matching: Vec<&Stored> = self
            .cookies
            .iter()
            .filter(|c| c.expires.is_none_or(|e| e > now_unix) && path_matches(c.path(), path))
            .collect();
        match matching.len() {
            0 => return None,
            1 => return Some(matching[0].pair.to_string()),
            _ => {}
        }
        matching.sort_by_key(|c| std::cmp::Reverse(c.path().len()));
        let mut out = String::with_capacity(matching.iter().map(|c| c.pair.len() + 2).sum());
        for c in matching {
            if !out.is_empty() {
                out.push_str("; ");
            }
            out.push_str(&c.pair);
        }
        Some(out)
    }

    pub fn is_empty(&self) -> bool {
        self.cookies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.cookies.len()
    }
}

/// RFC 6265 §5.1.4 path-match.
fn path_matches(cookie_path: &str, request_path: &str) -> bool {
    request_path == cookie_path
        || (request_path.starts_with(cookie_path)
            && (cookie_path.ends_with('/')
                || request_path.as_bytes().get(cookie_path.len()) == Some(&b'/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn captures_merges_and_expires() {
        let mut jar = CookieJar::default();
        jar.capture("VSESSION=abc; Path=/; HttpOnly; Secure", NOW);
        jar.capture("pref=1; Path=/chart", NOW);
        assert_eq!(
            jar.header_for("/chart/labs", NOW).unwrap(),
            "pref=1; VSESSION=abc"
        );
        assert_eq!(jar.header_for("/other", NOW).unwrap(), "VSESSION=abc");
        assert_eq!(jar.header_for("/chartx", NOW).unwrap(), "VSESSION=abc");
        jar.capture("VSESSION=def; Path=/", NOW);
        assert_eq!(jar.len(), 2, "replaced, not added");
        assert_eq!(jar.header_for("/", NOW).unwrap(), "VSESSION=def");
        jar.capture("VSESSION=; Max-Age=0; Path=/", NOW);
        assert_eq!(jar.header_for("/", NOW), None);
        jar.capture("short=1; Max-Age=10", NOW);
        assert!(jar
            .header_for("/chart", NOW + 5)
            .unwrap()
            .contains("short=1"));
        assert!(!jar
            .header_for("/chart", NOW + 11)
            .unwrap()
            .contains("short=1"));
    }

    #[test]
    fn bounded_and_tolerant_of_garbage() {
        let mut jar = CookieJar::default();
        jar.capture("not a cookie", NOW);
        assert!(jar.is_empty());
        for i in 0..200 {
            jar.capture(&format!("c{i}=v"), NOW);
        }
        assert_eq!(jar.len(), MAX_COOKIES);
    }
}
