//! The control store in one durable file (redb), for a single node (`tollgate dev` without
//! Redis). Same records as the Redis store; slugs carry their release time instead of a TTL.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::error::ControlError;
use crate::model::{Deployment, Env, Files, Project, now_ms};
use crate::store::{ControlStore, Usage};

/// key → JSON (or text), with the Redis store's key names.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("control");

#[derive(Clone)]
pub struct EmbeddedControlStore {
    db: Arc<Database>,
}

fn err(e: impl std::fmt::Display) -> ControlError {
    tracing::error!(error = %e, "embedded control store");
    ControlError::internal("the control store failed")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Slug {
    project: String,
    /// Free again after this time (ms); `None` while the project lives.
    free_after_ms: Option<u64>,
}

impl EmbeddedControlStore {
    pub fn open(path: &Path) -> Result<Self, ControlError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let db = Database::create(path).map_err(err)?;
        let w = db.begin_write().map_err(err)?;
        w.open_table(KV).map_err(err)?;
        w.commit().map_err(err)?;
        Ok(EmbeddedControlStore { db: Arc::new(db) })
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, ControlError> {
        let r = self.db.begin_read().map_err(err)?;
        let t = r.open_table(KV).map_err(err)?;
        Ok(t.get(key).map_err(err)?.map(|v| v.value().to_vec()))
    }

    fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, ControlError> {
        match self.get(key)? {
            Some(b) => Ok(Some(serde_json::from_slice(&b)?)),
            None => Ok(None),
        }
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), ControlError>,
    ) -> Result<(), ControlError> {
        let w = self.db.begin_write().map_err(err)?;
        {
            let mut t = w.open_table(KV).map_err(err)?;
            f(&mut t)?;
        }
        w.commit().map_err(err)
    }

    fn put_json<T: serde::Serialize>(&self, key: &str, v: &T) -> Result<(), ControlError> {
        let bytes = serde_json::to_vec(v)?;
        self.write(|t| t.insert(key, bytes.as_slice()).map(|_| ()).map_err(err))
    }

    fn ids(&self, key: &str) -> Result<Vec<String>, ControlError> {
        Ok(self.get_json(key)?.unwrap_or_default())
    }
}

#[async_trait]
impl ControlStore for EmbeddedControlStore {
    async fn claim_slug(&self, slug: &str, project_id: &str) -> Result<bool, ControlError> {
        let key = format!("slug:{slug}");
        let mut claimed = false;
        self.write(|t| {
            let taken = match t.get(key.as_str()).map_err(err)? {
                Some(v) => {
                    let s: Slug = serde_json::from_slice(v.value())?;
                    s.free_after_ms.is_none_or(|at| now_ms() < at)
                }
                None => false,
            };
            if !taken {
                let v = serde_json::to_vec(&Slug {
                    project: project_id.to_owned(),
                    free_after_ms: None,
                })?;
                t.insert(key.as_str(), v.as_slice()).map_err(err)?;
                claimed = true;
            }
            Ok(())
        })?;
        Ok(claimed)
    }

    async fn release_slug(
        &self,
        slug: &str,
        project_id: &str,
        grace: Duration,
    ) -> Result<(), ControlError> {
        let key = format!("slug:{slug}");
        self.write(|t| {
            let project = match t.get(key.as_str()).map_err(err)? {
                Some(v) => serde_json::from_slice::<Slug>(v.value())?.project,
                None => return Ok(()),
            };
            if project != project_id {
                return Ok(()); // another project holds it now
            }
            let v = serde_json::to_vec(&Slug {
                project,
                free_after_ms: Some(now_ms() + grace.as_millis() as u64),
            })?;
            t.insert(key.as_str(), v.as_slice())
                .map(|_| ())
                .map_err(err)
        })
    }

    async fn put_project(&self, p: &Project) -> Result<(), ControlError> {
        let owner_key = format!("owner:{}", p.owner);
        let mut owned = self.ids(&owner_key)?;
        let mut all = self.ids("projects")?;
        for list in [&mut owned, &mut all] {
            if !list.contains(&p.id) {
                list.push(p.id.clone());
            }
        }
        let (pj, oj, aj) = (
            serde_json::to_vec(p)?,
            serde_json::to_vec(&owned)?,
            serde_json::to_vec(&all)?,
        );
        let pkey = format!("project:{}", p.id);
        self.write(|t| {
            t.insert(pkey.as_str(), pj.as_slice()).map_err(err)?;
            t.insert(owner_key.as_str(), oj.as_slice()).map_err(err)?;
            t.insert("projects", aj.as_slice()).map_err(err)?;
            Ok(())
        })
    }

    async fn project(&self, id: &str) -> Result<Option<Project>, ControlError> {
        self.get_json(&format!("project:{id}"))
    }

    async fn projects_of(&self, owner: &str) -> Result<Vec<Project>, ControlError> {
        let mut out = Vec::new();
        for id in self.ids(&format!("owner:{owner}"))? {
            if let Some(p) = self.project(&id).await? {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn all_projects(&self) -> Result<Vec<Project>, ControlError> {
        let mut out = Vec::new();
        for id in self.ids("projects")? {
            if let Some(p) = self.project(&id).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    async fn put_deployment(&self, d: &Deployment) -> Result<(), ControlError> {
        self.put_json(&format!("deployment:{}", d.id), d)
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>, ControlError> {
        self.get_json(&format!("deployment:{id}"))
    }

    async fn put_artifacts(
        &self,
        deployment: &str,
        files: &Files,
        bundle: &str,
    ) -> Result<(), ControlError> {
        let fj = serde_json::to_vec(files)?;
        let (fk, bk) = (
            format!("files:{deployment}"),
            format!("bundle:{deployment}"),
        );
        self.write(|t| {
            t.insert(fk.as_str(), fj.as_slice()).map_err(err)?;
            t.insert(bk.as_str(), bundle.as_bytes()).map_err(err)?;
            Ok(())
        })
    }

    async fn files(&self, deployment: &str) -> Result<Option<Files>, ControlError> {
        self.get_json(&format!("files:{deployment}"))
    }

    async fn bundle(&self, deployment: &str) -> Result<Option<String>, ControlError> {
        Ok(self
            .get(&format!("bundle:{deployment}"))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    async fn delete_artifacts(&self, deployment: &str) -> Result<(), ControlError> {
        let (fk, bk) = (
            format!("files:{deployment}"),
            format!("bundle:{deployment}"),
        );
        self.write(|t| {
            t.remove(fk.as_str()).map_err(err)?;
            t.remove(bk.as_str()).map_err(err)?;
            Ok(())
        })
    }

    async fn put_env(&self, project: &str, env: &Env) -> Result<(), ControlError> {
        self.put_json(&format!("env:{project}"), env)
    }

    async fn env(&self, project: &str) -> Result<Env, ControlError> {
        Ok(self
            .get_json(&format!("env:{project}"))?
            .unwrap_or_default())
    }

    /// Proxies count requests into Redis; a single node without Redis has none to show. Database
    /// rows are counted here.
    async fn usage(&self, project: &str, buckets: &[String]) -> Result<Usage, ControlError> {
        let mut rows = Vec::with_capacity(buckets.len());
        for b in buckets {
            rows.push(
                self.get_json::<(u64, u64)>(&format!("rows:{project}:{b}"))?
                    .unwrap_or((0, 0)),
            );
        }
        Ok(Usage {
            buckets: vec![(0, 0); buckets.len()],
            rows,
            last_request_ms: None,
        })
    }

    async fn add_rows(
        &self,
        project: &str,
        bucket: &str,
        rows_read: u64,
        rows_written: u64,
    ) -> Result<(), ControlError> {
        let key = format!("rows:{project}:{bucket}");
        self.write(|t| {
            let (r, w): (u64, u64) = match t.get(key.as_str()).map_err(err)? {
                Some(v) => serde_json::from_slice(v.value())?,
                None => (0, 0),
            };
            let v =
                serde_json::to_vec(&(r.saturating_add(rows_read), w.saturating_add(rows_written)))?;
            t.insert(key.as_str(), v.as_slice()).map_err(err)?;
            Ok(())
        })
    }
}
