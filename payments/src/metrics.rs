//! Payment metrics (Prometheus conventions: `tollgate_` prefix, base units, bounded labels).

use std::time::Duration;

use prometheus::{
    Counter, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

use crate::{Accepted, Rejection};

#[derive(Clone)]
pub struct PaymentMetrics {
    /// Session credentials by action (`open|voucher|topUp|close`) and result
    /// (`accepted|rejected|unavailable`).
    pub credentials: IntCounterVec,
    pub verify_seconds: Histogram,
    /// Dollars credited to accounts from vouchers (a float counter: an integer one of
    /// pico-dollars would wrap at ~$18M).
    pub credited_dollars: Counter,
    /// Chain operations by kind (`settle|close|capture reads as settle|events|read`) and result
    /// (`ok|failed`).
    pub chain_ops: IntCounterVec,
    /// Close requests the payers made on chain (seen by the close watcher).
    pub close_requests: IntCounter,
    /// Write-offs of credit whose voucher could not be captured in time, and what they took.
    pub write_offs: IntCounter,
    pub written_off_dollars: Counter,
    /// Pending credits set aside because the money store refuses them for good.
    pub credits_poisoned: IntCounter,
    /// Credits waiting to be applied, and set aside, as of the last drain.
    pub credits_pending: IntGauge,
    pub credits_poisoned_now: IntGauge,
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
                "tollgate_payment_verify_duration_seconds",
                "Time to verify and record one session credential",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )?;
        let credited_dollars = Counter::new(
            "tollgate_payment_credited_dollars_total",
            "Credit added to accounts from accepted vouchers (dollars)",
        )?;
        let chain_ops = IntCounterVec::new(
            Opts::new(
                "tollgate_payment_chain_transactions_total",
                "Settlement and close transactions sent, by kind and result",
            ),
            &["kind", "result"],
        )?;
        let close_requests = IntCounter::new(
            "tollgate_payment_close_requests_total",
            "Channel close requests payers made on chain (the payee then captures in full)",
        )?;
        let write_offs = IntCounter::new(
            "tollgate_payment_write_offs_total",
            "Credit written off because its voucher could not be captured before the payer could withdraw",
        )?;
        let written_off_dollars = Counter::new(
            "tollgate_payment_written_off_dollars_total",
            "Credit written off (dollars)",
        )?;
        let credits_poisoned = IntCounter::new(
            "tollgate_payment_credits_poisoned_total",
            "Pending credits set aside because the money store refuses them for good",
        )?;
        let credits_pending = IntGauge::new(
            "tollgate_payment_credits_pending",
            "Credits recorded with a payment and not yet applied to the account",
        )?;
        let credits_poisoned_now = IntGauge::new(
            "tollgate_payment_credits_poisoned",
            "Credits set aside for an operator (tollgate payments credits)",
        )?;
        // Failure series exist from the start, so rate() sees the first failure.
        for action in ["open", "voucher", "topUp", "close", "unknown"] {
            for result in ["accepted", "rejected", "unavailable"] {
                credentials.with_label_values(&[action, result]);
            }
        }
        for kind in ["settle", "close", "events", "read"] {
            for result in ["ok", "failed"] {
                chain_ops.with_label_values(&[kind, result]);
            }
        }
        Ok(PaymentMetrics {
            credentials,
            verify_seconds,
            credited_dollars,
            chain_ops,
            close_requests,
            write_offs,
            written_off_dollars,
            credits_poisoned,
            credits_pending,
            credits_poisoned_now,
        })
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.credentials.clone()))?;
        registry.register(Box::new(self.verify_seconds.clone()))?;
        registry.register(Box::new(self.credited_dollars.clone()))?;
        registry.register(Box::new(self.chain_ops.clone()))?;
        registry.register(Box::new(self.close_requests.clone()))?;
        registry.register(Box::new(self.write_offs.clone()))?;
        registry.register(Box::new(self.written_off_dollars.clone()))?;
        registry.register(Box::new(self.credits_poisoned.clone()))?;
        registry.register(Box::new(self.credits_pending.clone()))?;
        registry.register(Box::new(self.credits_poisoned_now.clone()))?;
        Ok(())
    }

    pub(crate) fn observe(
        &self,
        cred: &mpp::PaymentCredential,
        r: &Result<Accepted, Rejection>,
        took: Duration,
    ) {
        self.verify_seconds.observe(took.as_secs_f64());
        // What the payer attempted, also when refused (bounded: unknown values are "unknown").
        let attempted = match cred.payload.get("action").and_then(|a| a.as_str()) {
            Some("open") => "open",
            Some("voucher") => "voucher",
            Some("topUp") => "topUp",
            Some("close") => "close",
            _ => "unknown",
        };
        let (action, result) = match r {
            Ok(a) => (a.action.as_str(), "accepted"),
            Err(e) if e.retryable => (attempted, "unavailable"),
            Err(_) => (attempted, "rejected"),
        };
        self.credentials.with_label_values(&[action, result]).inc();
    }

    pub(crate) fn undecodable(&self) {
        self.credentials
            .with_label_values(&["unknown", "rejected"])
            .inc();
    }

    // Metrics only: money itself stays integer pico-dollars everywhere else.
    pub(crate) fn credited(&self, picos: i64) {
        self.credited_dollars.inc_by(picos.max(0) as f64 / 1e12);
    }

    pub(crate) fn written_off(&self, picos: i64) {
        self.write_offs.inc();
        self.written_off_dollars.inc_by(picos.max(0) as f64 / 1e12);
    }

    pub(crate) fn chain_op(&self, kind: &str, ok: bool) {
        self.chain_ops
            .with_label_values(&[kind, if ok { "ok" } else { "failed" }])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_series_exist_at_zero_before_the_first_event() {
        let registry = Registry::new();
        PaymentMetrics::new().unwrap().register(&registry).unwrap();
        let families = registry.gather();
        let count = |name: &str| {
            families
                .iter()
                .find(|f| f.name() == name)
                .map_or(0, |f| f.get_metric().len())
        };
        assert_eq!(count("tollgate_payment_credentials_total"), 5 * 3);
        assert_eq!(count("tollgate_payment_chain_transactions_total"), 4 * 2);
        let mut out = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&families, &mut out)
            .unwrap();
        assert!(
            out.contains(
                "tollgate_payment_credentials_total{action=\"voucher\",result=\"rejected\"} 0"
            ),
            "{out}"
        );
        assert!(out.contains("tollgate_payment_verify_duration_seconds_bucket"));
        assert!(out.contains("tollgate_payment_credited_dollars_total 0"));
    }
}
