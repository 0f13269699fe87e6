//! Logging set-up. Logs go to standard error, human-readable or JSON lines.
//!
//! What is logged is decided where it happens; the rule everywhere: never an HCN, a
//! patient's name or birth date, a cookie value, a ticket or a session id.

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use crate::config::LogFormat;

/// Replaces the log filter of the running process (a reload of `log.filter`).
pub type FilterHandle = reload::Handle<EnvFilter, Registry>;

/// Installs the global subscriber. `RUST_LOG`, when set, wins over `filter` (and then a
/// reload leaves the filter alone: no handle is returned). A second call (tests start
/// several servers) leaves the first one in place and returns no handle.
pub fn init(format: LogFormat, filter: &str) -> Option<FilterHandle> {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_wins = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt).try_init(),
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
    }
    .is_ok();
    (installed && !env_wins).then_some(handle)
}

/// Sets a new filter (already validated by the configuration's check).
pub fn set_filter(handle: &FilterHandle, filter: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    handle.reload(filter).map_err(|e| e.to_string())
}
