//! The deploy pipeline and project lifecycle: validate → bundle → start → publish route → live.
//! A failed step leaves the previous live deployment serving and records why.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tollgate_bundler::Bundler;
use tollgate_routes::{Route, RouteKey, validate_slug};

use crate::routes::RoutePublisher;
use tollgate_runtime::{DeploymentSpec, LogEntry, RuntimeEvent, Supervisor};

use crate::error::ControlError;
use crate::model::{
    DeployStatus, Deployment, Env, EnvVar, Files, Project, ProjectStatus, new_id, now_ms,
};
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
    store: Arc<dyn ControlStore>,
    bundler: Bundler,
    runtime: Supervisor,
    routes: Arc<dyn RoutePublisher>,
    cfg: ControlConfig,
    /// One pipeline at a time per project (one control instance; see docs/control.md).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// The route of `project` to its deployment `deployment` (upstreams filled in by the caller).
fn route_for(project: &Project, deployment: &str) -> Route {
    Route {
        upstreams: Vec::new(),
        account_id: Some(project.owner.clone()),
        project_id: Some(project.id.clone()),
        deployment_id: Some(deployment.to_owned()),
    }
}

/// What the runtime needs to run `dep` of `project`.
fn spec_for(project: &Project, dep: &Deployment, code: String, env: &Env) -> DeploymentSpec {
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
    }
}

fn slugify(name: &str) -> String {
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
        runtime: Supervisor,
        routes: Arc<dyn RoutePublisher>,
        cfg: ControlConfig,
    ) -> Arc<Control> {
        Arc::new(Control {
            store,
            bundler,
            runtime,
            routes,
            cfg,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// How long a project may go without a request or a deploy before it expires.
    pub fn inactivity_ttl(&self) -> Duration {
        self.cfg.inactivity_ttl
    }

    pub fn url(&self, slug: &str) -> String {
        self.cfg.url_template.replace("{slug}", slug)
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

    /// A project of `owner`; another owner's project is "not found" (no existence leak).
    async fn owned(&self, owner: &str, project_id: &str) -> Result<Project, ControlError> {
        match self.store.project(project_id).await? {
            Some(p) if p.owner == owner && p.status != ProjectStatus::Deleted => Ok(p),
            _ => Err(ControlError::not_found(&format!("project {project_id:?}"))),
        }
    }

    /// A project of `owner` that may change: active. A suspended (by an operator) or expired
    /// project only answers reads; its slug may already belong to someone else.
    async fn owned_active(&self, owner: &str, project_id: &str) -> Result<Project, ControlError> {
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

    async fn new_project(&self, owner: &str, name: Option<&str>) -> Result<Project, ControlError> {
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
                };
                self.store.put_project(&p).await?;
                return Ok(p);
            }
        }
        Err(ControlError::internal("could not find a free slug"))
    }

    /// Validates, bundles, starts, publishes; returns once the deployment is live or failed.
    pub async fn deploy(
        &self,
        owner: &str,
        req: DeployRequest,
    ) -> Result<DeployOutcome, ControlError> {
        self.deploy_observed(owner, req, None).await
    }

    /// [`Control::deploy`], reporting its steps (`bundling`, `starting`) as they begin.
    pub async fn deploy_observed(
        &self,
        owner: &str,
        req: DeployRequest,
        steps: Option<&tokio::sync::mpsc::UnboundedSender<&'static str>>,
    ) -> Result<DeployOutcome, ControlError> {
        let step = |s: &'static str| {
            if let Some(tx) = steps {
                let _ = tx.send(s);
            }
        };
        match (&req.files, &req.changes, &req.project_id) {
            (Some(_), Some(_), _) => {
                return Err(ControlError::validation(
                    "both files and changes were given",
                    "Send files for a whole source, or changes (with project_id) to edit the live one.",
                ));
            }
            (None, None, _) => {
                return Err(ControlError::validation(
                    "neither files nor changes were given",
                    "Send files: {\"src/index.ts\": \"…\"}.",
                ));
            }
            (None, Some(_), None) => {
                return Err(ControlError::validation(
                    "changes need a project_id",
                    "Pass the project_id returned by your first deploy.",
                ));
            }
            _ => {}
        }
        for name in req.env.keys().chain(req.secrets.keys()) {
            if !tollgate_runtime::capnp::valid_binding_name(name) {
                return Err(ControlError::validation(
                    format!("env var name {name:?} is not an identifier"),
                    "Use names like API_KEY: letters, digits and _, not starting with a digit.",
                ));
            }
        }
        // Check the files before creating anything.
        if let Some(files) = &req.files {
            tollgate_bundler::SourceFiles::new(
                files
                    .iter()
                    .map(|(p, t)| (p.as_str(), t.as_bytes().to_vec())),
                self.bundler.limits(),
            )?;
        }
        let project = match &req.project_id {
            Some(id) => self.owned_active(owner, id).await?,
            None => self.new_project(owner, req.project_name.as_deref()).await?,
        };
        let lock = self.lock_for(&project.id);
        let _guard = lock.lock().await;
        // Re-read under the lock: another deploy may have finished meanwhile.
        let mut project = self.owned_active(owner, &project.id).await?;

        let files = match (req.files, req.changes) {
            (Some(files), _) => files,
            (None, Some(changes)) => {
                let base = match &project.live_deployment {
                    Some(live) => self.store.files(live).await?.unwrap_or_default(),
                    None => {
                        return Err(ControlError::validation(
                            "the project has no live deployment to apply changes to",
                            "Deploy the whole source with files.",
                        ));
                    }
                };
                let mut files = base;
                for (path, text) in changes {
                    match text {
                        Some(t) => {
                            files.insert(path, t);
                        }
                        None => {
                            if files.remove(&path).is_none() {
                                return Err(ControlError::validation(
                                    format!(
                                        "cannot delete {path:?}: no such file in the live source"
                                    ),
                                    "Read the source back with read_project_file to check paths.",
                                ));
                            }
                        }
                    }
                }
                files
            }
            (None, None) => Files::new(),
        };

        let mut env = self.store.env(&project.id).await?;
        for (k, v) in req.env {
            env.insert(
                k,
                EnvVar {
                    value: v,
                    secret: false,
                },
            );
        }
        for (k, v) in req.secrets {
            env.insert(
                k,
                EnvVar {
                    value: v,
                    secret: true,
                },
            );
        }
        // Saved once the new version is live: a failed deploy changes nothing (the running
        // version, its restarts and rollbacks keep the env they had).
        let mut dep = Deployment {
            id: new_id("d"),
            project_id: project.id.clone(),
            version: project.deployments.len() as u32 + 1,
            status: DeployStatus::Building,
            reason: None,
            created_ms: now_ms(),
            manifest: None,
            rollback_of: None,
            compatibility_date: self.cfg.compatibility_date.clone(),
        };
        self.store.put_deployment(&dep).await?;
        project.deployments.push(dep.id.clone());
        self.store.put_project(&project).await?;

        step("bundling");
        let bundle = match self
            .bundler
            .bundle_raw(
                files
                    .iter()
                    .map(|(p, t)| (p.as_str(), t.as_bytes().to_vec())),
            )
            .await
        {
            Ok(b) => b,
            Err(e) => {
                let mut e = ControlError::from(e);
                if project.live_deployment.is_none() {
                    // Keep the agent on this project (and its name) when it retries.
                    e.hint = format!(
                        "{} Retry with project_id {:?}, which keeps the name {:?}.",
                        e.hint, project.id, project.slug
                    );
                }
                self.fail(&mut dep, &e).await;
                return Err(e);
            }
        };
        dep.manifest = Some(bundle.manifest.clone());
        self.store
            .put_artifacts(&dep.id, &files, &bundle.code)
            .await?;
        step("starting");
        let project_id = project.id.clone();
        let out = self.go_live(project, dep, bundle.code, &env).await?;
        if let Err(e) = self.store.put_env(&project_id, &env).await {
            // Live with the new env, but a restart would use the old one until the next deploy.
            tracing::error!(project = %project_id, error = %e, "env of a live deployment not saved");
        }
        Ok(out)
    }

    /// Starts `dep`'s code, switches the route to it, drains and stops the previous live one.
    async fn go_live(
        &self,
        mut project: Project,
        mut dep: Deployment,
        code: String,
        env: &Env,
    ) -> Result<DeployOutcome, ControlError> {
        let spec = spec_for(&project, &dep, code, env);
        let route = route_for(&project, &dep.id);
        let key = RouteKey::slug(&project.slug)
            .map_err(|e| ControlError::internal(format!("stored slug is invalid: {e}")))?;
        let old = project.live_deployment.clone();
        // Start the new version and point the route at it; the old version drains and stops in
        // the background, so the agent gets its answer as soon as the new one serves.
        let started = match self.runtime.start(spec).await {
            Ok(started) => {
                let mut route = route;
                route.upstreams = vec![started.addr];
                match self.routes.put(&key, &route).await {
                    Ok(_) => Ok(started),
                    Err(e) => {
                        let _ = self.runtime.remove(&dep.id, false).await;
                        Err(format!("could not publish the route: {e}"))
                    }
                }
            }
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = started {
            let hint = match &old {
                Some(_) => {
                    "Fix the error and deploy again; the previous version keeps serving.".to_owned()
                }
                None => format!(
                    "Fix the error and deploy again with project_id {:?}, which keeps the name {:?}.",
                    project.id, project.slug
                ),
            };
            let e = ControlError::new(
                "DEPLOY_FAILED",
                format!("the service did not start: {e}"),
                hint,
            );
            self.fail(&mut dep, &e).await;
            return Err(e);
        }
        // Record the switch before touching the old version. The rule the caller's money
        // follows (a deploy is charged when it serves, refunded when it does not): from here,
        // an error means the route no longer points at the new version, and `Ok` means it
        // serves.
        dep.status = DeployStatus::Live;
        project.live_deployment = Some(dep.id.clone());
        project.last_activity_ms = now_ms();
        let recorded = async {
            self.store.put_deployment(&dep).await?;
            self.store.put_project(&project).await
        }
        .await;
        if let Err(e) = recorded {
            // Point the route back at what the store says is live (the old version, still
            // running), or take it down for a first deploy.
            let reverted = match old.as_deref().and_then(|o| {
                self.runtime
                    .status(o)
                    .and_then(|s| s.addr)
                    .map(|addr| (o, addr))
            }) {
                Some((old_id, old_addr)) => {
                    let mut back = route_for(&project, old_id);
                    back.upstreams = vec![old_addr];
                    self.routes.put(&key, &back).await
                }
                None => self.routes.delete(&key).await,
            };
            match reverted {
                Ok(()) => {
                    let _ = self.runtime.remove(&dep.id, false).await;
                    return Err(e);
                }
                Err(route_err) => {
                    // The route could not be moved back: the new version is what serves, so it
                    // is the live one (and charged). Its record is written again by the next
                    // deploy or recovery; say so loudly.
                    tracing::error!(project = %project.id, deployment = %dep.id, error = %e, route_error = %route_err, "deployment serves but its record was not written");
                }
            }
        }
        // Serving now: bookkeeping of the old version that fails from here on is logged and
        // repaired later, never reported as a failed deploy.
        if let Some(old) = &old {
            match self.store.deployment(old).await {
                Ok(Some(mut prev)) => {
                    prev.status = DeployStatus::Superseded;
                    if let Err(e) = self.store.put_deployment(&prev).await {
                        tracing::error!(deployment = %old, error = %e, "previous deployment not marked superseded");
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(deployment = %old, error = %e, "previous deployment not marked superseded");
                }
            }
        }
        if let Some(old) = old.clone() {
            let runtime = self.runtime.clone();
            tokio::spawn(async move {
                // Drained, stopped, and its folder (with the config and its secrets) removed.
                let _ = runtime.remove(&old, true).await;
            });
        }
        tracing::info!(project = %project.id, deployment = %dep.id, version = dep.version, "live");
        Ok(DeployOutcome {
            url: self.url(&project.slug),
            project_id: project.id,
            deployment_id: dep.id,
            slug: project.slug,
            version: dep.version,
            status: DeployStatus::Live,
        })
    }

    async fn fail(&self, dep: &mut Deployment, e: &ControlError) {
        dep.status = DeployStatus::Failed;
        dep.reason = Some(format!("{}: {}", e.code, e.message));
        if let Err(err) = self.store.put_deployment(dep).await {
            tracing::error!(deployment = %dep.id, error = %err, "could not record a failed deployment");
        }
    }

    /// Runs an earlier deployment's code again, as a new deployment (code only: env and secrets
    /// stay as they are now). Default target: the live one before the current.
    pub async fn rollback(
        &self,
        owner: &str,
        project_id: &str,
        target: Option<&str>,
    ) -> Result<DeployOutcome, ControlError> {
        let lock = self.lock_for(project_id);
        let _guard = lock.lock().await;
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
                .map(|s| s.compatibility_date)
                .unwrap_or_else(|| self.cfg.compatibility_date.clone()),
        };
        self.store.put_deployment(&dep).await?;
        self.store.put_artifacts(&dep.id, &files, &code).await?;
        project.deployments.push(dep.id.clone());
        self.store.put_project(&project).await?;
        let env = self.store.env(&project.id).await?;
        self.go_live(project, dep, code, &env).await
    }

    /// Stops the service, removes its route (the URL answers 404), deletes its artifacts and
    /// frees its slug after the grace period. Idempotent.
    pub async fn delete(&self, owner: &str, project_id: &str) -> Result<(), ControlError> {
        let lock = self.lock_for(project_id);
        let _guard = lock.lock().await;
        let mut project = self.owned(owner, project_id).await?;
        if project.status == ProjectStatus::Expired {
            // Already torn down; its slug may belong to another project by now: touch nothing
            // of it.
            project.status = ProjectStatus::Deleted;
            return self.store.put_project(&project).await;
        }
        self.teardown(&mut project, ProjectStatus::Deleted).await
    }

    async fn teardown(
        &self,
        project: &mut Project,
        status: ProjectStatus,
    ) -> Result<(), ControlError> {
        if let Ok(key) = RouteKey::slug(&project.slug) {
            self.routes
                .delete(&key)
                .await
                .map_err(|e| ControlError::internal(format!("route delete: {e}")))?;
        }
        for d in &project.deployments {
            let _ = self.runtime.remove(d, false).await;
            self.store.delete_artifacts(d).await?;
        }
        project.status = status;
        project.live_deployment = None;
        self.store.put_project(project).await?;
        self.store
            .release_slug(&project.slug, &project.id, self.cfg.slug_grace)
            .await?;
        tracing::info!(project = %project.id, ?status, "torn down");
        Ok(())
    }

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

    async fn view(&self, project: Project) -> Result<ProjectView, ControlError> {
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

    /// Follows the runtime: a restarted, idle-stopped or woken process gets its route updated;
    /// a deployment that keeps crashing is recorded as failed, with the reason.
    pub async fn follow_runtime(
        self: Arc<Self>,
        mut events: tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    ) {
        while let Some(ev) = events.recv().await {
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
    async fn republish_locked(
        &self,
        deployment_id: &str,
        addr: std::net::SocketAddr,
    ) -> Result<(), ControlError> {
        let Some(dep) = self.store.deployment(deployment_id).await? else {
            return Ok(());
        };
        let lock = self.lock_for(&dep.project_id);
        let _guard = lock.lock().await;
        self.republish(deployment_id, addr).await
    }

    async fn republish(
        &self,
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
        self.routes
            .put(
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

    async fn mark_crashed(&self, deployment_id: &str, reason: &str) -> Result<(), ControlError> {
        if let Some(mut dep) = self.store.deployment(deployment_id).await? {
            dep.status = DeployStatus::Failed;
            dep.reason = Some(format!("crashed repeatedly: {reason}"));
            self.store.put_deployment(&dep).await?;
        }
        Ok(())
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
            match self.restart_live(&project, &live).await {
                Ok(()) => n += 1,
                Err(e) => {
                    tracing::error!(project = %project.id, error = %e, "could not restart a live deployment");
                }
            }
        }
        Ok(n)
    }
}

/// The cleanup job.
impl Control {
    /// Expires every project unused (no request, no deploy) for `inactivity_ttl`: its process
    /// stops, its route goes (the URL answers 404), its artifacts are deleted, its slug is freed
    /// after the grace period. Idempotent; returns the projects it expired now.
    pub async fn sweep(&self) -> Result<Vec<String>, ControlError> {
        let now = now_ms();
        let ttl = self.cfg.inactivity_ttl.as_millis() as u64;
        let mut expired = Vec::new();
        for p in self.store.all_projects().await? {
            if !matches!(p.status, ProjectStatus::Active | ProjectStatus::Suspended) {
                continue;
            }
            if now.saturating_sub(self.last_activity(&p, now).await?) <= ttl {
                continue;
            }
            let lock = self.lock_for(&p.id);
            let _guard = lock.lock().await;
            // Re-check under the lock: a deploy may have just happened.
            let Some(mut p) = self.store.project(&p.id).await? else {
                continue;
            };
            if !matches!(p.status, ProjectStatus::Active | ProjectStatus::Suspended)
                || now.saturating_sub(self.last_activity(&p, now).await?) <= ttl
            {
                continue;
            }
            self.teardown(&mut p, ProjectStatus::Expired).await?;
            tracing::info!(project = %p.id, "expired after inactivity");
            expired.push(p.id);
        }
        Ok(expired)
    }

    /// The latest of: the last deploy, the last request the runtime saw, the last request a
    /// proxy counted.
    async fn last_activity(&self, p: &Project, now: u64) -> Result<u64, ControlError> {
        let seen = p
            .live_deployment
            .as_deref()
            .and_then(|d| self.runtime.idle_for(d))
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
        let lock = self.lock_for(project_id);
        let _guard = lock.lock().await;
        let mut p = self.live_project(project_id).await?;
        if p.status == ProjectStatus::Active {
            if let Ok(key) = RouteKey::slug(&p.slug) {
                self.routes
                    .delete(&key)
                    .await
                    .map_err(|e| ControlError::internal(format!("route delete: {e}")))?;
            }
            if let Some(live) = &p.live_deployment {
                let _ = self.runtime.stop(live, false).await;
            }
            p.status = ProjectStatus::Suspended;
            self.store.put_project(&p).await?;
            tracing::info!(project = %p.id, "suspended by an operator");
        }
        self.view(p).await
    }

    /// Starts the live deployment again and republishes its route. Idempotent.
    pub async fn admin_resume(&self, project_id: &str) -> Result<ProjectView, ControlError> {
        let lock = self.lock_for(project_id);
        let _guard = lock.lock().await;
        let mut p = self.live_project(project_id).await?;
        if p.status == ProjectStatus::Suspended {
            p.status = ProjectStatus::Active;
            self.store.put_project(&p).await?;
            if let Some(live) = p.live_deployment.clone()
                && let Err(e) = self.restart_live(&p, &live).await
            {
                // Back to suspended, so the resume can be retried.
                p.status = ProjectStatus::Suspended;
                self.store.put_project(&p).await?;
                return Err(e);
            }
            tracing::info!(project = %p.id, "resumed by an operator");
        }
        self.view(p).await
    }

    pub async fn admin_delete(&self, project_id: &str) -> Result<(), ControlError> {
        let lock = self.lock_for(project_id);
        let _guard = lock.lock().await;
        let mut p = self.live_project(project_id).await?;
        self.teardown(&mut p, ProjectStatus::Deleted).await
    }

    async fn live_project(&self, project_id: &str) -> Result<Project, ControlError> {
        match self.store.project(project_id).await? {
            Some(p) if p.status != ProjectStatus::Deleted => Ok(p),
            _ => Err(ControlError::not_found(&format!("project {project_id:?}"))),
        }
    }

    /// Starts `live` from its stored bundle (its process is gone) and republishes the route.
    async fn restart_live(&self, project: &Project, live: &str) -> Result<(), ControlError> {
        let (Some(dep), Some(code)) = (
            self.store.deployment(live).await?,
            self.store.bundle(live).await?,
        ) else {
            return Err(ControlError::internal(format!(
                "deployment {live} has no stored bundle"
            )));
        };
        let env = self.store.env(&project.id).await?;
        let spec = spec_for(project, &dep, code, &env);
        let started = self.runtime.start(spec).await.map_err(|e| {
            ControlError::new("DEPLOY_FAILED", e.to_string(), "See the deployment's logs.")
        })?;
        self.republish(&dep.id, started.addr).await
    }
}
