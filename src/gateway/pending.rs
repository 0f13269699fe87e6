//! Sign-outs a shared-store outage held back. A logout the store could not record is
//! kept here and retried, and a viewer request of a session named here is refused and
//! the sign-out done first: a logout seen while Redis was down is never forgotten.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::session::decide::EndReason;
use crate::session::TokenHash;

/// At most this many are kept (a long outage with many logouts): beyond it the oldest
/// reasons are not kept, but the idle limits still end those sessions.
const MAX_PENDING: usize = 100_000;

#[derive(Default)]
pub(crate) struct PendingSignOuts {
    /// Anything held: a lock-free answer for the request path, where it is almost
    /// always false.
    any: AtomicBool,
    /// EMR session key → (whole EMR session, or its EHR side only; why).
    held: Mutex<HashMap<TokenHash, (bool, EndReason)>>,
}

impl PendingSignOuts {
    pub(crate) fn remember(&self, key: TokenHash, emr_side: bool, reason: EndReason) {
        let mut held = self.held.lock().expect("pending lock");
        if held.len() >= MAX_PENDING && !held.contains_key(&key) {
            return;
        }
        let entry = held.entry(key).or_insert((emr_side, reason));
        // An EMR sign-out covers its EHR side too.
        entry.0 |= emr_side;
        self.any.store(true, Ordering::Release);
    }

    /// Whether a sign-out of this EMR session (or its EHR side) is held back.
    pub(crate) fn holds(&self, key: &TokenHash) -> Option<(bool, EndReason)> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.held.lock().expect("pending lock").get(key).copied()
    }

    pub(crate) fn forget(&self, key: &TokenHash) {
        if self.any.load(Ordering::Acquire) {
            let mut held = self.held.lock().expect("pending lock");
            held.remove(key);
            self.any.store(!held.is_empty(), Ordering::Release);
        }
    }

    /// Forgets a held EHR-side sign-out (done); a held EMR sign-out stays.
    pub(crate) fn forget_ehr(&self, key: &TokenHash) {
        if self.any.load(Ordering::Acquire) {
            let mut held = self.held.lock().expect("pending lock");
            if held.get(key).is_some_and(|(emr_side, _)| !emr_side) {
                held.remove(key);
            }
            self.any.store(!held.is_empty(), Ordering::Release);
        }
    }

    pub(crate) fn all(&self) -> Vec<(TokenHash, bool, EndReason)> {
        if !self.any.load(Ordering::Acquire) {
            return Vec::new();
        }
        let held = self.held.lock().expect("pending lock");
        held.iter().map(|(k, (e, r))| (*k, *e, *r)).collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.held.lock().expect("pending lock").len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emr_sign_out_covers_its_ehr_side_and_is_kept_until_done() {
        let p = PendingSignOuts::default();
        let k = TokenHash::of("j");
        assert!(p.holds(&k).is_none());
        p.remember(k, false, EndReason::Disconnect);
        p.remember(k, true, EndReason::EmrLogoutPath);
        assert_eq!(p.holds(&k).map(|(e, _)| e), Some(true));
        p.forget_ehr(&k);
        assert!(p.holds(&k).is_some(), "the EMR sign-out is still owed");
        p.forget(&k);
        assert!(p.holds(&k).is_none());
        assert_eq!(p.len(), 0);
    }
}
