//! The proxy listener clinicians' browsers reach: binding (one socket per worker with
//! `SO_REUSEPORT`), accepting within the connection limit, the TLS handshake, HTTP/1.1
//! or HTTP/2 by ALPN with the connection limits, and graceful drain. It calls the
//! [`Handler`] it is given for every request and knows nothing above it: what a request
//! means is the application's business.

mod conn;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::body::Body;
use crate::config::{ConfigError, ServerConfig};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use conn::ConnGuards;
pub use conn::ConnLimits;
use http::HeaderValue;

/// What the server knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's address as `X-Forwarded-For` carries it, written once per connection
    /// rather than once per request.
    pub peer_ip: HeaderValue,
    /// The TLS SNI, lowercase; `None` when the client sent none (e.g. connected by IP).
    pub sni: Option<Box<str>>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, sni: Option<Box<str>>) -> Self {
        // An address's text is digits, dots, colons and hex letters: always a valid
        // header value.
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self { peer, peer_ip, sni }
    }
}

/// What answers requests: given the connection's facts and the request, a response.
/// It never fails: every problem is already a response.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        conn: Arc<ConnInfo>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send + 'static;
}

/// Why ehrgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Whether the proxy is taking new work; `/readyz` reports it.
#[derive(Debug, Default)]
pub struct Health {
    ready: AtomicBool,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// The bound proxy listener, one socket per worker, not yet accepting.
pub struct Listening {
    pub addr: SocketAddr,
    listeners: Vec<TcpListener>,
}

/// Binds `server.listen` for every worker.
pub fn bind(server: &ServerConfig) -> Result<Listening, StartError> {
    let workers = worker_count(server.workers);
    let bind_error = |source| StartError::Bind {
        what: "server.listen",
        addr: server.listen,
        source,
    };
    // With several workers, each accepts on its own SO_REUSEPORT socket (as nginx
    // workers do) and the kernel spreads connections between them.
    let first = bind_listener(server.listen, workers > 1).map_err(bind_error)?;
    let addr = first.local_addr().map_err(bind_error)?;
    let mut listeners = vec![first];
    for _ in 1..workers {
        listeners.push(bind_listener(addr, true).map_err(bind_error)?);
    }
    Ok(Listening { addr, listeners })
}

/// Serves `listening` until `shutdown` turns `true`, then drains (at most
/// `shutdown_grace`); resolves when every worker has drained.
/// `limits` may be replaced while serving (a reload): each new connection takes the
/// limits in force when it is accepted.
pub async fn serve<H: Handler>(
    listening: Listening,
    server: &ServerConfig,
    tls: Arc<rustls::ServerConfig>,
    limits: Arc<ArcSwap<ConnLimits>>,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) {
    let acceptor = TlsAcceptor::from(tls);
    // One budget of connections for the whole server, whichever worker takes them.
    let slots = Arc::new(Semaphore::new(server.max_connections));
    let workers = listening.listeners.len();
    let accept_loops: Vec<AcceptLoop<H>> = listening
        .listeners
        .into_iter()
        .map(|listener| AcceptLoop {
            listener,
            acceptor: acceptor.clone(),
            handler: handler.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
            slots: slots.clone(),
            grace: server.shutdown_grace.get(),
            shutdown: shutdown.clone(),
        })
        .collect();
    info!(addr = %listening.addr, workers, "accepting connections");
    run_workers(accept_loops).await;
}

/// Workers to run: `server.workers`, or one per CPU this process may use.
fn worker_count(configured: usize) -> usize {
    match configured {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// A listening socket; `reuse_port` lets several workers listen on the same address.
fn bind_listener(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    #[cfg(not(unix))]
    let _ = reuse_port;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Runs the accept loops: one on this runtime, or each on its own thread with a
/// single-threaded runtime (no work-stealing between them: like nginx's workers, each
/// serves its connections start to end). Returns when all have drained.
async fn run_workers<H: Handler>(mut loops: Vec<AcceptLoop<H>>) {
    if loops.len() == 1 {
        return loops.pop().expect("one").run().await;
    }
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    for (i, accept) in loops.into_iter().enumerate() {
        let done = done_tx.clone();
        let listener = match accept.listener.into_std() {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, worker = i, "worker could not take its listener");
                continue;
            }
        };
        let spawned = std::thread::Builder::new()
            .name(format!("ehrgate-worker-{i}"))
            .spawn(move || {
                let _done = done;
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        return warn!(error = %e, worker = i, "worker runtime failed to start")
                    }
                };
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => AcceptLoop { listener, ..accept }.run().await,
                        Err(e) => warn!(error = %e, worker = i, "worker listener failed"),
                    }
                });
            });
        if let Err(e) = spawned {
            warn!(error = %e, worker = i, "worker thread failed to start");
        }
    }
    drop(done_tx);
    // Every worker holds a sender until it has drained.
    let _ = done_rx.recv().await;
}

struct AcceptLoop<H> {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    limits: Arc<ArcSwap<ConnLimits>>,
    slots: Arc<Semaphore>,
    grace: Duration,
    shutdown: watch::Receiver<bool>,
}

impl<H: Handler> AcceptLoop<H> {
    async fn run(mut self) {
        let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = crate::shutdown::signalled(&mut self.shutdown) => break,
                r = self.listener.accept() => r,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.slots.clone().try_acquire_owned() else {
                self.metrics.connection_rejected();
                warn!(%peer, "connection refused: server.max_connections are open");
                drop(tcp);
                continue;
            };
            tokio::spawn(conn::serve(
                tcp,
                peer,
                self.acceptor.clone(),
                self.handler.clone(),
                self.metrics.clone(),
                self.limits.load_full(),
                self.shutdown.clone(),
                ConnGuards {
                    _permit: permit,
                    _drain: drain_tx.clone(),
                },
            ));
        }
        drop(self.listener);
        drop(drain_tx);
        info!(
            open = self.metrics.open_connections(),
            "shutting down: no new connections; finishing requests in flight"
        );
        if tokio::time::timeout(self.grace, drain_rx.recv())
            .await
            .is_err()
        {
            warn!(
                open = self.metrics.open_connections(),
                "shutdown grace ran out; closing the remaining connections"
            );
        } else {
            info!("all connections finished");
        }
    }
}
