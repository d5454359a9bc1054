//! The deploy pipeline: validate → bundle → start → publish route → live.

use tollgate_routes::RouteKey;
use tracing::Instrument as _;

use super::*;
use crate::error::ControlError;
use crate::model::{DeployStatus, Deployment, EnvVar, Files, Project, new_id, now_ms};

/// A deploy's (or rollback's) result label: live, failed or refused.
pub(crate) fn deploy_result(out: &Result<DeployOutcome, ControlError>) -> &'static str {
    match out {
        Ok(o) if o.status == DeployStatus::Live => "live",
        Ok(_) => "failed",
        // Went through the pipeline and did not go live (the code crashed at start, the
        // runtime or the route write failed), or a platform fault.
        Err(e) if e.code == "DEPLOY_FAILED" || e.code == "INTERNAL_ERROR" => "failed",
        Err(_) => "refused",
    }
}

impl Control {
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
        let started = std::time::Instant::now();
        // For OpenTelemetry (docs/metrics.md, "Traces"): ids and the result, never the code.
        // The project id is the one the deploy resolved, never the caller's input as sent.
        let span = tracing::info_span!(
            "control.deploy",
            project.id = tracing::field::Empty,
            deploy.result = tracing::field::Empty,
            error.code = tracing::field::Empty,
        );
        let out = self
            .run_deploy(owner, req, steps)
            .instrument(span.clone())
            .await;
        let result = deploy_result(&out);
        span.record("deploy.result", result);
        match &out {
            Ok(o) => {
                span.record("project.id", o.project_id.as_str());
            }
            Err(e) => {
                span.record("error.code", e.code);
            }
        }
        if let Some(m) = self.metrics.get() {
            m.observe(result, started.elapsed().as_secs_f64());
        }
        out
    }

    async fn run_deploy(
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
        if let Some(names) = &req.databases {
            check_database_names(names, &req.env, &req.secrets, self.databases().is_some())?;
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
        let guard = self.lock_start(&project.id).await?;
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
        // Bindings: as asked, else those of the live version (a redeploy keeps its database).
        let databases = match req.databases {
            Some(names) => names,
            None => match &project.live_deployment {
                Some(live) => self
                    .store
                    .deployment(live)
                    .await?
                    .map(|d| d.databases)
                    .unwrap_or_default(),
                None => Vec::new(),
            },
        };
        if let Some(clash) = databases.iter().find(|n| env.contains_key(*n)) {
            return Err(ControlError::validation(
                format!("{clash:?} is both an env var and a database binding"),
                "Pick another name for the database binding (e.g. DB).",
            ));
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
            databases,
        };
        self.store.put_deployment(&dep).await?;
        project.deployments.push(dep.id.clone());
        self.save_project(&guard, &project).await?;

        step("bundling");
        let bundle = match self
            .bundler
            .bundle_raw(
                files
                    .iter()
                    .map(|(p, t)| (p.as_str(), t.as_bytes().to_vec())),
            )
            .instrument(tracing::info_span!("control.bundle", files = files.len()))
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
        let out = self
            .go_live(&guard, project, dep, bundle.code, &env)
            .instrument(tracing::info_span!("control.go_live"))
            .await?;
        if let Err(e) = self
            .store
            .put_env_fenced(&project_id, &env, guard.fence())
            .await
        {
            // Live with the new env, but a restart would use the old one until the next deploy.
            tracing::error!(project = %project_id, error = %e, "env of a live deployment not saved");
        }
        Ok(out)
    }

    /// Starts `dep`'s code, switches the route to it, drains and stops the previous live one.
    pub(crate) async fn go_live(
        &self,
        guard: &ProjectGuard,
        mut project: Project,
        mut dep: Deployment,
        code: String,
        env: &Env,
    ) -> Result<DeployOutcome, ControlError> {
        let spec = self.spec(&project, &dep, code, env)?;
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
                match self.put_route(guard, &key, &route).await {
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
            self.save_project(guard, &project).await
        }
        .await;
        let recorded = match recorded {
            Err(e) if e.code == "PROJECT_BUSY" => {
                // Another control instance took the project while this one stalled: the route
                // and the record are its to write now (it republishes what the store says is
                // live). This version is not live: stop it; the deploy fails (its charge comes
                // back).
                let _ = self.runtime.remove(&dep.id, false).await;
                self.fail(&mut dep, &e).await;
                return Err(e);
            }
            other => other,
        };
        if let Err(e) = recorded {
            // Point the route back at what the store says is live (the old version, still
            // running), or take it down for a first deploy.
            let old_addr = match old.as_deref() {
                Some(o) => self
                    .runtime
                    .status(o)
                    .await
                    .and_then(|s| s.addr)
                    .map(|addr| (o, addr)),
                None => None,
            };
            let reverted = match old_addr {
                Some((old_id, old_addr)) => {
                    let mut back = route_for(&project, old_id);
                    back.upstreams = vec![old_addr];
                    self.put_route(guard, &key, &back).await
                }
                None => self.delete_route(guard, &key).await,
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

    pub(crate) async fn fail(&self, dep: &mut Deployment, e: &ControlError) {
        dep.status = DeployStatus::Failed;
        dep.reason = Some(format!("{}: {}", e.code, e.message));
        if let Err(err) = self.store.put_deployment(dep).await {
            tracing::error!(deployment = %dep.id, error = %err, "could not record a failed deployment");
        }
    }
}

/// Database binding names: identifiers, distinct, not env vars, at most 8.
fn check_database_names(
    names: &[String],
    env: &BTreeMap<String, String>,
    secrets: &BTreeMap<String, String>,
    offered: bool,
) -> Result<(), ControlError> {
    if !names.is_empty() && !offered {
        return Err(ControlError::validation(
            "this host offers no databases",
            "Deploy without `databases`, or ask the operator to enable them.",
        ));
    }
    if names.len() > 8 {
        return Err(ControlError::validation(
            format!("{} database bindings; at most 8", names.len()),
            "One project has one database; bind it under one name such as DB.",
        ));
    }
    for (i, n) in names.iter().enumerate() {
        if !tollgate_runtime::capnp::valid_binding_name(n) {
            return Err(ControlError::validation(
                format!("database binding {n:?} is not an identifier"),
                "Use a name like DB: letters, digits and _, not starting with a digit.",
            ));
        }
        if names[..i].contains(n) || env.contains_key(n) || secrets.contains_key(n) {
            return Err(ControlError::validation(
                format!("database binding {n:?} is given twice or is also an env var"),
                "Bind the database under a name no env var uses, once.",
            ));
        }
    }
    Ok(())
}
