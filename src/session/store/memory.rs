//! The in-memory store every connection of one ehrgate shares: concurrent maps, no global
//! lock on the request path, no I/O. Its operations are plain methods (the benches and
//! unit tests call them directly); the [`SessionStore`] impl wraps them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use std::collections::HashSet;

use dashmap::DashMap;

use super::{
    EmrSeen, Linked, SessionStore, StoreCounts, StoreError, StoreLimits, StoreResult,
    SweepCandidates, ViewerSession,
};
use crate::session::decide;
use crate::session::token::TokenHashBuilder;
use crate::session::{EhrSession, EmrSession, LaunchTicket, Millis, TokenHash};

type TokenMap<V> = DashMap<TokenHash, V, TokenHashBuilder>;

/// The in-memory store, bounded by `max_sessions`.
pub struct MemoryStore {
    epoch: Instant,
    max_sessions: usize,
    emr: TokenMap<Arc<EmrSession>>,
    emr_count: AtomicUsize,
    markers: TokenMap<TokenHash>,
    by_user: DashMap<Arc<str>, HashSet<TokenHash, TokenHashBuilder>>,
    ehr: TokenMap<Arc<EhrSession>>,
    ehr_by_emr: TokenMap<Arc<EhrSession>>,
    tickets: TokenMap<LaunchTicket>,
}

impl MemoryStore {
    pub fn new(max_sessions: usize) -> Self {
        Self {
            epoch: Instant::now(),
            max_sessions,
            emr: TokenMap::default(),
            emr_count: AtomicUsize::new(0),
            markers: TokenMap::default(),
            by_user: DashMap::new(),
            ehr: TokenMap::default(),
            ehr_by_emr: TokenMap::default(),
            tickets: TokenMap::default(),
        }
    }
}

impl MemoryStore {
    pub fn now(&self) -> Millis {
        self.epoch.elapsed().as_millis() as Millis
    }

    pub fn emr(&self, key: &TokenHash) -> Option<Arc<EmrSession>> {
        let entry = self.emr.get(key)?;
        (entry.key().ct_eq(key) && !entry.is_ended()).then(|| entry.value().clone())
    }

    pub fn insert_emr(&self, session: EmrSession) -> StoreResult<Arc<EmrSession>> {
        use dashmap::mapref::entry::Entry;
        match self.emr.entry(session.key) {
            Entry::Occupied(e) => Ok(e.get().clone()),
            Entry::Vacant(v) => {
                // Reserve a slot first, so concurrent launches cannot overshoot the bound.
                if self.emr_count.fetch_add(1, Ordering::AcqRel) >= self.max_sessions {
                    self.emr_count.fetch_sub(1, Ordering::AcqRel);
                    return Err(StoreError::Full);
                }
                let session = Arc::new(session);
                self.by_user
                    .entry(session.user.clone())
                    .or_default()
                    .insert(session.key);
                v.insert(session.clone());
                Ok(session)
            }
        }
    }

    pub fn remove_emr(&self, key: &TokenHash) -> Option<Arc<EmrSession>> {
        let (_, s) = self.emr.remove(key)?;
        self.emr_count.fetch_sub(1, Ordering::AcqRel);
        for m in s.markers() {
            self.markers.remove(&m);
        }

        self.by_user.remove_if_mut(&*s.user, |_, keys| {
            keys.remove(key);
            keys.is_empty()
        });
        Some(s)
    }

    pub fn add_marker(&self, marker: TokenHash, emr: &Arc<EmrSession>) {
        if let Some(evicted) = emr.add_marker(marker) {
            self.markers.remove(&evicted);
        }
        self.markers.insert(marker, emr.key);
    }

    pub fn emr_by_marker(&self, marker: &TokenHash) -> Option<Arc<EmrSession>> {
        let key = *self.markers.get(marker)?;
        self.emr(&key)
    }

    pub fn emr_keys_of_user(&self, user: &str) -> Vec<TokenHash> {
        self.by_user
            .get(user)
            .map(|k| k.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn ehr(&self, id: &TokenHash) -> Option<Arc<EhrSession>> {
        let entry = self.ehr.get(id)?;
        (entry.key().ct_eq(id) && !entry.is_closed()).then(|| entry.value().clone())
    }

    pub fn ehr_of_emr(&self, emr: &TokenHash) -> Option<Arc<EhrSession>> {
        let s = self.ehr_by_emr.get(emr)?.clone();
        (!s.is_closed()).then_some(s)
    }

    pub fn insert_ehr(&self, session: Arc<EhrSession>) -> Option<Arc<EhrSession>> {
        self.ehr.insert(session.id(), session.clone());
        let replaced = self
            .ehr_by_emr
            .insert(session.emr, session.clone())
            .filter(|old| !Arc::ptr_eq(old, &session));
        if let Some(old) = &replaced {
            self.ehr.remove(&old.id());
        }
        // Ended while being inserted: take it out again.
        if session.is_closed() {
            self.ehr.remove(&session.id());
        }
        replaced
    }

    pub fn rekey_ehr(&self, session: &Arc<EhrSession>, new_id: TokenHash) {
        let old = session.id();
        session.set_id(new_id);
        self.ehr.insert(new_id, session.clone());
        self.ehr.remove(&old);
        if session.is_closed() {
            self.ehr.remove(&new_id);
        }
    }

    pub fn remove_ehr_of_emr(&self, emr: &TokenHash) -> Option<Arc<EhrSession>> {
        let (_, s) = self.ehr_by_emr.remove(emr)?;
        self.ehr.remove(&s.id());
        Some(s)
    }

    pub fn put_ticket(&self, hash: TokenHash, ticket: LaunchTicket) -> StoreResult<()> {
        if self.tickets.len() >= self.max_sessions {
            return Err(StoreError::Full);
        }
        // Bounded per EMR session too: its oldest ticket gives way.
        if let Some(emr) = self.emr(&ticket.emr) {
            if let Some(evicted) = emr.add_ticket(hash) {
                self.tickets.remove(&evicted);
            }
        }
        self.tickets.insert(hash, ticket);
        Ok(())
    }

    pub fn take_ticket(&self, hash: &TokenHash) -> Option<LaunchTicket> {
        self.tickets.remove(hash).map(|(_, t)| t)
    }

    pub fn peek_ticket(&self, hash: &TokenHash) -> Option<LaunchTicket> {
        self.tickets.get(hash).map(|t| t.clone())
    }

    pub fn bind_ticket(
        &self,
        hash: &TokenHash,
        binding: TokenHash,
        nonce: TokenHash,
    ) -> Option<LaunchTicket> {
        let mut t = self.tickets.get_mut(hash)?;
        match t.binding {
            None => {
                t.binding = Some(binding);
                t.confirm_nonce = Some(nonce);
            }
            Some(b) if b.ct_eq(&binding) => {
                t.confirm_nonce = Some(nonce);
                t.redeem_code = None;
            }
            Some(_) => {}
        }
        Some(t.clone())
    }

    pub fn confirm_ticket(&self, hash: &TokenHash, nonce: &TokenHash, code: TokenHash) -> bool {
        let Some(mut t) = self.tickets.get_mut(hash) else {
            return false;
        };
        if !t.confirm_nonce.as_ref().is_some_and(|n| n.ct_eq(nonce)) {
            return false;
        }
        t.confirm_nonce = None;
        t.redeem_code = Some(code);
        true
    }

    pub fn take_confirmed_ticket(
        &self,
        hash: &TokenHash,
        binding: &TokenHash,
        code: &TokenHash,
    ) -> Option<LaunchTicket> {
        self.tickets
            .remove_if(hash, |_, t| {
                t.binding.as_ref().is_some_and(|b| b.ct_eq(binding))
                    && t.redeem_code.as_ref().is_some_and(|c| c.ct_eq(code))
            })
            .map(|(_, t)| t)
    }

    pub fn drop_expired_tickets(&self, now: Millis) -> usize {
        let before = self.tickets.len();
        self.tickets.retain(|_, t| t.expires > now);
        before.saturating_sub(self.tickets.len())
    }

    pub fn emr_where(&self, stale: &dyn Fn(&EmrSession) -> bool) -> Vec<TokenHash> {
        self.emr
            .iter()
            .filter(|e| stale(e.value()))
            .map(|e| *e.key())
            .collect()
    }

    pub fn ehr_where(&self, stale: &dyn Fn(&EhrSession) -> bool) -> Vec<TokenHash> {
        self.ehr_by_emr
            .iter()
            .filter(|e| stale(e.value()))
            .map(|e| *e.key())
            .collect()
    }

    pub fn counts(&self) -> StoreCounts {
        StoreCounts {
            emr: self.emr_count.load(Ordering::Relaxed),
            ehr: self.ehr_by_emr.len(),
            tickets: self.tickets.len(),
        }
    }
}

impl MemoryStore {
    pub fn touch_emr(&self, key: &TokenHash, now: Millis, idle: Millis) -> EmrSeen {
        match self.emr(key) {
            None => EmrSeen::Unknown,
            Some(emr) if decide::emr_idle(&emr, now, idle) => EmrSeen::Idle,
            Some(emr) => {
                emr.touch(now);
                EmrSeen::Live
            }
        }
    }

    #[allow(clippy::type_complexity)]
    pub fn end_emr(&self, key: &TokenHash) -> Option<(Arc<EmrSession>, Option<Arc<EhrSession>>)> {
        let emr = self.remove_emr(key)?;
        if !emr.end() {
            return None;
        }
        Some((emr, self.remove_ehr_of_emr(key)))
    }

    pub fn viewer_session(&self, id: &TokenHash) -> Option<ViewerSession> {
        let ehr = self.ehr(id)?;
        let emr = self.emr(&ehr.emr);
        Some(ViewerSession { ehr, emr })
    }

    pub fn sweep_candidates(&self, now: Millis, l: StoreLimits) -> SweepCandidates {
        SweepCandidates {
            tickets_dropped: self.drop_expired_tickets(now),
            idle_emr: self.emr_where(&|s| decide::emr_idle(s, now, l.emr_idle)),
            expired_ehr: self
                .ehr_where(&|s| decide::ehr_expired(s, now, l.ehr_idle, l.ehr_lifetime).is_some()),
            orphan_ehr: self.ehr_where(&|s| self.emr(&s.emr).is_none()),
        }
    }
}

impl SessionStore for MemoryStore {
    fn now(&self) -> Millis {
        MemoryStore::now(self)
    }
    async fn emr(&self, key: &TokenHash) -> StoreResult<Option<Arc<EmrSession>>> {
        Ok(MemoryStore::emr(self, key))
    }
    async fn insert_emr(&self, session: EmrSession) -> StoreResult<Arc<EmrSession>> {
        MemoryStore::insert_emr(self, session)
    }
    async fn touch_emr(&self, key: &TokenHash, now: Millis, idle: Millis) -> StoreResult<EmrSeen> {
        Ok(MemoryStore::touch_emr(self, key, now, idle))
    }
    async fn end_emr(
        &self,
        key: &TokenHash,
    ) -> StoreResult<Option<(Arc<EmrSession>, Option<Arc<EhrSession>>)>> {
        Ok(MemoryStore::end_emr(self, key))
    }
    async fn add_marker(&self, marker: TokenHash, emr: &Arc<EmrSession>) -> StoreResult<()> {
        MemoryStore::add_marker(self, marker, emr);
        Ok(())
    }
    async fn emr_by_marker(&self, marker: &TokenHash) -> StoreResult<Option<Arc<EmrSession>>> {
        Ok(MemoryStore::emr_by_marker(self, marker))
    }
    async fn emr_keys_of_user(&self, user: &str) -> StoreResult<Vec<TokenHash>> {
        Ok(MemoryStore::emr_keys_of_user(self, user))
    }
    async fn viewer_session(
        &self,
        id: &TokenHash,
        _touch: Option<Millis>,
    ) -> StoreResult<Option<ViewerSession>> {
        // The caller touches the session object itself: it is the store's own.
        Ok(MemoryStore::viewer_session(self, id))
    }
    async fn ehr_of_emr(&self, emr: &TokenHash) -> StoreResult<Option<Arc<EhrSession>>> {
        Ok(MemoryStore::ehr_of_emr(self, emr))
    }
    async fn insert_ehr(&self, session: Arc<EhrSession>) -> StoreResult<Linked> {
        if MemoryStore::emr(self, &session.emr).is_none() {
            return Ok(Linked::EmrGone);
        }
        Ok(match MemoryStore::insert_ehr(self, session) {
            Some(old) => Linked::Replaced(old),
            None => Linked::New,
        })
    }
    async fn rekey_ehr(&self, session: &Arc<EhrSession>, new_id: TokenHash) -> StoreResult<bool> {
        MemoryStore::rekey_ehr(self, session, new_id);
        Ok(!session.is_closed())
    }
    async fn save_ehr(&self, session: &Arc<EhrSession>) -> StoreResult<bool> {
        // The session object is the store's own: nothing to write back.
        Ok(!session.is_closed())
    }
    async fn remove_ehr_of_emr(&self, emr: &TokenHash) -> StoreResult<Option<Arc<EhrSession>>> {
        Ok(MemoryStore::remove_ehr_of_emr(self, emr))
    }
    async fn put_ticket(&self, hash: TokenHash, ticket: LaunchTicket) -> StoreResult<()> {
        MemoryStore::put_ticket(self, hash, ticket)
    }
    async fn take_ticket(&self, hash: &TokenHash) -> StoreResult<Option<LaunchTicket>> {
        Ok(MemoryStore::take_ticket(self, hash))
    }
    async fn peek_ticket(&self, hash: &TokenHash) -> StoreResult<Option<LaunchTicket>> {
        Ok(MemoryStore::peek_ticket(self, hash))
    }
    async fn bind_ticket(
        &self,
        hash: &TokenHash,
        binding: TokenHash,
        nonce: TokenHash,
    ) -> StoreResult<Option<LaunchTicket>> {
        Ok(MemoryStore::bind_ticket(self, hash, binding, nonce))
    }
    async fn confirm_ticket(
        &self,
        hash: &TokenHash,
        nonce: &TokenHash,
        code: TokenHash,
    ) -> StoreResult<bool> {
        Ok(MemoryStore::confirm_ticket(self, hash, nonce, code))
    }
    async fn take_confirmed_ticket(
        &self,
        hash: &TokenHash,
        binding: &TokenHash,
        code: &TokenHash,
    ) -> StoreResult<Option<LaunchTicket>> {
        Ok(MemoryStore::take_confirmed_ticket(
            self, hash, binding, code,
        ))
    }
    async fn sweep_candidates(
        &self,
        now: Millis,
        limits: StoreLimits,
    ) -> StoreResult<SweepCandidates> {
        Ok(MemoryStore::sweep_candidates(self, now, limits))
    }
    async fn recheck_live(&self) -> StoreResult<usize> {
        Ok(0)
    }
    async fn counts(&self) -> StoreResult<StoreCounts> {
        Ok(MemoryStore::counts(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Authority;
    use crate::session::Token;

    fn authority() -> Authority {
        Authority {
            id: "a:1".into(),
            name: "A".into(),
            default: true,
        }
    }

    #[test]
    fn bounded_by_max_sessions() {
        let store = MemoryStore::new(2);
        for i in 0..2 {
            store
                .insert_emr(EmrSession::new(TokenHash::of(&format!("c{i}")), "u", 0))
                .unwrap();
        }
        let full = store.insert_emr(EmrSession::new(TokenHash::of("c3"), "u", 0));
        assert_eq!(full.unwrap_err(), StoreError::Full);
        // A known session is still found, not refused.
        assert!(store
            .insert_emr(EmrSession::new(TokenHash::of("c0"), "u", 0))
            .is_ok());
        store.remove_emr(&TokenHash::of("c0")).unwrap();
        assert!(store
            .insert_emr(EmrSession::new(TokenHash::of("c3"), "u", 0))
            .is_ok());
        assert_eq!(store.counts().emr, 2);
    }

    #[test]
    fn markers_and_user_index_follow_the_emr_session() {
        let store = MemoryStore::new(10);
        let emr = store
            .insert_emr(EmrSession::new(TokenHash::of("j"), "999998", 0))
            .unwrap();
        let marker = Token::generate().unwrap().hash();
        store.add_marker(marker, &emr);
        assert_eq!(&*store.emr_by_marker(&marker).unwrap().user, "999998");
        assert_eq!(store.emr_keys_of_user("999998"), vec![emr.key]);
        store.remove_emr(&emr.key);
        assert!(store.emr_by_marker(&marker).is_none());
        assert!(store.emr_keys_of_user("999998").is_empty());
    }

    #[test]
    fn markers_and_tickets_are_bounded_per_emr_session() {
        let store = MemoryStore::new(1000);
        let emr = store
            .insert_emr(EmrSession::new(TokenHash::of("j"), "999998", 0))
            .unwrap();
        let markers: Vec<TokenHash> = (0..crate::session::MAX_MARKERS_PER_EMR + 2)
            .map(|i| TokenHash::of(&format!("m{i}")))
            .collect();
        for m in &markers {
            store.add_marker(*m, &emr);
        }
        // The evicted ones are gone from the store, not only from the session.
        assert!(store.emr_by_marker(&markers[0]).is_none());
        assert!(store.emr_by_marker(&markers[1]).is_none());
        assert!(store.emr_by_marker(&markers[2]).is_some());
        assert_eq!(store.markers.len(), crate::session::MAX_MARKERS_PER_EMR);

        let tickets: Vec<TokenHash> = (0..crate::session::MAX_TICKETS_PER_EMR + 3)
            .map(|i| TokenHash::of(&format!("t{i}")))
            .collect();
        for t in &tickets {
            store.put_ticket(*t, ticket(emr.key)).unwrap();
        }
        assert_eq!(store.tickets.len(), crate::session::MAX_TICKETS_PER_EMR);
        assert!(store.peek_ticket(&tickets[2]).is_none());
        assert!(store.peek_ticket(&tickets[3]).is_some());
    }

    fn ticket(emr: TokenHash) -> LaunchTicket {
        LaunchTicket {
            emr,
            user: "u".into(),
            authority: Arc::new(authority()),
            patient: crate::session::decide::tests::patient(),
            mrp: true,
            expires: 100,
            binding: None,
            confirm_nonce: None,
            redeem_code: None,
        }
    }

    #[test]
    fn a_ticket_is_redeemed_once_by_its_bound_browser_under_concurrency() {
        let store = Arc::new(MemoryStore::new(10));
        let t = TokenHash::of("t");
        let (mine, nonce, code) = (
            TokenHash::of("binding"),
            TokenHash::of("nonce"),
            TokenHash::of("code"),
        );
        store.put_ticket(t, ticket(TokenHash::of("j"))).unwrap();
        assert_eq!(
            store.bind_ticket(&t, mine, nonce).unwrap().binding,
            Some(mine)
        );
        // A second binding does not replace the first.
        let other = TokenHash::of("other");
        let seen = store.bind_ticket(&t, other, TokenHash::of("n2")).unwrap();
        assert_eq!(seen.binding, Some(mine));
        assert_eq!(seen.confirm_nonce, Some(nonce));
        assert!(
            store.take_confirmed_ticket(&t, &mine, &code).is_none(),
            "not confirmed"
        );
        assert!(!store.confirm_ticket(&t, &TokenHash::of("wrong nonce"), code));
        assert!(store.confirm_ticket(&t, &nonce, code));
        assert!(
            !store.confirm_ticket(&t, &nonce, code),
            "a nonce confirms once"
        );
        assert!(store.take_confirmed_ticket(&t, &other, &code).is_none());
        assert!(store.take_confirmed_ticket(&t, &mine, &nonce).is_none());
        let winners: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let store = store.clone();
                    s.spawn(move || {
                        store.take_confirmed_ticket(&t, &mine, &code).is_some() as usize
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(winners, 1);
    }

    #[test]
    fn rekeyed_ehr_session_answers_only_to_its_new_id() {
        let store = MemoryStore::new(10);
        let emr = TokenHash::of("j");
        let (a, b) = (
            Token::generate().unwrap().hash(),
            Token::generate().unwrap().hash(),
        );
        let s = Arc::new(EhrSession::new(
            emr,
            "u".into(),
            Arc::new(authority()),
            a,
            0,
        ));
        assert!(store.insert_ehr(s.clone()).is_none());
        assert!(store.ehr(&a).is_some());
        store.rekey_ehr(&s, b);
        assert!(store.ehr(&a).is_none());
        assert!(store.ehr(&b).is_some());
        assert!(Arc::ptr_eq(&store.ehr_of_emr(&emr).unwrap(), &s));
    }

    #[test]
    fn a_second_ehr_session_for_one_emr_session_hands_back_the_first() {
        let store = MemoryStore::new(10);
        let emr = TokenHash::of("j");
        let make = |id: &str| {
            Arc::new(EhrSession::new(
                emr,
                "u".into(),
                Arc::new(authority()),
                TokenHash::of(id),
                0,
            ))
        };
        let (first, second) = (make("one"), make("two"));
        assert!(store.insert_ehr(first.clone()).is_none());
        let replaced = store
            .insert_ehr(second.clone())
            .expect("the first comes back");
        assert!(Arc::ptr_eq(&replaced, &first));
        assert!(store.ehr(&TokenHash::of("one")).is_none());
        assert!(store.ehr(&TokenHash::of("two")).is_some());
    }

    #[test]
    fn a_closed_ehr_session_is_never_found() {
        let store = MemoryStore::new(10);
        let emr = TokenHash::of("j");
        let id = TokenHash::of("id");
        let s = Arc::new(EhrSession::new(
            emr,
            "u".into(),
            Arc::new(authority()),
            id,
            0,
        ));
        store.insert_ehr(s.clone());
        assert!(s.close());
        assert!(!s.close(), "effects run once");
        assert!(store.ehr(&id).is_none());
        assert!(store.ehr_of_emr(&emr).is_none());
        // A rekey racing with the close does not bring it back.
        store.rekey_ehr(&s, TokenHash::of("id2"));
        assert!(store.ehr(&TokenHash::of("id2")).is_none());
    }

    #[test]
    fn tickets_are_single_use() {
        let store = MemoryStore::new(10);
        let t = TokenHash::of("t");
        store.put_ticket(t, ticket(TokenHash::of("j"))).unwrap();
        assert!(store.take_ticket(&t).is_some());
        assert!(store.take_ticket(&t).is_none());
    }
}
