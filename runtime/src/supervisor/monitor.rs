//! One deployment's life: (re)start its process (under its limits and meter from its first
//! instruction) until it is stopped or fails; crash restarts with backoff; idle stops.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};

use super::activator::relay_from_activator;
use super::{Deployment, Inner, Phase, Proc, RuntimeEvent, Started};
use crate::cpu::{CpuMeter, ProcessLimits};
use crate::instance;
use crate::logs::LogBuffer;

/// Numbers each process start in this process's life (cgroup names).
static START_NO: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One deployment's life: (re)start its process until stopped or failed.
pub(crate) async fn monitor(
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
    loop {
        // Limits and meter first: the process joins them before its first instruction, so its
        // module code and start-up are capped and billed like the rest of its life. The group
        // name is unique in this supervisor's life (a group is never reused).
        let start_no = START_NO.fetch_add(1, Ordering::Relaxed);
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
            cfg.listen_ip,
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
                inner.metrics.start_failed();
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
        if !jail.holds(sp.pid) {
            // Fail closed: never serve from a process its meter does not see.
            inner.metrics.start_failed();
            let _ = sp.child.start_kill();
            let _ = sp.child.wait().await;
            let reason =
                "could not put the process under its resource limits (it is not in its cgroup)"
                    .to_owned();
            dep.logs.system(&reason);
            jail.discard();
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
        inner.metrics.started(sp.started.elapsed().as_secs_f64());
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
                match TcpListener::bind((inner.cfg.listen_ip, 0)).await {
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
                    // The status says where the route goes from now on, as the event does:
                    // whoever compares the two (the route repair of runtime hosts) must not
                    // take the draining process for the deployment's address.
                    dep.update(|s| s.addr = Some(addr));
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
                inner.metrics.exited("idle");
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
                inner.metrics.exited("stopped");
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
                inner.metrics.exited(match (capped, unpaid) {
                    (true, _) => "cpu_limit",
                    (false, true) => "unpaid",
                    (false, false) => "crashed",
                });
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

pub(crate) enum Exit {
    Crashed(std::io::Result<std::process::ExitStatus>),
    Stop,
    Idle(TcpListener),
}

pub(crate) fn end_proc(dep: &Deployment, meter: &CpuMeter) {
    if let Ok(mut p) = dep.proc_.lock() {
        *p = None;
    }
    meter.cleanup();
}

pub(crate) fn finish_stopped(dep: &Deployment) {
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
pub(crate) async fn give_up(
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
        inner.metrics.gave_up();
        tracing::warn!(deployment = %dep.id, %reason, "deployment failed: too many crashes");
        let _ = inner.events.send(RuntimeEvent::Failed {
            deployment_id: dep.id.to_string(),
            reason,
        });
    }
    failed
}

/// Exponential backoff (100 ms · 2ⁿ, at most 5 s); true when a stop arrived meanwhile.
pub(crate) async fn wait_backoff(
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

pub(crate) fn with_log_tail(reason: &str, logs: &LogBuffer) -> String {
    let tail = logs.tail_text(5);
    if tail.is_empty() {
        reason.to_owned()
    } else {
        format!("{reason}; last errors: {tail}")
    }
}
