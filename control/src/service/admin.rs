//! Operator actions.

use tollgate_routes::RouteKey;

use super::*;
use crate::error::ControlError;
use crate::model::{Project, ProjectStatus};

/// Operator actions (the admin API): any project, whoever owns it.
impl Control {
    pub async fn admin_list(&self) -> Result<Vec<ProjectView>, ControlError> {
        let mut all = self.store.all_projects().await?;
        all.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        let mut out = Vec::new();
        for p in all {
            out.push(self.view(p).await?);
        }
        Ok(out)
    }

    pub async fn admin_get(&self, project_id: &str) -> Result<ProjectView, ControlError> {
        let p = self
            .store
            .project(project_id)
            .await?
            .ok_or_else(|| ControlError::not_found(&format!("project {project_id:?}")))?;
        self.view(p).await
    }

    /// Stops the service and takes its route down (its URL answers 404) until resumed; keeps
    /// everything else. Idempotent.
    pub async fn admin_suspend(&self, project_id: &str) -> Result<ProjectView, ControlError> {
        let guard = self.lock_project(project_id, START_LOCK_WAIT).await?;
        let mut p = self.live_project(project_id).await?;
        if p.status == ProjectStatus::Active {
            if let Ok(key) = RouteKey::slug(&p.slug) {
                self.delete_route(&guard, &key)
                    .await
                    .map_err(|e| ControlError::internal(format!("route delete: {e}")))?;
            }
            if let Some(live) = &p.live_deployment {
                let _ = self.runtime.stop(live, false).await;
            }
            p.status = ProjectStatus::Suspended;
            self.save_project(&guard, &p).await?;
            tracing::info!(project = %p.id, "suspended by an operator");
        }
        self.view(p).await
    }

    /// Starts the live deployment again and republishes its route. Idempotent.
    pub async fn admin_resume(&self, project_id: &str) -> Result<ProjectView, ControlError> {
        let guard = self.lock_project(project_id, START_LOCK_WAIT).await?;
        let mut p = self.live_project(project_id).await?;
        if p.status == ProjectStatus::Suspended {
            p.status = ProjectStatus::Active;
            self.save_project(&guard, &p).await?;
            if let Some(live) = p.live_deployment.clone()
                && let Err(e) = self.restart_live(&guard, &p, &live).await
            {
                // Back to suspended, so the resume can be retried.
                p.status = ProjectStatus::Suspended;
                self.save_project(&guard, &p).await?;
                return Err(e);
            }
            tracing::info!(project = %p.id, "resumed by an operator");
        }
        self.view(p).await
    }

    pub async fn admin_delete(&self, project_id: &str) -> Result<(), ControlError> {
        let guard = self.lock_project(project_id, START_LOCK_WAIT).await?;
        let mut p = self.live_project(project_id).await?;
        if p.status == ProjectStatus::Expired {
            // Already torn down, and its slug may be another project's by now: its route is not
            // this project's to delete. Only its data goes.
            p.status = ProjectStatus::Deleted;
            self.save_project(&guard, &p).await?;
            return self.drop_database(&p.id).await;
        }
        self.teardown(&guard, &mut p, ProjectStatus::Deleted).await
    }

    pub(crate) async fn live_project(&self, project_id: &str) -> Result<Project, ControlError> {
        match self.store.project(project_id).await? {
            Some(p) if p.status != ProjectStatus::Deleted => Ok(p),
            _ => Err(ControlError::not_found(&format!("project {project_id:?}"))),
        }
    }

    /// Starts `live` from its stored bundle (its process is gone) and republishes the route.
    pub(crate) async fn restart_live(
        &self,
        guard: &ProjectGuard,
        project: &Project,
        live: &str,
    ) -> Result<(), ControlError> {
        let (Some(dep), Some(code)) = (
            self.store.deployment(live).await?,
            self.store.bundle(live).await?,
        ) else {
            return Err(ControlError::internal(format!(
                "deployment {live} has no stored bundle"
            )));
        };
        let env = self.store.env(&project.id).await?;
        let spec = self.spec(project, &dep, code, &env)?;
        let started = self.runtime.start(spec).await.map_err(|e| {
            ControlError::new("DEPLOY_FAILED", e.to_string(), "See the deployment's logs.")
        })?;
        self.republish(guard, &dep.id, started.addr).await
    }
}
