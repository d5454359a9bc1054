//! Payment metrics (Prometheus conventions: `tollgate_` prefix, base units, bounded labels).

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

use crate::{Accepted, Rejection};

#[derive(Clone)]
pub struct PaymentMetrics {
    /// Session credentials by action (`open|voucher|topUp|close`) and result
    /// (`accepted|rejected|unavailable`).
    pub credentials: IntCounterVec,
    pub verify_seconds: Histogram,
    /// p$ credited to accounts from vouchers.
    pub credited_picodollars: IntCounter,
    /// Settlement and close transactions by kind (`settle|close`) and result (`ok|failed`).
    pub chain_ops: IntCounterVec,
}

impl PaymentMetrics {
    pub fn new() -> prometheus::Result<Self> {
        let credentials = IntCounterVec::new(
            Opts::new(
                "tollgate_payment_credentials_total",
                "MPP session credentials received, by action and result",
            ),
            &["action", "result"],
        )?;
        let verify_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_payment_verify_seconds",
                "Time to verify and record one session credential",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let credited_picodollars = IntCounter::new(
            "tollgate_payment_credited_picodollars_total",
            "Credit added to accounts from accepted vouchers (pico-dollars)",
        )?;
        let chain_ops = IntCounterVec::new(
            Opts::new(
                "tollgate_payment_chain_transactions_total",
                "Settlement and close transactions sent, by kind and result",
            ),
            &["kind", "result"],
        )?;
        Ok(PaymentMetrics {
            credentials,
            verify_seconds,
            credited_picodollars,
            chain_ops,
        })
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.credentials.clone()))?;
        registry.register(Box::new(self.verify_seconds.clone()))?;
        registry.register(Box::new(self.credited_picodollars.clone()))?;
        registry.register(Box::new(self.chain_ops.clone()))?;
        Ok(())
    }

    pub(crate) fn observe(&self, r: &Result<Accepted, Rejection>, took: Duration) {
        self.verify_seconds.observe(took.as_secs_f64());
        let (action, result) = match r {
            Ok(a) => (a.action.as_str(), "accepted"),
            Err(e) if e.retryable => ("unknown", "unavailable"),
            Err(_) => ("unknown", "rejected"),
        };
        self.credentials.with_label_values(&[action, result]).inc();
    }

    pub(crate) fn credited(&self, picos: i64) {
        self.credited_picodollars
            .inc_by(u64::try_from(picos).unwrap_or(0));
    }

    pub(crate) fn chain_op(&self, kind: &str, ok: bool) {
        self.chain_ops
            .with_label_values(&[kind, if ok { "ok" } else { "failed" }])
            .inc();
    }
}
