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

use crate::{Caller, Identify, Refusal};

/// `_meta` key of a failed tool's `{code, message, hint}` (also in the text content).
pub const ERROR_META: &str = "dev.tollgate/error";

#[derive(Clone)]
pub struct TollgateMcp {
    control: Arc<Control>,
    identify: Arc<dyn Identify>,
    tool_router: Arc<ToolRouter<TollgateMcp>>,
    pricing: Option<crate::DeployPricing>,
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
    /// Extra credit (dollars) this deploy buys for the service's requests and CPU, paid with
    /// the deploy. "0" deploys on existing balance alone. Default: the server's (usually "1").
    pub prepay_usd: Option<String>,
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

#[derive(Debug, Deserialize, JsonSchema)]
pub struct TopUpArgs {
    /// Dollars to add to your balance, e.g. "5" or "2.50" (at most 6 decimals).
    pub amount_usd: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct BalanceOut {
    /// Your account: the payer's address as a did:pkh.
    pub account: String,
    /// What your services can still spend, in dollars.
    pub available_usd: String,
    /// Held by the proxies for requests in flight; returns to available when unused.
    pub reserved_usd: String,
    /// Everything you ever paid in.
    pub credited_usd: String,
    /// Everything spent (deploys, requests, CPU).
    pub spent_usd: String,
    /// active (services answer) or suspended (services answer 402 until you top up).
    pub status: String,
    /// What each of your projects cost over the last 24 hours (requests) and its live version's
    /// CPU so far.
    pub projects: Vec<ProjectCostOut>,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProjectCostOut {
    pub project_id: String,
    pub slug: String,
    pub day_request_cost_usd: String,
    pub cpu_cost_live_usd: String,
}

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
    /// What this deploy cost (dollars); 0 when deploys are free here.
    pub charged_usd: String,
    /// Your balance after it (dollars), when this server keeps balances.
    pub balance_usd: Option<String>,
    /// Unix ms after which the project expires (and is collected) if it gets no request and no
    /// deploy until then; every request or deploy moves it.
    pub expires_at_ms: u64,
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
    /// What these requests cost (dollars); "0.000000" where this server does not charge.
    pub request_cost_usd: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct UsageOut {
    /// The current UTC hour so far.
    pub hour: TrafficOut,
    /// The last 24 UTC hours.
    pub day: TrafficOut,
    pub last_request_ms: Option<u64>,
    pub cpu_ms_live: u64,
    /// What the live version's CPU has cost so far (dollars).
    pub cpu_cost_live_usd: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct ProjectOut {
    pub project_id: String,
    pub slug: String,
    pub url: String,
    /// active | suspended | expired
    pub status: String,
    /// Why it is suspended: `no_credit` (your balance is used up: its URL answers 402 until you
    /// top up, then it resumes by itself) or `operator`.
    pub suspended_for: Option<String>,
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
        charged_usd: usd(0),
        balance_usd: None,
        expires_at_ms: 0,
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

/// p$ per request and per CPU-µs, (0, 0) where nothing is charged.
type UsagePrices = (i64, i64);

fn project_out(v: ProjectView, prices: UsagePrices) -> ProjectOut {
    let req_cost = |n: u64| {
        usd(i64::try_from(n)
            .unwrap_or(i64::MAX)
            .saturating_mul(prices.0))
    };
    ProjectOut {
        project_id: v.project.id.clone(),
        slug: v.project.slug.clone(),
        url: v.url,
        suspended_for: (status_str(&v.project.status) == "suspended").then(|| "operator".into()),
        status: status_str(&v.project.status),
        live: v.live.as_ref().map(deployment_out),
        recent: v.recent.iter().map(deployment_out).collect(),
        env: v.env,
        usage: UsageOut {
            hour: TrafficOut {
                requests: v.usage.hour.requests,
                bytes_out: v.usage.hour.bytes_out,
                request_cost_usd: req_cost(v.usage.hour.requests),
            },
            day: TrafficOut {
                requests: v.usage.day.requests,
                bytes_out: v.usage.day.bytes_out,
                request_cost_usd: req_cost(v.usage.day.requests),
            },
            last_request_ms: v.usage.last_request_ms,
            cpu_ms_live: v.usage.cpu_ms_live,
            cpu_cost_live_usd: usd(i64::try_from(v.usage.cpu_ms_live)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000)
                .saturating_mul(prices.1)),
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

/// A refusal as the tool call's answer: a tool error result, or a JSON-RPC error (payment).
fn refused(r: Refusal) -> Result<CallToolResult, ErrorData> {
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
fn with_receipt(mut r: CallToolResult, caller: &Caller) -> CallToolResult {
    if let Some((key, receipt)) = &caller.receipt {
        let mut meta = r.meta.take().unwrap_or_default();
        meta.insert(key.clone(), receipt.clone());
        r = r.with_meta(Some(meta));
    }
    r
}

/// p$ as a dollar string with 6 decimals (rounded toward zero), e.g. "4.950000".
pub fn usd(picos: i64) -> String {
    let micros = picos / 1_000_000;
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// A key unique to one charge (one tool call).
fn unique_ref() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // A random part too: several control nodes charge into one money store.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!(
        "{nanos}-{random:016x}-{}",
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Dollars (up to 6 decimals) → base units ($0.000001).
fn parse_usd(text: &str) -> Option<u128> {
    let (whole, frac) = text.split_once('.').unwrap_or((text, ""));
    if whole.is_empty()
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || frac.len() > 6
        || (text.contains('.') && frac.is_empty())
        || whole.len() > 9
    {
        return None;
    }
    let f: u128 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().ok()?
    };
    Some(whole.parse::<u128>().ok()? * 1_000_000 + f)
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
            pricing: None,
        }
    }

    /// Where balances are kept and the owner's is used up, its active projects are suspended
    /// in fact (the proxy answers 402): say so.
    async fn mark_unpaid(&self, owner: &str, projects: &mut [ProjectOut]) {
        if self.pricing.is_none() {
            return;
        }
        if let Ok(b) = self.identify.balance(owner).await
            && b.available_picos <= 0
            && b.reserved_picos <= 0
        {
            for p in projects.iter_mut().filter(|p| p.status == "active") {
                p.status = "suspended".into();
                p.suspended_for = Some("no_credit".into());
            }
        }
    }

    fn prices(&self) -> UsagePrices {
        self.pricing
            .map_or((0, 0), |p| (p.per_request_picos, p.per_cpu_us_picos))
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

    /// Charges the deploy price for a process start the owner asks for (a deploy or a
    /// rollback), once per call. `Ok(None)` where nothing is charged. When the balance is
    /// short, the answer is a payment challenge for the price.
    async fn charge_start(
        &self,
        ctx: &RequestContext<RoleServer>,
        caller: &Caller,
        what: &str,
    ) -> Result<Option<(String, i64)>, Result<CallToolResult, ErrorData>> {
        let price = self.pricing.map_or(0, |p| p.deploy_picos.max(0));
        if price == 0 {
            return Ok(None);
        }
        // Unique per call: one payment reference could otherwise be presented again (or by
        // two calls at once) to start on one charge.
        let key = format!("deploy:{}", unique_ref());
        match self.identify.charge(&caller.account, &key, price).await {
            Ok(true) => Ok(Some((key, price))),
            Ok(false) => {
                // Short of the price: ask for it (the answer is a payment challenge).
                let parts = ctx.extensions.get::<http::request::Parts>();
                let words = format!("{what} (${}); your balance is short", usd(price));
                let price_base = u128::try_from(price).unwrap_or(0).div_ceil(1_000_000);
                Err(
                    match self
                        .identify
                        .pay(parts, &serde_json::Map::new(), price_base, &words)
                        .await
                    {
                        Err(r) => refused(r),
                        Ok(_) => Ok(tool_error(
                            "INSUFFICIENT_BALANCE",
                            &format!("your balance does not cover the price of {what}"),
                            "call top_up, or deploy with prepay_usd above 0",
                        )),
                    },
                )
            }
            Err(f) => Err(Ok(tool_error(f.code, &f.message, &f.hint))),
        }
    }

    /// A start that did not go live is not charged: its price goes back (once per key), and
    /// `message` says so.
    async fn refund_start(
        &self,
        owner: &str,
        charge: &Option<(String, i64)>,
        message: &mut String,
    ) {
        let Some((key, picos)) = charge else {
            return;
        };
        match self
            .identify
            .refund(owner, &format!("refund:{key}"), *picos)
            .await
        {
            Ok(()) => message.push_str(" (the price was refunded)"),
            Err(f) => {
                // Recorded durably by the payments layer: the drain applies it.
                tracing::error!(key, error = %f.message, "refund not applied yet")
            }
        }
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
        description = "Deploy a web service and get its live URL. Send `files` (path → text; Workers-style `export default { fetch(request, env) }` or a Hono app, TypeScript/TSX welcome; entry src/index.ts or package.json main; packages available: hono, zod, @hono/zod-validator, itty-router, nanoid, jose) for a new project, or `changes` with `project_id` to edit the live source. Waits until the new version is live or failed, sending progress. A failed deploy leaves the previous version serving and is not charged. Requests and CPU of the running service are paid from your balance; at zero the URL answers 402 until you top up.",
        annotations(title = "Deploy project", read_only_hint = false, destructive_hint = false, idempotent_hint = false, open_world_hint = true),
        output_schema = schema_for_output::<DeployOut>()
    )]
    async fn deploy_project(
        &self,
        Parameters(a): Parameters<DeployArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let prepay = match (&self.pricing, a.prepay_usd.as_deref()) {
            (None, _) => 0,
            (Some(p), None) => p.default_prepay,
            (Some(_), Some(s)) => match parse_usd(s.trim()) {
                Some(v) => v,
                None => {
                    return Ok(tool_error(
                        "VALIDATION_ERROR",
                        &format!("prepay_usd '{s}' is not a dollar amount"),
                        "write it like \"1\" or \"0.50\", or \"0\" to deploy on your balance alone",
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
                usd(price),
                usd(i64::try_from(prepay).unwrap_or(0).saturating_mul(1_000_000))
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
                let mut o = deploy_out(out);
                o.expires_at_ms = self.expires_ms();
                o.charged_usd = usd(charge.as_ref().map_or(0, |c| c.1));
                if self.pricing.is_some() {
                    o.balance_usd = self
                        .identify
                        .balance(&owner)
                        .await
                        .ok()
                        .map(|b| usd(b.available_picos));
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
                let mut d = deploy_out(o);
                d.expires_at_ms = self.expires_ms();
                d.charged_usd = usd(charge.as_ref().map_or(0, |c| c.1));
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
        let Some(amount) = parse_usd(a.amount_usd.trim()).filter(|a| *a > 0) else {
            return Ok(tool_error(
                "VALIDATION_ERROR",
                &format!(
                    "amount_usd '{}' is not a dollar amount above 0",
                    a.amount_usd
                ),
                "write it like \"5\" or \"2.50\" (at most 6 decimals)",
            ));
        };
        let what = format!("a top-up of ${} credit", a.amount_usd.trim());
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

impl TollgateMcp {
    async fn balance_of(&self, account: &str) -> Result<BalanceOut, CallToolResult> {
        let b = self
            .identify
            .balance(account)
            .await
            .map_err(|f| tool_error(f.code, &f.message, &f.hint))?;
        let projects = match self.control.list_projects(account).await {
            Ok(list) => list
                .into_iter()
                .map(|v| {
                    let o = project_out(v, self.prices());
                    ProjectCostOut {
                        project_id: o.project_id,
                        slug: o.slug,
                        day_request_cost_usd: o.usage.day.request_cost_usd,
                        cpu_cost_live_usd: o.usage.cpu_cost_live_usd,
                    }
                })
                .collect(),
            Err(e) => return Err(from_control(e)),
        };
        Ok(BalanceOut {
            projects,
            account: account.to_owned(),
            available_usd: usd(b.available_picos),
            reserved_usd: usd(b.reserved_picos),
            credited_usd: usd(b.credited_picos),
            spent_usd: usd(b.spent_picos),
            status: if b.available_picos > 0 {
                "active".into()
            } else {
                "suspended".into()
            },
        })
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
