//! The sweeper: ends idle and expired sessions with the full sign-out effects, and drops
//! stale tickets. Requests enforce the limits exactly on access; the sweeper makes sure
//! sessions nobody touches still end (and their viewer tabs close).

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use crate::gateway::{Current, Gateway};
use crate::session::decide::{self, EndReason};
use crate::session::{SessionStore, Sessions};

/// Sweeps at a quarter of the shortest limit, between 100 ms and 30 s.
pub fn interval(gateway: &Gateway) -> Duration {
    let l = &gateway.limits;
    let shortest = l
        .emr_idle
        .min(l.ehr_idle)
        .min(l.ehr_lifetime)
        .min(l.ticket_ttl);
    Duration::from_millis(shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

/// Sweeps with the gateway in force at each pass (its limits follow a reload).
pub fn spawn_sweeper(current: Arc<Current>) {
    let first = current.get();
    let mut shutdown = first.shutdown.clone();
    let store = first.store.clone();
    drop(first);
    tokio::spawn(async move {
        loop {
            // The pause follows the limits in force (a reload may shorten them).
            let pause = interval(&current.get());
            tokio::select! {
                _ = crate::shutdown::signalled(&mut shutdown) => return,
                _ = tokio::time::sleep(pause) => sweep(&current.get()).await,
                // Sign-outs held back by an outage land the moment the store is back.
                _ = reachable_again(&store) => sweep(&current.get()).await,
            }
        }
    });
}

async fn reachable_again(store: &Sessions) {
    match store {
        Sessions::Redis(r) => r.reachable_again().await,
        Sessions::Memory(_) => std::future::pending().await,
    }
}

/// One pass: sign-outs held back by a store outage first, then what the store lists as
/// idle, expired or orphaned, then this replica's live handles checked against the store.
async fn sweep(gateway: &Gateway) {
    let pending = gateway.retry_pending().await;
    let store = &gateway.store;
    let l = gateway.limits;
    let now = store.now();
    let found = match store.sweep_candidates(now, l.store()).await {
        Ok(found) => found,
        Err(e) => {
            gateway.store_failed(&e);
            return;
        }
    };
    for key in &found.idle_emr {
        gateway.sign_out_emr(key, EndReason::EmrIdle, None).await;
    }
    for emr in &found.expired_ehr {
        let reason = match store.ehr_of_emr(emr).await {
            Ok(Some(s)) => decide::ehr_expired(&s, now, l.ehr_idle, l.ehr_lifetime),
            _ => None,
        }
        .unwrap_or(EndReason::EhrIdle);
        gateway.end_ehr_of(emr, reason, None).await;
    }
    // An EHR session whose EMR session is gone (an enter that raced a sign-out).
    for emr in &found.orphan_ehr {
        gateway.end_ehr_of(emr, EndReason::EmrGone, None).await;
    }
    // Every sweep, not only after a lost subscription: a subscription can also die
    // silently (a half-open connection), and a session can end without a message (its
    // record expired). One pipelined look-up per thousand handles.
    let rechecked = match store.recheck_live().await {
        Ok(n) => n,
        Err(e) => {
            gateway.store_failed(&e);
            0
        }
    };
    let n = found.tickets_dropped
        + found.idle_emr.len()
        + found.expired_ehr.len()
        + found.orphan_ehr.len()
        + rechecked;
    if n > 0 || pending > 0 {
        debug!(
            tickets = found.tickets_dropped,
            emr = found.idle_emr.len(),
            ehr = found.expired_ehr.len(),
            orphans = found.orphan_ehr.len(),
            rechecked,
            pending,
            "swept"
        );
    }
}
