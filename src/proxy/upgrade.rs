//! HTTP/1.1 `Upgrade` (WebSocket) tunnels: once both sides have switched protocols, bytes
//! are copied both ways until either side closes or the tunnel is told to close.

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{debug, Instrument};

use crate::metrics::Metrics;

/// Spawns the byte pump between a client's and an upstream's upgraded connections.
/// `close`, when given, ends the tunnel as soon as it turns `true` (or its sender goes).
pub fn spawn_tunnel(
    client: OnUpgrade,
    upstream: OnUpgrade,
    metrics: Arc<Metrics>,
    close: Option<watch::Receiver<bool>>,
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
            match close {
                Some(mut close) => tokio::select! {
                    r = pump => Some(r),
                    _ = crate::server::signalled(&mut close) => None,
                },
                None => Some(pump.await),
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
