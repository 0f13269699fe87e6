//! ehrgate: a TLS reverse-proxy sidecar between clinicians' browsers, the clinic's EMR and
//! the regional EHR viewer.
//!
//! Browsers talk only to ehrgate. It routes by host to the EMR or the viewer, turns the
//! EMR's EHR button into an in-context launch, and keeps the viewer session alive exactly
//! as long as the EMR session allows. The contract (command line, configuration,
//! endpoints, cookies, audit record, security invariants) is `DESIGN.md`.
//!
//! Layout:
//! - [`config`]: the configuration file and its validation.
//! - [`tls`]: server and upstream TLS, and development key material.
//! - [`server`]: listeners, connection limits, graceful shutdown.
//! - [`proxy`]: one request's path through classify, filter, forward.
//! - [`lifecycle`]: launch, enter, viewer and EMR traffic, sign-out, Disconnect, events.
//! - [`session`]: EMR and EHR sessions, launch tickets, and the lifecycle decisions.
//! - [`context`]: the signed context assertion. [`audit`]: the audit log.
//! - [`admin`]: health, readiness and metrics.
//! - [`demo`]: `ehrgate demo`, the whole set-up on one machine.
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
pub mod server;
pub mod session;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
