//! Who may take admin actions (`POST /admin/*`, DESIGN §4 `[admin]`): the holder of a
//! bearer token from `admin.token_file`, compared in constant time; with no token file,
//! anyone who can reach a loopback `admin_listen`, and nobody on any other address.

use std::net::SocketAddr;
use std::path::Path;

use aws_lc_rs::digest;

use crate::config::ConfigError;

/// The shortest token accepted: 128 bits of base64 or hex.
const MIN_TOKEN_LEN: usize = 22;

/// One token and the name its actions are audited under.
struct Named {
    name: String,
    sha256: [u8; 32],
}

/// The admin credentials in force.
pub struct AdminAuth {
    tokens: Vec<Named>,
    loopback: bool,
    /// Refuses every action: the token file changed and cannot be read as tokens (a
    /// revoked token must not keep working because its replacement is broken).
    locked: bool,
}

/// Why an admin action was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Tokens are configured and the request carried none, or a wrong one.
    BadToken,
    /// No token file, and the admin listener is reachable from other machines.
    NoTokenOffLoopback,
}

fn sha256(text: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, text.as_bytes()).as_ref());
    out
}

impl AdminAuth {
    /// Reads `token_file` (empty: none): one token per line, `NAME:TOKEN` or `TOKEN`
    /// (named `admin`); blank lines and `#` comments are skipped.
    pub fn load(token_file: &Path, admin_listen: SocketAddr) -> Result<Self, ConfigError> {
        let key = "admin.token_file";
        let mut tokens = Vec::new();
        if !token_file.as_os_str().is_empty() {
            let text = std::fs::read_to_string(token_file).map_err(|e| {
                ConfigError::new(key, format!("cannot read {}: {e}", token_file.display()))
            })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (name, token) = line.split_once(':').unwrap_or(("admin", line));
                let (name, token) = (name.trim(), token.trim());
                if token.len() < MIN_TOKEN_LEN || token.contains(char::is_whitespace) {
                    return Err(ConfigError::new(
                        key,
                        format!(
                            "line {} of {}: a token must be at least {MIN_TOKEN_LEN} characters \
                             without spaces (e.g. head -c 32 /dev/urandom | base64)",
                            i + 1,
                            token_file.display()
                        ),
                    ));
                }
                tokens.push(Named {
                    name: name.to_owned(),
                    sha256: sha256(token),
                });
            }
            if tokens.is_empty() {
                return Err(ConfigError::new(
                    key,
                    format!("{} holds no token", token_file.display()),
                ));
            }
        }
        Ok(Self {
            tokens,
            loopback: admin_listen.ip().is_loopback(),
            locked: false,
        })
    }

    /// Credentials that refuse every admin action (fail closed).
    pub fn locked() -> Self {
        Self {
            tokens: Vec::new(),
            loopback: false,
            locked: true,
        }
    }

    /// Who is acting, from the request's `Authorization` header; or why not.
    pub fn who(&self, authorization: Option<&[u8]>) -> Result<String, Refusal> {
        if self.locked {
            return Err(Refusal::BadToken);
        }
        if self.tokens.is_empty() {
            return if self.loopback {
                Ok("loopback".to_owned())
            } else {
                Err(Refusal::NoTokenOffLoopback)
            };
        }
        let offered = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .ok_or(Refusal::BadToken)?;
        let offered = sha256(offered);
        // Every token is compared, whichever matches: the time taken tells nothing.
        let mut found = None;
        for t in &self.tokens {
            if aws_lc_rs::constant_time::verify_slices_are_equal(&t.sha256, &offered).is_ok() {
                found = Some(t.name.clone());
            }
        }
        found.ok_or(Refusal::BadToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "c2VjcmV0LXRva2VuLWZvci10ZXN0cw";

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn tokens_name_who_acts() {
        let f = file(&format!("# IT staff\nalice:{TOKEN}\n\n{TOKEN}x\n"));
        let auth = AdminAuth::load(f.path(), "10.0.0.5:9090".parse().unwrap()).unwrap();
        let bearer = |t: &str| format!("Bearer {t}");
        assert_eq!(auth.who(Some(bearer(TOKEN).as_bytes())), Ok("alice".into()));
        assert_eq!(
            auth.who(Some(bearer(&format!("{TOKEN}x")).as_bytes())),
            Ok("admin".into())
        );
        for bad in [None, Some("Bearer nope"), Some(TOKEN), Some("Basic abc")] {
            assert_eq!(
                auth.who(bad.map(str::as_bytes)),
                Err(Refusal::BadToken),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn without_tokens_only_loopback_may_act() {
        let none = Path::new("");
        let local = AdminAuth::load(none, "127.0.0.1:9090".parse().unwrap()).unwrap();
        assert_eq!(local.who(None), Ok("loopback".into()));
        let open = AdminAuth::load(none, "0.0.0.0:9090".parse().unwrap()).unwrap();
        assert_eq!(open.who(None), Err(Refusal::NoTokenOffLoopback));
    }

    #[test]
    fn weak_or_empty_token_files_are_refused() {
        let addr = "127.0.0.1:9090".parse().unwrap();
        for text in [
            "",
            "# nothing\n",
            "short\n",
            "a:has space inside the token 123\n",
        ] {
            let f = file(text);
            let e = AdminAuth::load(f.path(), addr).err().expect(text);
            assert_eq!(e.key, "admin.token_file");
        }
        let e = AdminAuth::load(Path::new("/nonexistent/token"), addr)
            .err()
            .unwrap();
        assert!(e.message.contains("cannot read"));
    }
}
