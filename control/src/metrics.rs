//! Deploys as SREs see them (docs/metrics.md): by result and duration, no project in any label.

use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};

#[derive(Clone)]
pub(crate) struct ControlMetrics {
    deploys: IntCounterVec,
    duration: Histogram,
}

impl ControlMetrics {
    pub(crate) fn register(registry: &Registry) -> prometheus::Result<ControlMetrics> {
        let deploys = IntCounterVec::new(
            Opts::new(
                "tollgate_deploys_total",
                "Deploys by result: live, failed (went through the pipeline and did not go live: the code crashed at start, or a platform fault), refused (rejected before anything ran: bad input, a bundle error, not the owner)",
            ),
            &["result"],
        )?;
        for r in ["live", "failed", "refused"] {
            deploys.with_label_values(&[r]);
        }
        let duration = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_deploy_duration_seconds",
                "A deploy from the request to live or failed (validate, bundle, start, publish)",
            )
            .buckets(vec![0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0]),
        )?;
        registry.register(Box::new(deploys.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(ControlMetrics { deploys, duration })
    }

    pub(crate) fn observe(&self, result: &'static str, seconds: f64) {
        self.deploys.with_label_values(&[result]).inc();
        // Refusals take no time worth a histogram (and would drown the deploys that ran).
        if result != "refused" {
            self.duration.observe(seconds);
        }
    }
}
