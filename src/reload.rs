//! Reload without a restart (DESIGN §10): on SIGHUP, and when a watched certificate, key,
//! CA bundle, signing key or admin token file changes on disk.
//!
//! The new configuration is checked exactly as `check-config` does, and everything it
//! needs is built before anything is swapped; then, at once, new handshakes get the new
//! certificate, new connections the new limits, new requests the new gateway (routes,
//! authorities, timeouts, signing keys, upstream pools), admin actions the new tokens,
//! and the log its new filter. Established connections, event streams, WebSockets and
//! every session go on untouched (sessions live in the store, which a reload keeps).
//! A configuration that fails its check changes nothing: the error is logged with the
//! key at fault, counted, and shown by `/readyz` (still 200: the old one serves). Keys
//! that only a restart can apply are reported as such.
//!
//! Files are watched by directory, so a certificate renewed by writing a new file and
//! renaming it, or a Kubernetes secret swapped by symlink, is seen; events are debounced
//! and a reload happens only when a watched file's content changed.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::admin::auth::AdminAuth;
use crate::config::{Config, ConfigError};
use crate::gateway::Current;
use crate::metrics::Metrics;
use crate::server::ConnLimits;
use crate::telemetry::FilterHandle;
use crate::tls::CertSwap;

/// Events closer together than this are one change (an editor's or a secret
/// manager's several writes).
const DEBOUNCE: Duration = Duration::from_millis(300);

/// What `/readyz` says of reloads.
#[derive(Debug, Default)]
pub struct ReloadStatus(Mutex<StatusText>);

#[derive(Debug, Default, Clone)]
struct StatusText {
    /// The last reload's error, while the running configuration is an older one.
    failed: Option<String>,
    /// Keys changed in the file that only a restart applies.
    restart: Vec<&'static str>,
}

impl ReloadStatus {
    /// Lines for `/readyz`'s body; empty when there is nothing to say.
    pub fn describe(&self) -> String {
        let s = self.0.lock().map(|s| s.clone()).unwrap_or_default();
        let mut out = String::new();
        if let Some(e) = &s.failed {
            out.push_str(&format!(
                "last reload refused, the previous configuration serves: {e}\n"
            ));
        }
        if !s.restart.is_empty() {
            out.push_str(&format!(
                "changed keys that need a restart to take effect: {}\n",
                s.restart.join(", ")
            ));
        }
        out
    }
}

/// Everything a reload swaps.
pub struct Reloader {
    path: Option<PathBuf>,
    current: Arc<Current>,
    cert: Arc<CertSwap>,
    limits: Arc<ArcSwap<ConnLimits>>,
    admin: Arc<ArcSwap<AdminAuth>>,
    log: Option<FilterHandle>,
    metrics: Arc<Metrics>,
    pub status: Arc<ReloadStatus>,
    /// One reload at a time (SIGHUP and a file change together).
    busy: tokio::sync::Mutex<()>,
    /// After each applied reload: the watched files' content as that reload found it
    /// (read before it read them), so the watcher follows the files the new
    /// configuration names and misses no change made meanwhile.
    applied: watch::Sender<Arc<Fingerprints>>,
}

/// Keys read once at start: a changed value is reported, not applied.
fn restart_only(o: &Config, n: &Config) -> Vec<&'static str> {
    let (os, ns) = (&o.session, &n.session);
    [
        ("server.listen", o.server.listen != n.server.listen),
        (
            "server.admin_listen",
            o.server.admin_listen != n.server.admin_listen,
        ),
        ("server.workers", o.server.workers != n.server.workers),
        (
            "server.max_connections",
            o.server.max_connections != n.server.max_connections,
        ),
        (
            "server.shutdown_grace",
            o.server.shutdown_grace != n.server.shutdown_grace,
        ),
        ("session.store", os.store != ns.store),
        ("session.redis_url", os.redis_url != ns.redis_url),
        ("session.redis_ca", os.redis_ca != ns.redis_ca),
        (
            "session.redis_key_prefix",
            os.redis_key_prefix != ns.redis_key_prefix,
        ),
        ("session.store_key", os.store_key != ns.store_key),
        ("session.max_sessions", os.max_sessions != ns.max_sessions),
        ("audit.path", o.audit.path != n.audit.path),
        ("audit.hash_key", o.audit.hash_key != n.audit.hash_key),
        ("log.format", o.log.format != n.log.format),
    ]
    .into_iter()
    .filter_map(|(key, changed)| changed.then_some(key))
    .collect()
}

impl Reloader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        path: Option<PathBuf>,
        current: Arc<Current>,
        cert: Arc<CertSwap>,
        limits: Arc<ArcSwap<ConnLimits>>,
        admin: Arc<ArcSwap<AdminAuth>>,
        log: Option<FilterHandle>,
        metrics: Arc<Metrics>,
        status: Arc<ReloadStatus>,
    ) -> Self {
        Self {
            path,
            current,
            cert,
            limits,
            admin,
            log,
            metrics,
            status,
            busy: tokio::sync::Mutex::new(()),
            applied: watch::Sender::new(Arc::default()),
        }
    }

    /// Reads the configuration file again and applies it (SIGHUP, a watched file).
    pub async fn reload(&self) -> Result<Vec<&'static str>, ConfigError> {
        let Some(path) = &self.path else {
            return Err(ConfigError::new(
                "",
                "this ehrgate was not started from a configuration file",
            ));
        };
        let loaded = Config::load(path);
        match loaded {
            Ok(config) => self.apply(config).await,
            Err(e) => {
                self.refused(&e);
                Err(e)
            }
        }
    }

    /// Checks `config` as `check-config` does and, if it passes, puts it in force.
    pub async fn apply(&self, config: Config) -> Result<Vec<&'static str>, ConfigError> {
        let _one = self.busy.lock().await;
        let old = self.current.get();
        let found = fingerprints(&watched_files_of(&config)).await;
        // Everything is built before anything is swapped: a failure changes nothing.
        let built = (|| {
            let config = Arc::new(config);
            let cert = crate::tls::certified_key(&config.server.tls_cert, &config.server.tls_key)?;
            let gateway = old.reloaded(config.clone())?;
            // The admin listener stays where it is: its address needs a restart.
            let admin = AdminAuth::load(&config.admin.token_file, old.config.server.admin_listen)?;
            // Store keys apply at the next restart; checked now, as check-config would,
            // so that restart does not fail (nothing is connected).
            if config.session.store == crate::config::StoreKind::Redis {
                crate::session::RedisStore::new(
                    &config.session,
                    gateway.limits.store(),
                    Vec::new(),
                    old.shutdown.clone(),
                )?;
            }
            Ok::<_, ConfigError>((config, cert, gateway, admin))
        })();
        let (config, cert, gateway, admin) = match built {
            Ok(b) => b,
            Err(e) => {
                self.refused(&e);
                return Err(e);
            }
        };
        let mut restart = restart_only(&old.config, &config);
        if self.log.is_none() && old.config.log.filter != config.log.filter {
            // RUST_LOG chose the filter, or logging was set up elsewhere.
            restart.push("log.filter");
        }
        gateway.store.set_limits(gateway.limits.store());
        self.cert.replace(cert);
        self.limits
            .store(Arc::new(ConnLimits::from(&config.server)));
        self.admin.store(Arc::new(admin));
        if let Some(log) = &self.log {
            if let Err(e) = crate::telemetry::set_filter(log, &config.log.filter) {
                warn!(error = %e, "log filter not changed");
            }
        }
        self.current.replace(gateway);
        self.applied.send_replace(Arc::new(found));
        self.metrics.reload(true);
        if let Ok(mut s) = self.status.0.lock() {
            s.failed = None;
            s.restart = restart.clone();
        }
        if restart.is_empty() {
            info!("configuration reloaded");
        } else {
            warn!(
                restart = %restart.join(", "),
                "configuration reloaded; these changed keys need a restart to take effect"
            );
        }
        Ok(restart)
    }

    fn refused(&self, e: &ConfigError) {
        self.metrics.reload(false);
        warn!(key = %e.key, error = %e.message, "configuration reload refused; the running configuration stays");
        if let Ok(mut s) = self.status.0.lock() {
            s.failed = Some(e.to_string());
        }
    }

    /// The token file of the configuration in force, if any.
    fn token_file(&self) -> Option<PathBuf> {
        let c = self.current.get().config.clone();
        (!c.admin.token_file.as_os_str().is_empty()).then(|| c.admin.token_file.clone())
    }

    /// Applies the token file alone (the rest of a changed configuration was refused);
    /// a file that cannot be read as tokens locks admin actions until it can.
    fn reload_tokens_alone(&self) {
        let c = self.current.get().config.clone();
        match AdminAuth::load(&c.admin.token_file, c.server.admin_listen) {
            Ok(auth) => {
                self.admin.store(Arc::new(auth));
                info!("admin tokens reloaded on their own");
            }
            Err(e) => {
                self.admin.store(Arc::new(AdminAuth::locked()));
                warn!(key = %e.key, error = %e.message, "admin token file unusable: every admin action is refused until it is fixed");
            }
        }
    }

    /// The files whose change triggers a reload, under the configuration in force.
    fn watched_files(&self) -> Vec<PathBuf> {
        watched_files_of(&self.current.get().config)
    }
}

/// The files of `c` whose change triggers a reload.
fn watched_files_of(c: &Config) -> Vec<PathBuf> {
    let mut files = vec![c.server.tls_cert.clone(), c.server.tls_key.clone()];
    for ca in [&c.emr.upstream_ca, &c.ehr.upstream_ca] {
        if !ca.is_empty() {
            files.push(PathBuf::from(ca));
        }
    }
    files.extend(c.context.signing_key.paths().iter().cloned());
    if !c.admin.token_file.as_os_str().is_empty() {
        files.push(c.admin.token_file.clone());
    }
    files
}

/// A file's content as the watcher last saw it (following symlinks), to tell a real
/// change from an event that changed nothing.
fn fingerprint(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok().map(|b| {
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &b)
            .as_ref()
            .to_vec()
    })
}

type Fingerprints = HashMap<PathBuf, Option<Vec<u8>>>;

async fn fingerprints(files: &[PathBuf]) -> Fingerprints {
    let files = files.to_vec();
    tokio::task::spawn_blocking(move || files.iter().map(|f| (f.clone(), fingerprint(f))).collect())
        .await
        .unwrap_or_default()
}

/// Events closer together than [`DEBOUNCE`] are one change, but a directory that never
/// goes quiet still gets its reload after this long.
const DEBOUNCE_AT_MOST: Duration = Duration::from_secs(2);

/// Watches the directories of the configured files until shutdown; reloads when one of
/// the files' content changes. After any applied reload (SIGHUP included) it follows
/// the files the new configuration names.
///
/// The files are read and the watches set before this returns (before ehrgate says it
/// is serving), so no change made after that moment can be missed.
pub fn spawn_watcher(reloader: Arc<Reloader>, mut shutdown: watch::Receiver<bool>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut applied = reloader.applied.subscribe();
    let mut files = reloader.watched_files();
    let mut seen: Fingerprints = files.iter().map(|f| (f.clone(), fingerprint(f))).collect();
    let mut watcher = arm(&files, &tx);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = crate::shutdown::signalled(&mut shutdown) => return,
                got = rx.recv() => if got.is_none() { return },
                // A reload (SIGHUP, or this watcher's own) may name other files: watch
                // those, from what that reload read; a change made since is caught below.
                _ = applied.changed() => {
                    let next = reloader.watched_files();
                    if next != files {
                        files = next;
                        drop(watcher.take());
                        watcher = arm(&files, &tx);
                    }
                    seen = (**applied.borrow_and_update()).clone();
                }
            }
            // Debounce: until the events stop for a moment, or at most a while.
            let until = tokio::time::Instant::now() + DEBOUNCE_AT_MOST;
            loop {
                let quiet = tokio::time::Instant::now() + DEBOUNCE;
                match tokio::time::timeout_at(quiet.min(until), rx.recv()).await {
                    Ok(Some(())) if tokio::time::Instant::now() < until => continue,
                    Ok(None) => return,
                    _ => break,
                }
            }
            let now = fingerprints(&files).await;
            if now == seen {
                continue;
            }
            let token_file = reloader.token_file();
            let tokens_changed = token_file
                .as_ref()
                .is_some_and(|t| now.get(t) != seen.get(t));
            info!("a watched certificate, key or token file changed: reloading");
            match reloader.reload().await {
                // `applied` brings the loop back to the files the new one names.
                Ok(_) => seen = now,
                Err(_) if tokens_changed => {
                    // The rest of the configuration is refused, but the tokens are
                    // applied on their own (a revoked token stops working), or, if
                    // they cannot be read, every admin action is refused.
                    reloader.reload_tokens_alone();
                    seen = now;
                }
                // Not taken: the next change or SIGHUP tries again.
                Err(_) => {}
            }
        }
    });
}

fn arm(files: &[PathBuf], tx: &mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    match watch_dirs(files, tx.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            warn!(error = %e, "cannot watch the configured files; reload with SIGHUP");
            None
        }
    }
}

/// Whether an event can mean a watched file changed: it names one of them, or an entry
/// of the `..data` kind that Kubernetes swaps to replace a secret's files at once.
/// Reads (opens, accesses) never do: ehrgate's own reads must not wake the watcher.
fn relevant(event: &notify::Event, names: &BTreeSet<std::ffi::OsString>) -> bool {
    if matches!(event.kind, notify::EventKind::Access(_)) {
        return false;
    }
    event.paths.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| names.contains(n) || n.to_str().is_some_and(|n| n.starts_with("..")))
    })
}

fn watch_dirs(
    files: &[PathBuf],
    tx: mpsc::UnboundedSender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let names: BTreeSet<std::ffi::OsString> = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| n.to_os_string()))
        .collect();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| relevant(&e, &names)) {
            let _ = tx.send(());
        }
    })?;
    let dirs: BTreeSet<PathBuf> = files
        .iter()
        .map(|f| {
            f.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        })
        .collect();
    for dir in dirs {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}
