//! The database service's metrics (registered in the injected registry). Every result series
//! exists from the start, so `rate()` sees the first failure.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// The closed set of `result` labels.
pub const RESULTS: &[&str] = &[
    "ok",
    "sql_error",
    "refused",
    "timeout",
    "too_large",
    "full",
    "suspended",
    "unavailable",
    "busy",
    "bad_request",
];

#[derive(Clone)]
pub struct DbMetrics {
    pub queries_total: IntCounterVec,
    pub query_seconds: Histogram,
    pub rows_read_total: IntCounter,
    pub rows_written_total: IntCounter,
}

impl DbMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<DbMetrics> {
        let m = DbMetrics::unregistered()?;
        registry.register(Box::new(m.queries_total.clone()))?;
        registry.register(Box::new(m.query_seconds.clone()))?;
        registry.register(Box::new(m.rows_read_total.clone()))?;
        registry.register(Box::new(m.rows_written_total.clone()))?;
        Ok(m)
    }

    /// Metrics nobody scrapes (tests, benches).
    pub fn unregistered() -> prometheus::Result<DbMetrics> {
        let queries_total = IntCounterVec::new(
            Opts::new(
                "tollgate_database_queries_total",
                "D1 requests (a statement or a batch) from hosted services and query_database, by result.",
            ),
            &["result"],
        )?;
        for r in RESULTS {
            queries_total.with_label_values(&[r]);
        }
        Ok(DbMetrics {
            queries_total,
            query_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_database_query_duration_seconds",
                    "From a D1 request's arrival to its answer (admission, queue for the project's connection, SQLite).",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
                ]),
            )?,
            rows_read_total: IntCounter::new(
                "tollgate_database_rows_read_total",
                "Rows read by D1 requests (what their owners are charged for).",
            )?,
            rows_written_total: IntCounter::new(
                "tollgate_database_rows_written_total",
                "Rows written by D1 requests (what their owners are charged for).",
            )?,
        })
    }

    pub(crate) fn result(&self, r: &str) {
        self.queries_total.with_label_values(&[r]).inc();
    }
}
