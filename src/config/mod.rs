//! The configuration file (DESIGN §4): its keys, their defaults and their validation.
//!
//! Owns turning TOML text into a [`Config`] that later code can trust; every problem is a
//! [`ConfigError`] naming the key and what is wrong. It never opens sockets; files that a
//! key names (certificates, keys, bundles) are checked by the modules that load them.

mod duration;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use duration::ConfigDuration;

/// A configuration problem: which key, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

impl ServerConfig {
    /// The HTTP/1.1 buffer size on both sides: the stream buffer, or the header limit
    /// when that is larger (a header block must fit in the read buffer).
    pub fn h1_buffer_bytes(&self) -> usize {
        self.stream_buffer_bytes.max(self.max_header_bytes)
    }
}

/// Upper bounds of the counted limits: beyond them a value is a typing error, not a plan,
/// and some would exhaust the process (threads, memory) before serving anything.
pub const MAX_CONNECTIONS: usize = 1_000_000;
pub const MAX_FORM_BYTES: usize = 16 * 1024 * 1024;
pub const MAX_SESSIONS: usize = 100_000_000;
pub const MAX_WORKERS: usize = 256;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    pub emr: EmrConfig,
    pub ehr: EhrConfig,
    #[serde(rename = "authority", default)]
    pub authorities: Vec<Authority>,
    #[serde(default)]
    pub session: SessionConfig,
    #[serde(default)]
    pub context: ContextConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// File holding the bearer token `POST /admin/*` requires. Empty: admin actions are
    /// refused unless `server.admin_listen` is a loopback address.
    pub token_file: PathBuf,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    pub admin_listen: SocketAddr,
    /// A client must finish its TLS handshake within this time.
    pub tls_handshake_timeout: ConfigDuration,
    /// A client must send a request's whole header within this time (slow-header clients
    /// are cut off); on HTTP/1.1 it also bounds the wait for the next request.
    pub header_read_timeout: ConfigDuration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: ConfigDuration,
    /// Largest request header block (request line and all fields), in bytes.
    pub max_header_bytes: usize,
    /// Connections served at once; further ones are closed at accept.
    pub max_connections: usize,
    /// Worker threads serving connections, each with its own event loop; 0: one per CPU.
    pub workers: usize,
    /// Largest request body ehrgate reads itself (observed forms such as the override).
    pub max_form_bytes: usize,
    /// Most body bytes ehrgate holds for one stream at each hop: the HTTP/1.1 read and
    /// write buffers on both sides (never less than `max_header_bytes`), the HTTP/2 send
    /// buffer and receive window. Memory per in-flight stream is bounded by a small
    /// multiple of it, however fast or slow the two sides are.
    pub stream_buffer_bytes: usize,
    pub upstream_connect_timeout: ConfigDuration,
    /// Time allowed for an upstream's response header after the request was sent.
    pub upstream_response_timeout: ConfigDuration,
    /// Idle pooled upstream connections are closed after this long.
    pub upstream_idle_timeout: ConfigDuration,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    pub shutdown_grace: ConfigDuration,
    /// Longest pause between two reads of a client's request body; then 408 (or, once
    /// forwarding has begun, the exchange ends).
    pub client_body_timeout: ConfigDuration,
    /// Longest a client may leave a response unread (no progress); then the exchange ends.
    pub send_timeout: ConfigDuration,
    /// Longest pause between two reads of an upstream's response body; then the response
    /// ends visibly (connection closed or stream reset, never a clean end).
    pub upstream_body_timeout: ConfigDuration,
    /// Concurrent HTTP/2 streams (and so upstream requests) one client connection may hold.
    pub max_streams_per_connection: u32,
    /// `Strict-Transport-Security` on every response; empty to omit.
    pub hsts: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8443)),
            tls_cert: "certs/server.crt".into(),
            tls_key: "certs/server.key".into(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            tls_handshake_timeout: ConfigDuration::secs(10),
            header_read_timeout: ConfigDuration::secs(15),
            idle_timeout: ConfigDuration::secs(75),
            max_header_bytes: 32 * 1024,
            max_connections: 10_000,
            workers: 0,
            max_form_bytes: 64 * 1024,
            stream_buffer_bytes: 64 * 1024,
            upstream_connect_timeout: ConfigDuration::secs(5),
            upstream_response_timeout: ConfigDuration::secs(60),
            upstream_idle_timeout: ConfigDuration::secs(90),
            shutdown_grace: ConfigDuration::secs(30),
            client_body_timeout: ConfigDuration::secs(60),
            send_timeout: ConfigDuration::secs(60),
            upstream_body_timeout: ConfigDuration::secs(60),
            max_streams_per_connection: 100,
            hsts: "max-age=31536000".into(),
        }
    }
}

/// The fields of the EMR's demographics JSON, as JSON pointers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatientFields {
    pub hcn: String,
    pub hcn_version: String,
    pub birth_year: String,
    pub birth_month: String,
    pub birth_day: String,
    pub gender: String,
    pub mrp: String,
    pub family: String,
    pub given: String,
}

impl Default for PatientFields {
    fn default() -> Self {
        Self {
            hcn: "/hin".into(),
            hcn_version: "/ver".into(),
            birth_year: "/dobYear".into(),
            birth_month: "/dobMonth".into(),
            birth_day: "/dobDay".into(),
            gender: "/sex".into(),
            mrp: "/providerNo".into(),
            family: "/lastName".into(),
            given: "/firstName".into(),
        }
    }
}

impl PatientFields {
    fn pointers(&self) -> [(&'static str, &str); 9] {
        [
            ("hcn", &self.hcn),
            ("hcn_version", &self.hcn_version),
            ("birth_year", &self.birth_year),
            ("birth_month", &self.birth_month),
            ("birth_day", &self.birth_day),
            ("gender", &self.gender),
            ("mrp", &self.mrp),
            ("family", &self.family),
            ("given", &self.given),
        ]
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EmrConfig {
    pub host: String,
    pub upstream: String,
    #[serde(default)]
    pub upstream_ca: String,
    /// Offer HTTP/2 in ALPN to an https upstream; used where the upstream accepts it
    /// (WebSocket upgrades stay on HTTP/1.1).
    #[serde(default)]
    pub upstream_http2: bool,
    #[serde(default = "defaults::session_cookie")]
    pub session_cookie: String,
    #[serde(default = "defaults::logout_paths")]
    pub logout_paths: Vec<String>,
    #[serde(default = "defaults::launch_path")]
    pub launch_path: String,
    #[serde(default = "defaults::launch_patient_params")]
    pub launch_patient_params: Vec<String>,
    #[serde(default = "defaults::launch_authority_param")]
    pub launch_authority_param: String,
    #[serde(default = "defaults::whoami_path")]
    pub whoami_path: String,
    #[serde(default = "defaults::whoami_user_field")]
    pub whoami_user_field: String,
    #[serde(default = "defaults::patient_path")]
    pub patient_path: String,
    #[serde(default)]
    pub patient_fields: PatientFields,
    #[serde(default = "defaults::emr_idle_timeout")]
    pub idle_timeout: ConfigDuration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CookieMode {
    /// Viewer cookies stay in ehrgate's jar and never reach the browser.
    Vault,
    /// Viewer cookies go to the browser; ehrgate expires them on sign-out.
    Passthrough,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EhrConfig {
    pub host: String,
    pub upstream: String,
    #[serde(default)]
    pub upstream_ca: String,
    /// Offer HTTP/2 in ALPN to an https upstream; used where the upstream accepts it
    /// (WebSocket upgrades stay on HTTP/1.1).
    #[serde(default)]
    pub upstream_http2: bool,
    #[serde(default = "defaults::ehr_launch_path")]
    pub launch_path: String,
    #[serde(default = "defaults::ehr_logout_path")]
    pub logout_path: String,
    #[serde(default = "defaults::override_path")]
    pub override_path: String,
    #[serde(default = "defaults::override_reason_field")]
    pub override_reason_field: String,
    #[serde(default = "defaults::cookie_mode")]
    pub cookie_mode: CookieMode,
    #[serde(default = "defaults::context_header")]
    pub context_header: String,
    #[serde(default = "defaults::yes")]
    pub inject_session_script: bool,
}

/// An authority (UAO) a clinician may act for.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Authority {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionConfig {
    pub idle_timeout: ConfigDuration,
    pub max_lifetime: ConfigDuration,
    pub max_sessions: usize,
    pub ticket_ttl: ConfigDuration,
    /// Where sessions live: this process, or a Redis/Valkey shared by replicas (§9).
    pub store: StoreKind,
    /// `redis://[user:pass@]host:port/db` or `rediss://` (TLS); its password is never
    /// printed (check-config shows `***`).
    pub redis_url: RedisUrl,
    /// PEM bundle for a `rediss://` server with a private CA; empty: the system's roots.
    pub redis_ca: PathBuf,
    /// Prefix of every key ehrgate writes (several clinics may share one Redis).
    pub redis_key_prefix: String,
    /// File of 32 random bytes: the key that encrypts vault jars and patient context at
    /// rest in Redis. Required with `store = "redis"`.
    pub store_key: PathBuf,
}

/// `session.store`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Memory,
    Redis,
}

/// A Redis URL whose password never reaches a log or `check-config`'s output.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, password included: for the Redis client only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password (if any) replaced by `***`.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        let Some(scheme_end) = s.find("://") else {
            return s.clone();
        };
        let rest = &s[scheme_end + 3..];
        // The last `@` ends the user information, whatever the password holds (even an
        // unencoded `/`): everything before it is hidden but the user name.
        match rest.rfind('@') {
            Some(at) => {
                let userinfo = &rest[..at];
                let user = userinfo.split(':').next().unwrap_or("");
                let shown = if userinfo.contains(':') {
                    format!("{user}:***")
                } else {
                    // `redis://secret@host`: the lone userinfo is the password.
                    "***".to_string()
                };
                format!("{}://{shown}{}", &s[..scheme_end], &rest[at..])
            }
            None => s.clone(),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            idle_timeout: ConfigDuration::mins(30),
            max_lifetime: ConfigDuration::hours(12),
            max_sessions: 1_000_000,
            ticket_ttl: ConfigDuration::secs(60),
            store: StoreKind::Memory,
            redis_url: RedisUrl::default(),
            redis_ca: PathBuf::new(),
            redis_key_prefix: "ehrgate:".into(),
            store_key: PathBuf::new(),
        }
    }
}

/// `context.signing_key`: a path, or a list of paths (DESIGN §10, key rotation).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum SigningKeys {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

impl SigningKeys {
    /// The key files in order: the first signs.
    pub fn paths(&self) -> &[PathBuf] {
        match self {
            SigningKeys::One(p) => std::slice::from_ref(p),
            SigningKeys::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// One key file, or a list: the first signs, all are published (rotation).
    pub signing_key: SigningKeys,
    pub issuer: String,
    pub lifetime: ConfigDuration,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            signing_key: SigningKeys::One("certs/context-signing.pem".into()),
            issuer: "ehrgate".into(),
            lifetime: ConfigDuration::secs(60),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    pub path: PathBuf,
    /// Key for `hcn_hmac`; never printed.
    pub hash_key: String,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: "audit/ehrgate-audit.jsonl".into(),
            hash_key: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `"info"` or `"ehrgate=debug,info"`; `RUST_LOG` wins.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

mod defaults {
    use super::{ConfigDuration, CookieMode};

    pub fn session_cookie() -> String {
        "JSESSIONID".into()
    }
    pub fn logout_paths() -> Vec<String> {
        vec!["/oscar/logout.jsp".into(), "/oscar/logout.do".into()]
    }
    pub fn launch_path() -> String {
        "/oscar/clinicalConnectEHRViewer.do".into()
    }
    pub fn launch_patient_params() -> Vec<String> {
        vec!["demographicNo".into(), "demographic_no".into()]
    }
    pub fn launch_authority_param() -> String {
        "uao".into()
    }
    pub fn whoami_path() -> String {
        "/oscar/ws/rs/providerService/provider/me".into()
    }
    pub fn whoami_user_field() -> String {
        "/providerNo".into()
    }
    pub fn patient_path() -> String {
        "/oscar/ws/rs/demographics/{demographicNo}".into()
    }
    pub fn emr_idle_timeout() -> ConfigDuration {
        ConfigDuration::mins(120)
    }
    pub fn ehr_launch_path() -> String {
        "/launch".into()
    }
    pub fn ehr_logout_path() -> String {
        "/logout".into()
    }
    pub fn override_path() -> String {
        "/override".into()
    }
    pub fn override_reason_field() -> String {
        "reason".into()
    }
    pub fn cookie_mode() -> CookieMode {
        CookieMode::Vault
    }
    pub fn context_header() -> String {
        "X-EHR-Context".into()
    }
    pub fn yes() -> bool {
        true
    }
}

/// An upstream's base URL, split into what the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub https: bool,
    pub authority: http::uri::Authority,
}

impl UpstreamUrl {
    pub fn parse(key: &str, text: &str) -> Result<Self, ConfigError> {
        let uri: http::Uri = text.parse().map_err(|_| {
            ConfigError::new(
                key,
                format!("{text:?} is not a URL; write it as http://host:port or https://host"),
            )
        })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(ConfigError::new(
                    key,
                    format!("unknown scheme {other:?} in {text:?}; use http:// or https://"),
                ))
            }
            None => {
                return Err(ConfigError::new(
                    key,
                    format!("{text:?} has no scheme; write http://{text} or https://{text}"),
                ))
            }
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| ConfigError::new(key, format!("{text:?} names no host")))?;
        if authority.as_str().contains('@') {
            return Err(ConfigError::new(
                key,
                "credentials in the upstream URL are not supported",
            ));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(ConfigError::new(
                key,
                format!("{text:?} has a path; give only scheme://host[:port]"),
            ));
        }
        Ok(Self { https, authority })
    }
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "",
                format!("cannot read configuration file {}: {e}", path.display()),
            )
        })?;
        Self::parse(&text)
    }

    /// Parses and validates configuration text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| toml_error("", &e, text))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." { String::new() } else { path };
            toml_error(&key, e.inner(), text)
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Semantic checks that the types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_host("emr.host", &self.emr.host)?;
        validate_host("ehr.host", &self.ehr.host)?;
        if self.emr.host.eq_ignore_ascii_case(&self.ehr.host) {
            return Err(ConfigError::new(
                "ehr.host",
                format!(
                    "{:?} is also emr.host; the EMR and the viewer need distinct host names",
                    self.ehr.host
                ),
            ));
        }
        UpstreamUrl::parse("emr.upstream", &self.emr.upstream)?;
        UpstreamUrl::parse("ehr.upstream", &self.ehr.upstream)?;
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            return Err(ConfigError::new(
                "server.admin_listen",
                "must differ from server.listen",
            ));
        }

        let s = &self.server;
        for (key, d) in [
            ("server.tls_handshake_timeout", s.tls_handshake_timeout),
            ("server.header_read_timeout", s.header_read_timeout),
            ("server.idle_timeout", s.idle_timeout),
            (
                "server.upstream_connect_timeout",
                s.upstream_connect_timeout,
            ),
            (
                "server.upstream_response_timeout",
                s.upstream_response_timeout,
            ),
            ("server.upstream_idle_timeout", s.upstream_idle_timeout),
            ("server.client_body_timeout", s.client_body_timeout),
            ("server.send_timeout", s.send_timeout),
            ("server.upstream_body_timeout", s.upstream_body_timeout),
            ("emr.idle_timeout", self.emr.idle_timeout),
            ("session.idle_timeout", self.session.idle_timeout),
            ("session.max_lifetime", self.session.max_lifetime),
            ("session.ticket_ttl", self.session.ticket_ttl),
            ("context.lifetime", self.context.lifetime),
        ] {
            if d.get().is_zero() {
                return Err(ConfigError::new(key, "must be longer than zero"));
            }
        }
        // hyper refuses an HTTP/1 read buffer smaller than 8 KiB.
        if !(8 * 1024..=1024 * 1024).contains(&s.max_header_bytes) {
            return Err(ConfigError::new(
                "server.max_header_bytes",
                "must be between 8192 and 1048576",
            ));
        }
        for (key, n, most) in [
            ("server.max_connections", s.max_connections, MAX_CONNECTIONS),
            ("server.max_form_bytes", s.max_form_bytes, MAX_FORM_BYTES),
            (
                "session.max_sessions",
                self.session.max_sessions,
                MAX_SESSIONS,
            ),
        ] {
            if n == 0 {
                return Err(ConfigError::new(key, "must be at least 1"));
            }
            if n > most {
                return Err(ConfigError::new(key, format!("must be at most {most}")));
            }
        }
        // HTTP/2 needs a window of at least one frame (16 KiB); beyond 16 MiB it is no
        // longer a bound worth having.
        if !(16 * 1024..=16 * 1024 * 1024).contains(&s.stream_buffer_bytes) {
            return Err(ConfigError::new(
                "server.stream_buffer_bytes",
                "must be between 16384 and 16777216",
            ));
        }
        if !(1..=1000).contains(&s.max_streams_per_connection) {
            return Err(ConfigError::new(
                "server.max_streams_per_connection",
                "must be between 1 and 1000",
            ));
        }
        if http::HeaderValue::from_str(&s.hsts).is_err() {
            return Err(ConfigError::new(
                "server.hsts",
                "must be a valid header value, e.g. \"max-age=31536000\", or \"\" to omit",
            ));
        }
        if s.workers > MAX_WORKERS {
            return Err(ConfigError::new(
                "server.workers",
                format!("must be at most {MAX_WORKERS} (0: one per CPU)"),
            ));
        }

        let emr = &self.emr;
        if emr.session_cookie.is_empty()
            || cookie::Cookie::parse(format!("{}=x", emr.session_cookie)).is_err()
        {
            return Err(ConfigError::new(
                "emr.session_cookie",
                "must be a cookie name",
            ));
        }
        if emr.logout_paths.is_empty() {
            return Err(ConfigError::new(
                "emr.logout_paths",
                "list at least one logout path of the EMR",
            ));
        }
        for (i, p) in emr.logout_paths.iter().enumerate() {
            validate_path(&format!("emr.logout_paths[{i}]"), p)?;
        }
        validate_path("emr.launch_path", &emr.launch_path)?;
        validate_path("emr.whoami_path", &emr.whoami_path)?;
        validate_path("emr.patient_path", &emr.patient_path)?;
        if !emr.patient_path.contains("{demographicNo}") {
            return Err(ConfigError::new(
                "emr.patient_path",
                "must contain {demographicNo}, where the patient's number goes",
            ));
        }
        if emr.launch_patient_params.is_empty()
            || emr.launch_patient_params.iter().any(String::is_empty)
        {
            return Err(ConfigError::new(
                "emr.launch_patient_params",
                "list at least one non-empty query parameter name",
            ));
        }
        if emr.launch_authority_param.is_empty() {
            return Err(ConfigError::new(
                "emr.launch_authority_param",
                "must not be empty",
            ));
        }
        validate_pointer("emr.whoami_user_field", &emr.whoami_user_field)?;
        for (name, pointer) in emr.patient_fields.pointers() {
            validate_pointer(&format!("emr.patient_fields.{name}"), pointer)?;
        }

        let ehr = &self.ehr;
        validate_path("ehr.launch_path", &ehr.launch_path)?;
        validate_path("ehr.logout_path", &ehr.logout_path)?;
        validate_path("ehr.override_path", &ehr.override_path)?;
        if ehr.override_reason_field.is_empty() {
            return Err(ConfigError::new(
                "ehr.override_reason_field",
                "must not be empty",
            ));
        }
        if http::HeaderName::from_bytes(ehr.context_header.as_bytes()).is_err() {
            return Err(ConfigError::new(
                "ehr.context_header",
                format!("{:?} is not a valid HTTP header name", ehr.context_header),
            ));
        }

        self.validate_authorities()?;
        self.validate_store()?;

        let keys = self.context.signing_key.paths();
        if keys.is_empty() {
            return Err(ConfigError::new(
                "context.signing_key",
                "list at least one key file (the first signs)",
            ));
        }
        for (i, p) in keys.iter().enumerate() {
            if keys[..i].contains(p) {
                return Err(ConfigError::new(
                    "context.signing_key",
                    format!("{} is listed twice", p.display()),
                ));
            }
        }
        if self.context.issuer.is_empty() {
            return Err(ConfigError::new("context.issuer", "must not be empty"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return Err(ConfigError::new(
                "log.filter",
                format!(
                    "{:?} is not a log filter ({e}); write e.g. \"info\" or \"ehrgate=debug,warn\"",
                    self.log.filter
                ),
            ));
        }
        Ok(())
    }

    fn validate_store(&self) -> Result<(), ConfigError> {
        let s = &self.session;
        if s.store != StoreKind::Redis {
            return Ok(());
        }
        let url = s.redis_url.expose();
        if url.is_empty() {
            return Err(ConfigError::new(
                "session.redis_url",
                "is required when session.store = \"redis\" (redis://host:6379/0, or rediss:// for TLS)",
            ));
        }
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(ConfigError::new(
                "session.redis_url",
                format!(
                    "{:?} must start with redis:// or rediss:// (TLS)",
                    s.redis_url.redacted()
                ),
            ));
        }
        if url.contains('#') {
            return Err(ConfigError::new(
                "session.redis_url",
                "must not have a #fragment (#insecure would turn off certificate checks); trust a private CA with session.redis_ca",
            ));
        }
        if !s.redis_ca.as_os_str().is_empty() && !url.starts_with("rediss://") {
            return Err(ConfigError::new(
                "session.redis_ca",
                "is only used with a rediss:// (TLS) redis_url",
            ));
        }
        if s.store_key.as_os_str().is_empty() {
            return Err(ConfigError::new(
                "session.store_key",
                "is required when session.store = \"redis\": a file of 32 random bytes \
                 (head -c 32 /dev/urandom > store.key; chmod 600 store.key)",
            ));
        }
        if s.redis_key_prefix.is_empty()
            || s.redis_key_prefix.len() > 64
            || s.redis_key_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ConfigError::new(
                "session.redis_key_prefix",
                "must be 1 to 64 characters without spaces, e.g. \"ehrgate:\"",
            ));
        }
        Ok(())
    }

    fn validate_authorities(&self) -> Result<(), ConfigError> {
        if self.authorities.is_empty() {
            return Err(ConfigError::new(
                "authority",
                "configure at least one [[authority]] (id and name of the organisation \
                 clinicians act for)",
            ));
        }
        for (i, a) in self.authorities.iter().enumerate() {
            if a.id.trim().is_empty() {
                return Err(ConfigError::new(
                    format!("authority[{i}].id"),
                    "must not be empty",
                ));
            }
            if a.name.trim().is_empty() {
                return Err(ConfigError::new(
                    format!("authority[{i}].name"),
                    "must not be empty",
                ));
            }
            if self.authorities[..i].iter().any(|b| b.id == a.id) {
                return Err(ConfigError::new(
                    format!("authority[{i}].id"),
                    format!("{:?} is configured twice", a.id),
                ));
            }
        }
        if self.authorities.iter().filter(|a| a.default).count() > 1 {
            return Err(ConfigError::new(
                "authority",
                "more than one authority has default = true; mark at most one",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with secrets redacted.
    pub fn to_effective_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.audit.hash_key.is_empty() {
            shown.audit.hash_key = "<redacted>".into();
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }
}

fn toml_error(key: &str, e: &toml::de::Error, text: &str) -> ConfigError {
    let mut message = e.message().trim().replace('\n', " ");
    message = message.replace("unknown field", "unknown key");
    if let Some(span) = e.span() {
        let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
        message = format!("{message} (line {line})");
    }
    ConfigError::new(key, message)
}

fn validate_host(key: &str, host: &str) -> Result<(), ConfigError> {
    let ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("{host:?} is not a host name (write it without scheme or port, e.g. emr.clinic.example)"),
        ))
    }
}

fn validate_path(key: &str, path: &str) -> Result<(), ConfigError> {
    if path.starts_with('/')
        && !path.contains(['?', '#', ' '])
        && path.parse::<http::uri::PathAndQuery>().is_ok()
    {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!("{path:?} must be an absolute path starting with '/', without query"),
        ))
    }
}

fn validate_pointer(key: &str, pointer: &str) -> Result<(), ConfigError> {
    if pointer.starts_with('/') {
        Ok(())
    } else {
        Err(ConfigError::new(
            key,
            format!(
                "{pointer:?} is not a JSON pointer (it must start with '/', e.g. \"/providerNo\")"
            ),
        ))
    }
}

#[cfg(test)]
mod tests;
