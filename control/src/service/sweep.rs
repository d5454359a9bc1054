//! Expiry: unused projects are stopped and collected.

use super::*;
use crate::error::ControlError;
use crate::model::{Project, ProjectStatus, now_ms};

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
