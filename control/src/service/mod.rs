//! The control service: projects and their deployments. The pipeline is in `deploy` (validate →
//! bundle → start → publish route → live; a failed step leaves the previous live deployment
//! serving and records why), rollback and delete in `lifecycle`, what agents read in `views`,
//! the runtime's events and recovery in `events`, expiry in `sweep`, operator actions in
//! `admin`.

mod admin;
mod deploy;
mod events;
mod lifecycle;
mod sweep;
mod views;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tollgate_bundler::Bundler;
use tollgate_routes::{Route, RouteKey, validate_slug};

use crate::routes::RoutePublisher;
use tollgate_runtime::{DeploymentSpec, LogEntry, RuntimeEvent};

use crate::runtime::Runtime;

use crate::error::ControlError;
use crate::locks::{Fence, ProjectLease};
use crate::model::{DeployStatus, Deployment, Env, Files, Project, ProjectStatus, new_id, now_ms};
use crate::store::ControlStore;

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// How a project's URL is written: `{slug}` is replaced (e.g. `http://{slug}.localhost:8080`).
    pub url_template: String,
    pub compatibility_date: String,
    /// A deleted or expired project's slug stays reserved this long.
    pub slug_grace: Duration,
    /// A project with no request and no deploy for this long expires and is garbage-collected.
    pub inactivity_ttl: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            url_template: "http://{slug}.localhost:8080".into(),
            compatibility_date: "2025-09-01".into(),
            slug_grace: Duration::from_secs(24 * 3600),
            inactivity_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// How long a deploy or rollback waits for another one of the same project.
pub const START_LOCK_WAIT: Duration = Duration::from_secs(120);

/// How long a route update from the runtime waits for its project (the route repair comes
/// back to a busy one).
pub(crate) const EVENT_LOCK_WAIT: Duration = Duration::from_secs(2);

/// What `deploy_project` takes (after the MCP layer parsed it).
#[derive(Clone, Default)]
pub struct DeployRequest {
    /// The whole source (new project, or a full replacement with `project_id`).
    pub files: Option<Files>,
    /// Edits to the live source: path → new text, or `None` to delete. Needs `project_id`.
    pub changes: Option<BTreeMap<String, Option<String>>>,
    pub project_id: Option<String>,
    /// For a new project: the wanted slug (normalised; a suffix is added when taken).
    pub project_name: Option<String>,
    /// Env vars to set (merged into the project's).
    pub env: BTreeMap<String, String>,
    /// Secrets to set (write-only).
    pub secrets: BTreeMap<String, String>,
    /// Names to bind the project's SQL database under (D1 API); `None` keeps the live
    /// deployment's bindings, `Some([])` removes them (the data stays).
    pub databases: Option<Vec<String>>,
}

/// Names only: file contents are noise and secrets must never reach logs.
impl std::fmt::Debug for DeployRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployRequest")
            .field(
                "files",
                &self.files.as_ref().map(|m| m.keys().collect::<Vec<_>>()),
            )
            .field(
                "changes",
                &self.changes.as_ref().map(|m| m.keys().collect::<Vec<_>>()),
            )
            .field("project_id", &self.project_id)
            .field("project_name", &self.project_name)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("databases", &self.databases)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeployOutcome {
    pub project_id: String,
    pub deployment_id: String,
    pub slug: String,
    pub url: String,
    pub version: u32,
    pub status: DeployStatus,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProjectView {
    pub project: Project,
    pub url: String,
    pub live: Option<Deployment>,
    /// Newest first, at most 10.
    pub recent: Vec<Deployment>,
    /// Env var names; secret values are never shown.
    pub env: BTreeMap<String, Option<String>>,
    pub usage: UsageView,
    /// The project's SQL database, once it has one.
    pub database: Option<DatabaseView>,
}

/// What `query_database` answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QueryOut {
    pub columns: Vec<String>,
    pub rows: Vec<serde_json::Value>,
    /// More rows matched than were returned.
    pub truncated: bool,
    /// Rows the query read (billed like the service's own).
    pub rows_read: u64,
}

/// A project's database as agents see it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DatabaseView {
    /// The names the live version binds it under.
    pub bindings: Vec<String>,
    pub size_bytes: u64,
    pub max_size_bytes: u64,
    pub tables: Vec<tollgate_database::TableInfo>,
    /// Rows (read, written) in the current UTC hour and the last 24 hours.
    pub rows_hour: (u64, u64),
    pub rows_day: (u64, u64),
}

/// What the project's service did, from the proxies' counts and the runtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct UsageView {
    /// The current UTC clock hour so far.
    pub hour: Traffic,
    /// The last 24 UTC hour buckets, the current one included.
    pub day: Traffic,
    pub last_request_ms: Option<u64>,
    /// CPU of the live deployment's process(es) since this control service started it.
    pub cpu_ms_live: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Traffic {
    pub requests: u64,
    pub bytes_out: u64,
}

pub struct Control {
    pub(crate) store: Arc<dyn ControlStore>,
    pub(crate) bundler: Bundler,
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) routes: Arc<dyn RoutePublisher>,
    pub(crate) cfg: ControlConfig,
    /// One pipeline at a time per project in this instance; the store's project lease covers
    /// other instances (docs/scale-out.md).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The per-project SQL databases and where workerd reaches their service; unset when the
    /// host offers none (deploys asking for a database are refused).
    databases: std::sync::OnceLock<DatabaseAccess>,
    metrics: std::sync::OnceLock<crate::metrics::ControlMetrics>,
    /// The route repair's differences of its last round (deployment → where it runs).
    mismatches: Mutex<HashMap<String, std::net::SocketAddr>>,
}

/// A project held by this control instance; dropped, it is free again.
pub(crate) struct ProjectGuard {
    _local: tokio::sync::OwnedMutexGuard<()>,
    lease: ProjectLease,
}

impl ProjectGuard {
    pub(crate) fn fence(&self) -> Option<&Fence> {
        self.lease.fence()
    }
}

/// The database service and where workerd reaches it (`IP:PORT` or `unix:/path`).
#[derive(Clone)]
pub struct DatabaseAccess {
    pub service: Arc<tollgate_database::Service>,
    pub address: String,
}

/// The route of `project` to its deployment `deployment` (upstreams filled in by the caller).
pub(crate) fn route_for(project: &Project, deployment: &str) -> Route {
    Route {
        upstreams: Vec::new(),
        account_id: Some(project.owner.clone()),
        project_id: Some(project.id.clone()),
        deployment_id: Some(deployment.to_owned()),
    }
}

/// What the runtime needs to run `dep` of `project`; `d1` is the database access for it.
pub(crate) fn spec_for(
    project: &Project,
    dep: &Deployment,
    code: String,
    env: &Env,
    d1: Option<tollgate_runtime::D1Access>,
) -> DeploymentSpec {
    DeploymentSpec {
        deployment_id: dep.id.clone(),
        project_id: project.id.clone(),
        account_id: project.owner.clone(),
        code,
        compatibility_date: dep.compatibility_date.clone(),
        env: env
            .iter()
            .map(|(k, v)| (k.clone(), v.value.clone()))
            .collect(),
        databases: dep.databases.clone(),
        d1,
    }
}

pub(crate) fn slugify(name: &str) -> String {
    let mut s = String::new();
    for c in name.trim().chars().flat_map(char::to_lowercase) {
        if c.is_ascii_alphanumeric() {
            s.push(c);
        } else if !s.ends_with('-') {
            s.push('-');
        }
    }
    let s: String = s.trim_matches('-').chars().take(40).collect();
    s.trim_end_matches('-').to_owned()
}

/// A bundler over the runtime's pinned toolchain, building under `work_dir`.
pub fn bundler_for(
    toolchain: &tollgate_runtime::Toolchain,
    work_dir: std::path::PathBuf,
) -> Result<Bundler, ControlError> {
    Bundler::new(tollgate_bundler::BundlerConfig {
        esbuild: toolchain.esbuild.clone(),
        node_modules: toolchain.node_modules.clone(),
        packages: toolchain.packages.clone(),
        work_dir,
        limits: tollgate_bundler::Limits::default(),
    })
    .map_err(ControlError::from)
}

impl Control {
    pub fn new(
        store: Arc<dyn ControlStore>,
        bundler: Bundler,
        runtime: impl Runtime,
        routes: Arc<dyn RoutePublisher>,
        cfg: ControlConfig,
    ) -> Arc<Control> {
        Arc::new(Control {
            store,
            bundler,
            runtime: Arc::new(runtime),
            routes,
            cfg,
            locks: Mutex::new(HashMap::new()),
            databases: std::sync::OnceLock::new(),
            metrics: std::sync::OnceLock::new(),
            mismatches: Mutex::new(HashMap::new()),
        })
    }

    /// Exports deploy metrics on `registry` (once).
    pub fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        let m = crate::metrics::ControlMetrics::register(registry)?;
        let _ = self.metrics.set(m);
        Ok(())
    }

    /// Offers per-project SQL databases to deployments (once, before serving).
    pub fn attach_databases(&self, access: DatabaseAccess) {
        let _ = self.databases.set(access);
    }

    pub fn databases(&self) -> Option<&DatabaseAccess> {
        self.databases.get()
    }

    /// The runtime spec of `dep`, with a fresh database token when it binds the database.
    pub(crate) fn spec(
        &self,
        project: &Project,
        dep: &Deployment,
        code: String,
        env: &Env,
    ) -> Result<DeploymentSpec, ControlError> {
        let d1 = if dep.databases.is_empty() {
            None
        } else {
            let access = self.databases.get().ok_or_else(|| {
                ControlError::validation(
                    "this host offers no databases",
                    "Deploy without `databases`, or ask the operator to enable them.",
                )
            })?;
            Some(tollgate_runtime::D1Access {
                address: access.address.clone(),
                token: access.service.grant(&project.id, &project.owner),
            })
        };
        Ok(spec_for(project, dep, code, env, d1))
    }

    /// How long a project may go without a request or a deploy before it expires.
    pub fn inactivity_ttl(&self) -> Duration {
        self.cfg.inactivity_ttl
    }

    pub fn url(&self, slug: &str) -> String {
        self.cfg.url_template.replace("{slug}", slug)
    }

    /// The project's lock for a start (a deploy or a rollback), waited for at most
    /// `START_LOCK_WAIT`: a start's charge gives itself back unless the start goes live
    /// within a deadline (docs/payments.md), so starts never queue up past it.
    pub(crate) async fn lock_start(&self, project: &str) -> Result<ProjectGuard, ControlError> {
        self.lock_project(project, START_LOCK_WAIT).await
    }

    /// The project, held by this instance: its in-process lock (this instance's tasks), then
    /// its lease in the store (other control instances), waited for at most `wait`.
    pub(crate) async fn lock_project(
        &self,
        project: &str,
        wait: Duration,
    ) -> Result<ProjectGuard, ControlError> {
        let busy = || {
            ControlError::new(
                "PROJECT_BUSY",
                "another deploy or rollback of this project is still under way",
                "wait for it to finish (get_project shows it), then repeat the call",
            )
        };
        let deadline = tokio::time::Instant::now() + wait;
        let local = tokio::time::timeout_at(deadline, self.lock_for(project).lock_owned())
            .await
            .map_err(|_| busy())?;
        let mut backoff = Duration::from_millis(10);
        loop {
            if let Some(lease) = self.store.try_lock_project(project).await? {
                return Ok(ProjectGuard {
                    _local: local,
                    lease,
                });
            }
            if tokio::time::Instant::now() + backoff > deadline {
                return Err(busy());
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    fn lock_for(&self, project: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // One entry per project ever touched would grow forever: drop the ones nobody holds
        // (only the map has them) once the map is large.
        if locks.len() >= 1024 {
            locks.retain(|_, l| Arc::strong_count(l) > 1);
        }
        locks.entry(project.to_owned()).or_default().clone()
    }

    /// Writes `p` under `guard`: refused (`PROJECT_BUSY`) if another instance took the project.
    pub(crate) async fn save_project(
        &self,
        guard: &ProjectGuard,
        p: &Project,
    ) -> Result<(), ControlError> {
        self.store.put_project_fenced(p, guard.fence()).await
    }

    /// Publishes `route` under `guard` (not written if another instance took the project).
    pub(crate) async fn put_route(
        &self,
        guard: &ProjectGuard,
        key: &RouteKey,
        route: &Route,
    ) -> Result<(), String> {
        self.routes.put_fenced(key, route, guard.fence()).await
    }

    /// Takes the route down under `guard`.
    pub(crate) async fn delete_route(
        &self,
        guard: &ProjectGuard,
        key: &RouteKey,
    ) -> Result<(), String> {
        self.routes.delete_fenced(key, guard.fence()).await
    }

    /// A project of `owner`; another owner's project is "not found" (no existence leak).
    pub(crate) async fn owned(
        &self,
        owner: &str,
        project_id: &str,
    ) -> Result<Project, ControlError> {
        match self.store.project(project_id).await? {
            Some(p) if p.owner == owner && p.status != ProjectStatus::Deleted => Ok(p),
            _ => Err(ControlError::not_found(&format!("project {project_id:?}"))),
        }
    }

    /// A project of `owner` that may change: active. A suspended (by an operator) or expired
    /// project only answers reads; its slug may already belong to someone else.
    pub(crate) async fn owned_active(
        &self,
        owner: &str,
        project_id: &str,
    ) -> Result<Project, ControlError> {
        let p = self.owned(owner, project_id).await?;
        match p.status {
            ProjectStatus::Active => Ok(p),
            ProjectStatus::Suspended => Err(ControlError::new(
                "PROJECT_SUSPENDED",
                format!("project {project_id:?} is suspended by the platform's operators"),
                "It cannot be changed until it is resumed; contact the operator.",
            )),
            _ => Err(ControlError::new(
                "PROJECT_EXPIRED",
                format!("project {project_id:?} expired after a long time without use"),
                "Deploy it again as a new project (without project_id).",
            )),
        }
    }

    pub(crate) async fn new_project(
        &self,
        owner: &str,
        name: Option<&str>,
    ) -> Result<Project, ControlError> {
        let id = new_id("p");
        let base = match name {
            Some(n) => {
                let s = slugify(n);
                if s.is_empty() {
                    return Err(ControlError::validation(
                        format!("project_name {n:?} has no letters or digits"),
                        "Use a name like \"todo-api\".",
                    ));
                }
                s
            }
            None => "app".to_owned(),
        };
        // The name as asked when free; else with a short random suffix.
        let mut candidates = Vec::new();
        if name.is_some() {
            candidates.push(base.clone());
        }
        for _ in 0..5 {
            let suffix = &new_id("x")[2..8];
            candidates.push(format!("{base}-{suffix}"));
        }
        for slug in candidates {
            if validate_slug(&slug).is_err() {
                continue;
            }
            if self.store.claim_slug(&slug, &id).await? {
                let now = now_ms();
                let p = Project {
                    id,
                    slug,
                    owner: owner.to_owned(),
                    created_ms: now,
                    status: ProjectStatus::Active,
                    live_deployment: None,
                    deployments: Vec::new(),
                    last_activity_ms: now,
                    ended_ms: None,
                };
                self.store.put_project(&p).await?;
                return Ok(p);
            }
        }
        Err(ControlError::internal("could not find a free slug"))
    }
}
