//! The tools.

use std::collections::BTreeMap;
use std::sync::Arc;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, MetaObject, ProgressNotificationParam,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tollgate_control::{Control, ControlError, DeployRequest, ProjectView};

use crate::{Identify, ToolFailure};

/// `_meta` key of a failed tool's `{code, message, hint}` (also in the text content).
pub const ERROR_META: &str = "dev.tollgate/error";

#[derive(Clone)]
pub struct TollgateMcp {
    control: Arc<Control>,
    identify: Arc<dyn Identify>,
    tool_router: Arc<ToolRouter<TollgateMcp>>,
}

// ---- inputs ----

/// (No `Debug`: it carries secrets.)
#[derive(Deserialize, JsonSchema)]
pub struct DeployArgs {
    /// The whole source: path → file text, e.g. {"src/index.ts": "import { Hono } from 'hono' …"}.
    /// For a new project, or to replace all files of `project_id`.
    pub files: Option<BTreeMap<String, String>>,
    /// Edits to the live source of `project_id`: path → new text, or null to delete the file.
    pub changes: Option<BTreeMap<String, Option<String>>>,
    /// The project to update (from an earlier deploy). Omit to create a new project.
    pub project_id: Option<String>,
    /// For a new project: the name its URL is made from (e.g. "todo-api").
    pub project_name: Option<String>,
    /// Env vars for the service, readable in code as `env.NAME`.
    pub env: Option<BTreeMap<String, String>>,
    /// Secrets, readable as `env.NAME`, never shown back.
    pub secrets: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct ProjectRef {
    /// A project id (p_…) from deploy_project or list_projects.
    pub project_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct RollbackArgs {
    pub project_id: String,
    /// The deployment (d_…) whose code to run again; default: the previous live one.
    pub deployment_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct LogsArgs {
    pub project_id: String,
    /// Only entries with `seq` ≥ this (use `next_since` from the previous call).
    pub since: Option<u64>,
    /// At most this many entries (1–1000, default 100).
    pub limit: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct FileArgs {
    pub project_id: String,
    /// A path as deployed, e.g. "src/index.ts".
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct NoArgs {}

// ---- outputs ----

#[derive(Debug, Serialize, JsonSchema)]
pub struct DeployOut {
    pub project_id: String,
    pub deployment_id: String,
    /// Where the service answers.
    pub url: String,
    /// `live`: the new version serves; requests are paid from the owner's balance.
    pub status: String,
    pub version: u32,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DeploymentOut {
    pub deployment_id: String,
    pub version: u32,
    /// building | live | failed | superseded
    pub status: String,
    /// Why it failed.
    pub reason: Option<String>,
    pub created_ms: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TrafficOut {
    pub requests: u64,
    pub bytes_out: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct UsageOut {
    /// The current UTC hour so far.
    pub hour: TrafficOut,
    /// The last 24 UTC hours.
    pub day: TrafficOut,
    pub last_request_ms: Option<u64>,
    pub cpu_ms_live: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProjectOut {
    pub project_id: String,
    pub slug: String,
    pub url: String,
    /// active | suspended | expired
    pub status: String,
    pub live: Option<DeploymentOut>,
    /// Newest first.
    pub recent: Vec<DeploymentOut>,
    /// Env var names with values; secrets show as null.
    pub env: BTreeMap<String, Option<String>>,
    pub usage: UsageOut,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProjectList {
    pub projects: Vec<ProjectOut>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct DeleteOut {
    pub project_id: String,
    pub deleted: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct LogLine {
    pub seq: u64,
    pub ts_ms: u64,
    /// log | info | warn | error | debug | system
    pub level: String,
    pub message: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct LogsOut {
    pub entries: Vec<LogLine>,
    /// Pass as `since` to get only newer entries.
    pub next_since: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct FileOut {
    pub path: String,
    pub content: String,
}

fn status_str<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn deploy_out(out: tollgate_control::DeployOutcome) -> DeployOut {
    DeployOut {
        project_id: out.project_id,
        deployment_id: out.deployment_id,
        url: out.url,
        status: status_str(&out.status),
        version: out.version,
    }
}

fn deployment_out(d: &tollgate_control::Deployment) -> DeploymentOut {
    DeploymentOut {
        deployment_id: d.id.clone(),
        version: d.version,
        status: status_str(&d.status),
        reason: d.reason.clone(),
        created_ms: d.created_ms,
    }
}

fn project_out(v: ProjectView) -> ProjectOut {
    ProjectOut {
        project_id: v.project.id.clone(),
        slug: v.project.slug.clone(),
        url: v.url,
        status: status_str(&v.project.status),
        live: v.live.as_ref().map(deployment_out),
        recent: v.recent.iter().map(deployment_out).collect(),
        env: v.env,
        usage: UsageOut {
            hour: TrafficOut {
                requests: v.usage.hour.requests,
                bytes_out: v.usage.hour.bytes_out,
            },
            day: TrafficOut {
                requests: v.usage.day.requests,
                bytes_out: v.usage.day.bytes_out,
            },
            last_request_ms: v.usage.last_request_ms,
            cpu_ms_live: v.usage.cpu_ms_live,
        },
    }
}

/// A failed tool: `isError: true`, `{code, message, hint}` as text and in `_meta` (not as
/// `structuredContent`: clients validate that against the output schema even on errors).
pub fn tool_error(code: &str, message: &str, hint: &str) -> CallToolResult {
    let body = serde_json::json!({"code": code, "message": message, "hint": hint});
    let mut meta = MetaObject::new();
    meta.insert(ERROR_META.into(), body.clone());
    CallToolResult::error(vec![ContentBlock::text(body.to_string())]).with_meta(Some(meta))
}

fn from_control(e: ControlError) -> CallToolResult {
    tool_error(e.code, &e.message, &e.hint)
}

fn ok<T: Serialize>(v: &T) -> Result<CallToolResult, ErrorData> {
    serde_json::to_value(v)
        .map(CallToolResult::structured)
        .map_err(|e| ErrorData::internal_error(e.to_string(), None))
}

impl TollgateMcp {
    pub fn new(
        control: Arc<Control>,
        identify: Arc<dyn Identify>,
        tool_router: Arc<ToolRouter<TollgateMcp>>,
    ) -> Self {
        TollgateMcp {
            control,
            identify,
            tool_router,
        }
    }

    /// Built once and shared: the server is constructed per request (stateless transport).
    pub fn tool_router_shared() -> ToolRouter<TollgateMcp> {
        Self::tool_router()
    }

    /// Resolves the caller, runs `f` for them, and turns the outcome into a tool result:
    /// `structuredContent` on success, an `isError` result with `{code, message, hint}` on failure.
    async fn act<T: Serialize>(
        &self,
        ctx: &RequestContext<RoleServer>,
        f: impl AsyncFnOnce(String) -> Result<T, ControlError>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = match self.who(ctx).await {
            Ok(o) => o,
            Err(r) => return Ok(r),
        };
        match f(owner).await {
            Ok(v) => ok(&v),
            Err(e) => Ok(from_control(e)),
        }
    }

    async fn who(&self, ctx: &RequestContext<RoleServer>) -> Result<String, CallToolResult> {
        let parts = ctx.extensions.get::<http::request::Parts>();
        self.identify
            .account(parts, &ctx.meta.0.0)
            .await
            .map_err(|f: ToolFailure| tool_error(f.code, &f.message, &f.hint))
    }
}

#[tool_router]
impl TollgateMcp {
    #[tool(
        description = "Deploy a web service and get its live URL. Send `files` (path → text; Workers-style `export default { fetch(request, env) }` or a Hono app, TypeScript/TSX welcome; entry src/index.ts or package.json main; packages available: hono, zod, @hono/zod-validator, itty-router, nanoid, jose) for a new project, or `changes` with `project_id` to edit the live source. Waits until the new version is live or failed, sending progress. A failed deploy leaves the previous version serving and is not charged. Requests and CPU of the running service are paid from your balance; at zero the URL answers 402 until you top up.",
        annotations(title = "Deploy project", read_only_hint = false, destructive_hint = false, idempotent_hint = false, open_world_hint = true),
        output_schema = schema_for_output::<DeployOut>()
    )]
    async fn deploy_project(
        &self,
        Parameters(a): Parameters<DeployArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let req = DeployRequest {
            files: a.files,
            changes: a.changes,
            project_id: a.project_id,
            project_name: a.project_name,
            env: a.env.unwrap_or_default(),
            secrets: a.secrets.unwrap_or_default(),
        };
        let token = ctx.meta.get_progress_token();
        let peer = ctx.peer.clone();
        self.act(&ctx, async |owner| {
            // Steps arrive on a channel while the deploy runs; each becomes a progress
            // notification when the client asked for them.
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
            let progress = async move {
                let mut n = 0.0;
                while let Some(step) = rx.recv().await {
                    n += 1.0;
                    if let Some(token) = token.clone() {
                        let _ = peer
                            .notify_progress(
                                ProgressNotificationParam::new(token, n)
                                    .with_total(3.0)
                                    .with_message(step),
                            )
                            .await;
                    }
                }
            };
            let deploy = async {
                let r = self.control.deploy_observed(&owner, req, Some(&tx)).await;
                drop(tx);
                r
            };
            let (result, ()) = tokio::join!(deploy, progress);
            result.map(deploy_out)
        })
        .await
    }

    #[tool(
        description = "A project's status, URL, live deployment, recent deployments (with failure reasons), env var names, and usage: requests and bytes this hour and over the last day, last request time, CPU ms of the live version.",
        annotations(title = "Get project", read_only_hint = true),
        output_schema = schema_for_output::<ProjectOut>()
    )]
    async fn get_project(
        &self,
        Parameters(a): Parameters<ProjectRef>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.act(&ctx, async |owner| {
            self.control
                .get_project(&owner, &a.project_id)
                .await
                .map(project_out)
        })
        .await
    }

    #[tool(
        description = "Your projects (active, suspended or expired), with their URLs and live deployments.",
        annotations(title = "List projects", read_only_hint = true),
        output_schema = schema_for_output::<ProjectList>()
    )]
    async fn list_projects(
        &self,
        Parameters(_): Parameters<NoArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.act(&ctx, async |owner| {
            let list = self.control.list_projects(&owner).await?;
            Ok(ProjectList {
                projects: list.into_iter().map(project_out).collect(),
            })
        })
        .await
    }

    #[tool(
        description = "Delete a project: its URL stops answering (404), its processes stop, its code is deleted, and its name becomes free again after a day. Not reversible.",
        annotations(title = "Delete project", read_only_hint = false, destructive_hint = true, idempotent_hint = true),
        output_schema = schema_for_output::<DeleteOut>()
    )]
    async fn delete_project(
        &self,
        Parameters(a): Parameters<ProjectRef>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.act(&ctx, async |owner| {
            self.control.delete(&owner, &a.project_id).await?;
            Ok(DeleteOut {
                project_id: a.project_id.clone(),
                deleted: true,
            })
        })
        .await
    }

    #[tool(
        description = "Run an earlier deployment's code again, as a new deployment (code only: env vars and secrets stay as they are now). Default: the previous live deployment.",
        annotations(title = "Roll back project", read_only_hint = false, destructive_hint = false, idempotent_hint = false),
        output_schema = schema_for_output::<DeployOut>()
    )]
    async fn rollback_project(
        &self,
        Parameters(a): Parameters<RollbackArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.act(&ctx, async |owner| {
            self.control
                .rollback(&owner, &a.project_id, a.deployment_id.as_deref())
                .await
                .map(deploy_out)
        })
        .await
    }

    #[tool(
        description = "The live deployment's console output and uncaught errors, oldest first, with timestamps and levels (plus `system` lines: started, crashed, killed at the CPU limit, stopped).",
        annotations(title = "Get logs", read_only_hint = true),
        output_schema = schema_for_output::<LogsOut>()
    )]
    async fn get_logs(
        &self,
        Parameters(a): Parameters<LogsArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let since = a.since.unwrap_or(0);
        let limit = a.limit.unwrap_or(100).clamp(1, 1000) as usize;
        self.act(&ctx, async |owner| {
            let entries = self
                .control
                .logs(&owner, &a.project_id, since, limit)
                .await?;
            let next_since = entries.last().map_or(since, |e| e.seq + 1);
            Ok(LogsOut {
                entries: entries
                    .into_iter()
                    .map(|e| LogLine {
                        seq: e.seq,
                        ts_ms: e.ts_ms,
                        level: e.level,
                        message: e.message,
                    })
                    .collect(),
                next_since,
            })
        })
        .await
    }

    #[tool(
        description = "Read back a file of the live deployment's source, as deployed.",
        annotations(title = "Read project file", read_only_hint = true),
        output_schema = schema_for_output::<FileOut>()
    )]
    async fn read_project_file(
        &self,
        Parameters(a): Parameters<FileArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.act(&ctx, async |owner| {
            let content = self
                .control
                .read_file(&owner, &a.project_id, &a.path)
                .await?;
            Ok(FileOut {
                path: a.path.clone(),
                content,
            })
        })
        .await
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for TollgateMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("tollgate", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Deploy and run web services that you pay for yourself. deploy_project returns a live URL; get_project shows status, usage and failures; get_logs shows your service's output.",
            )
    }
}
