//! The session store: one trait that both back-ends implement, so the gateway's flows
//! are the same whichever holds the sessions.
//!
//! - [`MemoryStore`]: one ehrgate; concurrent maps, no global lock, no I/O.
//! - [`RedisStore`]: several replicas share one Redis/Valkey (DESIGN §9); the store is
//!   the only source of truth, and each replica keeps only *live handles* (event
//!   streams, tunnels, streaming responses) that a sign-out anywhere closes.
//!
//! Every operation that may cross the network is async and fallible: a store that
//! cannot answer is [`StoreError::Unavailable`], and the gateway fails closed on it.
//! Operations that change several things at once (ending an EMR session with its
//! markers, index and EHR session; taking a ticket) are atomic in both back-ends.

mod memory;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

pub use memory::MemoryStore;
pub use redis::RedisStore;

use super::{EhrSession, EmrSession, LaunchTicket, Millis, TokenHash};

/// Why the store could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// At `max_sessions`: a new session or ticket is refused.
    #[error("the session store is full")]
    Full,
    /// The shared store did not answer (Redis down, timed out, refused).
    #[error("the session store is unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Sizes, for metrics and the admin view.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub emr: usize,
    pub ehr: usize,
    pub tickets: usize,
}

/// What an EMR request found of its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmrSeen {
    /// ehrgate knows no such EMR session (no launch yet, or it ended).
    Unknown,
    /// Live; its `last_seen` is now (within the store's write interval).
    Live,
    /// Unseen past `emr.idle_timeout`: the caller signs it out.
    Idle,
}

/// An EHR session as a viewer request finds it, with its EMR session (fetched together:
/// one round trip in Redis).
#[derive(Debug, Clone)]
pub struct ViewerSession {
    pub ehr: Arc<EhrSession>,
    /// `None` when the EMR session is gone (the EHR session is then an orphan to end).
    pub emr: Option<Arc<EmrSession>>,
}

/// The outcome of linking a new EHR session to its EMR session.
#[derive(Debug)]
pub enum Linked {
    /// Linked; no other EHR session was.
    New,
    /// Linked; a concurrent enter had linked this one, which the caller ends.
    Replaced(Arc<EhrSession>),
    /// Not linked: the EMR session ended meanwhile.
    EmrGone,
}

/// Limits the store needs to keep its records (TTLs, write intervals), in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct StoreLimits {
    pub emr_idle: Millis,
    pub ehr_idle: Millis,
    pub ehr_lifetime: Millis,
    pub ticket_ttl: Millis,
}

impl StoreLimits {
    /// How often `last_seen` is written back at most: 30 s, or a tenth of the shortest
    /// idle limit when that is shorter (so a short limit is still enforced closely).
    pub fn touch_interval(&self) -> Millis {
        (self.emr_idle.min(self.ehr_idle) / 10).min(30_000)
    }
}

/// The operations the gateway's flows need. Implemented by both back-ends, and by
/// [`Sessions`], which the gateway holds.
pub trait SessionStore: Send + Sync + 'static {
    /// The store's clock (shared by every replica in Redis: Unix milliseconds).
    fn now(&self) -> Millis;

    fn emr(
        &self,
        key: &TokenHash,
    ) -> impl Future<Output = StoreResult<Option<Arc<EmrSession>>>> + Send;
    /// Registers an EMR session; the existing one is returned if `key` is known.
    fn insert_emr(
        &self,
        session: EmrSession,
    ) -> impl Future<Output = StoreResult<Arc<EmrSession>>> + Send;
    /// An EMR request carrying the session's cookie: refreshes `last_seen` unless the
    /// session is idle past `idle`.
    fn touch_emr(
        &self,
        key: &TokenHash,
        now: Millis,
        idle: Millis,
    ) -> impl Future<Output = StoreResult<EmrSeen>> + Send;
    /// Ends an EMR session: it, its markers, its place in the user index and its EHR
    /// session leave the store together. `None` if there was none (so effects run once).
    #[allow(clippy::type_complexity)]
    fn end_emr(
        &self,
        key: &TokenHash,
    ) -> impl Future<Output = StoreResult<Option<(Arc<EmrSession>, Option<Arc<EhrSession>>)>>> + Send;
    fn add_marker(
        &self,
        marker: TokenHash,
        emr: &Arc<EmrSession>,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    fn emr_by_marker(
        &self,
        marker: &TokenHash,
    ) -> impl Future<Output = StoreResult<Option<Arc<EmrSession>>>> + Send;
    fn emr_keys_of_user(
        &self,
        user: &str,
    ) -> impl Future<Output = StoreResult<Vec<TokenHash>>> + Send;

    /// The EHR session `id` names, with its EMR session. With `touch`, a live session's
    /// `last_seen` is refreshed in the store (the caller still decides its limits on the
    /// values as they were).
    fn viewer_session(
        &self,
        id: &TokenHash,
        touch: Option<Millis>,
    ) -> impl Future<Output = StoreResult<Option<ViewerSession>>> + Send;
    fn ehr_of_emr(
        &self,
        emr: &TokenHash,
    ) -> impl Future<Output = StoreResult<Option<Arc<EhrSession>>>> + Send;
    /// Links a new EHR session to its EMR session.
    fn insert_ehr(
        &self,
        session: Arc<EhrSession>,
    ) -> impl Future<Output = StoreResult<Linked>> + Send;
    /// Gives an EHR session a new id; the old one stops working at once. False if the
    /// session is no longer the one linked.
    fn rekey_ehr(
        &self,
        session: &Arc<EhrSession>,
        new_id: TokenHash,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Writes back what a request changed in an EHR session (its cookie jar, the patient
    /// opened). Never brings back a session that ended: false if it had.
    fn save_ehr(&self, session: &Arc<EhrSession>)
        -> impl Future<Output = StoreResult<bool>> + Send;
    /// Unlinks and removes the EHR session of an EMR session (once: a concurrent call
    /// gets `None`).
    fn remove_ehr_of_emr(
        &self,
        emr: &TokenHash,
    ) -> impl Future<Output = StoreResult<Option<Arc<EhrSession>>>> + Send;

    fn put_ticket(
        &self,
        hash: TokenHash,
        ticket: LaunchTicket,
    ) -> impl Future<Output = StoreResult<()>> + Send;
    /// Takes a ticket out (single use), whatever its age; the caller checks expiry.
    fn take_ticket(
        &self,
        hash: &TokenHash,
    ) -> impl Future<Output = StoreResult<Option<LaunchTicket>>> + Send;
    /// A copy of a ticket, left in place.
    fn peek_ticket(
        &self,
        hash: &TokenHash,
    ) -> impl Future<Output = StoreResult<Option<LaunchTicket>>> + Send;
    /// Binds an unbound ticket to a browser's binding with a fresh confirm nonce, or gives
    /// the browser it is already bound to a fresh nonce (any code issued is void); returns
    /// the ticket as it now is (bound to `binding`, or to the browser that was first).
    fn bind_ticket(
        &self,
        hash: &TokenHash,
        binding: TokenHash,
        nonce: TokenHash,
    ) -> impl Future<Output = StoreResult<Option<LaunchTicket>>> + Send;
    /// Spends the ticket's confirm nonce, if it is `nonce`, and records the redeem code;
    /// returns whether it did (atomic: a nonce confirms once).
    fn confirm_ticket(
        &self,
        hash: &TokenHash,
        nonce: &TokenHash,
        code: TokenHash,
    ) -> impl Future<Output = StoreResult<bool>> + Send;
    /// Takes a ticket out only if it is bound to `binding` and confirmed with `code`
    /// (atomic: two redemptions at once, on any replicas, exactly one wins).
    fn take_confirmed_ticket(
        &self,
        hash: &TokenHash,
        binding: &TokenHash,
        code: &TokenHash,
    ) -> impl Future<Output = StoreResult<Option<LaunchTicket>>> + Send;

    /// Housekeeping for the sweeper: drops expired tickets (Redis: TTLs do it), and lists
    /// EMR sessions idle past `limits.emr_idle`, EHR sessions past their own limits and
    /// EHR sessions whose EMR session is gone. Bounded work: Redis answers from its
    /// expiry indexes, never by scanning keys.
    fn sweep_candidates(
        &self,
        now: Millis,
        limits: StoreLimits,
    ) -> impl Future<Output = StoreResult<SweepCandidates>> + Send;

    /// Closes the live handles of this replica whose sessions the store no longer holds
    /// (a sign-out message missed while disconnected). Memory: nothing to do.
    fn recheck_live(&self) -> impl Future<Output = StoreResult<usize>> + Send;

    fn counts(&self) -> impl Future<Output = StoreResult<StoreCounts>> + Send;
}

/// What one sweep found.
#[derive(Debug, Default)]
pub struct SweepCandidates {
    pub tickets_dropped: usize,
    pub idle_emr: Vec<TokenHash>,
    pub expired_ehr: Vec<TokenHash>,
    pub orphan_ehr: Vec<TokenHash>,
}

/// The store the gateway holds: one of the back-ends, chosen by `session.store`.
/// (An enum, not a trait object: the in-memory path stays free of boxing.)
pub enum Sessions {
    Memory(MemoryStore),
    Redis(Box<RedisStore>),
}

impl Sessions {
    pub fn is_shared(&self) -> bool {
        matches!(self, Sessions::Redis(_))
    }

    /// The shared store's health, for `/readyz`: `None` when it is fine.
    pub fn unhealthy(&self) -> Option<String> {
        match self {
            Sessions::Memory(_) => None,
            Sessions::Redis(r) => r.unhealthy(),
        }
    }

    /// New limits after a reload (the memory store reads them from the gateway).
    pub fn set_limits(&self, limits: StoreLimits) {
        if let Sessions::Redis(r) = self {
            r.set_limits(limits);
        }
    }

    /// Store errors seen so far (a metric).
    pub fn errors(&self) -> u64 {
        match self {
            Sessions::Memory(_) => 0,
            Sessions::Redis(r) => r.errors(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Sessions::Memory($s) => $e.await,
            Sessions::Redis(boxed) => {
                let $s: &RedisStore = boxed;
                $e.await
            }
        }
    };
}

impl SessionStore for Sessions {
    fn now(&self) -> Millis {
        match self {
            Sessions::Memory(s) => SessionStore::now(s),
            Sessions::Redis(s) => SessionStore::now(&**s),
        }
    }
    async fn emr(&self, key: &TokenHash) -> StoreResult<Option<Arc<EmrSession>>> {
        delegate!(self, s => SessionStore::emr(s, key))
    }
    async fn insert_emr(&self, session: EmrSession) -> StoreResult<Arc<EmrSession>> {
        delegate!(self, s => SessionStore::insert_emr(s, session))
    }
    async fn touch_emr(&self, key: &TokenHash, now: Millis, idle: Millis) -> StoreResult<EmrSeen> {
        delegate!(self, s => SessionStore::touch_emr(s, key, now, idle))
    }
    async fn end_emr(
        &self,
        key: &TokenHash,
    ) -> StoreResult<Option<(Arc<EmrSession>, Option<Arc<EhrSession>>)>> {
        delegate!(self, s => SessionStore::end_emr(s, key))
    }
    async fn add_marker(&self, marker: TokenHash, emr: &Arc<EmrSession>) -> StoreResult<()> {
        delegate!(self, s => SessionStore::add_marker(s, marker, emr))
    }
    async fn emr_by_marker(&self, marker: &TokenHash) -> StoreResult<Option<Arc<EmrSession>>> {
        delegate!(self, s => SessionStore::emr_by_marker(s, marker))
    }
    async fn emr_keys_of_user(&self, user: &str) -> StoreResult<Vec<TokenHash>> {
        delegate!(self, s => SessionStore::emr_keys_of_user(s, user))
    }
    async fn viewer_session(
        &self,
        id: &TokenHash,
        touch: Option<Millis>,
    ) -> StoreResult<Option<ViewerSession>> {
        delegate!(self, s => SessionStore::viewer_session(s, id, touch))
    }
    async fn ehr_of_emr(&self, emr: &TokenHash) -> StoreResult<Option<Arc<EhrSession>>> {
        delegate!(self, s => SessionStore::ehr_of_emr(s, emr))
    }
    async fn insert_ehr(&self, session: Arc<EhrSession>) -> StoreResult<Linked> {
        delegate!(self, s => SessionStore::insert_ehr(s, session))
    }
    async fn rekey_ehr(&self, session: &Arc<EhrSession>, new_id: TokenHash) -> StoreResult<bool> {
        delegate!(self, s => SessionStore::rekey_ehr(s, session, new_id))
    }
    async fn save_ehr(&self, session: &Arc<EhrSession>) -> StoreResult<bool> {
        delegate!(self, s => SessionStore::save_ehr(s, session))
    }
    async fn remove_ehr_of_emr(&self, emr: &TokenHash) -> StoreResult<Option<Arc<EhrSession>>> {
        delegate!(self, s => SessionStore::remove_ehr_of_emr(s, emr))
    }
    async fn put_ticket(&self, hash: TokenHash, ticket: LaunchTicket) -> StoreResult<()> {
        delegate!(self, s => SessionStore::put_ticket(s, hash, ticket))
    }
    async fn take_ticket(&self, hash: &TokenHash) -> StoreResult<Option<LaunchTicket>> {
        delegate!(self, s => SessionStore::take_ticket(s, hash))
    }
    async fn peek_ticket(&self, hash: &TokenHash) -> StoreResult<Option<LaunchTicket>> {
        delegate!(self, s => SessionStore::peek_ticket(s, hash))
    }
    async fn bind_ticket(
        &self,
        hash: &TokenHash,
        binding: TokenHash,
        nonce: TokenHash,
    ) -> StoreResult<Option<LaunchTicket>> {
        delegate!(self, s => SessionStore::bind_ticket(s, hash, binding, nonce))
    }
    async fn confirm_ticket(
        &self,
        hash: &TokenHash,
        nonce: &TokenHash,
        code: TokenHash,
    ) -> StoreResult<bool> {
        delegate!(self, s => SessionStore::confirm_ticket(s, hash, nonce, code))
    }
    async fn take_confirmed_ticket(
        &self,
        hash: &TokenHash,
        binding: &TokenHash,
        code: &TokenHash,
    ) -> StoreResult<Option<LaunchTicket>> {
        delegate!(self, s => SessionStore::take_confirmed_ticket(s, hash, binding, code))
    }
    async fn sweep_candidates(
        &self,
        now: Millis,
        limits: StoreLimits,
    ) -> StoreResult<SweepCandidates> {
        delegate!(self, s => SessionStore::sweep_candidates(s, now, limits))
    }
    async fn recheck_live(&self) -> StoreResult<usize> {
        delegate!(self, s => SessionStore::recheck_live(s))
    }
    async fn counts(&self) -> StoreResult<StoreCounts> {
        delegate!(self, s => SessionStore::counts(s))
    }
}
