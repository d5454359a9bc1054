//! Expiry: unused projects are stopped and collected.

use super::*;
use crate::error::ControlError;
use crate::model::{DeployStatus, Project, ProjectStatus, now_ms};

/// The cleanup job.
impl Control {
    /// Expires every project unused (no request, no deploy) for `inactivity_ttl`: its process
    /// stops, its route goes (the URL answers 404), its artifacts are deleted, its slug is freed
    /// after the grace period. Idempotent; returns the projects it expired now.
    pub async fn sweep(&self) -> Result<Vec<String>, ControlError> {
        let now = now_ms();
        let ttl = self.cfg.inactivity_ttl.as_millis() as u64;
        let mut expired = Vec::new();
        let all = self.store.all_projects().await?;
        let mut states: Vec<ProjectStatus> = all.iter().map(|p| p.status).collect();
        for (i, p) in all.into_iter().enumerate() {
            if !matches!(p.status, ProjectStatus::Active | ProjectStatus::Suspended) {
                continue;
            }
            if now.saturating_sub(self.last_activity(&p, now).await?) <= ttl {
                continue;
            }
            let guard = match self.lock_project(&p.id, START_LOCK_WAIT).await {
                Ok(g) => g,
                // Busy (a deploy, or another instance's sweep): the next sweep looks again.
                Err(e) if e.code == "PROJECT_BUSY" => continue,
                Err(e) => return Err(e),
            };
            // Re-check under the lock: a deploy may have just happened.
            let Some(mut p) = self.store.project(&p.id).await? else {
                continue;
            };
            if !matches!(p.status, ProjectStatus::Active | ProjectStatus::Suspended)
                || now.saturating_sub(self.last_activity(&p, now).await?) <= ttl
            {
                continue;
            }
            self.teardown(&guard, &mut p, ProjectStatus::Expired)
                .await?;
            tracing::info!(project = %p.id, "expired after inactivity");
            states[i] = ProjectStatus::Expired;
            expired.push(p.id);
        }
        if let Some(m) = self.metrics.get() {
            m.project_states(states);
        }
        self.sweep_databases(now).await?;
        Ok(expired)
    }

    /// Takes off their hosts the deployments placed on runtime hosts that nothing serves and no
    /// change of their project is bringing live: a control process that died in the middle of a
    /// deploy, or a superseded version whose removal never ran. Their processes would run, and
    /// be charged, with no route to them. Each is checked under its project's lease, so a
    /// deploy under way is never touched. Returns how many went.
    pub async fn collect_orphans(&self) -> Result<usize, ControlError> {
        let mut n = 0;
        for id in self.runtime.placed().await {
            let dep = self.store.deployment(&id).await?;
            let project_id = match &dep {
                Some(d) => d.project_id.clone(),
                None => {
                    // No record at all: nothing can ever serve it.
                    let _ = self.runtime.remove(&id, true).await;
                    n += 1;
                    continue;
                }
            };
            let serves = |p: Option<Project>| {
                p.is_some_and(|p| {
                    p.status == ProjectStatus::Active
                        && p.live_deployment.as_deref() == Some(id.as_str())
                })
            };
            // The common case, without the lease: it serves.
            if serves(self.store.project(&project_id).await?) {
                continue;
            }
            let guard = match self.lock_project(&project_id, Duration::from_secs(1)).await {
                Ok(g) => g,
                // A change of the project is under way: look again next time.
                Err(e) if e.code == "PROJECT_BUSY" => continue,
                Err(e) => {
                    tracing::warn!(project = %project_id, error = %e, "orphan check skipped");
                    continue;
                }
            };
            // Again under the lease: a deploy may have made it live meanwhile.
            if serves(self.store.project(&project_id).await?) {
                continue;
            }
            if let Err(e) = self.runtime.remove(&id, true).await {
                tracing::warn!(deployment = %id, error = %e, "orphaned deployment not removed");
                continue;
            }
            // Read again under the lease: its status may have moved on since.
            if let Some(mut d) = self.store.deployment(&id).await?
                && d.status == DeployStatus::Building
            {
                d.status = DeployStatus::Failed;
                d.reason = Some("the control service stopped in the middle of this deploy".into());
                self.store.put_deployment(&d).await?;
            }
            drop(guard);
            tracing::warn!(deployment = %id, project = %project_id, "orphaned deployment taken off its runtime host");
            n += 1;
        }
        Ok(n)
    }

    /// Deletes the databases of projects gone for longer than the slug grace: deleted ones
    /// (normally already removed by `delete`) and expired ones, a slug grace after they expired.
    async fn sweep_databases(&self, now: u64) -> Result<(), ControlError> {
        let Some(db) = self.databases() else {
            return Ok(());
        };
        let dbs = db.service.databases().clone();
        let on_disk = tokio::task::spawn_blocking(move || dbs.list())
            .await
            .map_err(|e| ControlError::internal(format!("database list: {e}")))?
            .map_err(|e| ControlError::internal(format!("database list: {e}")))?;
        let grace = self.cfg.slug_grace.as_millis() as u64;
        let ttl = self.cfg.inactivity_ttl.as_millis() as u64;
        for id in on_disk {
            let due = match self.store.project(&id).await? {
                Some(p) => match p.status {
                    ProjectStatus::Deleted => true,
                    ProjectStatus::Expired => match p.ended_ms {
                        Some(ended) => now.saturating_sub(ended) > grace,
                        // Expired before the time was recorded: at least ttl + grace ago.
                        None => now.saturating_sub(p.last_activity_ms) > ttl.saturating_add(grace),
                    },
                    _ => false,
                },
                // A database whose project is unknown here belongs to no one we serve.
                None => false,
            };
            if due {
                self.drop_database(&id).await?;
            }
        }
        Ok(())
    }

    /// The latest of: the last deploy, the last request the runtime saw, the last request a
    /// proxy counted.
    pub(crate) async fn last_activity(&self, p: &Project, now: u64) -> Result<u64, ControlError> {
        let seen = match p.live_deployment.as_deref() {
            Some(d) => self.runtime.idle_for(d).await,
            None => None,
        }
        .map(|idle| now.saturating_sub(idle.as_millis() as u64))
        .unwrap_or(0);
        let counted = self
            .store
            .usage(&p.id, &[])
            .await?
            .last_request_ms
            .unwrap_or(0);
        Ok(p.last_activity_ms.max(seen).max(counted))
    }
}
