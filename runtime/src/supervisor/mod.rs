//! Supervises one workerd process per deployment version: start, readiness, crash restarts with
//! backoff, CPU sampling and the per-request CPU cap, drain-then-stop. Types in `types`, the
//! sampler in `sample`, one deployment's life in `monitor`, the idle activator in `activator`.

mod activator;
mod monitor;
mod sample;
mod types;

pub use types::*;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::capnp::{self, WorkerConfig};
use crate::cpu::{AppliedLimits, CgroupRoots, CpuMeter};
use crate::logs::{LogBuffer, LogEntry};
use crate::toolchain::Toolchain;

pub(crate) struct Proc {
    pub(crate) meter: CpuMeter,
    pub(crate) last_us: u64,
    pub(crate) seen_busy: u64,
    pub(crate) seen_completed: u64,
    pub(crate) streak_us: u64,
}

pub(crate) struct Deployment {
    pub(crate) id: Arc<str>,
    pub(crate) project: Arc<str>,
    pub(crate) account: Arc<str>,
    pub(crate) dir: PathBuf,
    pub(crate) logs: Arc<LogBuffer>,
    pub(crate) inflight: Arc<Inflight>,
    pub(crate) status: Mutex<DeploymentStatus>,
    pub(crate) proc_: Mutex<Option<Proc>>,
    pub(crate) killed_for_cpu: AtomicBool,
    /// Set before an interruption because the owner cannot pay for the CPU.
    pub(crate) killed_unpaid: AtomicBool,
    /// The sampler asks the monitor (which owns the child) to kill it: no raw pid that could
    /// have been reused by then.
    pub(crate) cpu_kill: tokio::sync::Notify,
    pub(crate) idle_req: tokio::sync::Notify,
    pub(crate) idle_requested: AtomicBool,
    /// Milliseconds since `Inner::epoch` of the last request or CPU use.
    pub(crate) last_active_ms: AtomicU64,
    pub(crate) stop_tx: watch::Sender<bool>,
    pub(crate) task: Mutex<Option<JoinHandle<()>>>,
    /// Set once the monitor task has ended (its process gone, its last CPU charged), however
    /// it ended: every stopper waits for it, not only the one holding the task handle.
    pub(crate) finished: watch::Sender<bool>,
}

/// Marks a deployment's monitor finished when dropped (also when the task panics).
struct Finished(Arc<Deployment>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finished.send_replace(true);
    }
}

pub(crate) struct Inner {
    pub(crate) epoch: Instant,
    pub(crate) cfg: RuntimeConfig,
    pub(crate) toolchain: Toolchain,
    pub(crate) cgroups: CgroupRoots,
    pub(crate) deployments: Mutex<HashMap<String, Arc<Deployment>>>,
    pub(crate) cpu_sink: Arc<dyn CpuSink>,
    pub(crate) events: mpsc::UnboundedSender<RuntimeEvent>,
    pub(crate) metrics: crate::metrics::RuntimeMetrics,
    /// When the processes' memory was last read (ms since `epoch`): once a second, not at
    /// every CPU sample.
    pub(crate) memory_read_ms: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

pub(crate) fn valid_id(id: &str) -> bool {
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
        let metrics = crate::metrics::RuntimeMetrics::new()
            .map_err(|e| RuntimeError::Io(format!("runtime metrics: {e}")))?;
        let inner = Arc::new(Inner {
            metrics,
            epoch: Instant::now(),
            cfg,
            toolchain,
            cgroups,
            deployments: Mutex::new(HashMap::new()),
            cpu_sink,
            events,
            memory_read_ms: std::sync::atomic::AtomicU64::new(0),
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

    /// Exports the runtime's metrics (processes, starts, exits, cold starts) on `registry`.
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> Result<(), RuntimeError> {
        self.inner
            .metrics
            .register(registry)
            .map_err(|e| RuntimeError::Io(format!("runtime metrics: {e}")))
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
        for name in &spec.databases {
            if !capnp::valid_binding_name(name) || spec.env.contains_key(name) {
                return Err(RuntimeError::Invalid(format!(
                    "database binding {name:?} must be an identifier not used by an env var"
                )));
            }
        }
        if !spec.databases.is_empty() && spec.d1.is_none() {
            return Err(RuntimeError::Invalid(
                "database bindings need the database service (none is configured)".to_owned(),
            ));
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
            finished: watch::channel(false).0,
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
            dep.finished.send_replace(true);
            return Err(e);
        }
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn({
            let guard = Finished(dep.clone());
            let inner = self.inner.clone();
            let dep = dep.clone();
            async move {
                let _guard = guard;
                monitor::monitor(inner, dep, stop_rx, ready_tx).await;
            }
        });
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
        // Another stopper (a redeploy's background removal) may hold the task: wait for the
        // monitor to end all the same, so a shutdown never returns before the last CPU sample
        // of any deployment is charged.
        let mut finished = dep.finished.subscribe();
        let _ = finished.wait_for(|done| *done).await;
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

    pub(crate) fn get(&self, id: &str) -> Option<Arc<Deployment>> {
        self.lock_map().get(id).cloned()
    }

    pub(crate) fn lock_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Deployment>>> {
        self.inner
            .deployments
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(crate) fn write_files(
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
        databases: &spec.databases,
        d1: spec
            .d1
            .as_ref()
            .map(|a| (a.address.as_str(), a.token.as_str())),
        listen_ip: cfg.listen_ip,
    });
    write("config.capnp", config.as_bytes()).map_err(io)
}

impl Deployment {
    pub(crate) fn phase(&self) -> Phase {
        self.status.lock().map(|s| s.phase).unwrap_or(Phase::Failed)
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut DeploymentStatus)) {
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
