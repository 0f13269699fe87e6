//! The shared store (DESIGN §9): several ehrgate replicas keep their sessions in one
//! Redis or Valkey, the only source of truth.
//!
//! - **No window.** Every viewer request reads its EHR session, its EMR session and the
//!   vault jar in one script call (one round trip); a sign-out on any replica deletes
//!   them in one script, so the very next request anywhere is refused.
//! - **Atomic.** Each operation that touches several keys is one Lua script (launch,
//!   enter, sign-out, the ticket's bind/confirm/redeem steps): two replicas redeeming a
//!   ticket at once, exactly one wins.
//! - **Live connections follow.** The sign-out script itself publishes `E:gen` on
//!   `{prefix}signout`; every replica closes its handle of that session (event streams
//!   get `logout`, tunnels and streaming responses end). After a lost subscription the
//!   replica re-checks every handle it holds against the store.
//! - **Nothing readable at rest.** Keys are SHA-256 hashes of tokens and cookies (hex);
//!   the jar, the opened patient and the ticket's patient context are AES-256-GCM under
//!   `store_key`, bound to the key they sit in. The provider number is kept (it names
//!   the clinician, not a patient); the user index is keyed by its HMAC.
//! - **Expiry by TTL**, never by scanning: records carry TTLs a minute past their
//!   limits, and the sweeper asks two sorted sets (`z:emr` by last seen, `z:ehr` by
//!   deadline) for what is due, so sign-out effects still run.
//! - **Fail closed.** Any error is [`StoreError::Unavailable`]; the connection manager
//!   reconnects with backoff on its own.
//!
//! Key layout under the prefix `P` (`E` an EMR session, `X` an EHR session id, `T` a
//! ticket, `M` a marker, all hex hashes): `P e:E` (hash: user, uh, created, seen),
//! `P em:E` / `P et:E` (lists of its markers / tickets), `P m:M` → E, `P u:{hmac(user)}`
//! (set of E), `P h:E` (hash: the EHR session: id, gen, user, uao, uaon, created, seen,
//! jar, pat), `P x:X` → E, `P t:T` (hash: e, ctx, exp, b, n, c), `P z:emr`, `P z:ehr`,
//! `P z:tk` (sorted sets for the sweeper and the counts). Not for Redis Cluster: the
//! scripts touch keys they compute.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hmac;
use dashmap::DashMap;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, Value};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    EmrSeen, Linked, SessionStore, StoreCounts, StoreError, StoreLimits, StoreResult,
    SweepCandidates, ViewerSession,
};
use crate::config::{Authority, ConfigError, SessionConfig};
use crate::session::token::TokenHashBuilder;
use crate::session::{
    CookieJar, EhrSession, EmrSession, LaunchTicket, Millis, OpenedPatient, PatientContext,
    TokenHash, MAX_MARKERS_PER_EMR, MAX_TICKETS_PER_EMR,
};

/// Records outlive their limits by this much, so the sweeper (which runs the sign-out
/// effects) normally finds them first; TTLs are the backstop.
const SLACK: Millis = 60_000;
/// Most candidates one sweep takes of each kind; the rest wait for the next.
const SWEEP_BATCH: isize = 1000;
/// A sign-out seen here is remembered this long, so a request that read the session
/// just before it cannot bring back a handle that nobody will close.
const ENDED_MEMORY: Millis = 120_000;

/// Shared by the scripts that end an EHR session: read it, delete it and its id, and
/// publish the sign-out in the same atomic step.
const END_EHR: &str = r#"
local function I(x) return string.format('%d', x) end
local function end_ehr(P, E)
  local h = P .. 'h:' .. E
  local r = redis.call('HMGET', h, 'id', 'gen', 'user', 'uao', 'uaon', 'created', 'seen', 'jar', 'pat')
  redis.call('ZREM', P .. 'z:ehr', E)
  if not r[1] then return false end
  redis.call('DEL', h, P .. 'x:' .. r[1])
  redis.call('PUBLISH', P .. 'signout', E .. ':' .. r[2])
  return r
end
"#;

const INSERT_EMR: &str = r#"
local P, E, now, ttl = ARGV[1], ARGV[2], ARGV[5], ARGV[6]
local e = P .. 'e:' .. E
local r = redis.call('HMGET', e, 'user', 'created', 'uh')
if r[1] then
  redis.call('HSET', e, 'seen', now)
  redis.call('PEXPIRE', e, ttl)
  redis.call('PEXPIRE', P .. 'u:' .. r[3], ttl)
  redis.call('ZADD', P .. 'z:emr', now, E)
  return {r[1], r[2], now}
end
if redis.call('ZCARD', P .. 'z:emr') >= tonumber(ARGV[7]) then return 0 end
redis.call('HSET', e, 'user', ARGV[3], 'uh', ARGV[4], 'created', now, 'seen', now)
redis.call('PEXPIRE', e, ttl)
local u = P .. 'u:' .. ARGV[4]
redis.call('SADD', u, E)
redis.call('PEXPIRE', u, ttl)
redis.call('ZADD', P .. 'z:emr', now, E)
return {ARGV[3], now, now}
"#;

const TOUCH_EMR: &str = r#"
local P, E, ttl = ARGV[1], ARGV[2], ARGV[5]
local e = P .. 'e:' .. E
local r = redis.call('HMGET', e, 'seen', 'uh')
if not r[1] then return 0 end
local since = tonumber(ARGV[3]) - tonumber(r[1])
if since >= tonumber(ARGV[4]) then return 2 end
-- Written at most once per interval per session, whichever replica sees it.
if since < tonumber(ARGV[6]) then return 1 end
redis.call('HSET', e, 'seen', ARGV[3])
redis.call('PEXPIRE', e, ttl)
redis.call('PEXPIRE', P .. 'u:' .. r[2], ttl)
local ms = P .. 'em:' .. E
for _, m in ipairs(redis.call('LRANGE', ms, 0, -1)) do redis.call('PEXPIRE', P .. 'm:' .. m, ttl) end
redis.call('PEXPIRE', ms, ttl)
redis.call('PEXPIRE', P .. 'et:' .. E, ttl)
redis.call('ZADD', P .. 'z:emr', ARGV[3], E)
return 1
"#;

const GET_EMR: &str = r#"
return redis.call('HMGET', ARGV[1] .. 'e:' .. ARGV[2], 'user', 'created', 'seen')
"#;

const END_EMR: &str = r#"
local P, E = ARGV[1], ARGV[2]
local e = P .. 'e:' .. E
local r = redis.call('HMGET', e, 'user', 'created', 'seen', 'uh')
redis.call('ZREM', P .. 'z:emr', E)
for _, m in ipairs(redis.call('LRANGE', P .. 'em:' .. E, 0, -1)) do redis.call('DEL', P .. 'm:' .. m) end
for _, t in ipairs(redis.call('LRANGE', P .. 'et:' .. E, 0, -1)) do
  redis.call('DEL', P .. 't:' .. t)
  redis.call('ZREM', P .. 'z:tk', t)
end
redis.call('DEL', e, P .. 'em:' .. E, P .. 'et:' .. E)
if r[4] then redis.call('SREM', P .. 'u:' .. r[4], E) end
-- Its EHR session ends with it, even when the EMR record already expired.
local h = end_ehr(P, E)
if not r[1] and not h then return false end
return {r[1], r[2], r[3], h}
"#;

const REMOVE_EHR: &str = r#"
return end_ehr(ARGV[1], ARGV[2])
"#;

const VIEWER: &str = r#"
local P, X = ARGV[1], ARGV[2]
local E = redis.call('GET', P .. 'x:' .. X)
if not E then return false end
local h = P .. 'h:' .. E
local r = redis.call('HMGET', h, 'id', 'gen', 'user', 'uao', 'uaon', 'created', 'seen', 'jar', 'pat')
if r[1] ~= X then return false end
local m = redis.call('HMGET', P .. 'e:' .. E, 'user', 'created', 'seen')
if ARGV[3] == '1' then
  local now, created, seen = tonumber(ARGV[4]), tonumber(r[6]), tonumber(r[7])
  local idle, life = tonumber(ARGV[6]), tonumber(ARGV[7])
  if now - seen >= tonumber(ARGV[5]) and now - seen < idle and now - created < life then
    redis.call('HSET', h, 'seen', ARGV[4])
    local left = I(math.min(idle, created + life - now) + tonumber(ARGV[8]))
    redis.call('PEXPIRE', h, left)
    redis.call('PEXPIRE', P .. 'x:' .. X, left)
    redis.call('ZADD', P .. 'z:ehr', I(math.min(now + idle, created + life)), E)
  end
end
return {E, r, m}
"#;

const EHR_OF_EMR: &str = r#"
return redis.call('HMGET', ARGV[1] .. 'h:' .. ARGV[2], 'id', 'gen', 'user', 'uao', 'uaon', 'created', 'seen', 'jar', 'pat')
"#;

const INSERT_EHR: &str = r#"
local P, E = ARGV[1], ARGV[2]
if redis.call('EXISTS', P .. 'e:' .. E) == 0 then return {0} end
local old = end_ehr(P, E)
local h = P .. 'h:' .. E
redis.call('HSET', h, 'id', ARGV[3], 'gen', ARGV[4], 'user', ARGV[5], 'uao', ARGV[6], 'uaon', ARGV[7],
  'created', ARGV[8], 'seen', ARGV[8], 'jar', ARGV[9], 'pat', ARGV[10])
redis.call('PEXPIRE', h, ARGV[11])
redis.call('SET', P .. 'x:' .. ARGV[3], E, 'PX', ARGV[11])
redis.call('ZADD', P .. 'z:ehr', ARGV[12], E)
return {1, old}
"#;

const REKEY_EHR: &str = r#"
local P, E = ARGV[1], ARGV[2]
local h = P .. 'h:' .. E
local r = redis.call('HMGET', h, 'gen', 'id')
if r[1] ~= ARGV[3] then return 0 end
local left = redis.call('PTTL', h)
if left <= 0 then left = tonumber(ARGV[5]) end
redis.call('DEL', P .. 'x:' .. r[2])
redis.call('HSET', h, 'id', ARGV[4])
redis.call('SET', P .. 'x:' .. ARGV[4], E, 'PX', left)
return 1
"#;

const SAVE_EHR: &str = r#"
local h = ARGV[1] .. 'h:' .. ARGV[2]
if redis.call('HGET', h, 'gen') ~= ARGV[3] then return 0 end
redis.call('HSET', h, 'jar', ARGV[4], 'pat', ARGV[5])
return 1
"#;

const ADD_MARKER: &str = r#"
local P, E, M, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('EXISTS', P .. 'e:' .. E) == 0 then return 0 end
local ms = P .. 'em:' .. E
redis.call('RPUSH', ms, M)
while redis.call('LLEN', ms) > tonumber(ARGV[5]) do
  redis.call('DEL', P .. 'm:' .. redis.call('LPOP', ms))
end
redis.call('PEXPIRE', ms, ttl)
redis.call('SET', P .. 'm:' .. M, E, 'PX', ttl)
return 1
"#;

const BY_MARKER: &str = r#"
local P = ARGV[1]
local E = redis.call('GET', P .. 'm:' .. ARGV[2])
if not E then return false end
local r = redis.call('HMGET', P .. 'e:' .. E, 'user', 'created', 'seen')
if not r[1] then return false end
return {E, r[1], r[2], r[3]}
"#;

const PUT_TICKET: &str = r#"
local P, T, E = ARGV[1], ARGV[2], ARGV[3]
if redis.call('ZCARD', P .. 'z:tk') >= tonumber(ARGV[8]) then return 0 end
local t = P .. 't:' .. T
redis.call('HSET', t, 'e', E, 'ctx', ARGV[4], 'exp', ARGV[5])
redis.call('PEXPIRE', t, ARGV[6])
redis.call('ZADD', P .. 'z:tk', ARGV[5], T)
local ts = P .. 'et:' .. E
redis.call('RPUSH', ts, T)
while redis.call('LLEN', ts) > tonumber(ARGV[7]) do
  local old = redis.call('LPOP', ts)
  redis.call('DEL', P .. 't:' .. old)
  redis.call('ZREM', P .. 'z:tk', old)
end
redis.call('PEXPIRE', ts, ARGV[6])
return 1
"#;

const TICKET_FIELDS: &str = "'e', 'ctx', 'exp', 'b', 'n', 'c'";

const TAKE_TICKET: &str = r#"
local t = ARGV[1] .. 't:' .. ARGV[2]
local r = redis.call('HMGET', t, FIELDS)
redis.call('DEL', t)
redis.call('ZREM', ARGV[1] .. 'z:tk', ARGV[2])
return r
"#;

const PEEK_TICKET: &str = r#"
return redis.call('HMGET', ARGV[1] .. 't:' .. ARGV[2], FIELDS)
"#;

const BIND_TICKET: &str = r#"
local t = ARGV[1] .. 't:' .. ARGV[2]
local b = redis.call('HMGET', t, 'e', 'b')
if not b[1] then return false end
if not b[2] then
  redis.call('HSET', t, 'b', ARGV[3], 'n', ARGV[4])
elseif b[2] == ARGV[3] then
  redis.call('HSET', t, 'n', ARGV[4])
  redis.call('HDEL', t, 'c')
end
return redis.call('HMGET', t, FIELDS)
"#;

const CONFIRM_TICKET: &str = r#"
local t = ARGV[1] .. 't:' .. ARGV[2]
local n = redis.call('HGET', t, 'n')
if not n or n ~= ARGV[3] then return 0 end
redis.call('HDEL', t, 'n')
redis.call('HSET', t, 'c', ARGV[4])
return 1
"#;

const TAKE_CONFIRMED: &str = r#"
local t = ARGV[1] .. 't:' .. ARGV[2]
local r = redis.call('HMGET', t, FIELDS)
if not r[1] or r[4] ~= ARGV[3] or r[6] ~= ARGV[4] then return false end
redis.call('DEL', t)
redis.call('ZREM', ARGV[1] .. 'z:tk', ARGV[2])
return r
"#;

/// The scripts, loaded once (EVALSHA, with EVAL when the server does not know one yet).
struct Scripts {
    insert_emr: Script,
    touch_emr: Script,
    get_emr: Script,
    end_emr: Script,
    remove_ehr: Script,
    viewer: Script,
    ehr_of_emr: Script,
    insert_ehr: Script,
    rekey_ehr: Script,
    save_ehr: Script,
    add_marker: Script,
    by_marker: Script,
    put_ticket: Script,
    take_ticket: Script,
    peek_ticket: Script,
    bind_ticket: Script,
    confirm_ticket: Script,
    take_confirmed: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_end = |body: &str| Script::new(&format!("{END_EHR}{body}"));
        let tickets = |body: &str| Script::new(&body.replace("FIELDS", TICKET_FIELDS));
        Self {
            insert_emr: Script::new(INSERT_EMR),
            touch_emr: Script::new(TOUCH_EMR),
            get_emr: Script::new(GET_EMR),
            end_emr: with_end(END_EMR),
            remove_ehr: with_end(REMOVE_EHR),
            viewer: with_end(VIEWER),
            ehr_of_emr: Script::new(EHR_OF_EMR),
            insert_ehr: with_end(INSERT_EHR),
            rekey_ehr: Script::new(REKEY_EHR),
            save_ehr: Script::new(SAVE_EHR),
            add_marker: Script::new(ADD_MARKER),
            by_marker: Script::new(BY_MARKER),
            put_ticket: Script::new(PUT_TICKET),
            take_ticket: tickets(TAKE_TICKET),
            peek_ticket: tickets(PEEK_TICKET),
            bind_ticket: tickets(BIND_TICKET),
            confirm_ticket: Script::new(CONFIRM_TICKET),
            take_confirmed: tickets(TAKE_CONFIRMED),
        }
    }
}

/// AES-256-GCM under `store_key`. Each value is sealed with the name of the record it
/// belongs to as associated data, so a value moved to another record does not open.
struct Sealer(LessSafeKey);

impl Sealer {
    fn seal(&self, aad: &str, plain: &[u8]) -> StoreResult<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| StoreError::Unavailable("no random nonce for sealing".into()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let tag = self
            .0
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| StoreError::Unavailable("sealing failed".into()))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    fn open(&self, aad: &str, sealed: &[u8]) -> StoreResult<Vec<u8>> {
        let refused = || {
            StoreError::Unavailable(
                "a stored record does not open with this store_key (is session.store_key the same file on every replica?)"
                    .into(),
            )
        };
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(refused());
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut buf = rest.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| refused())?;
        Ok(plain.to_vec())
    }
}

/// The ticket's context as sealed in the store.
#[derive(serde::Serialize, serde::Deserialize)]
struct SealedTicket {
    emr: String,
    user: String,
    uao: String,
    uao_name: String,
    uao_default: bool,
    mrp: bool,
    expires: Millis,
    demographic_no: String,
    hcn: String,
    hcn_version: String,
    birth_date: String,
    gender: String,
    family: String,
    given: String,
    mrp_provider: String,
}

pub struct RedisStore {
    client: redis::Client,
    /// Made on first use, inside the runtime (`check-config` builds the store without
    /// one); it then reconnects by itself, with backoff.
    conn: std::sync::OnceLock<ConnectionManager>,
    manager: ConnectionManagerConfig,
    prefix: String,
    channel: String,
    sealer: Sealer,
    /// Keys the user index by an HMAC of the provider number.
    user_key: hmac::Key,
    /// Replaced on reload.
    limits: arc_swap::ArcSwap<StoreLimits>,
    max_sessions: usize,
    /// The configured authorities, shared by the sessions that act for them.
    authorities: Vec<Arc<Authority>>,
    scripts: Scripts,
    /// This replica's handles of EHR sessions, by EMR session: what a sign-out anywhere
    /// closes (event streams, tunnels, streaming responses hang on them).
    live: DashMap<TokenHash, Arc<EhrSession>, TokenHashBuilder>,
    /// Sessions this replica saw end (EMR key → generation, when), briefly.
    ended: DashMap<TokenHash, (u64, Millis), TokenHashBuilder>,
    /// When this replica last wrote each EMR session's `last_seen`.
    emr_touched: DashMap<TokenHash, Millis, TokenHashBuilder>,
    healthy: AtomicBool,
    problem: Mutex<Option<String>>,
    errors: AtomicU64,
    /// Set when the sign-out subscription was lost: the next sweep re-checks handles.
    recheck_due: AtomicBool,
    /// Woken when the store is reachable again, so held-back sign-outs land at once.
    back: tokio::sync::Notify,
    shutdown: watch::Receiver<bool>,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    // The client's errors name the server's address at most, never the URL's password.
    StoreError::Unavailable(e.to_string())
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    bytes(v).and_then(|b| std::str::from_utf8(b).ok())
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

fn malformed(what: &str) -> StoreError {
    StoreError::Unavailable(format!("the store returned a malformed {what}"))
}

impl RedisStore {
    /// Builds the store from `[session]`: reads `store_key` and `redis_ca`, checks the
    /// URL. Connects lazily (a replica starts while Redis is down, and fails closed).
    pub fn new(
        config: &SessionConfig,
        limits: StoreLimits,
        authorities: Vec<Arc<Authority>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, ConfigError> {
        let key = std::fs::read(&config.store_key).map_err(|e| {
            ConfigError::new(
                "session.store_key",
                format!("cannot read {}: {e}", config.store_key.display()),
            )
        })?;
        if key.len() != 32 {
            return Err(ConfigError::new(
                "session.store_key",
                format!(
                    "{} holds {} bytes; it must hold exactly 32 random bytes (head -c 32 /dev/urandom)",
                    config.store_key.display(),
                    key.len()
                ),
            ));
        }
        let aead = UnboundKey::new(&AES_256_GCM, &key)
            .map_err(|_| ConfigError::new("session.store_key", "not a usable AES-256 key"))?;
        let url = config.redis_url.expose();
        let client = if config.redis_ca.as_os_str().is_empty() {
            redis::Client::open(url)
        } else {
            let pem = std::fs::read(&config.redis_ca).map_err(|e| {
                ConfigError::new(
                    "session.redis_ca",
                    format!("cannot read {}: {e}", config.redis_ca.display()),
                )
            })?;
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        .map_err(|e| {
            ConfigError::new(
                "session.redis_url",
                format!(
                    "{} is not a usable Redis URL: {}",
                    config.redis_url.redacted(),
                    e
                ),
            )
        })?;
        let manager = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(2));
        let prefix = config.redis_key_prefix.clone();
        Ok(Self {
            client,
            conn: std::sync::OnceLock::new(),
            manager,
            channel: format!("{prefix}signout"),
            prefix,
            sealer: Sealer(LessSafeKey::new(aead)),
            user_key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            limits: arc_swap::ArcSwap::from_pointee(limits),
            max_sessions: config.max_sessions,
            authorities,
            scripts: Scripts::new(),
            live: DashMap::default(),
            ended: DashMap::default(),
            emr_touched: DashMap::default(),
            healthy: AtomicBool::new(true),
            problem: Mutex::new(None),
            errors: AtomicU64::new(0),
            recheck_due: AtomicBool::new(false),
            back: tokio::sync::Notify::new(),
            shutdown,
        })
    }

    fn limits(&self) -> StoreLimits {
        **self.limits.load()
    }

    /// New limits (a reload): TTLs and write intervals follow them from now on.
    pub fn set_limits(&self, limits: StoreLimits) {
        self.limits.store(Arc::new(limits));
    }

    /// Why the store is unusable now, if it is (for `/readyz`).
    pub fn unhealthy(&self) -> Option<String> {
        if self.healthy.load(Ordering::Acquire) {
            return None;
        }
        self.problem.lock().ok().and_then(|p| p.clone())
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn went_well(&self) {
        if !self.healthy.load(Ordering::Relaxed) && !self.healthy.swap(true, Ordering::AcqRel) {
            info!("session store reachable again");
            self.back.notify_waiters();
        }
    }

    /// Resolves when the store becomes reachable after an outage.
    pub async fn reachable_again(&self) {
        self.back.notified().await
    }

    fn went_wrong(&self, e: &StoreError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut p) = self.problem.lock() {
            *p = Some(e.to_string());
        }
        if self.healthy.swap(false, Ordering::AcqRel) {
            warn!(error = %e, "session store unreachable: EHR access is refused until it is back");
        }
    }

    /// The shared connection (cheap to clone: one multiplexed connection underneath).
    fn conn(&self) -> StoreResult<ConnectionManager> {
        if let Some(c) = self.conn.get() {
            return Ok(c.clone());
        }
        let made =
            ConnectionManager::new_lazy_with_config(self.client.clone(), self.manager.clone())
                .map_err(|e| {
                    let e = unavailable(e);
                    self.went_wrong(&e);
                    e
                })?;
        Ok(self.conn.get_or_init(|| made).clone())
    }

    /// Runs a script with string arguments; every failure is counted and marks the
    /// store unhealthy until an operation succeeds again.
    /// Every script takes the key prefix, then the hex hash its keys are named by
    /// (`subject`), then its own arguments.
    async fn run(&self, script: &Script, subject: &str, args: &[&[u8]]) -> StoreResult<Value> {
        let mut inv = script.prepare_invoke();
        inv.arg(self.prefix.as_bytes()).arg(subject.as_bytes());
        for a in args {
            inv.arg(*a);
        }
        let mut conn = self.conn()?;
        self.checked(inv.invoke_async::<Value>(&mut conn).await)
    }

    /// A reply from Redis as the store's result: every failure is counted and marks the
    /// store unhealthy until an operation succeeds again.
    fn checked<T>(&self, reply: redis::RedisResult<T>) -> StoreResult<T> {
        match reply {
            Ok(v) => {
                self.went_well();
                Ok(v)
            }
            Err(e) => {
                let e = unavailable(e);
                self.went_wrong(&e);
                Err(e)
            }
        }
    }

    fn user_hash(&self, user: &str) -> String {
        let tag = hmac::sign(&self.user_key, user.as_bytes());
        crate::audit::hex(tag.as_ref())
    }

    fn authority(&self, id: &str, name: &str, default: bool) -> Arc<Authority> {
        self.authorities
            .iter()
            .find(|a| a.id == id)
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(Authority {
                    id: id.to_string(),
                    name: name.to_string(),
                    default,
                })
            })
    }

    fn emr_ttl(&self) -> Millis {
        self.limits().emr_idle + SLACK
    }

    /// `[user, created, seen]` → an EMR session.
    fn emr_from(&self, key: TokenHash, fields: &[Value]) -> Option<Arc<EmrSession>> {
        let user = text(fields.first()?)?;
        let created = int(fields.get(1)?)? as Millis;
        let seen = int(fields.get(2)?)? as Millis;
        let s = EmrSession::new(key, user, created);
        s.touch(seen);
        Some(Arc::new(s))
    }

    fn seal_jar_and_patient(
        &self,
        emr_hex: &str,
        session: &EhrSession,
    ) -> StoreResult<(Vec<u8>, Vec<u8>)> {
        let jar = session.jar.lock().expect("jar lock").to_bytes();
        let patient = *session.patient.lock().expect("patient lock");
        let patient = serde_json::to_vec(&patient).unwrap_or_default();
        Ok((
            self.sealer.seal(&format!("jar:{emr_hex}"), &jar)?,
            self.sealer.seal(&format!("pat:{emr_hex}"), &patient)?,
        ))
    }

    /// `[id, gen, user, uao, uaon, created, seen, jar, pat]` → the EHR session's parts.
    fn ehr_record(&self, emr: TokenHash, f: &[Value]) -> StoreResult<Option<EhrRecord>> {
        let Some(id) = f.first().and_then(bytes) else {
            return Ok(None);
        };
        let bad = || malformed("EHR session");
        let id = TokenHash::from_hex(id).ok_or_else(bad)?;
        let field = |i: usize| f.get(i).ok_or_else(bad);
        let gen: u64 = text(field(1)?)
            .and_then(|g| g.parse().ok())
            .ok_or_else(bad)?;
        let user = text(field(2)?).ok_or_else(bad)?;
        let uao = text(field(3)?).ok_or_else(bad)?;
        let uao_name = text(field(4)?).ok_or_else(bad)?;
        let created = int(field(5)?).ok_or_else(bad)? as Millis;
        let seen = int(field(6)?).ok_or_else(bad)? as Millis;
        let emr_hex = emr.to_hex();
        let jar = self
            .sealer
            .open(&format!("jar:{emr_hex}"), bytes(field(7)?).ok_or_else(bad)?)?;
        let jar = CookieJar::from_bytes(&jar).ok_or_else(bad)?;
        let patient = self
            .sealer
            .open(&format!("pat:{emr_hex}"), bytes(field(8)?).ok_or_else(bad)?)?;
        let patient: OpenedPatient = serde_json::from_slice(&patient).map_err(|_| bad())?;
        Ok(Some(EhrRecord {
            emr,
            id,
            gen,
            user: user.into(),
            authority: self.authority(uao, uao_name, false),
            created,
            seen,
            jar,
            patient,
        }))
    }

    /// This replica's handle of a session the store described: the one it holds, brought
    /// up to date, or a new one. A session seen ending here gets a closed handle.
    fn handle(&self, r: EhrRecord) -> Arc<EhrSession> {
        use dashmap::mapref::entry::Entry;
        let fresh = |r: EhrRecord| {
            let s = EhrSession::restore(r.emr, r.user, r.authority, r.id, r.created, r.seen, r.gen);
            *s.jar.lock().expect("jar lock") = r.jar;
            *s.patient.lock().expect("patient lock") = r.patient;
            Arc::new(s)
        };
        if self.ended.get(&r.emr).is_some_and(|e| e.0 == r.gen) {
            let s = fresh(r);
            s.close();
            return s;
        }
        let (emr, gen) = (r.emr, r.gen);
        let s = match self.live.entry(emr) {
            Entry::Occupied(mut e) if e.get().gen == r.gen && !e.get().is_closed() => {
                let s = e.get_mut().clone();
                s.set_id(r.id);
                s.touch(r.seen);
                *s.jar.lock().expect("jar lock") = r.jar;
                *s.patient.lock().expect("patient lock") = r.patient;
                return s;
            }
            // A read from before a newer session of this EMR session replaced it: that
            // record's session is over, and the newer handle stays.
            Entry::Occupied(e) if e.get().created > r.created && !e.get().is_closed() => {
                let s = fresh(r);
                s.close();
                return s;
            }
            Entry::Occupied(mut e) => {
                let s = fresh(r);
                let old = e.insert(s.clone());
                // Another generation: that session is over.
                old.close();
                s
            }
            Entry::Vacant(v) => {
                let s = fresh(r);
                v.insert(s.clone());
                s
            }
        };
        self.close_if_ended(&emr, gen);
        s
    }

    /// A sign-out message may have been handled between the look-up of `ended` and the
    /// registration of a handle: checked again after it, so no handle stays open that
    /// nobody will close.
    fn close_if_ended(&self, emr: &TokenHash, gen: u64) {
        if self.ended.get(emr).is_some_and(|e| e.0 == gen) {
            if let Some((_, h)) = self.live.remove_if(emr, |_, h| h.gen == gen) {
                h.close();
            }
        }
    }

    /// The handle of a session this replica just ended in the store: taken out of the
    /// live set (the caller closes it and runs the effects).
    fn take_handle(&self, r: EhrRecord) -> Arc<EhrSession> {
        self.ended.insert(r.emr, (r.gen, self.now()));
        match self.live.remove_if(&r.emr, |_, h| h.gen == r.gen) {
            Some((_, h)) => {
                *h.jar.lock().expect("jar lock") = r.jar;
                h
            }
            None => {
                let s =
                    EhrSession::restore(r.emr, r.user, r.authority, r.id, r.created, r.seen, r.gen);
                *s.jar.lock().expect("jar lock") = r.jar;
                *s.patient.lock().expect("patient lock") = r.patient;
                Arc::new(s)
            }
        }
    }

    /// A sign-out published by any replica (this one included): closes the handle.
    fn on_signout(&self, payload: &[u8]) {
        let Some((emr, gen)) = std::str::from_utf8(payload).ok().and_then(|p| {
            let (e, g) = p.split_once(':')?;
            Some((TokenHash::from_hex(e.as_bytes())?, g.parse::<u64>().ok()?))
        }) else {
            return;
        };
        self.ended.insert(emr, (gen, self.now()));
        if let Some((_, h)) = self.live.remove_if(&emr, |_, h| h.gen == gen) {
            h.close();
        }
    }

    fn ticket_from(&self, hash: &TokenHash, f: &[Value]) -> StoreResult<Option<LaunchTicket>> {
        let Some(emr) = f.first().and_then(bytes) else {
            return Ok(None);
        };
        let bad = || malformed("launch ticket");
        let emr = TokenHash::from_hex(emr).ok_or_else(bad)?;
        let sealed = f.get(1).and_then(bytes).ok_or_else(bad)?;
        let plain = self.sealer.open(&format!("tk:{}", hash.to_hex()), sealed)?;
        let t: SealedTicket = serde_json::from_slice(&plain).map_err(|_| bad())?;
        if TokenHash::from_hex(t.emr.as_bytes()) != Some(emr) {
            return Err(bad());
        }
        let opt_hash = |i: usize| f.get(i).and_then(bytes).and_then(TokenHash::from_hex);
        Ok(Some(LaunchTicket {
            emr,
            user: t.user.into(),
            authority: self.authority(&t.uao, &t.uao_name, t.uao_default),
            patient: PatientContext {
                demographic_no: t.demographic_no,
                hcn: t.hcn,
                hcn_version: t.hcn_version,
                birth_date: t.birth_date,
                gender: t.gender,
                family: t.family,
                given: t.given,
                mrp_provider: t.mrp_provider,
            },
            mrp: t.mrp,
            expires: t.expires,
            binding: opt_hash(3),
            confirm_nonce: opt_hash(4),
            redeem_code: opt_hash(5),
        }))
    }

    async fn ticket_script(
        &self,
        script: &Script,
        hash: &TokenHash,
        extra: &[&[u8]],
    ) -> StoreResult<Option<LaunchTicket>> {
        let v = self.run(script, &hash.to_hex(), extra).await?;
        match array(&v) {
            Some(f) => self.ticket_from(hash, f),
            None => Ok(None),
        }
    }

    /// Listens for sign-outs published by every replica until shutdown, reconnecting
    /// with backoff; after each (re)subscription, re-checks every handle it holds (a
    /// message missed meanwhile must not leave a tab open).
    pub async fn listen(&self) {
        let mut shutdown = self.shutdown.clone();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.subscribe().await {
                Ok(mut pubsub) => {
                    backoff = Duration::from_millis(100);
                    self.went_well();
                    // Whatever was published while unsubscribed is looked up instead.
                    if let Err(e) = SessionStore::recheck_live(self).await {
                        self.recheck_due.store(true, Ordering::Release);
                        warn!(error = %e, "re-check after subscribing failed; the next sweep retries");
                    }
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            m = messages.next() => match m {
                                Some(m) => self.on_signout(m.get_payload_bytes()),
                                None => break,
                            },
                            _ = crate::shutdown::signalled(&mut shutdown) => return,
                        }
                    }
                    self.recheck_due.store(true, Ordering::Release);
                    let e = StoreError::Unavailable("the sign-out subscription was lost".into());
                    self.went_wrong(&e);
                }
                Err(e) => {
                    self.recheck_due.store(true, Ordering::Release);
                    self.went_wrong(&e);
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = crate::shutdown::signalled(&mut shutdown) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    async fn subscribe(&self) -> StoreResult<redis::aio::PubSub> {
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&self.channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(3), connect).await {
            Ok(r) => r.map_err(unavailable),
            Err(_) => Err(StoreError::Unavailable(
                "no answer from Redis within 3 s".into(),
            )),
        }
    }
}

/// An EHR session's parts, as the store holds them.
struct EhrRecord {
    emr: TokenHash,
    id: TokenHash,
    gen: u64,
    user: Arc<str>,
    authority: Arc<Authority>,
    created: Millis,
    seen: Millis,
    jar: CookieJar,
    patient: OpenedPatient,
}

impl SessionStore for RedisStore {
    fn now(&self) -> Millis {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or_default()
    }

    async fn emr(&self, key: &TokenHash) -> StoreResult<Option<Arc<EmrSession>>> {
        let e = key.to_hex();
        let v = self.run(&self.scripts.get_emr, &e, &[]).await?;
        Ok(array(&v).and_then(|f| self.emr_from(*key, f)))
    }

    async fn insert_emr(&self, session: EmrSession) -> StoreResult<Arc<EmrSession>> {
        let e = session.key.to_hex();
        let uh = self.user_hash(&session.user);
        let now = session.last_seen().to_string();
        let ttl = self.emr_ttl().to_string();
        let max = self.max_sessions.to_string();
        let v = self
            .run(
                &self.scripts.insert_emr,
                &e,
                &[
                    session.user.as_bytes(),
                    uh.as_bytes(),
                    now.as_bytes(),
                    ttl.as_bytes(),
                    max.as_bytes(),
                ],
            )
            .await?;
        match array(&v) {
            Some(f) => self
                .emr_from(session.key, f)
                .ok_or_else(|| malformed("EMR session")),
            None => Err(StoreError::Full),
        }
    }

    async fn touch_emr(&self, key: &TokenHash, now: Millis, idle: Millis) -> StoreResult<EmrSeen> {
        // Written at most once per interval per session by this replica: an EMR page
        // loads dozens of resources, and none of them needs a round trip.
        if self
            .emr_touched
            .get(key)
            .is_some_and(|t| now.saturating_sub(*t) < self.limits().touch_interval())
        {
            return Ok(EmrSeen::Live);
        }
        let e = key.to_hex();
        let (now_s, idle_s, ttl, interval) = (
            now.to_string(),
            idle.to_string(),
            self.emr_ttl().to_string(),
            self.limits().touch_interval().to_string(),
        );
        let v = self
            .run(
                &self.scripts.touch_emr,
                &e,
                &[
                    now_s.as_bytes(),
                    idle_s.as_bytes(),
                    ttl.as_bytes(),
                    interval.as_bytes(),
                ],
            )
            .await?;
        Ok(match int(&v) {
            Some(1) => {
                self.emr_touched.insert(*key, now);
                EmrSeen::Live
            }
            Some(2) => EmrSeen::Idle,
            _ => EmrSeen::Unknown,
        })
    }

    async fn end_emr(
        &self,
        key: &TokenHash,
    ) -> StoreResult<Option<(Arc<EmrSession>, Option<Arc<EhrSession>>)>> {
        let e = key.to_hex();
        self.emr_touched.remove(key);
        let v = self.run(&self.scripts.end_emr, &e, &[]).await?;
        let Some(f) = array(&v) else {
            return Ok(None);
        };
        let ehr = match f.get(3).and_then(array) {
            Some(h) => self.ehr_record(*key, h)?.map(|r| self.take_handle(r)),
            None => None,
        };
        // The EMR record may have expired already while its EHR session had not: the
        // EHR session still ends, under its own user.
        let emr = match (self.emr_from(*key, f), &ehr) {
            (Some(emr), _) => emr,
            (None, Some(ehr)) => Arc::new(EmrSession::new(*key, ehr.user.clone(), ehr.created)),
            (None, None) => return Ok(None),
        };
        emr.end();
        Ok(Some((emr, ehr)))
    }

    async fn add_marker(&self, marker: TokenHash, emr: &Arc<EmrSession>) -> StoreResult<()> {
        let (e, m) = (emr.key.to_hex(), marker.to_hex());
        let (ttl, max) = (self.emr_ttl().to_string(), MAX_MARKERS_PER_EMR.to_string());
        self.run(
            &self.scripts.add_marker,
            &e,
            &[m.as_bytes(), ttl.as_bytes(), max.as_bytes()],
        )
        .await?;
        Ok(())
    }

    async fn emr_by_marker(&self, marker: &TokenHash) -> StoreResult<Option<Arc<EmrSession>>> {
        let m = marker.to_hex();
        let v = self.run(&self.scripts.by_marker, &m, &[]).await?;
        let Some(f) = array(&v) else {
            return Ok(None);
        };
        let key = f
            .first()
            .and_then(bytes)
            .and_then(TokenHash::from_hex)
            .ok_or_else(|| malformed("marker"))?;
        Ok(self.emr_from(key, &f[1..]))
    }

    async fn emr_keys_of_user(&self, user: &str) -> StoreResult<Vec<TokenHash>> {
        let key = format!("{}u:{}", self.prefix, self.user_hash(user));
        let mut conn = self.conn()?;
        let members: Vec<Vec<u8>> = self.checked(
            redis::cmd("SMEMBERS")
                .arg(&key)
                .query_async(&mut conn)
                .await,
        )?;
        Ok(members
            .iter()
            .filter_map(|m| TokenHash::from_hex(m))
            .collect())
    }

    async fn viewer_session(
        &self,
        id: &TokenHash,
        touch: Option<Millis>,
    ) -> StoreResult<Option<ViewerSession>> {
        let x = id.to_hex();
        let l = self.limits();
        let now = touch.unwrap_or_default().to_string();
        let (interval, idle, life, slack) = (
            l.touch_interval().to_string(),
            l.ehr_idle.to_string(),
            l.ehr_lifetime.to_string(),
            SLACK.to_string(),
        );
        let v = self
            .run(
                &self.scripts.viewer,
                &x,
                &[
                    if touch.is_some() { b"1" } else { b"0" },
                    now.as_bytes(),
                    interval.as_bytes(),
                    idle.as_bytes(),
                    life.as_bytes(),
                    slack.as_bytes(),
                ],
            )
            .await?;
        let Some(f) = array(&v) else {
            return Ok(None);
        };
        let bad = || malformed("viewer session");
        let emr = f
            .first()
            .and_then(bytes)
            .and_then(TokenHash::from_hex)
            .ok_or_else(bad)?;
        let h = f.get(1).and_then(array).ok_or_else(bad)?;
        let Some(record) = self.ehr_record(emr, h)? else {
            return Ok(None);
        };
        let emr_session = f.get(2).and_then(array).and_then(|m| self.emr_from(emr, m));
        Ok(Some(ViewerSession {
            ehr: self.handle(record),
            emr: emr_session,
        }))
    }

    async fn ehr_of_emr(&self, emr: &TokenHash) -> StoreResult<Option<Arc<EhrSession>>> {
        let e = emr.to_hex();
        let v = self.run(&self.scripts.ehr_of_emr, &e, &[]).await?;
        let Some(f) = array(&v) else {
            return Ok(None);
        };
        Ok(self.ehr_record(*emr, f)?.map(|r| self.handle(r)))
    }

    async fn insert_ehr(&self, session: Arc<EhrSession>) -> StoreResult<Linked> {
        let e = session.emr.to_hex();
        let (jar, pat) = self.seal_jar_and_patient(&e, &session)?;
        let l = self.limits();
        let left = l.ehr_idle.min(l.ehr_lifetime) + SLACK;
        let deadline = session.created + l.ehr_idle.min(l.ehr_lifetime);
        let (id, gen, created) = (
            session.id().to_hex(),
            session.gen.to_string(),
            session.created.to_string(),
        );
        let (left, deadline) = (left.to_string(), deadline.to_string());
        let v = self
            .run(
                &self.scripts.insert_ehr,
                &e,
                &[
                    id.as_bytes(),
                    gen.as_bytes(),
                    session.user.as_bytes(),
                    session.authority.id.as_bytes(),
                    session.authority.name.as_bytes(),
                    created.as_bytes(),
                    &jar,
                    &pat,
                    left.as_bytes(),
                    deadline.as_bytes(),
                ],
            )
            .await?;
        let f = array(&v).ok_or_else(|| malformed("link"))?;
        if f.first().and_then(int) != Some(1) {
            return Ok(Linked::EmrGone);
        }
        let replaced = match f.get(1).and_then(array) {
            Some(old) => self
                .ehr_record(session.emr, old)?
                .map(|r| self.take_handle(r)),
            None => None,
        };
        // This replica's handle of the new session is the caller's.
        if let Some(old) = self.live.insert(session.emr, session.clone()) {
            if old.gen != session.gen {
                old.close();
            }
        }
        self.close_if_ended(&session.emr, session.gen);
        Ok(match replaced {
            Some(old) => Linked::Replaced(old),
            None => Linked::New,
        })
    }

    async fn rekey_ehr(&self, session: &Arc<EhrSession>, new_id: TokenHash) -> StoreResult<bool> {
        let (e, gen, id) = (
            session.emr.to_hex(),
            session.gen.to_string(),
            new_id.to_hex(),
        );
        let fallback = (self.limits().ehr_idle + SLACK).to_string();
        let v = self
            .run(
                &self.scripts.rekey_ehr,
                &e,
                &[gen.as_bytes(), id.as_bytes(), fallback.as_bytes()],
            )
            .await?;
        let done = int(&v) == Some(1);
        if done {
            session.set_id(new_id);
        }
        Ok(done)
    }

    async fn save_ehr(&self, session: &Arc<EhrSession>) -> StoreResult<bool> {
        let e = session.emr.to_hex();
        let (jar, pat) = self.seal_jar_and_patient(&e, session)?;
        let gen = session.gen.to_string();
        let v = self
            .run(&self.scripts.save_ehr, &e, &[gen.as_bytes(), &jar, &pat])
            .await?;
        Ok(int(&v) == Some(1))
    }

    async fn remove_ehr_of_emr(&self, emr: &TokenHash) -> StoreResult<Option<Arc<EhrSession>>> {
        let e = emr.to_hex();
        let v = self.run(&self.scripts.remove_ehr, &e, &[]).await?;
        match array(&v) {
            Some(f) => Ok(self.ehr_record(*emr, f)?.map(|r| self.take_handle(r))),
            None => Ok(None),
        }
    }

    async fn put_ticket(&self, hash: TokenHash, ticket: LaunchTicket) -> StoreResult<()> {
        let t = hash.to_hex();
        let e = ticket.emr.to_hex();
        let p = ticket.patient;
        let sealed = SealedTicket {
            emr: e.clone(),
            user: ticket.user.to_string(),
            uao: ticket.authority.id.clone(),
            uao_name: ticket.authority.name.clone(),
            uao_default: ticket.authority.default,
            mrp: ticket.mrp,
            expires: ticket.expires,
            demographic_no: p.demographic_no,
            hcn: p.hcn,
            hcn_version: p.hcn_version,
            birth_date: p.birth_date,
            gender: p.gender,
            family: p.family,
            given: p.given,
            mrp_provider: p.mrp_provider,
        };
        let plain = serde_json::to_vec(&sealed).map_err(|_| malformed("ticket"))?;
        let ctx = self.sealer.seal(&format!("tk:{t}"), &plain)?;
        let ttl = self.limits().ticket_ttl + SLACK;
        let (exp, ttl, max, most) = (
            ticket.expires.to_string(),
            ttl.to_string(),
            MAX_TICKETS_PER_EMR.to_string(),
            self.max_sessions.to_string(),
        );
        let v = self
            .run(
                &self.scripts.put_ticket,
                &t,
                &[
                    e.as_bytes(),
                    &ctx,
                    exp.as_bytes(),
                    ttl.as_bytes(),
                    max.as_bytes(),
                    most.as_bytes(),
                ],
            )
            .await?;
        match int(&v) {
            Some(1) => Ok(()),
            _ => Err(StoreError::Full),
        }
    }

    async fn take_ticket(&self, hash: &TokenHash) -> StoreResult<Option<LaunchTicket>> {
        self.ticket_script(&self.scripts.take_ticket, hash, &[])
            .await
    }

    async fn peek_ticket(&self, hash: &TokenHash) -> StoreResult<Option<LaunchTicket>> {
        self.ticket_script(&self.scripts.peek_ticket, hash, &[])
            .await
    }

    async fn bind_ticket(
        &self,
        hash: &TokenHash,
        binding: TokenHash,
        nonce: TokenHash,
    ) -> StoreResult<Option<LaunchTicket>> {
        let (b, n) = (binding.to_hex(), nonce.to_hex());
        self.ticket_script(
            &self.scripts.bind_ticket,
            hash,
            &[b.as_bytes(), n.as_bytes()],
        )
        .await
    }

    async fn confirm_ticket(
        &self,
        hash: &TokenHash,
        nonce: &TokenHash,
        code: TokenHash,
    ) -> StoreResult<bool> {
        let (t, n, c) = (hash.to_hex(), nonce.to_hex(), code.to_hex());
        let v = self
            .run(
                &self.scripts.confirm_ticket,
                &t,
                &[n.as_bytes(), c.as_bytes()],
            )
            .await?;
        Ok(int(&v) == Some(1))
    }

    async fn take_confirmed_ticket(
        &self,
        hash: &TokenHash,
        binding: &TokenHash,
        code: &TokenHash,
    ) -> StoreResult<Option<LaunchTicket>> {
        let (b, c) = (binding.to_hex(), code.to_hex());
        self.ticket_script(
            &self.scripts.take_confirmed,
            hash,
            &[b.as_bytes(), c.as_bytes()],
        )
        .await
    }

    async fn sweep_candidates(&self, now: Millis, l: StoreLimits) -> StoreResult<SweepCandidates> {
        let p = &self.prefix;
        let idle_before = now.saturating_sub(l.emr_idle);
        let mut conn = self.conn()?;
        let (dropped, idle, expired): (usize, Vec<Vec<u8>>, Vec<Vec<u8>>) = self.checked(
            redis::pipe()
                .cmd("ZREMRANGEBYSCORE")
                .arg(format!("{p}z:tk"))
                .arg("-inf")
                .arg(now)
                .cmd("ZRANGEBYSCORE")
                .arg(format!("{p}z:emr"))
                .arg("-inf")
                .arg(idle_before)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .cmd("ZRANGEBYSCORE")
                .arg(format!("{p}z:ehr"))
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH)
                .query_async(&mut conn)
                .await,
        )?;
        // Local bookkeeping ages out here too.
        let interval = self.limits().touch_interval();
        self.emr_touched
            .retain(|_, t| now.saturating_sub(*t) < interval);
        self.ended
            .retain(|_, (_, at)| now.saturating_sub(*at) < ENDED_MEMORY);
        let keys = |v: Vec<Vec<u8>>| v.iter().filter_map(|k| TokenHash::from_hex(k)).collect();
        Ok(SweepCandidates {
            tickets_dropped: dropped,
            idle_emr: keys(idle),
            expired_ehr: keys(expired),
            // Never made: a link is refused by the script when its EMR session is gone,
            // and ending an EMR session ends its EHR session in the same script.
            orphan_ehr: Vec::new(),
        })
    }

    async fn recheck_live(&self) -> StoreResult<usize> {
        self.recheck_due.store(false, Ordering::Release);
        let held: Vec<(TokenHash, u64)> = self.live.iter().map(|e| (*e.key(), e.gen)).collect();
        if held.is_empty() {
            return Ok(0);
        }
        let mut closed = 0;
        for chunk in held.chunks(1000) {
            let mut pipe = redis::pipe();
            for (emr, _) in chunk {
                pipe.cmd("HGET")
                    .arg(format!("{}h:{}", self.prefix, emr.to_hex()))
                    .arg("gen");
            }
            let mut conn = self.conn()?;
            let gens: Vec<Option<String>> = self
                .checked(pipe.query_async(&mut conn).await)
                .inspect_err(|_| self.recheck_due.store(true, Ordering::Release))?;
            for ((emr, gen), now) in chunk.iter().zip(gens) {
                if now.and_then(|g| g.parse::<u64>().ok()) != Some(*gen) {
                    if let Some((_, h)) = self.live.remove_if(emr, |_, h| h.gen == *gen) {
                        h.close();
                        closed += 1;
                    }
                }
            }
        }
        if closed > 0 {
            info!(
                closed,
                "closed viewer connections of sessions that ended elsewhere"
            );
        }
        Ok(closed)
    }

    async fn counts(&self) -> StoreResult<StoreCounts> {
        let p = &self.prefix;
        let mut conn = self.conn()?;
        let (emr, ehr, tickets): (usize, usize, usize) = self.checked(
            redis::pipe()
                .cmd("ZCARD")
                .arg(format!("{p}z:emr"))
                .cmd("ZCARD")
                .arg(format!("{p}z:ehr"))
                .cmd("ZCARD")
                .arg(format!("{p}z:tk"))
                .query_async(&mut conn)
                .await,
        )?;
        Ok(StoreCounts { emr, ehr, tickets })
    }
}

impl RedisStore {
    /// Whether a subscription was lost since the last re-check (sign-out messages may
    /// have been missed).
    pub fn recheck_due(&self) -> bool {
        self.recheck_due.load(Ordering::Acquire)
    }

    /// How many handles this replica holds (for tests and the admin view).
    pub fn live_handles(&self) -> usize {
        self.live.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &[7u8; 32]).unwrap(),
        ))
    }

    #[test]
    fn sealed_values_open_only_under_their_own_name() {
        let s = sealer();
        let sealed = s.seal("jar:aa", b"JSESSIONID=secret").unwrap();
        assert!(!sealed.windows(b"secret".len()).any(|w| w == b"secret"));
        assert_eq!(s.open("jar:aa", &sealed).unwrap(), b"JSESSIONID=secret");
        assert!(
            s.open("jar:bb", &sealed).is_err(),
            "moved to another record"
        );
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(s.open("jar:aa", &tampered).is_err());
        assert!(s.open("jar:aa", b"short").is_err());
        let other = Sealer(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &[8u8; 32]).unwrap(),
        ));
        assert!(other.open("jar:aa", &sealed).is_err(), "another store_key");
    }

    /// A store that is never connected: the handle bookkeeping needs no server.
    fn store() -> (RedisStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("store.key");
        std::fs::write(&key, [3u8; 32]).unwrap();
        let config = SessionConfig {
            store: crate::config::StoreKind::Redis,
            redis_url: crate::config::RedisUrl::new("redis://127.0.0.1:1/0"),
            store_key: key,
            ..SessionConfig::default()
        };
        let limits = StoreLimits {
            emr_idle: 60_000,
            ehr_idle: 60_000,
            ehr_lifetime: 600_000,
            ticket_ttl: 60_000,
        };
        let (_tx, rx) = watch::channel(false);
        (
            RedisStore::new(&config, limits, Vec::new(), rx).unwrap(),
            dir,
        )
    }

    fn record(emr: TokenHash, gen: u64, created: Millis) -> EhrRecord {
        EhrRecord {
            emr,
            id: TokenHash::of(&format!("id{gen}")),
            gen,
            user: "u".into(),
            authority: Arc::new(Authority {
                id: "a".into(),
                name: "A".into(),
                default: true,
            }),
            created,
            seen: created,
            jar: CookieJar::default(),
            patient: OpenedPatient::default(),
        }
    }

    #[test]
    fn a_sign_out_message_closes_the_handle_it_names_and_no_other() {
        let (s, _dir) = store();
        let emr = TokenHash::of("j");
        let h = s.handle(record(emr, 1, 10));
        assert!(!h.is_closed());
        assert!(
            Arc::ptr_eq(&h, &s.handle(record(emr, 1, 10))),
            "one handle per session"
        );
        s.on_signout(format!("{}:2", emr.to_hex()).as_bytes());
        assert!(!h.is_closed(), "another generation's sign-out");
        s.on_signout(format!("{}:1", emr.to_hex()).as_bytes());
        assert!(h.is_closed());
        assert_eq!(s.live_handles(), 0);
        s.on_signout(b"garbage");
    }

    #[test]
    fn a_read_from_before_a_sign_out_never_registers_an_open_handle() {
        let (s, _dir) = store();
        let emr = TokenHash::of("j");
        // The message arrived before the request that read the record registers it.
        s.on_signout(format!("{}:5", emr.to_hex()).as_bytes());
        let h = s.handle(record(emr, 5, 10));
        assert!(h.is_closed());
        assert_eq!(s.live_handles(), 0);
        // The message handled between the check and the registration: closed after it.
        let h = s.handle(record(emr, 6, 20));
        s.ended.insert(emr, (6, 0));
        s.close_if_ended(&emr, 6);
        assert!(h.is_closed());
        assert_eq!(s.live_handles(), 0);
    }

    #[test]
    fn a_stale_read_does_not_close_the_newer_session() {
        let (s, _dir) = store();
        let emr = TokenHash::of("j");
        let newer = s.handle(record(emr, 2, 200));
        let stale = s.handle(record(emr, 1, 100));
        assert!(stale.is_closed());
        assert!(!newer.is_closed());
        // A newer session replaces an older handle, which ends.
        let newest = s.handle(record(emr, 3, 300));
        assert!(newer.is_closed());
        assert!(!newest.is_closed());
    }

    #[test]
    fn two_seals_of_one_value_differ() {
        let s = sealer();
        assert_ne!(s.seal("a", b"x").unwrap(), s.seal("a", b"x").unwrap());
    }

    #[test]
    fn script_replies_are_read_strictly() {
        assert_eq!(int(&Value::Int(2)), Some(2));
        assert_eq!(int(&Value::BulkString(b"17".to_vec())), Some(17));
        assert_eq!(int(&Value::Nil), None);
        assert!(array(&Value::Nil).is_none());
        assert_eq!(text(&Value::BulkString(b"u".to_vec())), Some("u"));
    }
}
