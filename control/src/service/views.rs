//! What agents and operators read: projects with their usage, source files, logs.

use super::*;
use crate::error::ControlError;
use crate::model::{Project, ProjectStatus, now_ms};

impl Control {
    pub async fn list_projects(&self, owner: &str) -> Result<Vec<ProjectView>, ControlError> {
        let mut out = Vec::new();
        for p in self.store.projects_of(owner).await? {
            if p.status != ProjectStatus::Deleted {
                out.push(self.view(p).await?);
            }
        }
        Ok(out)
    }

    pub async fn get_project(
        &self,
        owner: &str,
        project_id: &str,
    ) -> Result<ProjectView, ControlError> {
        let p = self.owned(owner, project_id).await?;
        self.view(p).await
    }

    pub(crate) async fn view(&self, project: Project) -> Result<ProjectView, ControlError> {
        let live = match &project.live_deployment {
            Some(id) => self.store.deployment(id).await?,
            None => None,
        };
        let mut recent = Vec::new();
        for id in project.deployments.iter().rev().take(10) {
            if let Some(d) = self.store.deployment(id).await? {
                recent.push(d);
            }
        }
        let env = self
            .store
            .env(&project.id)
            .await?
            .into_iter()
            .map(|(k, v)| (k, (!v.secret).then_some(v.value)))
            .collect();
        let now_s = now_ms() / 1000;
        let buckets: Vec<String> = (0..24)
            .map(|h| tollgate_routes::hour_bucket(now_s.saturating_sub(h * 3600)))
            .collect();
        let counted = self.store.usage(&project.id, &buckets).await?;
        let mut usage = UsageView {
            last_request_ms: counted.last_request_ms,
            ..UsageView::default()
        };
        for (i, (req, bytes)) in counted.buckets.iter().enumerate() {
            if i == 0 {
                usage.hour = Traffic {
                    requests: *req,
                    bytes_out: *bytes,
                };
            }
            usage.day.requests += req;
            usage.day.bytes_out += bytes;
        }
        usage.cpu_ms_live = project
            .live_deployment
            .as_deref()
            .and_then(|d| self.runtime.status(d))
            .map_or(0, |s| s.cpu_us_total / 1000);
        Ok(ProjectView {
            url: self.url(&project.slug),
            project,
            live,
            recent,
            env,
            usage,
        })
    }

    /// A file of the live deployment's source, as deployed.
    pub async fn read_file(
        &self,
        owner: &str,
        project_id: &str,
        path: &str,
    ) -> Result<String, ControlError> {
        let p = self.owned(owner, project_id).await?;
        let live = p
            .live_deployment
            .ok_or_else(|| ControlError::not_found("a live deployment"))?;
        let files = self.store.files(&live).await?.unwrap_or_default();
        let path = tollgate_bundler::normalize_path(path)?;
        files.get(&path).cloned().ok_or_else(|| {
            ControlError::new(
                "NOT_FOUND",
                format!("{path:?} is not in the live source"),
                format!(
                    "Files: {}",
                    files.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    }

    /// The live deployment's console output and errors, oldest first.
    pub async fn logs(
        &self,
        owner: &str,
        project_id: &str,
        since: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, ControlError> {
        let p = self.owned(owner, project_id).await?;
        let Some(live) = p.live_deployment else {
            return Ok(Vec::new());
        };
        Ok(self
            .runtime
            .logs(&live, since, limit.clamp(1, 1000))
            .map(|(l, _)| l)
            .unwrap_or_default())
    }
}
