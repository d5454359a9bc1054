//! The CPU sampler: every `sample_interval` each process's CPU is read and charged, the
//! per-request CPU cap is enforced, idle deployments are asked to stop, and the deployments
//! whose owner cannot pay are interrupted.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{CpuDelta, Deployment, Inner};

impl Inner {
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Reads every running process's CPU, charges the deltas, enforces the per-request cap.
    pub(crate) fn sample(&self) {
        let deps: Vec<Arc<Deployment>> = self
            .deployments
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        let cap_us = self.cfg.cpu_limit_per_request.as_micros() as u64;
        let mut deltas = Vec::new();
        let now_ms = self.now_ms();
        let read_memory =
            now_ms.saturating_sub(self.memory_read_ms.load(Ordering::Relaxed)) >= 1000;
        let mut rss = 0u64;
        for dep in &deps {
            let Some(delta) = take_delta(dep) else {
                continue;
            };
            self.metrics.cpu_used(delta);
            if read_memory && let Some(pid) = dep.status.lock().ok().and_then(|s| s.pid) {
                rss += resident_bytes(pid);
            }
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
        if read_memory {
            self.memory_read_ms.store(now_ms, Ordering::Relaxed);
            self.metrics.memory(rss);
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
    pub(crate) fn take_and_charge(&self, dep: &Deployment) {
        if let Some(cpu_us) = take_delta(dep) {
            self.charge(dep, cpu_us);
        }
    }

    /// Charges `cpu_us` of this deployment's CPU to its owner (and counts it in its status).
    pub(crate) fn charge(&self, dep: &Deployment, cpu_us: u64) {
        if cpu_us == 0 {
            return;
        }
        self.metrics.cpu_used(cpu_us);
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

/// Resident memory of process `pid` (`VmRSS` of `/proc/<pid>/status`, in kB whatever the page
/// size), 0 when it is gone.
fn resident_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU since the last read of this deployment's current process.
pub(crate) fn take_delta(dep: &Deployment) -> Option<u64> {
    let mut guard = dep.proc_.lock().ok()?;
    let p = guard.as_mut()?;
    let now = p.meter.read_us().ok()?;
    let delta = now.saturating_sub(p.last_us);
    p.last_us = now;
    drop(guard);
    dep.update(|s| s.cpu_us_total += delta);
    Some(delta)
}
