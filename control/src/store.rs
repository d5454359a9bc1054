//! Where projects, deployments, their source and bundles live. Redis in production (shared by
//! control instances and outliving them); the embedded store for `tollgate dev` comes with the
//! dev wiring.

use std::time::Duration;

use async_trait::async_trait;
use redis::AsyncCommands;
use tollgate_kv::{Conn, Target};

use crate::error::ControlError;
use crate::locks::{Fence, ProjectLease};
use crate::model::{Deployment, Env, Files, Project};

/// A write made under a project lease that another control instance has taken since.
pub fn fenced_out() -> ControlError {
    ControlError::new(
        "PROJECT_BUSY",
        "another control instance took this project over while this change was under way",
        "Repeat the call; get_project shows what is live now.",
    )
}

#[async_trait]
pub trait ControlStore: Send + Sync + 'static {
    /// Reserves `slug` for `project_id`; false when another project holds it (or held it within
    /// the grace period after its deletion).
    async fn claim_slug(&self, slug: &str, project_id: &str) -> Result<bool, ControlError>;
    /// Frees `slug` after `grace` (links to the deleted service keep failing cleanly meanwhile),
    /// if `project_id` still holds it.
    async fn release_slug(
        &self,
        slug: &str,
        project_id: &str,
        grace: Duration,
    ) -> Result<(), ControlError>;
    async fn put_project(&self, p: &Project) -> Result<(), ControlError>;
    /// Tries once to take `project`'s lease, shared by every control instance on this store;
    /// `None` while another one holds it. A store only one process uses answers a local lease.
    async fn try_lock_project(&self, _project: &str) -> Result<Option<ProjectLease>, ControlError> {
        Ok(Some(ProjectLease::local()))
    }
    /// [`ControlStore::put_project`], refused (`PROJECT_BUSY`, nothing written) unless `fence`
    /// still holds.
    async fn put_project_fenced(
        &self,
        p: &Project,
        _fence: Option<&Fence>,
    ) -> Result<(), ControlError> {
        self.put_project(p).await
    }
    async fn project(&self, id: &str) -> Result<Option<Project>, ControlError>;
    async fn projects_of(&self, owner: &str) -> Result<Vec<Project>, ControlError>;
    async fn all_projects(&self) -> Result<Vec<Project>, ControlError>;
    async fn put_deployment(&self, d: &Deployment) -> Result<(), ControlError>;
    async fn deployment(&self, id: &str) -> Result<Option<Deployment>, ControlError>;
    async fn put_artifacts(
        &self,
        deployment: &str,
        files: &Files,
        bundle: &str,
    ) -> Result<(), ControlError>;
    async fn files(&self, deployment: &str) -> Result<Option<Files>, ControlError>;
    async fn bundle(&self, deployment: &str) -> Result<Option<String>, ControlError>;
    async fn delete_artifacts(&self, deployment: &str) -> Result<(), ControlError>;
    async fn put_env(&self, project: &str, env: &Env) -> Result<(), ControlError>;
    /// [`ControlStore::put_env`], refused (`PROJECT_BUSY`, nothing written) unless `fence`
    /// still holds.
    async fn put_env_fenced(
        &self,
        project: &str,
        env: &Env,
        _fence: Option<&Fence>,
    ) -> Result<(), ControlError> {
        self.put_env(project, env).await
    }
    async fn env(&self, project: &str) -> Result<Env, ControlError>;
    /// Requests and response bytes the proxies counted, by UTC hour buckets (`YYYYMMDDHH`), and
    /// the time of the last request.
    async fn usage(&self, project: &str, buckets: &[String]) -> Result<Usage, ControlError>;
    /// Adds database rows (read, written) to the project's hour bucket.
    async fn add_rows(
        &self,
        project: &str,
        bucket: &str,
        rows_read: u64,
        rows_written: u64,
    ) -> Result<(), ControlError>;
}

/// What the proxies counted for a project (see `tollgate_proxy::usage`), and its database rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Per bucket asked for, in order: (requests, response bytes).
    pub buckets: Vec<(u64, u64)>,
    /// Per bucket asked for, in order: database (rows read, rows written).
    pub rows: Vec<(u64, u64)>,
    pub last_request_ms: Option<u64>,
}

/// How long an hour bucket of usage is kept (the proxies use the same).
pub(crate) const BUCKET_TTL_S: i64 = 8 * 24 * 3600;

pub struct RedisControlStore {
    conn: Conn,
    prefix: String,
    lease_ttl: Duration,
}

impl RedisControlStore {
    /// `prefix` is the deployment's (on a cluster, the keys carry it as a hash tag, shared
    /// with the routes a project's lease fences).
    pub async fn connect(target: impl Into<Target>, prefix: &str) -> Result<Self, ControlError> {
        let target = target.into();
        let conn = target.connect().await?;
        Ok(RedisControlStore {
            conn,
            prefix: format!("{}:ctl", target.family_prefix(prefix)),
            lease_ttl: crate::locks::LEASE_TTL,
        })
    }

    /// How long a project lease lives without renewal (tests shorten it).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// The key of `project`'s lease.
    pub fn lock_key(&self, project: &str) -> String {
        self.key("lock", project)
    }

    fn key(&self, kind: &str, id: &str) -> String {
        format!("{}:{kind}:{id}", self.prefix)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: String,
    ) -> Result<Option<T>, ControlError> {
        let mut c = self.conn.clone();
        let v: Option<String> = c.get(key).await?;
        Ok(match v {
            Some(s) => Some(serde_json::from_str(&s)?),
            None => None,
        })
    }

    async fn set_json<T: serde::Serialize>(&self, key: String, v: &T) -> Result<(), ControlError> {
        let mut c = self.conn.clone();
        let _: () = c.set(key, serde_json::to_string(v)?).await?;
        Ok(())
    }
}

#[async_trait]
impl ControlStore for RedisControlStore {
    async fn claim_slug(&self, slug: &str, project_id: &str) -> Result<bool, ControlError> {
        let mut c = self.conn.clone();
        let ok: bool = redis::cmd("SET")
            .arg(self.key("slug", slug))
            .arg(project_id)
            .arg("NX")
            .query_async::<Option<String>>(&mut c)
            .await?
            .is_some();
        Ok(ok)
    }

    async fn release_slug(
        &self,
        slug: &str,
        project_id: &str,
        grace: Duration,
    ) -> Result<(), ControlError> {
        // Compare and release in one step: never free a slug another project holds by now.
        const SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) == 0 then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1"#;
        let mut c = self.conn.clone();
        let _: i64 = redis::Script::new(SCRIPT)
            .key(self.key("slug", slug))
            .arg(project_id)
            .arg(grace.as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(())
    }

    async fn put_project(&self, p: &Project) -> Result<(), ControlError> {
        self.put_project_fenced(p, None).await
    }

    async fn try_lock_project(&self, project: &str) -> Result<Option<ProjectLease>, ControlError> {
        ProjectLease::try_take(&self.conn, self.key("lock", project), self.lease_ttl).await
    }

    async fn put_project_fenced(
        &self,
        p: &Project,
        fence: Option<&Fence>,
    ) -> Result<(), ControlError> {
        // The record and its indexes in one step, and only while the lease (if any) holds.
        const SCRIPT: &str = r#"
if ARGV[3] and redis.call('GET', ARGV[3]) ~= ARGV[4] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[2])
return 1"#;
        let mut c = self.conn.clone();
        let script = redis::Script::new(SCRIPT);
        let mut inv = script.key(self.key("project", &p.id));
        inv.key(self.key("owner", &p.owner))
            .key(format!("{}:projects", self.prefix))
            .arg(serde_json::to_string(p)?)
            .arg(&p.id);
        if let Some(f) = fence {
            inv.arg(&f.key).arg(&f.token);
        }
        let written: i64 = inv.invoke_async(&mut c).await?;
        if written != 1 {
            return Err(fenced_out());
        }
        Ok(())
    }

    async fn project(&self, id: &str) -> Result<Option<Project>, ControlError> {
        self.get_json(self.key("project", id)).await
    }

    async fn projects_of(&self, owner: &str) -> Result<Vec<Project>, ControlError> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c.smembers(self.key("owner", owner)).await?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(p) = self.project(&id).await? {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    async fn all_projects(&self) -> Result<Vec<Project>, ControlError> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c.smembers(format!("{}:projects", self.prefix)).await?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(p) = self.project(&id).await? {
                out.push(p);
            }
        }
        Ok(out)
    }

    async fn put_deployment(&self, d: &Deployment) -> Result<(), ControlError> {
        self.set_json(self.key("deployment", &d.id), d).await
    }

    async fn deployment(&self, id: &str) -> Result<Option<Deployment>, ControlError> {
        self.get_json(self.key("deployment", id)).await
    }

    async fn put_artifacts(
        &self,
        deployment: &str,
        files: &Files,
        bundle: &str,
    ) -> Result<(), ControlError> {
        let mut c = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .set(self.key("files", deployment), serde_json::to_string(files)?)
            .set(self.key("bundle", deployment), bundle)
            .query_async(&mut c)
            .await?;
        Ok(())
    }

    async fn files(&self, deployment: &str) -> Result<Option<Files>, ControlError> {
        self.get_json(self.key("files", deployment)).await
    }

    async fn bundle(&self, deployment: &str) -> Result<Option<String>, ControlError> {
        let mut c = self.conn.clone();
        Ok(c.get(self.key("bundle", deployment)).await?)
    }

    async fn delete_artifacts(&self, deployment: &str) -> Result<(), ControlError> {
        let mut c = self.conn.clone();
        let _: () = c
            .del(&[
                self.key("files", deployment),
                self.key("bundle", deployment),
            ])
            .await?;
        Ok(())
    }

    async fn put_env(&self, project: &str, env: &Env) -> Result<(), ControlError> {
        self.put_env_fenced(project, env, None).await
    }

    async fn put_env_fenced(
        &self,
        project: &str,
        env: &Env,
        fence: Option<&Fence>,
    ) -> Result<(), ControlError> {
        const SCRIPT: &str = r#"
if ARGV[2] and redis.call('GET', ARGV[2]) ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
return 1"#;
        let mut c = self.conn.clone();
        let script = redis::Script::new(SCRIPT);
        let mut inv = script.key(self.key("env", project));
        inv.arg(serde_json::to_string(env)?);
        if let Some(f) = fence {
            inv.arg(&f.key).arg(&f.token);
        }
        let written: i64 = inv.invoke_async(&mut c).await?;
        if written != 1 {
            return Err(fenced_out());
        }
        Ok(())
    }

    async fn env(&self, project: &str) -> Result<Env, ControlError> {
        Ok(self
            .get_json(self.key("env", project))
            .await?
            .unwrap_or_default())
    }

    async fn usage(&self, project: &str, buckets: &[String]) -> Result<Usage, ControlError> {
        // Written by the proxies under `<prefix>:usage:…` (not `:ctl:`).
        let base = self.prefix.trim_end_matches(":ctl");
        let mut c = self.conn.clone();
        let mut pipe = redis::pipe();
        for b in buckets {
            pipe.cmd("HMGET")
                .arg(tollgate_routes::usage_key(base, project, Some(b)))
                .arg("requests")
                .arg("bytes_out")
                .arg("rows_read")
                .arg("rows_written");
        }
        pipe.hget(
            tollgate_routes::usage_key(base, project, None),
            "last_request_ms",
        );
        let mut replies: Vec<redis::Value> = pipe.query_async(&mut c).await?;
        let last = replies.pop();
        let last_request_ms = match last {
            Some(v) => redis::from_redis_value::<Option<u64>>(v).map_err(parse_err)?,
            None => None,
        };
        let mut out = Vec::new();
        let mut rows = Vec::new();
        for v in replies {
            let q: (Option<u64>, Option<u64>, Option<u64>, Option<u64>) =
                redis::from_redis_value(v).map_err(parse_err)?;
            out.push((q.0.unwrap_or(0), q.1.unwrap_or(0)));
            rows.push((q.2.unwrap_or(0), q.3.unwrap_or(0)));
        }
        Ok(Usage {
            buckets: out,
            rows,
            last_request_ms,
        })
    }

    async fn add_rows(
        &self,
        project: &str,
        bucket: &str,
        rows_read: u64,
        rows_written: u64,
    ) -> Result<(), ControlError> {
        let base = self.prefix.trim_end_matches(":ctl");
        let key = tollgate_routes::usage_key(base, project, Some(bucket));
        // Counts for agents' views, not money: never waited for a replica (a retry after an
        // unacknowledged write would count twice).
        let mut c = self.conn.without_acks();
        let _: () = redis::pipe()
            .hincr(&key, "rows_read", rows_read)
            .ignore()
            .hincr(&key, "rows_written", rows_written)
            .ignore()
            .expire(&key, BUCKET_TTL_S)
            .ignore()
            .query_async(&mut c)
            .await?;
        Ok(())
    }
}

fn parse_err(e: impl std::fmt::Display) -> ControlError {
    tracing::error!(error = %e, "usage record");
    ControlError::internal("a usage record could not be read")
}
