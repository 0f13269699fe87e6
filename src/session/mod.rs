//! Session lifecycle state (DESIGN §5): EMR sessions, the EHR session linked to each,
//! launch tickets, and the decisions over them.
//!
//! Owns what a session is and when it may live; holds no sockets and calls no upstream.
//! The gateway's flows carry bytes and call these; nothing here knows of them. Nothing
//! here is ever logged with a secret: tokens appear only as [`TokenHash`] labels.

pub mod decide;
pub mod jar;
pub mod store;
pub mod token;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::config::Authority;
pub use jar::CookieJar;
pub use store::{
    EmrSeen, Linked, MemoryStore, RedisStore, SessionStore, Sessions, StoreCounts, StoreError,
    StoreLimits, StoreResult, ViewerSession,
};
pub use token::{Token, TokenHash};

/// Milliseconds on the store's clock (since the store was made).
pub type Millis = u64;

/// The patient a launch is for, as the EMR described them. Its `Debug` shows only the
/// demographic number: never the HCN, name or birth date.
#[derive(Clone, PartialEq, Eq)]
pub struct PatientContext {
    pub demographic_no: String,
    pub hcn: String,
    pub hcn_version: String,
    /// `YYYY-MM-DD`.
    pub birth_date: String,
    pub gender: String,
    pub family: String,
    pub given: String,
    /// The EMR provider number of the patient's most responsible provider.
    pub mrp_provider: String,
}

impl fmt::Debug for PatientContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PatientContext")
            .field("demographic_no", &self.demographic_no)
            .finish_non_exhaustive()
    }
}

/// An EMR login that ehrgate has seen confirmed by the EMR's whoami.
#[derive(Debug)]
pub struct EmrSession {
    /// Hash of the EMR session cookie's value.
    pub key: TokenHash,
    /// The EMR user (provider number), shared with the session's EHR session.
    pub user: Arc<str>,
    pub created: Millis,
    last_seen: AtomicU64,
    ended: AtomicBool,
    /// Hashes of the `__Host-ehrgate-emr` markers issued for this session, and of its
    /// most recent launch tickets: a few each, bounded.
    links: Mutex<Links>,
}

#[derive(Debug, Default)]
struct Links {
    markers: Vec<TokenHash>,
    tickets: Vec<TokenHash>,
}

/// Markers one EMR session keeps (one per browser it launched from).
pub const MAX_MARKERS_PER_EMR: usize = 16;
/// Launch tickets one EMR session may hold at once; a newer one evicts the oldest.
pub const MAX_TICKETS_PER_EMR: usize = 8;

/// Adds `item` to a bounded list; returns the item it evicted, if any.
fn push_bounded(list: &mut Vec<TokenHash>, item: TokenHash, max: usize) -> Option<TokenHash> {
    let evicted = (list.len() >= max).then(|| list.remove(0));
    // Usually one: no room kept for more.
    list.reserve_exact(1);
    list.push(item);
    evicted
}

impl EmrSession {
    pub fn new(key: TokenHash, user: impl Into<Arc<str>>, now: Millis) -> Self {
        Self {
            key,
            user: user.into(),
            created: now,
            last_seen: AtomicU64::new(now),
            ended: AtomicBool::new(false),
            links: Mutex::new(Links::default()),
        }
    }

    pub fn last_seen(&self) -> Millis {
        self.last_seen.load(Ordering::Relaxed)
    }

    pub fn touch(&self, now: Millis) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
    }

    pub fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Marks the session over; returns false if it already was (so effects run once).
    pub fn end(&self) -> bool {
        !self.ended.swap(true, Ordering::AcqRel)
    }

    fn markers(&self) -> Vec<TokenHash> {
        self.links
            .lock()
            .map(|l| l.markers.clone())
            .unwrap_or_default()
    }

    /// Remembers a marker; returns the one it evicted, which the store must forget too.
    fn add_marker(&self, marker: TokenHash) -> Option<TokenHash> {
        let mut l = self.links.lock().ok()?;
        push_bounded(&mut l.markers, marker, MAX_MARKERS_PER_EMR)
    }

    /// Remembers a ticket; returns the one it evicted, which the store must drop.
    fn add_ticket(&self, ticket: TokenHash) -> Option<TokenHash> {
        let mut l = self.links.lock().ok()?;
        push_bounded(&mut l.tickets, ticket, MAX_TICKETS_PER_EMR)
    }
}

/// What ehrgate remembers of the patient last opened in an EHR session, for the audit
/// of an override: never the HCN itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OpenedPatient {
    pub demographic_no: u64,
    /// The audit log's HMAC tag of the HCN (written as hex).
    pub hcn_hmac: Option<[u8; 32]>,
}

/// Resolves when the session it was made from ends.
pub type CloseSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A viewer session, linked to exactly one EMR session.
pub struct EhrSession {
    /// The owning EMR session.
    pub emr: TokenHash,
    pub user: Arc<str>,
    /// Shared with the configuration: one copy for all sessions.
    pub authority: Arc<Authority>,
    pub created: Millis,
    /// Tells this session from a later one of the same EMR session: a sign-out message
    /// from another replica closes only the session it names.
    pub gen: u64,
    last_seen: AtomicU64,
    /// Hash of the current `__Host-ehrgate` value (rotated at every enter).
    id: Mutex<TokenHash>,
    pub jar: Mutex<CookieJar>,
    pub patient: Mutex<OpenedPatient>,
    /// Set when the session ends; `ended` wakes event streams and tunnels waiting on it.
    /// (A `Notify` and a flag: a tenth of the memory of a `watch` channel.)
    closed: AtomicBool,
    ended: Notify,
    /// Open event streams (`/.ehrgate/events`), capped per session.
    streams: std::sync::atomic::AtomicU32,
}

/// An open event stream of a session; the count drops when it is dropped.
pub struct StreamSlot(Arc<EhrSession>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl fmt::Debug for EhrSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EhrSession")
            .field("emr", &self.emr)
            .field("user", &self.user)
            .field("authority", &self.authority.id)
            .finish_non_exhaustive()
    }
}

impl EhrSession {
    pub fn new(
        emr: TokenHash,
        user: Arc<str>,
        authority: Arc<Authority>,
        id: TokenHash,
        now: Millis,
    ) -> Self {
        let mut gen = [0u8; 8];
        // A failed RNG leaves 0: generations then tell sessions apart only by `created`.
        let _ = aws_lc_rs::rand::fill(&mut gen);
        Self::restore(emr, user, authority, id, now, now, u64::from_le_bytes(gen))
    }

    /// A session as a shared store describes it.
    pub fn restore(
        emr: TokenHash,
        user: Arc<str>,
        authority: Arc<Authority>,
        id: TokenHash,
        created: Millis,
        last_seen: Millis,
        gen: u64,
    ) -> Self {
        Self {
            emr,
            user,
            authority,
            created,
            gen,
            last_seen: AtomicU64::new(last_seen),
            id: Mutex::new(id),
            jar: Mutex::new(CookieJar::default()),
            patient: Mutex::new(OpenedPatient::default()),
            closed: AtomicBool::new(false),
            ended: Notify::new(),
            streams: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// A slot for one more event stream, unless `max` are open.
    pub fn open_stream(self: &Arc<Self>, max: u32) -> Option<StreamSlot> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.clone()))
    }

    pub fn id(&self) -> TokenHash {
        *self.id.lock().expect("id lock")
    }

    pub(crate) fn set_id(&self, id: TokenHash) {
        *self.id.lock().expect("id lock") = id;
    }

    pub fn last_seen(&self) -> Millis {
        self.last_seen.load(Ordering::Relaxed)
    }

    pub fn touch(&self, now: Millis) {
        self.last_seen.fetch_max(now, Ordering::Relaxed);
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Marks the session over and wakes its watchers; returns false if it already was.
    pub fn close(&self) -> bool {
        let first = !self.closed.swap(true, Ordering::AcqRel);
        if first {
            self.ended.notify_waiters();
        }
        first
    }

    /// Resolves once the session has ended (at once if it already has).
    pub async fn wait_closed(&self) {
        loop {
            let notified = self.ended.notified();
            tokio::pin!(notified);
            // Registered before the flag is read: a close in between still wakes us.
            notified.as_mut().enable();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// An owned signal for a task that must stop when the session ends.
    pub fn close_signal(self: &Arc<Self>) -> CloseSignal {
        let session = self.clone();
        Box::pin(async move { session.wait_closed().await })
    }
}

/// A single-use launch ticket, bound to its EMR session, patient and authority, and on
/// its first visit to enter to one browser (DESIGN §6).
#[derive(Debug, Clone)]
pub struct LaunchTicket {
    pub emr: TokenHash,
    pub user: Arc<str>,
    pub authority: Arc<Authority>,
    pub patient: PatientContext,
    pub mrp: bool,
    pub expires: Millis,
    /// Hash of the binding cookie of the browser that first visited enter with it.
    pub binding: Option<TokenHash>,
    /// Hash of the nonce sent only to that browser, in its redirect to confirm: confirm
    /// is accepted only from the browser that holds the binding.
    pub confirm_nonce: Option<TokenHash>,
    /// Hash of the code confirm sent only to the confirming browser, in its redirect back
    /// to enter: the ticket is redeemed only with the binding and this code together.
    pub redeem_code: Option<TokenHash>,
}
