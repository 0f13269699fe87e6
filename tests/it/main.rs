//! Integration tests: real listeners on 127.0.0.1 ephemeral ports, in-process upstreams,
//! and a test CA made at run time. One test crate, a module per area.

mod support;

mod browser;
mod config;
mod corpus;
mod errors;
mod flows;
mod hardening;
mod lifecycle;
mod proxy;
mod reload;
mod replicas;
mod upstreams;
