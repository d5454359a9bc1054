//! Proxy metrics. Label values are fixed enums (status class, error kind, rejection reason), so
//! the series count is bounded; every series is created up front so the hot path only does an
//! atomic add.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

pub struct ProxyMetrics {
    by_class: [IntCounter; 6],
    pub duration_seconds: Histogram,
    pub in_flight: IntGauge,
    /// 1 when the node is ready (routes synced, not draining), as `/readyz` says; set at scrape.
    pub ready: IntGauge,
    pub upstream_connect_errors: IntCounter,
    pub upstream_timeouts: IntCounter,
    pub upstream_other_errors: IntCounter,
    pub rejected_bad_host: IntCounter,
    pub rejected_unknown_host: IntCounter,
    pub rejected_header_too_large: IntCounter,
    pub rejected_body_too_large: IntCounter,
    pub rejected_not_ready: IntCounter,
    /// A connection closed because its request header was not complete in time (slowloris).
    pub rejected_header_timeout: IntCounter,
}

/// Classes: index 0 is "no response written" (client went away), then 1xx … 5xx.
const CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let requests = IntCounterVec::new(
            Opts::new(
                "tollgate_http_requests_total",
                "Requests answered by the proxy, by status class.",
            ),
            &["code_class"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let by_class = CLASSES.map(|c| requests.with_label_values(&[c]));

        // Loopback proxying takes ~50 µs; hosted services take ms to s. These cover both.
        let duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_http_request_duration_seconds",
                "Time from request start to the end of the response, as the proxy sees it.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        )?;
        registry.register(Box::new(duration_seconds.clone()))?;

        let in_flight = IntGauge::new(
            "tollgate_http_requests_in_flight",
            "Requests being handled right now.",
        )?;
        registry.register(Box::new(in_flight.clone()))?;
        let ready = IntGauge::new(
            "tollgate_ready",
            "1 when this node is ready (routes loaded, not draining): what /readyz answers",
        )?;
        registry.register(Box::new(ready.clone()))?;

        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_errors_total",
                "Failed attempts to reach or read from an upstream, by kind.",
            ),
            &["kind"],
        )?;
        registry.register(Box::new(upstream_errors.clone()))?;

        let rejected = IntCounterVec::new(
            Opts::new(
                "tollgate_http_rejected_total",
                "Requests the proxy answered itself, by reason.",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(rejected.clone()))?;

        Ok(ProxyMetrics {
            by_class,
            duration_seconds,
            in_flight,
            ready,
            upstream_connect_errors: upstream_errors.with_label_values(&["connect"]),
            upstream_timeouts: upstream_errors.with_label_values(&["timeout"]),
            upstream_other_errors: upstream_errors.with_label_values(&["other"]),
            rejected_bad_host: rejected.with_label_values(&["bad_host"]),
            rejected_unknown_host: rejected.with_label_values(&["unknown_host"]),
            rejected_header_too_large: rejected.with_label_values(&["header_too_large"]),
            rejected_body_too_large: rejected.with_label_values(&["body_too_large"]),
            rejected_not_ready: rejected.with_label_values(&["not_ready"]),
            rejected_header_timeout: rejected.with_label_values(&["header_timeout"]),
        })
    }

    #[inline]
    pub fn count_status(&self, status: u16) {
        let idx = match status {
            100..=599 => usize::from(status / 100),
            _ => 0,
        };
        if let Some(c) = self.by_class.get(idx) {
            c.inc();
        }
    }
}

/// `tollgate_build_info{version,revision}` = 1 (the usual way to expose the running build) and
/// the standard `process_*` metrics of this process.
pub fn register_build_info(registry: &Registry) -> prometheus::Result<()> {
    let info = IntGaugeVec::new(
        Opts::new("tollgate_build_info", "The running tollgate build."),
        &["version", "revision"],
    )?;
    registry.register(Box::new(info.clone()))?;
    info.with_label_values(&[env!("CARGO_PKG_VERSION"), env!("TOLLGATE_REVISION")])
        .set(1);
    // The standard `process_*` series (CPU, memory, open fds, start time) of this process.
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    Ok(())
}
