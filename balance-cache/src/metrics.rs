//! Metering metrics on a node (registered in the injected registry).

use prometheus::{Counter, Histogram, HistogramOpts, IntCounter, IntGauge, Registry};

#[derive(Clone)]
pub struct CacheMetrics {
    pub settle_batches_total: IntCounter,
    pub settle_failures_total: IntCounter,
    pub settle_seconds: Histogram,
    pub lease_refills_total: IntCounter,
    pub journal_depth: IntGauge,
    pub lease_drift_total: IntCounter,
    pub feed_lag_seconds: Histogram,
    pub metered_cpu_seconds_total: Counter,
}

impl CacheMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let m = CacheMetrics {
            settle_batches_total: IntCounter::new(
                "tollgate_settle_batches_total",
                "Settle batches the store acknowledged.",
            )?,
            settle_failures_total: IntCounter::new(
                "tollgate_settle_failures_total",
                "Settle attempts that failed (retried from the journal).",
            )?,
            // A settle is one script round trip: ~100 µs on loopback, ms under load.
            settle_seconds: Histogram::with_opts(
                HistogramOpts::new("tollgate_settle_duration_seconds", "Settle round trip.")
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
                    ]),
            )?,
            lease_refills_total: IntCounter::new(
                "tollgate_lease_refills_total",
                "Settles that grew a lease on this node.",
            )?,
            journal_depth: IntGauge::new(
                "tollgate_settle_journal_depth",
                "Batches journaled but not yet acknowledged by the store.",
            )?,
            lease_drift_total: IntCounter::new(
                "tollgate_lease_drift_total",
                "Settle replies whose previous lease differed from this node's record (a bug).",
            )?,
            // The target is 5 ms p99 node to node; loopback is ~0.3 ms.
            feed_lag_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_balance_feed_lag_seconds",
                    "From a balance change at the store (its clock) to this node applying it.",
                )
                .buckets(vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
                ]),
            )?,
            metered_cpu_seconds_total: Counter::new(
                "tollgate_metered_cpu_seconds_total",
                "CPU time of hosted services charged to their owners through this node (settled).",
            )?,
        };
        registry.register(Box::new(m.settle_batches_total.clone()))?;
        registry.register(Box::new(m.settle_failures_total.clone()))?;
        registry.register(Box::new(m.settle_seconds.clone()))?;
        registry.register(Box::new(m.lease_refills_total.clone()))?;
        registry.register(Box::new(m.journal_depth.clone()))?;
        registry.register(Box::new(m.lease_drift_total.clone()))?;
        registry.register(Box::new(m.feed_lag_seconds.clone()))?;
        registry.register(Box::new(m.metered_cpu_seconds_total.clone()))?;
        Ok(m)
    }
}

/// `tollgate_cached_accounts` and `tollgate_suspended_accounts`, counted from the cache at
/// scrape time (a walk of its slots: no cost on the request path). Holds the cache weakly, so
/// a registry outliving its node exports nothing rather than keeping it alive.
pub(crate) struct AccountsCollector {
    cache: std::sync::Weak<crate::BalanceCache>,
    cached: IntGauge,
    suspended: IntGauge,
    descs: Vec<prometheus::core::Desc>,
}

impl AccountsCollector {
    pub(crate) fn new(cache: &std::sync::Arc<crate::BalanceCache>) -> prometheus::Result<Self> {
        let cached = IntGauge::new(
            "tollgate_cached_accounts",
            "Accounts with a balance slot on this node: every account it metered since it started.",
        )?;
        let suspended = IntGauge::new(
            "tollgate_suspended_accounts",
            "Accounts this node answers 402 for: their balance is spent.",
        )?;
        let descs = [&cached, &suspended]
            .iter()
            .flat_map(|g| prometheus::core::Collector::desc(*g))
            .cloned()
            .collect();
        Ok(AccountsCollector {
            cache: std::sync::Arc::downgrade(cache),
            cached,
            suspended,
            descs,
        })
    }
}

impl prometheus::core::Collector for AccountsCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let (cached, suspended) = self.cache.upgrade().map_or((0, 0), |c| c.count_accounts());
        self.cached.set(cached as i64);
        self.suspended.set(suspended as i64);
        let mut out = self.cached.collect();
        out.extend(self.suspended.collect());
        out
    }
}
