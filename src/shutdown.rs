//! Shutdown signalling: one `watch` channel turned `true` when ehrgate begins to stop.
//! A leaf every layer may wait on (listeners, the sweeper, event streams, tunnels).

use tokio::sync::watch;

/// Resolves once shutdown has been signalled (or its sender is gone).
pub async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
