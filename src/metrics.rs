//! Counters for `/metrics`, in the Prometheus text format. Lock-free: every update on the
//! request path is one relaxed atomic add.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::proxy::route::Origin;

/// Upper bounds of the upstream latency buckets, in seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Where a request was routed; `Unrouted` for refused hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Emr,
    Ehr,
    Unrouted,
}

impl From<Origin> for Route {
    fn from(o: Origin) -> Self {
        match o {
            Origin::Emr => Route::Emr,
            Origin::Ehr => Route::Ehr,
        }
    }
}

impl Route {
    const ALL: [Route; 3] = [Route::Emr, Route::Ehr, Route::Unrouted];

    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            Route::Emr => "emr",
            Route::Ehr => "ehr",
            Route::Unrouted => "none",
        }
    }
}

struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros().min(u64::MAX as u128) as u64, Relaxed);
    }
}

pub struct Metrics {
    /// Responses by route and status code (100..=599).
    responses: [Box<[AtomicU64]>; 3],
    upstream_latency: [Histogram; 2],
    upstream_errors: [[AtomicU64; 3]; 2],
    open_connections: AtomicI64,
    connections_total: AtomicU64,
    connections_rejected: AtomicU64,
    tls_handshake_failures: AtomicU64,
    open_tunnels: AtomicI64,
    store_errors: AtomicU64,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

/// Kinds of upstream failure counted separately.
#[derive(Debug, Clone, Copy)]
pub enum UpstreamFailure {
    Connect,
    Timeout,
    Other,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let statuses = || (0..500).map(|_| AtomicU64::new(0)).collect::<Box<[_]>>();
        Self {
            responses: [statuses(), statuses(), statuses()],
            upstream_latency: [Histogram::new(), Histogram::new()],
            upstream_errors: Default::default(),
            open_connections: AtomicI64::new(0),
            connections_total: AtomicU64::new(0),
            connections_rejected: AtomicU64::new(0),
            tls_handshake_failures: AtomicU64::new(0),
            open_tunnels: AtomicI64::new(0),
            store_errors: AtomicU64::new(0),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }
    }

    pub fn response(&self, route: Route, status: u16) {
        if let Some(c) = status
            .checked_sub(100)
            .and_then(|i| self.responses[route.index()].get(i as usize))
        {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn upstream_latency(&self, origin: Origin, d: Duration) {
        self.upstream_latency[origin as usize].observe(d);
    }

    pub fn upstream_failure(&self, origin: Origin, kind: UpstreamFailure) {
        self.upstream_errors[origin as usize][kind as usize].fetch_add(1, Relaxed);
    }

    pub fn connection_opened(&self) {
        self.connections_total.fetch_add(1, Relaxed);
        self.open_connections.fetch_add(1, Relaxed);
    }

    pub fn connection_closed(&self) {
        self.open_connections.fetch_sub(1, Relaxed);
    }

    pub fn connection_rejected(&self) {
        self.connections_rejected.fetch_add(1, Relaxed);
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.fetch_add(1, Relaxed);
    }

    pub fn tunnel_opened(&self) {
        self.open_tunnels.fetch_add(1, Relaxed);
    }

    pub fn tunnel_closed(&self) {
        self.open_tunnels.fetch_sub(1, Relaxed);
    }

    /// A session-store operation that failed (the shared store unreachable).
    pub fn store_error(&self) {
        self.store_errors.fetch_add(1, Relaxed);
    }

    /// A configuration reload, applied or refused.
    pub fn reload(&self, ok: bool) {
        if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        }
        .fetch_add(1, Relaxed);
    }

    pub fn store_errors(&self) -> u64 {
        self.store_errors.load(Relaxed)
    }

    pub fn open_connections(&self) -> i64 {
        self.open_connections.load(Relaxed)
    }

    /// The Prometheus text exposition of everything counted.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = self.write_to(&mut out);
        out
    }

    fn write_to(&self, out: &mut String) -> std::fmt::Result {
        writeln!(
            out,
            "# HELP ehrgate_config_reload_total Configuration reloads, by result (an error leaves the running configuration in force)."
        )?;
        writeln!(out, "# TYPE ehrgate_config_reload_total counter")?;
        writeln!(
            out,
            "ehrgate_config_reload_total{{result=\"ok\"}} {}",
            self.reloads_ok.load(Relaxed)
        )?;
        writeln!(
            out,
            "ehrgate_config_reload_total{{result=\"error\"}} {}",
            self.reloads_failed.load(Relaxed)
        )?;
        writeln!(
            out,
            "# HELP ehrgate_store_errors_total Session-store operations that failed (shared store unreachable)."
        )?;
        writeln!(out, "# TYPE ehrgate_store_errors_total counter")?;
        writeln!(
            out,
            "ehrgate_store_errors_total {}",
            self.store_errors.load(Relaxed)
        )?;
        writeln!(
            out,
            "# HELP ehrgate_requests_total Responses sent to clients, by origin and status."
        )?;
        writeln!(out, "# TYPE ehrgate_requests_total counter")?;
        for route in Route::ALL {
            for (i, c) in self.responses[route.index()].iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    writeln!(
                        out,
                        "ehrgate_requests_total{{origin=\"{}\",status=\"{}\"}} {n}",
                        route.label(),
                        i + 100
                    )?;
                }
            }
        }

        writeln!(out, "# HELP ehrgate_upstream_response_seconds Time from sending a request upstream to its response header.")?;
        writeln!(out, "# TYPE ehrgate_upstream_response_seconds histogram")?;
        for origin in [Origin::Emr, Origin::Ehr] {
            let h = &self.upstream_latency[origin as usize];
            let label = origin.as_str();
            let mut cumulative = 0;
            for (bound, c) in BUCKETS.iter().zip(&h.buckets) {
                cumulative += c.load(Relaxed);
                writeln!(
                    out,
                    "ehrgate_upstream_response_seconds_bucket{{origin=\"{label}\",le=\"{bound}\"}} {cumulative}"
                )?;
            }
            let count = h.count.load(Relaxed);
            writeln!(out, "ehrgate_upstream_response_seconds_bucket{{origin=\"{label}\",le=\"+Inf\"}} {count}")?;
            writeln!(
                out,
                "ehrgate_upstream_response_seconds_sum{{origin=\"{label}\"}} {}",
                h.sum_micros.load(Relaxed) as f64 / 1e6
            )?;
            writeln!(
                out,
                "ehrgate_upstream_response_seconds_count{{origin=\"{label}\"}} {count}"
            )?;
        }

        writeln!(
            out,
            "# HELP ehrgate_upstream_errors_total Upstream requests that got no response."
        )?;
        writeln!(out, "# TYPE ehrgate_upstream_errors_total counter")?;
        for origin in [Origin::Emr, Origin::Ehr] {
            for (kind, label) in [
                (UpstreamFailure::Connect, "connect"),
                (UpstreamFailure::Timeout, "timeout"),
                (UpstreamFailure::Other, "other"),
            ] {
                writeln!(
                    out,
                    "ehrgate_upstream_errors_total{{origin=\"{}\",kind=\"{label}\"}} {}",
                    origin.as_str(),
                    self.upstream_errors[origin as usize][kind as usize].load(Relaxed)
                )?;
            }
        }

        for (name, help, kind, value) in [
            (
                "ehrgate_open_connections",
                "Client connections open now.",
                "gauge",
                self.open_connections.load(Relaxed),
            ),
            (
                "ehrgate_open_tunnels",
                "Upgraded (WebSocket) connections open now.",
                "gauge",
                self.open_tunnels.load(Relaxed),
            ),
            (
                "ehrgate_connections_total",
                "Client connections accepted.",
                "counter",
                self.connections_total.load(Relaxed) as i64,
            ),
            (
                "ehrgate_connections_rejected_total",
                "Client connections closed at accept because server.max_connections were open.",
                "counter",
                self.connections_rejected.load(Relaxed) as i64,
            ),
            (
                "ehrgate_tls_handshake_failures_total",
                "Client TLS handshakes that failed or timed out.",
                "counter",
                self.tls_handshake_failures.load(Relaxed) as i64,
            ),
        ] {
            writeln!(out, "# HELP {name} {help}")?;
            writeln!(out, "# TYPE {name} {kind}")?;
            writeln!(out, "{name} {value}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_in_prometheus_text() {
        let m = Metrics::new();
        m.response(Route::Emr, 200);
        m.response(Route::Emr, 200);
        m.response(Route::Unrouted, 421);
        m.response(Route::Ehr, 42); // out of range: ignored, not a panic
        m.upstream_latency(Origin::Ehr, Duration::from_millis(3));
        m.connection_opened();
        let text = m.render();
        assert!(text.contains("ehrgate_requests_total{origin=\"emr\",status=\"200\"} 2"));
        assert!(text.contains("ehrgate_requests_total{origin=\"none\",status=\"421\"} 1"));
        assert!(text
            .contains("ehrgate_upstream_response_seconds_bucket{origin=\"ehr\",le=\"0.0025\"} 0"));
        assert!(text
            .contains("ehrgate_upstream_response_seconds_bucket{origin=\"ehr\",le=\"0.005\"} 1"));
        assert!(text.contains("ehrgate_upstream_response_seconds_count{origin=\"ehr\"} 1"));
        assert!(text.contains("ehrgate_open_connections 1"));
    }
}
