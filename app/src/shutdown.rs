//! The ordered stop of a process (docs/architecture.md, "Shutdown"): the signals, installed
//! first; what a process has started ([`Parts`]); and the bounded waits between the steps.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_proxy::{Certificates, Stop};
use tollgate_runtime::Supervisor;

use crate::devchain::DevChain;
use crate::metering::MeteringNode;
use crate::node::{PreparedNode, ProxyNode};

/// SIGTERM (graceful), SIGINT (fast), SIGQUIT (upgrade: hand the listeners over), SIGHUP
/// (reload certificates), installed once, first thing: a signal during start-up waits instead
/// of killing the process half way (SIGHUP's default action is to exit).
pub(crate) struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    hup: Option<tokio::signal::unix::Signal>,
    /// SIGQUIT hands the listeners to a successor (a proxy node); else it stops the process.
    pub(crate) upgradable: bool,
}

impl Signals {
    pub(crate) fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            quit: signal(SignalKind::quit()).context("SIGQUIT handler")?,
            hup: Some(signal(SignalKind::hangup()).context("SIGHUP handler")?),
            upgradable: false,
        })
    }

    pub(crate) async fn next(&mut self) -> Stop {
        let how = tokio::select! {
            _ = self.term.recv() => Stop::Graceful,
            _ = self.int.recv() => Stop::Fast,
            _ = self.quit.recv() => Stop::Upgrade,
        };
        crate::process::stopping(how, self.upgradable);
        how
    }

    /// From now on SIGHUP reloads `certs` (the proxy's TLS certificates; a bad file keeps the
    /// old ones and is logged). Without certificates it is logged and ignored.
    pub(crate) fn reload_on_hangup(&mut self, certs: Option<Arc<Certificates>>) {
        let Some(mut hup) = self.hup.take() else {
            return;
        };
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let Some(certs) = certs.clone() else {
                    tracing::info!("SIGHUP: nothing to reload in this process (no [tls] listener)");
                    continue;
                };
                crate::process::reloading("reloading TLS certificates");
                let done = tokio::task::spawn_blocking(move || certs.reload()).await;
                if let Ok(Err(e)) = done {
                    tracing::warn!(error = %e, "SIGHUP: certificates not reloaded");
                }
                crate::process::reloaded();
            }
        });
    }

    /// After the first signal: a second one hurries the shutdown (every wait left is cut
    /// short; the final settle still runs, within its own bound).
    pub(crate) fn hurry_on_next(mut self) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            let _ = self.next().await;
            tracing::warn!("second signal: cutting the shutdown's waits short");
            let _ = tx.send(true);
        });
        rx
    }
}

/// Waits for `task` at most `limit`, or until hurried; then aborts it. Aborting is safe for
/// every task given here (their state is in idempotent stores); the wait is for tidiness.
async fn bounded(what: &str, task: JoinHandle<()>, limit: Duration, hurry: &watch::Receiver<bool>) {
    let abort = task.abort_handle();
    let mut hurry = hurry.clone();
    tokio::select! {
        _ = task => {}
        _ = tokio::time::sleep(limit) => {
            tracing::warn!(task = what, seconds = limit.as_secs(), "did not stop in time; aborted");
            abort.abort();
        }
        _ = hurry.wait_for(|h| *h) => abort.abort(),
    }
}

/// What a `control` or `dev` process has started so far, stopped in one order by [`Parts::stop`]
/// (after a signal, or when the start fails half way).
#[derive(Default)]
pub(crate) struct Parts {
    /// Closes the control listener (it finishes the requests it has).
    pub(crate) intake: Option<watch::Sender<bool>>,
    /// Stops background work: runtime events, the sweep, payments.
    pub(crate) background: Option<watch::Sender<bool>>,
    pub(crate) server: Option<JoinHandle<()>>,
    pub(crate) tasks: Vec<JoinHandle<()>>,
    /// What workerd processes call while they run (the database service): stopped once the
    /// runtime has stopped them.
    pub(crate) after_runtime: Option<(watch::Sender<bool>, Vec<JoinHandle<()>>)>,
    pub(crate) payments: Option<JoinHandle<()>>,
    pub(crate) node: Option<ProxyNode>,
    pub(crate) prepared: Option<PreparedNode>,
    pub(crate) sup: Option<Supervisor>,
    pub(crate) metering: Option<MeteringNode>,
    pub(crate) chain: Option<DevChain>,
    pub(crate) drain: Duration,
    /// A runtime host's agent: it hands its deployments over (waiting up to `host_wait`) before
    /// the runtime stops them.
    pub(crate) host: Option<JoinHandle<()>>,
    pub(crate) host_wait: Duration,
}

impl Parts {
    /// After the start: until a signal, then the ordered stop. A start that failed stops what
    /// it started (fast) and returns its error.
    pub(crate) async fn run_until_signal(
        self,
        started: anyhow::Result<()>,
        mut signals: Signals,
        pid_file: Option<std::path::PathBuf>,
    ) -> anyhow::Result<()> {
        let pid_file = match (started, pid_file) {
            (Err(e), _) => Err(e),
            (Ok(()), None) => Ok(None),
            (Ok(()), Some(p)) => crate::process::PidFile::write(&p).map(Some),
        };
        let pid_file = match pid_file {
            Ok(p) => p,
            Err(e) => {
                self.stop(Stop::Fast, watch::channel(false).1).await;
                return Err(e);
            }
        };
        signals.reload_on_hangup(self.node.as_ref().and_then(|n| n.proxy.certificates()));
        crate::process::ready(false);
        let how = signals.next().await;
        self.stop(how, signals.hurry_on_next()).await;
        drop(pid_file);
        Ok(())
    }

    pub(crate) async fn stop(mut self, how: Stop, hurry: watch::Receiver<bool>) {
        // 1: intake stops (the proxy's listeners, the control listener).
        if let Some(tx) = &self.intake {
            let _ = tx.send(true);
        }
        if let Some(node) = &self.node {
            node.proxy.stop_intake(how).await;
        }
        // 2: requests in flight finish (the proxy bounds its own drain).
        if let Some(node) = &self.node {
            node.proxy.drained(how).await;
        }
        let drain = if how == Stop::Fast {
            Duration::from_secs(1)
        } else {
            self.drain
        };
        if let Some(server) = self.server.take() {
            bounded("control listener", server, drain, &hurry).await;
        }
        // Background work stops after the drain: routes of deployments the runtime restarts
        // stay current while requests finish.
        if let Some(tx) = &self.background {
            let _ = tx.send(true);
        }
        let mut waits = Vec::new();
        for t in self.tasks.drain(..) {
            waits.push(bounded(
                "control background",
                t,
                Duration::from_secs(10),
                &hurry,
            ));
        }
        if let Some(p) = self.payments.take() {
            waits.push(bounded("payments", p, Duration::from_secs(10), &hurry));
        }
        if let Some(h) = self.host.take() {
            // A fast stop (SIGINT) does not wait for the hand-over: the host gives its lease up
            // (control moves the deployments at once) and the runtime's stop below ends the
            // processes about 2 s later, undrained.
            let wait = if how == Stop::Fast {
                Duration::from_secs(2)
            } else {
                self.host_wait
            };
            waits.push(bounded("runtime host hand-over", h, wait, &hurry));
        }
        futures_util::future::join_all(waits).await;
        // 3: the runtime (each workerd's last CPU sample is charged).
        if let Some(sup) = &self.sup
            && tokio::time::timeout(Duration::from_secs(30), sup.shutdown())
                .await
                .is_err()
        {
            tracing::error!(
                "the runtime did not stop in 30 s; its last CPU samples may be missing"
            );
        }
        // The database service: its last queries charged, every WAL checkpointed.
        if let Some((tx, tasks)) = self.after_runtime.take() {
            let _ = tx.send(true);
            let mut waits = Vec::new();
            for t in tasks {
                waits.push(bounded(
                    "database service",
                    t,
                    Duration::from_secs(10),
                    &hurry,
                ));
            }
            futures_util::future::join_all(waits).await;
        }
        // 4–5: final settle (leases returned), then usage flushed.
        if let Some(m) = self.metering.take() {
            m.settle_and_stop().await;
        }
        if let Some(p) = self.prepared.take() {
            p.settle_and_stop().await;
        }
        if let Some(node) = self.node.take() {
            node.settle_and_flush().await;
        }
        if let Some(chain) = self.chain.take() {
            chain.shutdown().await;
        }
    }
}
