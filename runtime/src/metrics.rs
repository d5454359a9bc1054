//! What the runtime tells SREs (docs/metrics.md): processes running, starts, exits by reason,
//! cold starts, deployments given up. No deployment id in any label (unbounded).

use prometheus::{
    Counter, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

/// Exit reasons, every series present from the start.
pub(crate) const EXIT_REASONS: [&str; 5] = ["crashed", "cpu_limit", "unpaid", "idle", "stopped"];

#[derive(Clone)]
pub(crate) struct RuntimeMetrics {
    processes: IntGauge,
    starts: IntCounterVec,
    start_duration: Histogram,
    exits: IntCounterVec,
    failed: IntCounter,
    cpu_seconds: Counter,
    memory_bytes: IntGauge,
}

impl RuntimeMetrics {
    pub(crate) fn new() -> prometheus::Result<RuntimeMetrics> {
        let starts = IntCounterVec::new(
            Opts::new(
                "tollgate_runtime_starts_total",
                "workerd process starts by result (failed: never answered HTTP, or could not be put under its limits)",
            ),
            &["result"],
        )?;
        for r in ["ok", "failed"] {
            starts.with_label_values(&[r]);
        }
        let exits = IntCounterVec::new(
            Opts::new(
                "tollgate_runtime_exits_total",
                "workerd process exits by reason: crashed, cpu_limit (killed at the CPU limit per request), unpaid (interrupted: the owner's balance is gone), idle (stopped when idle), stopped (undeployed, replaced or shut down)",
            ),
            &["reason"],
        )?;
        for r in EXIT_REASONS {
            exits.with_label_values(&[r]);
        }
        let cpu_seconds = Counter::new(
            "tollgate_runtime_cpu_seconds_total",
            "CPU time used by workerd processes (user + system), whether or not an owner paid for it",
        )?;
        let memory_bytes = IntGauge::new(
            "tollgate_runtime_memory_bytes",
            "Resident memory of the running workerd processes, summed, read once a second",
        )?;
        Ok(RuntimeMetrics {
            cpu_seconds,
            memory_bytes,
            processes: IntGauge::new(
                "tollgate_runtime_processes",
                "workerd processes running now",
            )?,
            starts,
            start_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_runtime_start_duration_seconds",
                    "From starting a workerd process to its first HTTP answer (cold start)",
                )
                .buckets(vec![
                    0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
                ]),
            )?,
            exits,
            failed: IntCounter::new(
                "tollgate_runtime_failed_deployments_total",
                "Deployments given up after crashing too often (restart_window)",
            )?,
        })
    }

    pub(crate) fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.processes.clone()))?;
        registry.register(Box::new(self.starts.clone()))?;
        registry.register(Box::new(self.start_duration.clone()))?;
        registry.register(Box::new(self.exits.clone()))?;
        registry.register(Box::new(self.failed.clone()))?;
        registry.register(Box::new(self.cpu_seconds.clone()))?;
        registry.register(Box::new(self.memory_bytes.clone()))?;
        Ok(())
    }

    pub(crate) fn started(&self, seconds: f64) {
        self.starts.with_label_values(&["ok"]).inc();
        self.start_duration.observe(seconds);
        self.processes.inc();
    }

    pub(crate) fn start_failed(&self) {
        self.starts.with_label_values(&["failed"]).inc();
    }

    /// A process that was counted as started is gone.
    pub(crate) fn exited(&self, reason: &'static str) {
        self.processes.dec();
        self.exits.with_label_values(&[reason]).inc();
    }

    pub(crate) fn cpu_used(&self, cpu_us: u64) {
        self.cpu_seconds.inc_by(cpu_us as f64 / 1e6);
    }

    pub(crate) fn memory(&self, bytes: u64) {
        self.memory_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    pub(crate) fn gave_up(&self) {
        self.failed.inc();
    }
}
