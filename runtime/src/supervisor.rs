//! Supervises one workerd process per deployment version: start, readiness, crash restarts with
//! backoff, CPU sampling and the per-request CPU cap, drain-then-stop.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::capnp::{self, WorkerConfig};
use crate::cpu::{AppliedLimits, CgroupMode, CgroupRoots, CpuMeter, ProcessLimits};
use crate::instance;
use crate::logs::{LogBuffer, LogEntry};
use crate::toolchain::Toolchain;

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
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
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
    busy_periods: AtomicU64,
    completed: AtomicU64,
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
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

struct Proc {
    meter: CpuMeter,
    last_us: u64,
    seen_busy: u64,
    seen_completed: u64,
    streak_us: u64,
}

struct Deployment {
    id: Arc<str>,
    project: Arc<str>,
    account: Arc<str>,
    dir: PathBuf,
    logs: Arc<LogBuffer>,
    inflight: Arc<Inflight>,
    status: Mutex<DeploymentStatus>,
    proc_: Mutex<Option<Proc>>,
    killed_for_cpu: AtomicBool,
    /// Set before an interruption because the owner cannot pay for the CPU.
    killed_unpaid: AtomicBool,
    /// The sampler asks the monitor (which owns the child) to kill it: no raw pid that could
    /// have been reused by then.
    cpu_kill: tokio::sync::Notify,
    idle_req: tokio::sync::Notify,
    idle_requested: AtomicBool,
    /// Milliseconds since `Inner::epoch` of the last request or CPU use.
    last_active_ms: AtomicU64,
    stop_tx: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    epoch: Instant,
    cfg: RuntimeConfig,
    toolchain: Toolchain,
    cgroups: CgroupRoots,
    deployments: Mutex<HashMap<String, Arc<Deployment>>>,
    cpu_sink: Arc<dyn CpuSink>,
    events: mpsc::UnboundedSender<RuntimeEvent>,
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Supervisor {
    /// Starts the CPU sampler. Events arrive on the returned receiver.
    pub fn new(
        cfg: RuntimeConfig,
        toolchain: Toolchain,
        cpu_sink: Arc<dyn CpuSink>,
    ) -> Result<(Supervisor, mpsc::UnboundedReceiver<RuntimeEvent>), RuntimeError> {
        std::fs::create_dir_all(cfg.data_dir.join("deployments"))
            .map_err(|e| RuntimeError::Io(format!("{}: {e}", cfg.data_dir.display())))?;
        let group = format!("tollgate-{}", std::process::id());
        let cgroups = CgroupRoots::detect(cfg.cgroups, &group);
        tracing::info!(?cgroups, "runtime: cgroup support");
        let (events, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            epoch: Instant::now(),
            cfg,
            toolchain,
            cgroups,
            deployments: Mutex::new(HashMap::new()),
            cpu_sink,
            events,
        });
        let weak = Arc::downgrade(&inner);
        let period = inner.cfg.sample_interval;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                inner.sample();
            }
        });
        Ok((Supervisor { inner }, rx))
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.cfg
    }

    /// Writes the deployment's files, starts its process and waits until it answers HTTP.
    pub async fn start(&self, spec: DeploymentSpec) -> Result<Started, RuntimeError> {
        let cfg = &self.inner.cfg;
        if !valid_id(&spec.deployment_id) || !valid_id(&spec.project_id) {
            return Err(RuntimeError::Invalid(
                "ids are 1-64 characters of A-Z a-z 0-9 - _".to_owned(),
            ));
        }
        if !capnp::valid_compatibility_date(&spec.compatibility_date) {
            return Err(RuntimeError::Invalid(format!(
                "compatibility date {:?} is not YYYY-MM-DD",
                spec.compatibility_date
            )));
        }
        if let Some(bad) = spec.env.keys().find(|k| !capnp::valid_binding_name(k)) {
            return Err(RuntimeError::Invalid(format!(
                "env var name {bad:?} must be an identifier (letters, digits, _; not starting with a digit)"
            )));
        }
        let dir = cfg.data_dir.join("deployments").join(&spec.deployment_id);
        let (stop_tx, stop_rx) = watch::channel(false);
        let dep = Arc::new(Deployment {
            id: spec.deployment_id.as_str().into(),
            project: spec.project_id.as_str().into(),
            account: spec.account_id.as_str().into(),
            dir: dir.clone(),
            logs: Arc::new(LogBuffer::new(cfg.log_entries, cfg.log_line_bytes)),
            inflight: Arc::new(Inflight::default()),
            status: Mutex::new(DeploymentStatus {
                deployment_id: spec.deployment_id.clone(),
                project_id: spec.project_id.clone(),
                phase: Phase::Starting,
                addr: None,
                pid: None,
                restarts: 0,
                cpu_limit_kills: 0,
                last_exit: None,
                failure: None,
                cold_start_ms: None,
                cpu_us_total: 0,
                limits: AppliedLimits::default(),
            }),
            proc_: Mutex::new(None),
            killed_for_cpu: AtomicBool::new(false),
            killed_unpaid: AtomicBool::new(false),
            cpu_kill: tokio::sync::Notify::new(),
            idle_req: tokio::sync::Notify::new(),
            idle_requested: AtomicBool::new(false),
            last_active_ms: AtomicU64::new(self.inner.now_ms()),
            stop_tx,
            task: Mutex::new(None),
        });
        {
            let mut map = self.lock_map();
            if let Some(existing) = map.get(&spec.deployment_id)
                && !matches!(existing.phase(), Phase::Stopped | Phase::Failed)
            {
                return Err(RuntimeError::Exists(spec.deployment_id));
            }
            map.insert(spec.deployment_id.clone(), dep.clone());
        }
        if let Err(e) = write_files(&dir, &spec, cfg) {
            self.lock_map().remove(&spec.deployment_id);
            return Err(e);
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(monitor(self.inner.clone(), dep.clone(), stop_rx, ready_tx));
        if let Ok(mut t) = dep.task.lock() {
            *t = Some(task);
        }
        match ready_rx.await {
            Ok(Ok(started)) => Ok(started),
            Ok(Err(reason)) => {
                self.lock_map().remove(&spec.deployment_id);
                let _ = std::fs::remove_dir_all(&dir);
                Err(RuntimeError::StartFailed(reason))
            }
            Err(_) => Err(RuntimeError::StartFailed(
                "supervisor task ended".to_owned(),
            )),
        }
    }

    /// Start `spec`, let `publish` point traffic at it, then drain and stop `old`. When start or
    /// publish fails, `old` keeps serving and the new process is stopped.
    pub async fn redeploy<F, Fut>(
        &self,
        old: Option<&str>,
        spec: DeploymentSpec,
        publish: F,
    ) -> Result<Started, RuntimeError>
    where
        F: FnOnce(SocketAddr) -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        let id = spec.deployment_id.clone();
        let started = self.start(spec).await?;
        if let Err(e) = publish(started.addr).await {
            let _ = self.remove(&id, false).await;
            return Err(RuntimeError::StartFailed(format!(
                "could not publish the route: {e}"
            )));
        }
        if let Some(old) = old {
            let _ = self.stop(old, true).await;
        }
        Ok(started)
    }

    /// Stops a deployment's process; with `drain`, first waits for route propagation and for
    /// its in-flight requests. Logs and status stay readable until [`Supervisor::remove`].
    pub async fn stop(&self, deployment_id: &str, drain: bool) -> Result<(), RuntimeError> {
        let dep = self
            .get(deployment_id)
            .ok_or_else(|| RuntimeError::NotFound(deployment_id.to_owned()))?;
        if drain {
            tokio::time::sleep(self.inner.cfg.min_drain).await;
            let deadline = Instant::now() + self.inner.cfg.drain_timeout;
            while dep.inflight.count() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let _ = dep.stop_tx.send(true);
        let task = dep.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
        Ok(())
    }

    /// Stops and forgets a deployment, deleting its files.
    pub async fn remove(&self, deployment_id: &str, drain: bool) -> Result<(), RuntimeError> {
        self.stop(deployment_id, drain).await?;
        if let Some(dep) = self.lock_map().remove(deployment_id) {
            let _ = std::fs::remove_dir_all(&dep.dir);
        }
        Ok(())
    }

    /// Stops everything (process exit).
    pub async fn shutdown(&self) {
        let ids: Vec<String> = self.lock_map().keys().cloned().collect();
        for id in ids {
            let _ = self.stop(&id, false).await;
        }
    }

    pub fn status(&self, deployment_id: &str) -> Option<DeploymentStatus> {
        let dep = self.get(deployment_id)?;
        let s = dep.status.lock().ok()?.clone();
        Some(s)
    }

    /// How long since the deployment last had a request, a completed request or CPU use (as far
    /// as this supervisor has seen since it started).
    pub fn idle_for(&self, deployment_id: &str) -> Option<Duration> {
        let dep = self.get(deployment_id)?;
        let last = dep.last_active_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(
            self.inner.now_ms().saturating_sub(last),
        ))
    }

    pub fn list(&self) -> Vec<DeploymentStatus> {
        let deps: Vec<_> = self.lock_map().values().cloned().collect();
        deps.iter()
            .filter_map(|d| d.status.lock().ok().map(|s| s.clone()))
            .collect()
    }

    /// Log entries with `seq >= since` (oldest first, at most `limit`) and how many were dropped.
    pub fn logs(
        &self,
        deployment_id: &str,
        since: u64,
        limit: usize,
    ) -> Option<(Vec<LogEntry>, u64)> {
        Some(self.get(deployment_id)?.logs.read(since, limit))
    }

    pub fn inflight(&self, deployment_id: &str) -> Option<Arc<Inflight>> {
        Some(self.get(deployment_id)?.inflight.clone())
    }

    fn get(&self, id: &str) -> Option<Arc<Deployment>> {
        self.lock_map().get(id).cloned()
    }

    fn lock_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Deployment>>> {
        self.inner
            .deployments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn write_files(
    dir: &std::path::Path,
    spec: &DeploymentSpec,
    cfg: &RuntimeConfig,
) -> Result<(), RuntimeError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let io = |e: std::io::Error| RuntimeError::Io(format!("{}: {e}", dir.display()));
    // The config holds the deployment's secrets: only we may read it.
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let write = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(dir.join(name))?;
        f.write_all(bytes)
    };
    write("worker.js", spec.code.as_bytes()).map_err(io)?;
    let config = capnp::render(&WorkerConfig {
        module_file: "worker.js",
        compatibility_date: &spec.compatibility_date,
        compatibility_flags: &cfg.compatibility_flags,
        bindings: &spec.env,
    });
    write("config.capnp", config.as_bytes()).map_err(io)
}

impl Deployment {
    fn phase(&self) -> Phase {
        self.status.lock().map(|s| s.phase).unwrap_or(Phase::Failed)
    }

    fn update(&self, f: impl FnOnce(&mut DeploymentStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.cgroups.cleanup();
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Reads every running process's CPU, charges the deltas, enforces the per-request cap.
    fn sample(&self) {
        let deps: Vec<Arc<Deployment>> = self
            .deployments
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let cap_us = self.cfg.cpu_limit_per_request.as_micros() as u64;
        let mut deltas = Vec::new();
        for dep in &deps {
            let Some(delta) = take_delta(dep) else {
                continue;
            };
            let mut kill = None;
            if let Ok(mut guard) = dep.proc_.lock()
                && let Some(p) = guard.as_mut()
            {
                let busy = dep.inflight.busy_periods.load(Ordering::Acquire);
                let new_period = busy != p.seen_busy;
                p.seen_busy = busy;
                let completed = dep.inflight.completed.load(Ordering::Acquire);
                // A request finished: the event loop is making progress. A runaway synchronous
                // loop blocks it, so nothing finishes while it burns.
                let progressed = completed != p.seen_completed;
                p.seen_completed = completed;
                let in_flight = dep.inflight.count();
                let now = self.now_ms();
                if delta > 0 || new_period || progressed || in_flight > 0 {
                    dep.last_active_ms.store(now, Ordering::Release);
                } else if let Some(idle) = self.cfg.idle_timeout
                    && now.saturating_sub(dep.last_active_ms.load(Ordering::Acquire))
                        > idle.as_millis() as u64
                    && !dep.idle_requested.swap(true, Ordering::AcqRel)
                {
                    dep.idle_req.notify_one();
                }
                if in_flight == 0 || progressed {
                    p.streak_us = 0;
                } else if new_period {
                    p.streak_us = delta;
                } else {
                    p.streak_us += delta;
                }
                if p.streak_us > cap_us {
                    kill = Some(p.streak_us);
                    p.streak_us = 0;
                }
            }
            if let Some(used) = kill {
                dep.killed_for_cpu.store(true, Ordering::Release);
                dep.logs.system(&format!(
                    "killed: {} ms of CPU while handling requests, over the {} ms limit; restarting",
                    used / 1000,
                    cap_us / 1000
                ));
                tracing::warn!(deployment = %dep.id, cpu_ms = used / 1000, "CPU limit per request exceeded; killing the process");
                dep.cpu_kill.notify_one();
            }
            if delta > 0 {
                deltas.push(CpuDelta {
                    deployment_id: dep.id.clone(),
                    project_id: dep.project.clone(),
                    account_id: dep.account.clone(),
                    cpu_us: delta,
                });
            }
        }
        if !deltas.is_empty() {
            self.cpu_sink.record(&deltas);
            for id in self.cpu_sink.unpaid(&deltas) {
                let Some(dep) = deps.iter().find(|d| d.id == id) else {
                    continue;
                };
                if dep.killed_unpaid.swap(true, Ordering::AcqRel) {
                    continue; // already being interrupted
                }
                dep.logs.system(
                    "interrupted: the owner's prepaid balance is used up and this CPU cannot be paid for; \
                     requests get 402 until the balance is topped up",
                );
                tracing::warn!(deployment = %dep.id, account = %dep.account, "CPU past an empty balance; interrupting the process");
                dep.cpu_kill.notify_one();
            }
        }
    }
}

impl Inner {
    /// The last CPU of a process that is stopping or gone, charged like any sample: without
    /// it, the runtime's account of a deployment's CPU would exceed what its owner paid.
    fn take_and_charge(&self, dep: &Deployment) {
        if let Some(cpu_us) = take_delta(dep) {
            self.charge(dep, cpu_us);
        }
    }

    /// Charges `cpu_us` of this deployment's CPU to its owner (and counts it in its status).
    fn charge(&self, dep: &Deployment, cpu_us: u64) {
        if cpu_us == 0 {
            return;
        }
        if dep.proc_.lock().map(|p| p.is_none()).unwrap_or(true) {
            // Not counted by `take_delta` (a start that failed): count it here.
            dep.update(|s| s.cpu_us_total += cpu_us);
        }
        self.cpu_sink.record(&[CpuDelta {
            deployment_id: dep.id.clone(),
            project_id: dep.project.clone(),
            account_id: dep.account.clone(),
            cpu_us,
        }]);
    }
}

/// CPU since the last read of this deployment's current process.
fn take_delta(dep: &Deployment) -> Option<u64> {
    let mut guard = dep.proc_.lock().ok()?;
    let p = guard.as_mut()?;
    let now = p.meter.read_us().ok()?;
    let delta = now.saturating_sub(p.last_us);
    p.last_us = now;
    drop(guard);
    dep.update(|s| s.cpu_us_total += delta);
    Some(delta)
}

/// One deployment's life: (re)start its process until stopped or failed.
async fn monitor(
    inner: Arc<Inner>,
    dep: Arc<Deployment>,
    mut stop_rx: watch::Receiver<bool>,
    ready_tx: oneshot::Sender<Result<Started, String>>,
) {
    let cfg = &inner.cfg;
    let mut ready_tx = Some(ready_tx);
    let mut crashes: VecDeque<Instant> = VecDeque::new();
    let config_path = dep.dir.join("config.capnp");
    // After an idle stop: the activator socket and the connection that woke it.
    let mut woken: Option<(TcpListener, TcpStream)> = None;
    let mut start_no = 0u64;
    loop {
        start_no += 1;
        // Limits and meter first: the process joins them before its first instruction, so its
        // module code and start-up are capped and billed like the rest of its life.
        let jail = inner.cgroups.prepare(
            &format!("{}-{start_no}", dep.id),
            ProcessLimits {
                memory_bytes: cfg.memory_limit_bytes,
                cpu_percent: cfg.cpu_share_percent,
            },
        );
        let spawned = instance::spawn(
            &inner.toolchain.workerd,
            &config_path,
            dep.logs.clone(),
            cfg.ready_timeout,
            // JSON framing around a message of up to `log_line_bytes`.
            cfg.log_line_bytes * 2 + 1024,
            &jail.procs(),
        )
        .await;
        let mut sp = match spawned {
            Ok(sp) => {
                if let Some((listener, first)) = woken.take() {
                    tokio::spawn(relay_from_activator(
                        listener,
                        first,
                        sp.addr,
                        cfg.min_drain * 8,
                    ));
                }
                sp
            }
            Err(failed) => {
                // A start that never served still ran the tenant's code: bill what it used.
                let cpu_us = jail.cgroup_cpu_us().unwrap_or(failed.proc_cpu_us);
                inner.charge(&dep, cpu_us);
                // Its groups empty once the killed process is reaped.
                let cleanup = jail;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    cleanup.discard();
                });
                let reason = with_log_tail(&failed.reason, &dep.logs);
                if let Some(tx) = ready_tx.take() {
                    dep.update(|s| {
                        s.phase = Phase::Failed;
                        s.failure = Some(reason.clone());
                    });
                    let _ = tx.send(Err(reason));
                    return;
                }
                if give_up(&inner, &dep, &mut crashes, reason).await {
                    return;
                }
                if wait_backoff(&dep, &crashes, &mut stop_rx).await {
                    finish_stopped(&dep);
                    return;
                }
                continue;
            }
        };
        let (meter, limits) = jail.into_meter(sp.pid);
        if let Ok(mut p) = dep.proc_.lock() {
            *p = Some(Proc {
                meter: meter.clone(),
                // From zero: the meter counts from the process's first instruction.
                last_us: 0,
                seen_busy: dep.inflight.busy_periods.load(Ordering::Acquire),
                seen_completed: dep.inflight.completed.load(Ordering::Acquire),
                streak_us: 0,
            });
        }
        let cold_ms = sp.started.elapsed().as_millis() as u64;
        dep.update(|s| {
            s.phase = Phase::Running;
            s.addr = Some(sp.addr);
            s.pid = Some(sp.pid);
            s.cold_start_ms = Some(cold_ms);
            s.limits = limits.clone();
        });
        dep.logs.system(&format!(
            "started pid {} on {} in {cold_ms} ms (CPU accounting: {:?})",
            sp.pid, sp.addr, limits.accounting
        ));
        match ready_tx.take() {
            Some(tx) => {
                let _ = tx.send(Ok(Started {
                    addr: sp.addr,
                    pid: sp.pid,
                    cold_start_ms: cold_ms,
                    limits,
                }));
            }
            None => {
                let _ = inner.events.send(RuntimeEvent::Upstream {
                    deployment_id: dep.id.to_string(),
                    addr: sp.addr,
                });
            }
        }

        let stopped = loop {
            let idle = tokio::select! {
                status = sp.child.wait() => break Exit::Crashed(status),
                r = stop_rx.wait_for(|s| *s) => {
                    drop(r);
                    break Exit::Stop;
                }
                _ = dep.idle_req.notified() => true,
                _ = dep.cpu_kill.notified() => {
                    // A wake-up left over from a process that is gone (its flag was cleared)
                    // must not kill this one.
                    if dep.killed_for_cpu.load(Ordering::Acquire)
                        || dep.killed_unpaid.load(Ordering::Acquire)
                    {
                        let _ = sp.child.start_kill();
                    }
                    false
                }
            };
            if idle {
                match TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => break Exit::Idle(l),
                    Err(e) => {
                        tracing::warn!(deployment = %dep.id, "no activator socket ({e}); staying up");
                        dep.idle_requested.store(false, Ordering::Release);
                    }
                }
            }
        };
        match stopped {
            Exit::Idle(listener) => {
                // Point the route at the activator first, let that propagate and anything
                // already sent to the process finish; only then stop it. Connections that
                // reach the activator meanwhile wait in its backlog for the next start.
                let activator = listener.local_addr().ok();
                if let Some(addr) = activator {
                    let _ = inner.events.send(RuntimeEvent::Upstream {
                        deployment_id: dep.id.to_string(),
                        addr,
                    });
                }
                tokio::time::sleep(cfg.min_drain).await;
                let deadline = Instant::now() + cfg.drain_timeout;
                while dep.inflight.count() > 0 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                inner.take_and_charge(&dep);
                instance::stop(&mut sp.child, cfg.stop_grace).await;
                inner.take_and_charge(&dep);
                end_proc(&dep, &meter);
                // An interruption asked for meanwhile is moot: the process is gone.
                dep.killed_unpaid.store(false, Ordering::Release);
                dep.update(|s| {
                    s.phase = Phase::Idle;
                    s.addr = activator;
                    s.pid = None;
                });
                dep.logs
                    .system("idle: process stopped; the next request starts it again");
                tokio::select! {
                    conn = listener.accept() => {
                        dep.last_active_ms.store(inner.now_ms(), Ordering::Release);
                        dep.idle_requested.store(false, Ordering::Release);
                        dep.update(|s| s.phase = Phase::Starting);
                        match conn {
                            Ok((stream, _)) => woken = Some((listener, stream)),
                            Err(e) => tracing::warn!(deployment = %dep.id, "activator: {e}"),
                        }
                        continue;
                    }
                    _ = stop_rx.wait_for(|s| *s) => {
                        finish_stopped(&dep);
                        return;
                    }
                }
            }
            Exit::Stop => {
                dep.update(|s| s.phase = Phase::Stopping);
                inner.take_and_charge(&dep);
                instance::stop(&mut sp.child, cfg.stop_grace).await;
                inner.take_and_charge(&dep); // cgroup meters still read after exit
                end_proc(&dep, &meter);
                finish_stopped(&dep);
                return;
            }
            Exit::Crashed(status) => {
                inner.take_and_charge(&dep);
                end_proc(&dep, &meter);
                let exit = match status {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                // Both flags are cleared here: one left set would block later kills.
                let capped = dep.killed_for_cpu.swap(false, Ordering::AcqRel);
                let unpaid = dep.killed_unpaid.swap(false, Ordering::AcqRel);
                if capped {
                    // Our own kill: restart at once, not counted as a crash.
                    dep.update(|s| {
                        s.cpu_limit_kills += 1;
                        s.restarts += 1;
                        s.last_exit = Some("killed: CPU limit per request".to_owned());
                        s.phase = Phase::Restarting;
                    });
                    continue;
                }
                if unpaid {
                    dep.update(|s| {
                        s.restarts += 1;
                        s.last_exit = Some("interrupted: prepaid balance used up".to_owned());
                        s.phase = Phase::Restarting;
                    });
                    continue;
                }
                tokio::time::sleep(Duration::from_millis(20)).await; // let log readers drain
                let reason = with_log_tail(&format!("workerd exited ({exit})"), &dep.logs);
                dep.logs.system(&format!("crashed: {exit}"));
                if give_up(&inner, &dep, &mut crashes, reason).await {
                    return;
                }
                if wait_backoff(&dep, &crashes, &mut stop_rx).await {
                    finish_stopped(&dep);
                    return;
                }
            }
        }
    }
}

enum Exit {
    Crashed(std::io::Result<std::process::ExitStatus>),
    Stop,
    Idle(TcpListener),
}

/// Relays the connection that woke an idle deployment, and any that arrive at the activator
/// until the route has moved on (`linger`), to the freshly started process.
async fn relay_from_activator(
    listener: TcpListener,
    first: TcpStream,
    to: SocketAddr,
    linger: Duration,
) {
    async fn relay(mut inbound: TcpStream, to: SocketAddr) {
        if let Ok(mut outbound) = TcpStream::connect(to).await {
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        }
    }
    tokio::spawn(relay(first, to));
    let deadline = tokio::time::sleep(linger);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            conn = listener.accept() => match conn {
                Ok((s, _)) => { tokio::spawn(relay(s, to)); }
                Err(_) => break,
            },
            _ = &mut deadline => break,
        }
    }
}

fn end_proc(dep: &Deployment, meter: &CpuMeter) {
    if let Ok(mut p) = dep.proc_.lock() {
        *p = None;
    }
    meter.cleanup();
}

fn finish_stopped(dep: &Deployment) {
    // The secrets in the config are not needed once the version is stopped.
    let _ = std::fs::remove_file(dep.dir.join("config.capnp"));
    dep.update(|s| {
        s.phase = Phase::Stopped;
        s.addr = None;
        s.pid = None;
    });
    dep.logs.system("stopped");
}

/// Records a crash; true when the deployment is now failed.
async fn give_up(
    inner: &Inner,
    dep: &Deployment,
    crashes: &mut VecDeque<Instant>,
    reason: String,
) -> bool {
    let now = Instant::now();
    crashes.push_back(now);
    while crashes
        .front()
        .is_some_and(|t| now.duration_since(*t) > inner.cfg.restart_window)
    {
        crashes.pop_front();
    }
    let failed = crashes.len() as u32 > inner.cfg.max_restarts;
    dep.update(|s| {
        s.last_exit = Some(reason.clone());
        s.addr = None;
        s.pid = None;
        if failed {
            s.phase = Phase::Failed;
            s.failure = Some(format!(
                "crashed {} times within {} s; last: {reason}",
                crashes.len(),
                inner.cfg.restart_window.as_secs()
            ));
        } else {
            s.phase = Phase::Restarting;
            s.restarts += 1;
        }
    });
    if failed {
        tracing::warn!(deployment = %dep.id, %reason, "deployment failed: too many crashes");
        let _ = inner.events.send(RuntimeEvent::Failed {
            deployment_id: dep.id.to_string(),
            reason,
        });
    }
    failed
}

/// Exponential backoff (100 ms · 2ⁿ, at most 5 s); true when a stop arrived meanwhile.
async fn wait_backoff(
    _dep: &Deployment,
    crashes: &VecDeque<Instant>,
    stop_rx: &mut watch::Receiver<bool>,
) -> bool {
    let n = crashes.len().saturating_sub(1).min(6) as u32;
    let delay = (Duration::from_millis(100) * 2u32.pow(n)).min(Duration::from_secs(5));
    tokio::select! {
        _ = tokio::time::sleep(delay) => false,
        _ = stop_rx.wait_for(|s| *s) => true,
    }
}

fn with_log_tail(reason: &str, logs: &LogBuffer) -> String {
    let tail = logs.tail_text(5);
    if tail.is_empty() {
        reason.to_owned()
    } else {
        format!("{reason}; last errors: {tail}")
    }
}
