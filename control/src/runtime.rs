//! Where deployments run, as the control service sees it: the workerd supervisor in this process
//! (`tollgate dev`, a single-machine `tollgate control`), or runtime hosts reached through Redis
//! (`control.runtime = "hosts"`, see [`crate::hosts`] and docs/scale-out.md).

use std::time::Duration;

use async_trait::async_trait;
use tollgate_runtime::{DeploymentSpec, DeploymentStatus, LogEntry, RuntimeError, Started};

#[async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// Runs `spec` and returns once it answers. On runtime hosts, starting a deployment that
    /// already runs answers where it runs (recovery after a control restart relies on it); the
    /// in-process supervisor has nothing left running after a restart.
    async fn start(&self, spec: DeploymentSpec) -> Result<Started, RuntimeError>;
    /// Stops the deployment's process (drained first when `drain`); it may be started again.
    async fn stop(&self, deployment_id: &str, drain: bool) -> Result<(), RuntimeError>;
    /// Stops it and removes what it left on disk (its config holds secrets).
    async fn remove(&self, deployment_id: &str, drain: bool) -> Result<(), RuntimeError>;
    async fn status(&self, deployment_id: &str) -> Option<DeploymentStatus>;
    /// How long since the deployment last had a request or used CPU.
    async fn idle_for(&self, deployment_id: &str) -> Option<Duration>;
    /// Log entries with `seq >= since`, oldest first, at most `limit`.
    async fn logs(&self, deployment_id: &str, since: u64, limit: usize) -> Option<Vec<LogEntry>>;
    /// Every deployment placed on a runtime host, for the orphan collection. The in-process
    /// supervisor answers none: what it runs dies with the process.
    async fn placed(&self) -> Vec<String> {
        Vec::new()
    }
}

/// The supervisor in this process.
#[async_trait]
impl Runtime for tollgate_runtime::Supervisor {
    async fn start(&self, spec: DeploymentSpec) -> Result<Started, RuntimeError> {
        tollgate_runtime::Supervisor::start(self, spec).await
    }

    async fn stop(&self, deployment_id: &str, drain: bool) -> Result<(), RuntimeError> {
        tollgate_runtime::Supervisor::stop(self, deployment_id, drain).await
    }

    async fn remove(&self, deployment_id: &str, drain: bool) -> Result<(), RuntimeError> {
        tollgate_runtime::Supervisor::remove(self, deployment_id, drain).await
    }

    async fn status(&self, deployment_id: &str) -> Option<DeploymentStatus> {
        tollgate_runtime::Supervisor::status(self, deployment_id)
    }

    async fn idle_for(&self, deployment_id: &str) -> Option<Duration> {
        tollgate_runtime::Supervisor::idle_for(self, deployment_id)
    }

    async fn logs(&self, deployment_id: &str, since: u64, limit: usize) -> Option<Vec<LogEntry>> {
        tollgate_runtime::Supervisor::logs(self, deployment_id, since, limit).map(|(l, _)| l)
    }
}

/// A shared runtime (control and the process's shutdown hold the same one).
#[async_trait]
impl<T: Runtime + ?Sized> Runtime for std::sync::Arc<T> {
    async fn start(&self, spec: DeploymentSpec) -> Result<Started, RuntimeError> {
        (**self).start(spec).await
    }

    async fn stop(&self, deployment_id: &str, drain: bool) -> Result<(), RuntimeError> {
        (**self).stop(deployment_id, drain).await
    }

    async fn remove(&self, deployment_id: &str, drain: bool) -> Result<(), RuntimeError> {
        (**self).remove(deployment_id, drain).await
    }

    async fn status(&self, deployment_id: &str) -> Option<DeploymentStatus> {
        (**self).status(deployment_id).await
    }

    async fn idle_for(&self, deployment_id: &str) -> Option<Duration> {
        (**self).idle_for(deployment_id).await
    }

    async fn logs(&self, deployment_id: &str, since: u64, limit: usize) -> Option<Vec<LogEntry>> {
        (**self).logs(deployment_id, since, limit).await
    }

    async fn placed(&self) -> Vec<String> {
        (**self).placed().await
    }
}
