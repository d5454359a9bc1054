//! Rollback (an earlier version's code as a new deployment) and delete.

use tollgate_routes::RouteKey;

use super::*;
use crate::error::ControlError;
use crate::model::{DeployStatus, Deployment, Project, ProjectStatus, new_id, now_ms};

impl Control {
    /// Runs an earlier deployment's code again, as a new deployment (code only: env and secrets
    /// stay as they are now). Default target: the live one before the current.
    pub async fn rollback(
        &self,
        owner: &str,
        project_id: &str,
        target: Option<&str>,
    ) -> Result<DeployOutcome, ControlError> {
        use tracing::Instrument as _;
        let span = tracing::info_span!(
            "control.rollback",
            project.id = tracing::field::Empty,
            deploy.result = tracing::field::Empty,
        );
        let out = self
            .run_rollback(owner, project_id, target)
            .instrument(span.clone())
            .await;
        let result = super::deploy::deploy_result(&out);
        span.record("deploy.result", result);
        if let Ok(o) = &out {
            span.record("project.id", o.project_id.as_str());
        }
        if let Some(m) = self.metrics.get() {
            m.rollback(result);
        }
        out
    }

    async fn run_rollback(
        &self,
        owner: &str,
        project_id: &str,
        target: Option<&str>,
    ) -> Result<DeployOutcome, ControlError> {
        let guard = self.lock_start(project_id).await?;
        let mut project = self.owned_active(owner, project_id).await?;
        let target = match target {
            Some(t) => {
                if !project.deployments.iter().any(|d| d == t) {
                    return Err(ControlError::not_found(&format!(
                        "deployment {t:?} in this project"
                    )));
                }
                t.to_owned()
            }
            None => {
                let mut found = None;
                for id in project.deployments.iter().rev() {
                    if Some(id) == project.live_deployment.as_ref() {
                        continue;
                    }
                    if let Some(d) = self.store.deployment(id).await?
                        && d.status == DeployStatus::Superseded
                    {
                        found = Some(d.id);
                        break;
                    }
                }
                found.ok_or_else(|| {
                    ControlError::validation(
                        "there is no earlier live deployment to roll back to",
                        "get_project lists the deployments; pass deployment_id to choose one.",
                    )
                })?
            }
        };
        let (Some(files), Some(code)) = (
            self.store.files(&target).await?,
            self.store.bundle(&target).await?,
        ) else {
            return Err(ControlError::validation(
                format!("deployment {target:?} has no stored code (it failed, or was cleaned up)"),
                "Pick a deployment that was live once.",
            ));
        };
        let source = self.store.deployment(&target).await?;
        let dep = Deployment {
            id: new_id("d"),
            project_id: project.id.clone(),
            version: project.deployments.len() as u32 + 1,
            status: DeployStatus::Building,
            reason: None,
            created_ms: now_ms(),
            manifest: source.as_ref().and_then(|s| s.manifest.clone()),
            rollback_of: Some(target.clone()),
            compatibility_date: source
                .as_ref()
                .map(|s| s.compatibility_date.clone())
                .unwrap_or_else(|| self.cfg.compatibility_date.clone()),
            // The bindings of the version rolled back to; the data itself is the project's and
            // stays as it is now (schema changes are the agent's).
            databases: source.map(|s| s.databases).unwrap_or_default(),
        };
        self.store.put_deployment(&dep).await?;
        self.store.put_artifacts(&dep.id, &files, &code).await?;
        project.deployments.push(dep.id.clone());
        self.save_project(&guard, &project).await?;
        let env = self.store.env(&project.id).await?;
        self.go_live(&guard, project, dep, code, &env).await
    }

    /// Stops the service, removes its route (the URL answers 404), deletes its artifacts and
    /// frees its slug after the grace period. Idempotent.
    pub async fn delete(&self, owner: &str, project_id: &str) -> Result<(), ControlError> {
        let guard = self.lock_project(project_id, START_LOCK_WAIT).await?;
        let mut project = self.owned(owner, project_id).await?;
        if project.status == ProjectStatus::Expired {
            // Already torn down; its slug may belong to another project by now: touch nothing
            // of it but its own data.
            // Counted once, when it expired.
            project.status = ProjectStatus::Deleted;
            self.save_project(&guard, &project).await?;
            return self.drop_database(&project.id).await;
        }
        self.teardown(&guard, &mut project, ProjectStatus::Deleted)
            .await?;
        // The agent deleted it: the data goes now (expiry keeps it for the grace period).
        self.drop_database(&project.id).await
    }

    pub(crate) async fn teardown(
        &self,
        guard: &ProjectGuard,
        project: &mut Project,
        status: ProjectStatus,
    ) -> Result<(), ControlError> {
        if let Ok(key) = RouteKey::slug(&project.slug) {
            self.delete_route(guard, &key)
                .await
                .map_err(|e| ControlError::internal(format!("route delete: {e}")))?;
        }
        // No deployment of this project reaches its database any more, even one still stopping.
        if let Some(db) = self.databases() {
            db.service.revoke_project(&project.id);
        }
        for d in &project.deployments {
            let _ = self.runtime.remove(d, false).await;
            self.store.delete_artifacts(d).await?;
        }
        let was = project.status;
        project.status = status;
        project.live_deployment = None;
        project.ended_ms = Some(now_ms());
        self.save_project(guard, project).await?;
        // A project ends once: an expired one deleted later is not counted again.
        if matches!(was, ProjectStatus::Active | ProjectStatus::Suspended)
            && let Some(m) = self.metrics.get()
        {
            m.ended(status);
        }
        self.store
            .release_slug(&project.slug, &project.id, self.cfg.slug_grace)
            .await?;
        tracing::info!(project = %project.id, ?status, "torn down");
        Ok(())
    }
}

impl Control {
    /// Deletes the project's database files. Idempotent.
    pub(crate) async fn drop_database(&self, project_id: &str) -> Result<(), ControlError> {
        let Some(db) = self.databases() else {
            return Ok(());
        };
        db.service.revoke_project(project_id);
        let dbs = db.service.databases().clone();
        let id = project_id.to_owned();
        let gone = tokio::task::spawn_blocking(move || dbs.delete(&id))
            .await
            .map_err(|e| ControlError::internal(format!("database delete: {e}")))?
            .map_err(|e| ControlError::internal(format!("database delete: {e}")))?;
        if gone {
            tracing::info!(project = %project_id, "database deleted");
        }
        Ok(())
    }
}
