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
        // One queue per deployment: its events in the order they came (an idle stop's
        // activator, then the wake-up's process), while one project waiting for its lease (a
        // long deploy) holds up no other project's route.
        type Queue = tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>;
        let mut queues: HashMap<String, tokio::sync::mpsc::UnboundedSender<RuntimeEvent>> =
            HashMap::new();
        let mut workers: tokio::task::JoinSet<(String, Queue)> = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { break };
                    let id = match &ev {
                        RuntimeEvent::Upstream { deployment_id, .. }
                        | RuntimeEvent::Failed { deployment_id, .. } => deployment_id.clone(),
                    };
                    let tx = queues.entry(id.clone()).or_insert_with(|| {
                        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                        workers.spawn(self.clone().apply_events(id.clone(), rx));
                        tx
                    });
                    let _ = tx.send(ev);
                }
                Some(done) = workers.join_next() => {
                    let Ok((id, mut rx)) = done else { continue };
                    // Idle: gone, unless something came in meanwhile.
                    match rx.try_recv() {
                        Ok(ev) => {
                            let (tx, fresh) = tokio::sync::mpsc::unbounded_channel();
                            let _ = tx.send(ev);
                            while let Ok(more) = rx.try_recv() {
                                let _ = tx.send(more);
                            }
                            queues.insert(id.clone(), tx);
                            workers.spawn(self.clone().apply_events(id, fresh));
                        }
                        Err(_) => {
                            queues.remove(&id);
                        }
                    }
                }
            }
        }
    }

    /// Applies one deployment's events in order; returns its queue after a second without any.
    async fn apply_events(
        self: Arc<Self>,
        id: String,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>) {
        loop {
            let ev = match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
                Ok(Some(ev)) => ev,
                Ok(None) | Err(_) => return (id, rx),
            };
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
        let projects = self.store.all_projects().await?;
        // The differences of the previous round; this round's replace them (so only a
        // difference seen in two rounds in a row counts).
        let previous =
            std::mem::take(&mut *self.mismatches.lock().unwrap_or_else(|e| e.into_inner()));
        let mut seen = HashMap::new();
        for project in &projects {
            if project.status != ProjectStatus::Active {
                continue;
            }
            match self.repair_route(project, &previous, &mut seen).await {
                Ok(true) => n += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(project = %project.id, error = %e, "route not repaired; next round");
                }
            }
        }
        *self.mismatches.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        Ok(n)
    }

    async fn repair_route(
        &self,
        project: &crate::model::Project,
        previous: &HashMap<String, std::net::SocketAddr>,
        seen: &mut HashMap<String, std::net::SocketAddr>,
    ) -> Result<bool, ControlError> {
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
            && matches!(
                s.phase,
                tollgate_runtime::Phase::Failed | tollgate_runtime::Phase::Stopped
            )
            && self
                .store
                .deployment(&live)
                .await?
                .is_some_and(|d| d.status == DeployStatus::Live)
        {
            // Its start failed on its host (after a move), or its process is gone: started
            // again (somewhere else if it failed), under the lease.
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
        if right {
            return Ok(false);
        }
        // Only a difference seen in two rounds in a row: a route that leads the state for a
        // moment is not one.
        if previous.get(&live) != Some(&addr) {
            seen.insert(live.clone(), addr);
            return Ok(false);
        }
        // Kept until republished: a busy project is looked at again next round.
        seen.insert(live.clone(), addr);
        tracing::warn!(project = %project.id, deployment = %live, %addr, "route did not point where the live deployment runs; republished");
        // A busy project is left to the change under way, and to the next rounds. Under the
        // lease, only if it still runs at that address (an event may have moved it meanwhile).
        let guard = self.lock_project(&project.id, EVENT_LOCK_WAIT).await?;
        let still = self
            .runtime
            .status(&live)
            .await
            .is_some_and(|s| s.addr == Some(addr));
        if !still {
            return Ok(false);
        }
        self.republish(&guard, &live, addr).await?;
        seen.remove(&live);
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
