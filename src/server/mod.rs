//! The listeners: the TLS proxy listener clinicians' browsers reach, and the plain-HTTP
//! admin listener. Owns accepting, the connection limit and graceful shutdown; what a
//! request means is the proxy module's business.

mod conn;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::admin;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::Gateway;
use crate::tls;
use conn::{ConnGuards, ConnLimits};

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
}

/// Everything `run` needs, built and checked before any socket is opened. `check-config`
/// builds it too, so a configuration that passes the check also starts.
pub struct Prepared {
    pub config: Arc<Config>,
    pub gateway: Arc<Gateway>,
    pub metrics: Arc<Metrics>,
    admin_auth: Arc<admin::auth::AdminAuth>,
    tls: Arc<rustls::ServerConfig>,
    shutdown: watch::Sender<bool>,
}

impl Prepared {
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let config = Arc::new(config);
        let tls = tls::server_config(&config.server.tls_cert, &config.server.tls_key)?;
        let metrics = Arc::new(Metrics::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let gateway = Arc::new(Gateway::new(config.clone(), metrics.clone(), shutdown_rx)?);
        let admin_auth = Arc::new(admin::auth::AdminAuth::load(
            &config.admin.token_file,
            config.server.admin_listen,
        )?);
        Ok(Self {
            config,
            gateway,
            metrics,
            admin_auth,
            tls,
            shutdown,
        })
    }
}

/// A started ehrgate: its bound addresses and the handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub health: Arc<Health>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting and lets requests in flight finish (within `shutdown_grace`).
    pub fn shutdown(&self) {
        self.health.ready.store(false, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
    }

    /// Waits until the server has stopped (after [`Running::shutdown`]).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    start_prepared(Prepared::new(config)?).await
}

pub async fn start_prepared(prepared: Prepared) -> Result<Running, StartError> {
    let Prepared {
        config,
        gateway,
        metrics,
        admin_auth,
        tls,
        shutdown: shutdown_tx,
    } = prepared;
    let server = &config.server;
    let workers = worker_count(server.workers);
    let bind_error = |source| StartError::Bind {
        what: "server.listen",
        addr: server.listen,
        source,
    };
    // With several workers, each accepts on its own SO_REUSEPORT socket (as nginx
    // workers do) and the kernel spreads connections between them.
    let listener = bind_listener(server.listen, workers > 1).map_err(bind_error)?;
    let admin_listener = TcpListener::bind(server.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "server.admin_listen",
            addr: server.admin_listen,
            source,
        })?;
    let proxy_addr = listener
        .local_addr()
        .expect("bound listener has an address");
    let admin_addr = admin_listener
        .local_addr()
        .expect("bound listener has an address");

    let health = Arc::new(Health::default());
    let shutdown_rx = shutdown_tx.subscribe();
    // The admin listener outlives the drain, so /readyz can say "shutting down".
    let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin::AdminState {
            metrics: metrics.clone(),
            health: health.clone(),
            gateway: gateway.clone(),
            auth: admin_auth,
        },
        admin_stop_rx,
    ));

    crate::lifecycle::spawn_sweeper(gateway.clone());
    let mut listeners = vec![listener];
    for _ in 1..workers {
        listeners.push(bind_listener(proxy_addr, true).map_err(bind_error)?);
    }
    let acceptor = TlsAcceptor::from(tls);
    let limits = Arc::new(ConnLimits::from(server));
    // One budget of connections for the whole server, whichever worker takes them.
    let slots = Arc::new(Semaphore::new(server.max_connections));
    let accept_loops: Vec<AcceptLoop> = listeners
        .into_iter()
        .map(|listener| AcceptLoop {
            listener,
            acceptor: acceptor.clone(),
            gateway: gateway.clone(),
            metrics: metrics.clone(),
            limits: limits.clone(),
            slots: slots.clone(),
            grace: server.shutdown_grace.get(),
            shutdown: shutdown_rx.clone(),
        })
        .collect();
    health.ready.store(true, Ordering::Relaxed);
    info!(%proxy_addr, %admin_addr, workers, "ehrgate is serving");
    let task = tokio::spawn(async move {
        run_workers(accept_loops).await;
        let _ = admin_stop_tx.send(true);
        let _ = admin_task.await;
    });
    Ok(Running {
        proxy_addr,
        admin_addr,
        health,
        shutdown: shutdown_tx,
        task,
    })
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
async fn run_workers(mut loops: Vec<AcceptLoop>) {
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

struct AcceptLoop {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    gateway: Arc<Gateway>,
    metrics: Arc<Metrics>,
    limits: Arc<ConnLimits>,
    slots: Arc<Semaphore>,
    grace: Duration,
    shutdown: watch::Receiver<bool>,
}

impl AcceptLoop {
    async fn run(mut self) {
        let (drain_tx, mut drain_rx) = mpsc::channel::<()>(1);
        loop {
            let accepted = tokio::select! {
                biased;
                _ = signalled(&mut self.shutdown) => break,
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
                self.gateway.clone(),
                self.metrics.clone(),
                self.limits.clone(),
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

/// Resolves once shutdown has been signalled (or its sender is gone).
pub async fn signalled(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
