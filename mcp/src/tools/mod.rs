//! The tools: each with a description agents read, an input and an output schema, and
//! `structuredContent`. Types are in `types`, what tools cost in `money`.

mod money;
mod types;

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
use serde::Serialize;
use tollgate_control::{Control, ControlError, DeployRequest};
use tollgate_metering::units::format_usd6;

pub use types::*;

use crate::{Caller, Identify, Refusal};

/// The largest payment one call takes (a single money-core operation holds about $9,007).
const MAX_PAYMENT_USD: u64 = 9_000;

/// `_meta` key of a failed tool's `{code, message, hint}` (also in the text content).
pub const ERROR_META: &str = "dev.tollgate/error";

#[derive(Clone)]
pub struct TollgateMcp {
    control: Arc<Control>,
    identify: Arc<dyn Identify>,
    tool_router: Arc<ToolRouter<TollgateMcp>>,
    pricing: Option<crate::DeployPricing>,
    metrics: Option<Arc<crate::metrics::McpMetrics>>,
}

/// A failed tool: `isError: true`, `{code, message, hint}` as text and in `_meta` (not as
/// `structuredContent`: clients validate that against the output schema even on errors).
pub fn tool_error(code: &str, message: &str, hint: &str) -> CallToolResult {
    let body = serde_json::json!({"code": code, "message": message, "hint": hint});
    let mut meta = MetaObject::new();
    meta.insert(ERROR_META.into(), body.clone());
    CallToolResult::error(vec![ContentBlock::text(body.to_string())]).with_meta(Some(meta))
}

/// A refusal as the tool call's answer: a tool error result, or a JSON-RPC error (payment).
pub(crate) fn refused(r: Refusal) -> Result<CallToolResult, ErrorData> {
    match r {
        Refusal::Tool(f) => Ok(tool_error(f.code, &f.message, &f.hint)),
        Refusal::Rpc {
            code,
            message,
            data,
        } => Err(ErrorData::new(
            rmcp::model::ErrorCode(code),
            message,
            Some(data),
        )),
    }
}

/// Puts the payment receipt, if the call paid, into `result._meta`.
pub(crate) fn with_receipt(mut r: CallToolResult, caller: &Caller) -> CallToolResult {
    if let Some((key, receipt)) = &caller.receipt {
        let mut meta = r.meta.take().unwrap_or_default();
        meta.insert(key.clone(), receipt.clone());
        r = r.with_meta(Some(meta));
    }
    r
}

pub(crate) fn from_control(e: ControlError) -> CallToolResult {
    tool_error(e.code, &e.message, &e.hint)
}

pub(crate) fn ok<T: Serialize>(v: &T) -> Result<CallToolResult, ErrorData> {
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
            pricing: None,
            metrics: None,
        }
    }

    pub(crate) fn with_metrics(mut self, metrics: Option<Arc<crate::metrics::McpMetrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    fn prices(&self) -> UsagePrices {
        self.pricing
            .map_or(UsagePrices::default(), |p| UsagePrices {
                per_request: p.per_request_picos,
                per_cpu_us: p.per_cpu_us_picos,
                per_row_read: p.per_row_read_picos,
                per_row_written: p.per_row_written_picos,
            })
    }

    /// When a project just deployed (or otherwise used now) expires if unused.
    fn expires_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| (d + self.control.inactivity_ttl()).as_millis() as u64)
            .unwrap_or(0)
    }

    pub fn with_pricing(mut self, pricing: Option<crate::DeployPricing>) -> Self {
        self.pricing = pricing;
        self
    }

    /// Built once and shared: the server is constructed per request (stateless transport).
    pub fn tool_router_shared() -> ToolRouter<TollgateMcp> {
        Self::tool_router() + Self::pay_router()
    }

    /// Resolves the caller, runs `f` for them, and turns the outcome into a tool result:
    /// `structuredContent` on success, an `isError` result with `{code, message, hint}` on failure.
    async fn act<T: Serialize>(
        &self,
        ctx: &RequestContext<RoleServer>,
        f: impl AsyncFnOnce(String) -> Result<T, ControlError>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = match self.who(ctx).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        match f(caller.account.clone()).await {
            Ok(v) => ok(&v).map(|r| with_receipt(r, &caller)),
            Err(e) => Ok(from_control(e)),
        }
    }

    async fn who(
        &self,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<Caller, Result<CallToolResult, ErrorData>> {
        let parts = ctx.extensions.get::<http::request::Parts>();
        self.identify
            .account(parts, &ctx.meta.0.0)
            .await
            .map_err(refused)
    }

    async fn pay(
        &self,
        ctx: &RequestContext<RoleServer>,
        amount: u128,
        what: &str,
    ) -> Result<Caller, Result<CallToolResult, ErrorData>> {
        let parts = ctx.extensions.get::<http::request::Parts>();
        self.identify
            .pay(parts, &ctx.meta.0.0, amount, what)
            .await
            .map_err(refused)
    }
}

#[tool_router]
impl TollgateMcp {
    #[tool(
        description = "Deploy a web service and get its live URL. Send `files` (path → text; Workers-style `export default { fetch(request, env) }` or a Hono app, TypeScript/TSX welcome; entry src/index.ts or package.json main; packages available: hono, zod, @hono/zod-validator, itty-router, nanoid, jose) for a new project, or `changes` with `project_id` to edit the live source. Need storage? Add `databases: [\"DB\"]` and use the D1 API on `env.DB` (a SQLite database per project that survives redeploys). Waits until the new version is live or failed, sending progress. A failed deploy leaves the previous version serving and is not charged. Requests and CPU of the running service are paid from your balance; at zero the URL answers 402 until you top up.",
        annotations(title = "Deploy project", read_only_hint = false, destructive_hint = false, idempotent_hint = false, open_world_hint = true),
        output_schema = schema_for_output::<DeployOut>()
    )]
    async fn deploy_project(
        &self,
        Parameters(a): Parameters<DeployArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let prepay = match (&self.pricing, &a.prepay_usd) {
            (None, _) => 0,
            (Some(p), None) => p.default_prepay,
            (Some(_), Some(s)) => match s.base_units(MAX_PAYMENT_USD) {
                Ok(v) => v,
                Err(e) => {
                    return Ok(tool_error(
                        "VALIDATION_ERROR",
                        &format!("prepay_usd: {e}"),
                        "write it like \"1\", \"0.50\" or 0.5, or \"0\" to deploy on your balance alone",
                    ));
                }
            },
        };
        let req = DeployRequest {
            files: a.files,
            changes: a.changes,
            project_id: a.project_id,
            project_name: a.project_name,
            env: a.env.unwrap_or_default(),
            secrets: a.secrets.unwrap_or_default(),
            databases: a.databases,
        };
        // Payment first: the deploy's price plus the prepay, as one voucher (or, with no
        // prepay, an identity proof and the balance).
        let price = self.pricing.map_or(0, |p| p.deploy_picos.max(0));
        let price_base = u128::try_from(price).unwrap_or(0).div_ceil(1_000_000);
        let caller = if self.pricing.is_none() || prepay == 0 {
            self.who(&ctx).await
        } else {
            let what = format!(
                "a deploy (${} ) plus ${} of prepaid credit for the service",
                format_usd6(price),
                format_usd6(i64::try_from(prepay).unwrap_or(0).saturating_mul(1_000_000))
            )
            .replace(" )", ")");
            self.pay(&ctx, price_base + prepay, &what).await
        };
        let caller = match caller {
            Ok(c) => c,
            Err(r) => return r,
        };
        let charge = match self.charge_start(&ctx, &caller, "a deploy").await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let owner = caller.account.clone();
        let token = ctx.meta.get_progress_token();
        let peer = ctx.peer.clone();
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
        match result {
            Ok(out) => {
                if let Some((key, _)) = &charge {
                    self.identify.keep(&owner, key).await;
                }
                let mut o = deploy_out(out);
                o.expires_at_ms = self.expires_ms();
                o.charged_usd = format_usd6(charge.as_ref().map_or(0, |c| c.1));
                if self.pricing.is_some() {
                    o.balance_usd = self
                        .identify
                        .balance(&owner)
                        .await
                        .ok()
                        .map(|b| format_usd6(b.available_picos));
                }
                ok(&o).map(|r| with_receipt(r, &caller))
            }
            Err(e) => {
                let mut message = e.message.clone();
                self.refund_start(&owner, &charge, &mut message).await;
                Ok(with_receipt(tool_error(e.code, &message, &e.hint), &caller))
            }
        }
    }

    #[tool(
        description = "A project's status, URL, live deployment, recent deployments (with failure reasons), env var names, and usage: requests and bytes this hour and over the last day, last request time, CPU ms of the live version; and its database (size, tables with row counts, rows read and written this hour and day with their cost).",
        annotations(title = "Get project", read_only_hint = true),
        output_schema = schema_for_output::<ProjectOut>()
    )]
    async fn get_project(
        &self,
        Parameters(a): Parameters<ProjectRef>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.act(&ctx, async |owner| {
            let v = self.control.get_project(&owner, &a.project_id).await?;
            let mut out = [project_out(v, self.prices())];
            self.mark_unpaid(&owner, &mut out).await;
            let [out] = out;
            Ok(out)
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
            let mut projects: Vec<ProjectOut> = list
                .into_iter()
                .map(|v| project_out(v, self.prices()))
                .collect();
            self.mark_unpaid(&owner, &mut projects).await;
            Ok(ProjectList { projects })
        })
        .await
    }

    #[tool(
        description = "Delete a project: its URL stops answering (404), its processes stop, its code and its database (all rows) are deleted, and its name becomes free again after a day. Not reversible: back up data you need first (query_database).",
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
        description = "Run one read-only SQL statement on your project's database to inspect your data, e.g. `SELECT * FROM entries ORDER BY id DESC LIMIT 20`, `SELECT name FROM sqlite_schema WHERE type='table'` or `PRAGMA table_info(entries)`. Returns columns and up to `max_rows` rows (default 100, at most 1000). Rows read are billed like your service's queries. Change data from your service's code, not here.",
        annotations(title = "Query database", read_only_hint = true),
        output_schema = schema_for_output::<QueryOut>()
    )]
    async fn query_database(
        &self,
        Parameters(a): Parameters<QueryArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        self.act(&ctx, async |owner| {
            let max = a.max_rows.unwrap_or(100).clamp(1, 1000) as usize;
            let q = self
                .control
                .query_database(&owner, &a.project_id, &a.sql, max)
                .await?;
            let p = self.prices();
            Ok(QueryOut {
                cost_usd: format_usd6(
                    i64::try_from(q.rows_read)
                        .unwrap_or(i64::MAX)
                        .saturating_mul(p.per_row_read),
                ),
                columns: q.columns,
                rows: q.rows,
                truncated: q.truncated,
                rows_read: q.rows_read,
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
        let caller = match self.who(&ctx).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        // A rollback starts a new deployment, like a deploy: the same price, given back if it
        // does not go live.
        let charge = match self.charge_start(&ctx, &caller, "a rollback").await {
            Ok(c) => c,
            Err(r) => return r,
        };
        let owner = caller.account.clone();
        match self
            .control
            .rollback(&owner, &a.project_id, a.deployment_id.as_deref())
            .await
        {
            Ok(o) => {
                if let Some((key, _)) = &charge {
                    self.identify.keep(&owner, key).await;
                }
                let mut d = deploy_out(o);
                d.expires_at_ms = self.expires_ms();
                d.charged_usd = format_usd6(charge.as_ref().map_or(0, |c| c.1));
                ok(&d).map(|r| with_receipt(r, &caller))
            }
            Err(e) => {
                let mut message = e.message.clone();
                self.refund_start(&owner, &charge, &mut message).await;
                Ok(with_receipt(tool_error(e.code, &message, &e.hint), &caller))
            }
        }
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

#[tool_router(router = pay_router, vis = "pub")]
impl TollgateMcp {
    #[tool(
        description = "Add credit to your balance, paid over MPP (the Machine Payments Protocol): the call first answers JSON-RPC error -32042 with a Tempo session challenge for the amount; an MPP client (e.g. mppx) opens or reuses a payment channel, signs a voucher, and repeats the call with the credential in _meta. Credit lands once per voucher and resumes suspended services at once. Returns the new balance.",
        annotations(title = "Top up balance", read_only_hint = false, destructive_hint = false, idempotent_hint = false, open_world_hint = true),
        output_schema = schema_for_output::<BalanceOut>()
    )]
    async fn top_up(
        &self,
        Parameters(a): Parameters<TopUpArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let amount = match a.amount_usd.base_units(MAX_PAYMENT_USD) {
            Ok(v) if v > 0 => v,
            Ok(_) => {
                return Ok(tool_error(
                    "VALIDATION_ERROR",
                    "amount_usd is 0: a top-up adds more than nothing",
                    "write it like \"5\", \"2.50\" or 2.5 (at most 6 decimals)",
                ));
            }
            Err(e) => {
                return Ok(tool_error(
                    "VALIDATION_ERROR",
                    &format!("amount_usd: {e}"),
                    "write it like \"5\", \"2.50\" or 2.5 (at most 6 decimals)",
                ));
            }
        };
        let what = format!("a top-up of ${} credit", a.amount_usd.text());
        let caller = match self.pay(&ctx, amount, &what).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        match self.balance_of(&caller.account).await {
            Ok(b) => ok(&b).map(|r| with_receipt(r, &caller)),
            Err(r) => Ok(r),
        }
    }

    #[tool(
        description = "Your balance: available, reserved for requests in flight, credited in total, spent in total, and whether your services run (active) or answer 402 (suspended). Free; asks for a zero-amount MPP identity proof.",
        annotations(title = "Get balance", read_only_hint = true),
        output_schema = schema_for_output::<BalanceOut>()
    )]
    async fn get_balance(
        &self,
        Parameters(_a): Parameters<NoArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let caller = match self.who(&ctx).await {
            Ok(c) => c,
            Err(r) => return r,
        };
        match self.balance_of(&caller.account).await {
            Ok(b) => ok(&b).map(|r| with_receipt(r, &caller)),
            Err(r) => Ok(r),
        }
    }
}

/// The span of one tool call. Its parent is the span the HTTP server put in the request's
/// extensions (a `tracing::Span`; with OpenTelemetry on, that one carries the caller's
/// `traceparent`): the MCP session runs on a task of its own, where the request's span is not
/// the current one.
fn tool_span(name: &str, context: &RequestContext<RoleServer>) -> tracing::Span {
    let parent = context
        .extensions
        .get::<http::request::Parts>()
        .and_then(|p| p.extensions.get::<tracing::Span>())
        .and_then(|s| s.id());
    tracing::info_span!(
        parent: parent,
        "mcp.tool_call",
        otel.name = %format!("tools/call {name}"),
        gen_ai.tool.name = %name,
        mcp.result = tracing::field::Empty,
    )
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for TollgateMcp {
    /// The router's dispatch, measured (`tollgate_mcp_tool_calls_total`, `…_duration_seconds`).
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, ErrorData> {
        use tracing::Instrument as _;
        let started = std::time::Instant::now();
        let tool = self
            .metrics
            .as_ref()
            .map(|m| m.tool(&request.name).to_owned());
        // Bounded: a name the router does not know is not echoed into traces or logs.
        let known = if self.tool_router.has_route(&request.name) {
            request.name.to_string()
        } else {
            "unknown".to_owned()
        };
        let span = tool_span(&known, &context);
        let tcc = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        let out = self.tool_router.call(tcc).instrument(span.clone()).await;
        span.record("mcp.result", crate::metrics::result_of(&out));
        if let (Some(m), Some(tool)) = (&self.metrics, tool) {
            m.observe(&tool, &out, started.elapsed().as_secs_f64());
        }
        out
    }

    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("tollgate", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Deploy and run web services that you pay for yourself. deploy_project returns a live URL; get_project shows status, usage and failures; get_logs shows your service's output.",
            )
    }
}
