//! ehrgate: a TLS reverse-proxy sidecar between clinicians' browsers, the clinic's EMR and
//! the regional EHR viewer.
//!
//! Browsers talk only to ehrgate. It routes by host to the EMR or the viewer, turns the
//! EMR's EHR button into an in-context launch, and keeps the viewer session alive exactly
//! as long as the EMR session allows. The contract (command line, configuration,
//! endpoints, cookies, audit record, security invariants) is `DESIGN.md`.
//!
//! Layers, each depending only on those below it:
//! - top: [`cli`] (`run`, `check-config`, `demo`), [`demo`], [`admin`] (health,
//!   readiness, metrics, admin actions), [`reload`] (SIGHUP and watched files), and
//!   [`app`], which composes them.
//! - the application, [`gateway`]: the clinic's policy and the flows of DESIGN §6.
//! - the engine, [`proxy`] (upstreams, header rules, canonical paths, tunnels), and the
//!   listener, [`server`] (binding, TLS accept, connection limits, drain).
//! - leaves: [`session`] (sessions, tickets, the decisions), [`audit`], [`context`],
//!   [`config`], [`tls`], [`problem`], [`body`], [`metrics`], [`shutdown`], [`error`],
//!   [`telemetry`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod body;
pub mod cli;
pub mod config;
pub mod context;
pub mod demo;
pub mod error;
pub mod gateway;
pub mod metrics;
pub mod problem;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
