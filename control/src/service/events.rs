//! The runtime's events (a process restarted or failed) and recovery after a restart.

use std::sync::Arc;

use tollgate_routes::RouteKey;

use super::*;
use crate::error::ControlError;
use crate::model::{DeployStatus, ProjectStatus};

impl Control {
    /// Follows the runtime: a restarted, idle-stopped or woken process gets its route updated;
    /// a deployment that keeps crashing is recorded as failed, with the reason.
    pub async fn follow_runtime(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    ) {
        while let Some(ev) = events.recv().await {
            let res = match ev {
                RuntimeEvent::Upstream {
                    deployment_id,
                    addr,
                } => self.republish_locked(&deployment_id, addr).await,
                RuntimeEvent::Failed {
                    deployment_id,
                    reason,
                } => self.mark_crashed(&deployment_id, &reason).await,
            };
            if let Err(e) = res {
                tracing::error!(error = %e, "runtime event not applied");
            }
        }
    }

    /// [`Control::republish`] under the project's lock, so it cannot interleave with a deploy.
    pub(crate) async fn republish_locked(
        &self,
        deployment_id: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(), ControlError> {
        self.republish_within(deployment_id, addr, START_LOCK_WAIT)
            .await
    }

    /// [`Control::republish_locked`], waiting at most `wait` for the project.
    async fn republish_within(
        &self,
        deployment_id: &str,
        addr: std::net::SocketAddr,
        wait: Duration,
    ) -> Result<(), ControlError> {
        let Some(dep) = self.store.deployment(deployment_id).await? else {
            return Ok(());
        };
        let guard = self.lock_project(&dep.project_id, wait).await?;
        self.republish(&guard, deployment_id, addr).await
    }

    pub(crate) async fn republish(
        &self,
        guard: &ProjectGuard,
        deployment_id: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(), ControlError> {
        let Some(dep) = self.store.deployment(deployment_id).await? else {
            return Ok(());
        };
        let Some(project) = self.store.project(&dep.project_id).await? else {
            return Ok(());
        };
        if project.live_deployment.as_deref() != Some(deployment_id)
            || project.status != ProjectStatus::Active
        {
            return Ok(()); // an old version being drained, or a project not serving
        }

        let key = RouteKey::slug(&project.slug)
            .map_err(|e| ControlError::internal(format!("stored slug is invalid: {e}")))?;
        self.put_route(
            guard,
            &key,
            &Route {
                upstreams: vec![addr],
                ..route_for(&project, &dep.id)
            },
        )
        .await
        .map_err(|e| ControlError::internal(format!("route put: {e}")))?;
        Ok(())
    }

    pub(crate) async fn mark_crashed(
        &self,
        deployment_id: &str,
        reason: &str,
    ) -> Result<(), ControlError> {
        if let Some(mut dep) = self.store.deployment(deployment_id).await? {
            dep.status = DeployStatus::Failed;
            dep.reason = Some(format!("crashed repeatedly: {reason}"));
            self.store.put_deployment(&dep).await?;
        }
        Ok(())
    }

    /// Points every live deployment's route where it runs now, where it does not already
    /// (runtime hosts; run by one instance at a time). It repairs what a lost event, a move
    /// whose start outlived its wait, or a busy project left behind. It also starts elsewhere a
    /// live deployment whose start failed on its host (a move), and takes down a route that
    /// names a deployment when its project serves none (a deploy fenced out after it
    /// published). Returns how many it changed.
    pub async fn repair_routes(&self) -> Result<usize, ControlError> {
        let mut n = 0;
        for project in self.store.all_projects().await? {
            if project.status != ProjectStatus::Active {
                continue;
            }
            match self.repair_route(&project).await {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(project = %project.id, error = %e, "route not repaired; next round");
                }
            }
        }
        Ok(n)
    }

    async fn repair_route(&self, project: &crate::model::Project) -> Result<bool, ControlError> {
        let Ok(key) = RouteKey::slug(&project.slug) else {
            return Ok(false);
        };
        let published = match self.routes.get(&key).await {
            Ok(r) => r,
            // This publisher cannot be read: nothing to compare.
            Err(_) => return Ok(false),
        };
        let Some(live) = project.live_deployment.clone() else {
            if published
                .as_ref()
                .is_some_and(|r| r.deployment_id.is_some())
            {
                let guard = self.lock_project(&project.id, EVENT_LOCK_WAIT).await?;
                let now = self.store.project(&project.id).await?;
                if now.is_some_and(|p| p.live_deployment.is_none()) {
                    tracing::warn!(project = %project.id, "route of a project that serves no deployment; taken down");
                    self.delete_route(&guard, &key)
                        .await
                        .map_err(|e| ControlError::internal(format!("route delete: {e}")))?;
                    return Ok(true);
                }
            }
            return Ok(false);
        };
        let status = self.runtime.status(&live).await;
        if let Some(s) = &status
            && s.phase == tollgate_runtime::Phase::Failed
            && self
                .store
                .deployment(&live)
                .await?
                .is_some_and(|d| d.status == DeployStatus::Live)
        {
            // Its start failed on its host (after a move): somewhere else, under the lease.
            tracing::warn!(project = %project.id, deployment = %live, "live deployment failed to start on its host; starting it elsewhere");
            let guard = self.lock_project(&project.id, EVENT_LOCK_WAIT).await?;
            self.restart_live(&guard, project, &live).await?;
            return Ok(true);
        }
        let Some(addr) = status
            .filter(|s| {
                matches!(
                    s.phase,
                    tollgate_runtime::Phase::Running | tollgate_runtime::Phase::Idle
                )
            })
            .and_then(|s| s.addr)
        else {
            return Ok(false);
        };
        let right = published.as_ref().is_some_and(|r| {
            r.upstreams == [addr] && r.deployment_id.as_deref() == Some(live.as_str())
        });
        // Only a difference seen twice in a row: a route that leads the state for a moment (an
        // idle stop publishes its activator before the process stops) is not one.
        let act = {
            let mut seen = self.mismatches.lock().unwrap_or_else(|e| e.into_inner());
            if right {
                seen.remove(&live);
                false
            } else if seen.insert(live.clone(), addr) == Some(addr) {
                seen.remove(&live);
                true
            } else {
                false
            }
        };
        if !act {
            return Ok(false);
        }
        tracing::warn!(project = %project.id, deployment = %live, %addr, "route did not point where the live deployment runs; republished");
        // A busy project is left to the change under way, and to the next rounds.
        self.republish_within(&live, addr, EVENT_LOCK_WAIT).await?;
        Ok(true)
    }

    /// After a restart of the control service (its workerd processes died with it): starts every
    /// active project's live deployment again from its stored bundle and republishes its route.
    /// Returns how many came back.
    pub async fn recover(&self) -> Result<usize, ControlError> {
        let mut n = 0;
        for project in self.store.all_projects().await? {
            if project.status != ProjectStatus::Active {
                continue;
            }
            let Some(live) = project.live_deployment.clone() else {
                continue;
            };
            let restarted = match self.lock_project(&project.id, START_LOCK_WAIT).await {
                Ok(guard) => self.restart_live(&guard, &project, &live).await,
                Err(e) => Err(e),
            };
            match restarted {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::error!(project = %project.id, error = %e, "could not restart a live deployment");
                }
            }
        }
        Ok(n)
    }
}
