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
        let mut rows_hour = (0, 0);
        let mut rows_day = (0u64, 0u64);
        for (i, (r, w)) in counted.rows.iter().enumerate() {
            if i == 0 {
                rows_hour = (*r, *w);
            }
            rows_day = (rows_day.0.saturating_add(*r), rows_day.1.saturating_add(*w));
        }
        let database = match self.databases() {
            Some(db) => {
                let dbs = db.service.databases().clone();
                let id = project.id.clone();
                let info = tokio::task::spawn_blocking(move || dbs.info(&id))
                    .await
                    .map_err(|e| ControlError::internal(format!("database info: {e}")))?
                    .map_err(|e| ControlError::internal(format!("database info: {e}")))?;
                info.map(|info| DatabaseView {
                    bindings: live
                        .as_ref()
                        .map(|d| d.databases.clone())
                        .unwrap_or_default(),
                    size_bytes: info.size_bytes,
                    max_size_bytes: db.service.databases().limits().max_size_bytes,
                    tables: info.tables,
                    rows_hour,
                    rows_day,
                })
            }
            None => None,
        };
        usage.cpu_ms_live = match project.live_deployment.as_deref() {
            Some(d) => self.runtime.status(d).await,
            None => None,
        }
        .map_or(0, |s| s.cpu_us_total / 1000);
        Ok(ProjectView {
            url: self.url(&project.slug),
            project,
            live,
            recent,
            env,
            usage,
            database,
        })
    }

    /// Read-only SQL on the owner's project database (for the agent's own inspection): one
    /// statement, at most `max_rows` rows, metered like the service's own queries.
    pub async fn query_database(
        &self,
        owner: &str,
        project_id: &str,
        sql: &str,
        max_rows: usize,
    ) -> Result<QueryOut, ControlError> {
        let project = self.owned(owner, project_id).await?;
        let Some(db) = self.databases() else {
            return Err(ControlError::validation(
                "this host offers no databases",
                "Databases are not enabled by the operator.",
            ));
        };
        let grant = tollgate_database::Grant {
            project: project.id.clone(),
            account: project.owner.clone(),
        };
        use tollgate_database::service::Failure;
        let done = db
            .service
            .inspect(&grant, sql, max_rows.saturating_add(1))
            .await
            .map_err(|f| match f {
                Failure::Suspended => ControlError::new(
                    "PAYMENT_REQUIRED",
                    f.to_string(),
                    "Top up your balance (top_up), then query again.",
                ),
                Failure::Unavailable | Failure::Busy => ControlError::new(
                    "UNAVAILABLE",
                    f.to_string(),
                    "Retry in a few seconds.",
                ),
                Failure::Db(tollgate_database::DbError::NoDatabase(_)) => ControlError::validation(
                    "the project has no database yet",
                    "Deploy with databases: [\"DB\"]; the database is created on its first query.",
                ),
                Failure::Db(e) => ControlError::validation(
                    format!("query failed: {e}"),
                    "query_database runs one read-only statement, e.g. SELECT * FROM t LIMIT 20 or PRAGMA table_info(t).",
                ),
            })?;
        let mut out = QueryOut {
            rows_read: done.rows_read,
            ..QueryOut::default()
        };
        if let Some(r) = done.results.into_iter().next() {
            if let Some(cols) = r.results.get("columns").and_then(|c| c.as_array()) {
                out.columns = cols
                    .iter()
                    .filter_map(|c| c.as_str().map(str::to_owned))
                    .collect();
            }
            if let Some(serde_json::Value::Array(rows)) = r.results.get("rows") {
                out.truncated = rows.len() > max_rows;
                out.rows = rows.iter().take(max_rows).cloned().collect();
            }
        }
        Ok(out)
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
            .await
            .unwrap_or_default())
    }
}
