//! Composition: ehrgate as one running program — the gateway (the clinic's policy) behind
//! the proxy listener, the admin listener beside it, the sweeper — built from one
//! configuration, started, and stopped together. `run`, `check-config` and `demo` all
//! start here.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::{Config, ConfigError};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
pub use crate::server::StartError;
use crate::server::{self, Health};
use crate::tls;

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
        self.health.set_ready(false);
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
    let listening = server::bind(&config.server)?;
    let admin_listener = TcpListener::bind(config.server.admin_listen)
        .await
        .map_err(|source| StartError::Bind {
            what: "server.admin_listen",
            addr: config.server.admin_listen,
            source,
        })?;
    let proxy_addr = listening.addr;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            what: "server.admin_listen",
            addr: config.server.admin_listen,
            source,
        })?;

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
    crate::gateway::spawn_sweeper(gateway.clone());
    crate::gateway::spawn_store_listener(gateway.clone());
    health.set_ready(true);
    tracing::info!(%proxy_addr, %admin_addr, "ehrgate is serving");
    let task = tokio::spawn(async move {
        server::serve(
            listening,
            &config.server,
            tls,
            gateway,
            metrics,
            shutdown_rx,
        )
        .await;
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
