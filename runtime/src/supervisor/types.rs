//! The supervisor's public types: configuration, specs, status, errors, CPU deltas and sinks,
//! in-flight counts, events.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cpu::{AppliedLimits, CgroupMode};

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Deployment folders (bundle + generated config) live under `<data_dir>/deployments`.
    pub data_dir: PathBuf,
    pub cgroups: CgroupMode,
    /// How often each process's CPU is read and charged.
    pub sample_interval: Duration,
    pub ready_timeout: Duration,
    /// SIGTERM → SIGKILL.
    pub stop_grace: Duration,
    /// After a route switch, wait at least this long (route propagation) before stopping the old
    /// version, then until its in-flight requests finish or `drain_timeout` passes.
    pub min_drain: Duration,
    pub drain_timeout: Duration,
    /// CPU a deployment may use during one busy period (requests in flight without a break)
    /// before its process is killed and restarted; like Workers' per-request CPU limit.
    pub cpu_limit_per_request: Duration,
    pub memory_limit_bytes: Option<u64>,
    /// Share of one core per process (100 = one core), where a CPU controller is writable.
    pub cpu_share_percent: Option<u32>,
    /// More than this many crashes within `restart_window` marks the deployment failed.
    pub max_restarts: u32,
    pub restart_window: Duration,
    pub compatibility_flags: Vec<String>,
    /// A deployment with no request and no CPU use for this long has its process stopped; a
    /// loopback "activator" socket takes its place in the route and starts it again on the
    /// next connection. `None` keeps processes running.
    pub idle_timeout: Option<Duration>,
    pub log_entries: usize,
    pub log_line_bytes: usize,
    /// The address workerd processes (and idle activators) listen on, and routes point
    /// proxies at. Loopback unless proxies run on other hosts; then only they may reach it
    /// (a firewall or NetworkPolicy: tenant processes behind it are not metered).
    pub listen_ip: std::net::IpAddr,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            data_dir: PathBuf::from("tollgate-data/runtime"),
            cgroups: CgroupMode::Auto,
            sample_interval: Duration::from_millis(50),
            ready_timeout: Duration::from_secs(10),
            stop_grace: Duration::from_secs(2),
            min_drain: Duration::from_millis(250),
            drain_timeout: Duration::from_secs(30),
            cpu_limit_per_request: Duration::from_secs(30),
            // A busy workerd grows to ~300 MiB (runtime.md) and keeps it; 256 MiB got it
            // OOM-killed under a benchmark's load.
            memory_limit_bytes: Some(512 * 1024 * 1024),
            cpu_share_percent: Some(100),
            max_restarts: 5,
            restart_window: Duration::from_secs(60),
            compatibility_flags: vec!["nodejs_compat".to_owned()],
            idle_timeout: Some(Duration::from_secs(600)),
            log_entries: 1000,
            log_line_bytes: 4096,
            listen_ip: std::net::IpAddr::from([127, 0, 0, 1]),
        }
    }
}

/// What to run (also what a runtime host is sent: docs/scale-out.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeploymentSpec {
    pub deployment_id: String,
    pub project_id: String,
    /// The paying account: CPU deltas carry it so the metering side can charge them.
    pub account_id: String,
    /// The bundled ES module.
    pub code: String,
    pub compatibility_date: String,
    /// Env vars and secrets, as text bindings on `env`.
    pub env: BTreeMap<String, String>,
    /// The project's SQL database, bound as D1 under these names (none: no binding).
    pub databases: Vec<String>,
    /// Where the D1 service listens and this deployment's token for it; needed when
    /// `databases` is not empty.
    pub d1: Option<D1Access>,
}

/// The D1 service a deployment's database bindings call, and the secret token workerd adds to
/// each of its requests (tenant code never sees it).
#[derive(Clone, Serialize, Deserialize)]
pub struct D1Access {
    /// `IP:PORT`, or `unix:/path/to/socket`.
    pub address: String,
    pub token: String,
}

impl std::fmt::Debug for D1Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("D1Access")
            .field("address", &self.address)
            .field("token", &"<secret>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuntimeError {
    #[error("invalid deployment: {0}")]
    Invalid(String),
    #[error("deployment {0} is already running")]
    Exists(String),
    #[error("no deployment {0}")]
    NotFound(String),
    #[error("the deployment did not start: {0}")]
    StartFailed(String),
    #[error("runtime I/O: {0}")]
    Io(String),
}

/// CPU used by one deployment since the previous sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuDelta {
    pub deployment_id: Arc<str>,
    pub project_id: Arc<str>,
    pub account_id: Arc<str>,
    pub cpu_us: u64,
}

/// Receives CPU deltas every sample interval (the metering side charges them). Called from the
/// sampler task: keep it cheap and non-blocking.
pub trait CpuSink: Send + Sync + 'static {
    fn record(&self, deltas: &[CpuDelta]);

    /// Called right after `record`: the deployments among `deltas` whose owner can no longer
    /// pay for the CPU they keep using. The runtime interrupts them (kills the process and
    /// starts it again at once, with nothing in flight), so a CPU-heavy request cannot run far
    /// past an empty balance.
    /// Default: none (nothing is metered).
    fn unpaid(&self, _deltas: &[CpuDelta]) -> Vec<Arc<str>> {
        Vec::new()
    }
}

/// Charges nothing: a runtime whose CPU nobody pays for (metering off, tests).
pub struct NoCpuSink;

impl CpuSink for NoCpuSink {
    fn record(&self, _deltas: &[CpuDelta]) {}
}

/// Things the control plane must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeEvent {
    /// The deployment's address changed (restart, idle stop to its activator, cold start from
    /// it): republish the route.
    Upstream {
        deployment_id: String,
        addr: SocketAddr,
    },
    /// Gave up restarting.
    Failed {
        deployment_id: String,
        reason: String,
    },
}

/// Requests in flight for one deployment. The proxy holds a guard per request; the CPU cap needs
/// it to tell one long request from a stream of short ones.
#[derive(Debug, Default)]
pub struct Inflight {
    count: AtomicU32,
    pub(crate) busy_periods: AtomicU64,
    pub(crate) completed: AtomicU64,
}

pub struct InflightGuard(Arc<Inflight>);

impl Inflight {
    pub fn begin(self: &Arc<Self>) -> InflightGuard {
        if self.count.fetch_add(1, Ordering::AcqRel) == 0 {
            self.busy_periods.fetch_add(1, Ordering::AcqRel);
        }
        InflightGuard(self.clone())
    }

    pub fn count(&self) -> u32 {
        self.count.load(Ordering::Acquire)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.completed.fetch_add(1, Ordering::AcqRel);
        self.0.count.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Running,
    /// Stopped for idleness; `addr` is the activator that starts it on the next connection.
    Idle,
    Restarting,
    Stopping,
    Stopped,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeploymentStatus {
    pub deployment_id: String,
    pub project_id: String,
    pub phase: Phase,
    pub addr: Option<SocketAddr>,
    pub pid: Option<u32>,
    pub restarts: u32,
    pub cpu_limit_kills: u32,
    pub last_exit: Option<String>,
    pub failure: Option<String>,
    pub cold_start_ms: Option<u64>,
    pub cpu_us_total: u64,
    pub limits: AppliedLimits,
}

/// Returned once a new deployment answers.
#[derive(Debug, Clone, Serialize)]
pub struct Started {
    pub addr: SocketAddr,
    pub pid: u32,
    pub cold_start_ms: u64,
    pub limits: AppliedLimits,
}
