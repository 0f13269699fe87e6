//! The sweeper: ends idle and expired sessions with the full sign-out effects, and drops
//! stale tickets. Requests enforce the limits exactly on access; the sweeper makes sure
//! sessions nobody touches still end (and their viewer tabs close).

use std::sync::Arc;
use std::time::Duration;

use tracing::debug;

use crate::gateway::Gateway;
use crate::session::decide::{self, EndReason};

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

pub fn spawn_sweeper(gateway: Arc<Gateway>) {
    let mut shutdown = gateway.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval(&gateway));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::shutdown::signalled(&mut shutdown) => return,
                _ = tick.tick() => sweep(&gateway).await,
            }
        }
    });
}

/// One pass over the store.
async fn sweep(gateway: &Gateway) {
    let store = &gateway.store;
    let l = gateway.limits;
    let now = store.now();
    let tickets = store.drop_expired_tickets(now);
    let idle_emr = store.emr_where(&|s| decide::emr_idle(s, now, l.emr_idle));
    for key in &idle_emr {
        gateway.sign_out_emr(key, EndReason::EmrIdle, None).await;
    }
    let expired =
        store.ehr_where(&|s| decide::ehr_expired(s, now, l.ehr_idle, l.ehr_lifetime).is_some());
    for emr in &expired {
        let reason = store
            .ehr_of_emr(emr)
            .and_then(|s| decide::ehr_expired(&s, now, l.ehr_idle, l.ehr_lifetime))
            .unwrap_or(EndReason::EhrIdle);
        gateway.end_ehr_of(emr, reason, None).await;
    }
    // An EHR session whose EMR session is gone (an enter that raced a sign-out).
    let orphans = store.ehr_where(&|s| store.emr(&s.emr).is_none());
    for emr in &orphans {
        gateway.end_ehr_of(emr, EndReason::EmrGone, None).await;
    }
    if tickets + idle_emr.len() + expired.len() + orphans.len() > 0 {
        debug!(
            tickets,
            emr = idle_emr.len(),
            ehr = expired.len(),
            orphans = orphans.len(),
            "swept"
        );
    }
}
