//! Composition: ehrgate as one running program — the gateway (the clinic's policy) behind
//! the proxy listener, the admin listener beside it, the sweeper — built from one
//! configuration, started, and stopped together. `run`, `check-config` and `demo` all
//! start here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin;
use crate::config::{Config, ConfigError};
use crate::gateway::{Current, Gateway};
use crate::metrics::Metrics;
use crate::reload::{ReloadStatus, Reloader};
pub use crate::server::StartError;
use crate::server::{self, ConnLimits, Health};
use crate::tls;

/// Everything `run` needs, built and checked before any socket is opened. `check-config`
/// builds it too, so a configuration that passes the check also starts.
pub struct Prepared {
    pub config: Arc<Config>,
    /// The gateway in force (replaced on reload).
    pub gateway: Arc<Current>,
    pub metrics: Arc<Metrics>,
    admin_auth: Arc<ArcSwap<admin::auth::AdminAuth>>,
    tls: tls::ServerTls,
    limits: Arc<ArcSwap<ConnLimits>>,
    shutdown: watch::Sender<bool>,
    /// The file it was read from, for reloads (none: reloads are refused).
    config_path: Option<PathBuf>,
    /// Set when the log filter can be changed by a reload.
    log: Option<crate::telemetry::FilterHandle>,
}

impl Prepared {
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        let config = Arc::new(config);
        let tls = tls::server_config(&config.server.tls_cert, &config.server.tls_key)?;
        let metrics = Arc::new(Metrics::new());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let gateway = Gateway::new(config.clone(), metrics.clone(), shutdown_rx)?;
        let admin_auth =
            admin::auth::AdminAuth::load(&config.admin.token_file, config.server.admin_listen)?;
        Ok(Self {
            limits: Arc::new(ArcSwap::from_pointee(ConnLimits::from(&config.server))),
            config,
            gateway: Arc::new(Current::new(gateway)),
            metrics,
            admin_auth: Arc::new(ArcSwap::from_pointee(admin_auth)),
            tls,
            shutdown,
            config_path: None,
            log: None,
        })
    }

    /// Reloads read `path` again (SIGHUP, watched files); `log` lets them change the
    /// log filter.
    pub fn reloadable(
        mut self,
        path: PathBuf,
        log: Option<crate::telemetry::FilterHandle>,
    ) -> Self {
        self.config_path = Some(path);
        self.log = log;
        self
    }
}

/// A started ehrgate: its bound addresses and the handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub health: Arc<Health>,
    /// The gateway in force.
    pub gateway: Arc<Current>,
    pub reloader: Arc<Reloader>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops accepting and lets requests in flight finish (within `shutdown_grace`).
    pub fn shutdown(&self) {
        self.health.set_ready(false);
        let _ = self.shutdown.send(true);
    }

    /// Reloads the configuration file (what SIGHUP does); returns the changed keys that
    /// need a restart, or why the new configuration was refused (the old one serves).
    pub async fn reload(&self) -> Result<Vec<&'static str>, ConfigError> {
        self.reloader.reload().await
    }

    /// Puts `config` in force as a reload would.
    pub async fn reload_with(&self, config: Config) -> Result<Vec<&'static str>, ConfigError> {
        self.reloader.apply(config).await
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
        limits,
        shutdown: shutdown_tx,
        config_path,
        log,
    } = prepared;
    let watch_files = config_path.is_some();
    let reload_status = Arc::new(ReloadStatus::default());
    let reloader = Arc::new(Reloader::new(
        config_path,
        gateway.clone(),
        tls.cert.clone(),
        limits.clone(),
        admin_auth.clone(),
        log,
        metrics.clone(),
        reload_status.clone(),
    ));
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
            reload: reload_status,
        },
        admin_stop_rx,
    ));
    crate::gateway::spawn_sweeper(gateway.clone());
    crate::gateway::spawn_store_listener(gateway.get().store.clone());
    if watch_files {
        crate::reload::spawn_watcher(reloader.clone(), shutdown_tx.subscribe());
    }
    health.set_ready(true);
    tracing::info!(%proxy_addr, %admin_addr, "ehrgate is serving");
    let handler = gateway.clone();
    let task = tokio::spawn(async move {
        server::serve(
            listening,
            &config.server,
            tls.config,
            limits,
            handler,
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
        gateway,
        reloader,
        shutdown: shutdown_tx,
        task,
    })
}

/// Tells systemd (a `Type=notify` unit) where ehrgate stands; nothing without systemd.
pub fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "systemd notification not sent");
    }
}

/// `RELOADING=1` with the monotonic time systemd asks to come with it.
pub fn notify_reloading() {
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => notify_systemd(&[sd_notify::NotifyState::Reloading, now]),
        Err(_) => notify_systemd(&[sd_notify::NotifyState::Reloading]),
    }
}
