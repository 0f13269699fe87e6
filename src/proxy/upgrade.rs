//! HTTP/1.1 `Upgrade` (WebSocket) tunnels: once both sides have switched protocols, bytes
//! are copied both ways until either side closes or the tunnel is told to close.

use std::sync::Arc;

use crate::session::CloseSignal;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tracing::{debug, Instrument};

use crate::metrics::Metrics;

/// Spawns the byte pump between a client's and an upstream's upgraded connections.
/// The tunnel ends when either side closes, or at once when `close` resolves (the EHR
/// session ended, or the server is stopping).
pub fn spawn_tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    metrics: Arc<Metrics>,
    close: CloseSignal,
) {
    let task = async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        metrics.tunnel_opened();
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        let outcome = {
            let pump = tokio::io::copy_bidirectional(&mut client, &mut upstream);
            tokio::select! {
                r = pump => Some(r),
                _ = close => None,
            }
        };
        match outcome {
            Some(Ok((up, down))) => debug!(up, down, "tunnel closed"),
            Some(Err(e)) => debug!(error = %e, "tunnel broke"),
            None => {
                // Told to close: end both sides cleanly so each peer sees the close now.
                let _ = tokio::join!(client.shutdown(), upstream.shutdown());
                debug!("tunnel closed by ehrgate");
            }
        }
        metrics.tunnel_closed();
    };
    tokio::spawn(task.in_current_span());
}
