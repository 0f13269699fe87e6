//! The command line (DESIGN §3): `run`, `demo`, `check-config`.
//!
//! Exit codes: 0 after a clean stop or a valid configuration; 2 for a configuration
//! error (one line naming the key); 1 when the server cannot start (e.g. a port in use).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{self, Prepared, StartError};
use crate::config::{Config, LogFormat};
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(
    name = "ehrgate",
    version,
    about = "TLS reverse proxy linking a clinic's EMR session to its EHR viewer session"
)]
pub struct Cli {
    /// Log format; overrides `[log] format` in the configuration.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

impl From<LogFormatArg> for LogFormat {
    fn from(f: LogFormatArg) -> Self {
        match f {
            LogFormatArg::Text => LogFormat::Text,
            LogFormatArg::Json => LogFormat::Json,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve with a configuration file.
    Run {
        #[arg(long, default_value = "config/ehrgate.toml")]
        config: PathBuf,
    },
    /// Start the proxy with built-in demo EMR and viewer on loopback; needs no set-up.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
    },
    /// Validate a configuration file and print the effective configuration.
    CheckConfig {
        #[arg(long, default_value = "config/ehrgate.toml")]
        config: PathBuf,
    },
}

pub fn main(cli: Cli) -> ExitCode {
    let log_format = cli.log_format.map(LogFormat::from);
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Run { config: path } => {
            let config = match load(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let log = telemetry::init(log_format.unwrap_or(config.log.format), &config.log.filter);
            runtime().block_on(run(config, path, log))
        }
        Command::Demo { listen } => {
            telemetry::init(log_format.unwrap_or_default(), "info");
            runtime().block_on(crate::demo::run(listen))
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("ehrgate: {}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn check_config(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let shown = config.to_effective_toml();
    // Loads certificates, keys and CA bundles exactly as `run` would.
    if let Err(e) = Prepared::new(config) {
        eprintln!("ehrgate: {}: {e}", path.display());
        return ExitCode::from(2);
    }
    print!("{shown}");
    eprintln!("ehrgate: {}: configuration is valid", path.display());
    ExitCode::SUCCESS
}

/// Serves until SIGTERM or SIGINT, then shuts down gracefully; SIGHUP reloads `path`.
pub async fn run(config: Config, path: PathBuf, log: Option<telemetry::FilterHandle>) -> ExitCode {
    // Installed before the "serving" line, so a signal sent after it is never missed.
    let stop = Signals::install();
    let mut hangup = Hangup::install();
    let prepared = match app::Prepared::new(config) {
        Ok(p) => p.reloadable(path, log),
        Err(e) => return start_failed(e.into()),
    };
    let running = match app::start_prepared(prepared).await {
        Ok(r) => r,
        Err(e) => return start_failed(e),
    };
    println!(
        "ehrgate: serving https on {} (admin http on {})",
        running.proxy_addr, running.admin_addr
    );
    app::notify_systemd(&[sd_notify::NotifyState::Ready]);
    let stopped = stop.wait();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                app::notify_reloading();
                // The outcome is logged, counted and shown by /readyz (and systemd's status).
                match running.reload().await {
                    Ok(_) => app::notify_systemd(&[
                        sd_notify::NotifyState::Ready,
                        sd_notify::NotifyState::Status("serving; configuration reloaded"),
                    ]),
                    Err(e) => {
                        let status = format!("serving; last reload refused: {e}");
                        app::notify_systemd(&[
                            sd_notify::NotifyState::Ready,
                            sd_notify::NotifyState::Status(&status),
                        ]);
                    }
                }
            }
        }
    }
    app::notify_systemd(&[sd_notify::NotifyState::Stopping]);
    running.shutdown();
    running.wait().await;
    ExitCode::SUCCESS
}

pub fn start_failed(e: StartError) -> ExitCode {
    eprintln!("ehrgate: {e}");
    match e {
        StartError::Config(_) => ExitCode::from(2),
        StartError::Bind { .. } => ExitCode::from(1),
    }
}

/// SIGHUP, listened for from the moment of `install` (without it, SIGHUP would end the
/// process).
pub struct Hangup {
    #[cfg(unix)]
    hup: Option<tokio::signal::unix::Signal>,
}

impl Hangup {
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                hup: signal(SignalKind::hangup()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = &mut self.hup {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}

/// SIGTERM and SIGINT (Ctrl-C), listened for from the moment of `install`.
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves on the first of them.
    pub async fn wait(mut self) {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                _ = recv(&mut self.term) => {}
                _ = recv(&mut self.int) => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("signal received: shutting down");
    }
}
