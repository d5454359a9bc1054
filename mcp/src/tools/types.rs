//! What the tools take and answer (their JSON schemas are what agents read), and the
//! conversions from the control service's views.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tollgate_control::ProjectView;
use tollgate_metering::units::{UsdAmount, format_usd6};

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
    /// Bind the project's SQL database (SQLite, Cloudflare D1's API) under these names, e.g.
    /// ["DB"]: code uses `env.DB.prepare("SELECT …").bind(x).all()`, `.first()`, `.run()`,
    /// `env.DB.batch([...])`, `env.DB.exec("CREATE TABLE …")`. Created on first use; the data
    /// survives restarts, redeploys and rollbacks, and is deleted with the project. Omit to
    /// keep the live version's bindings; [] removes them (the data stays). Rows read and
    /// written are billed (see get_pricing).
    pub databases: Option<Vec<String>>,
    /// Extra credit (dollars) this deploy buys for the service's requests and CPU, paid with
    /// the deploy: a string ("0.50") or a number (0.5). "0" deploys on existing balance alone.
    /// Default: the server's (usually "1").
    #[schemars(with = "Option<UsdSchema>")]
    pub prepay_usd: Option<UsdAmount>,
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
pub struct QueryArgs {
    pub project_id: String,
    /// One read-only statement (SELECT, or a PRAGMA that reads the schema).
    pub sql: String,
    /// At most this many rows (1–1000, default 100).
    pub max_rows: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
pub struct TopUpArgs {
    /// Dollars to add to your balance: a string ("5", "2.50") or a number (2.5); at most 6
    /// decimals.
    #[schemars(with = "UsdSchema")]
    pub amount_usd: UsdAmount,
}

/// The schema of a dollar amount: agents send strings and numbers, both are taken.
pub struct UsdSchema;

impl JsonSchema for UsdSchema {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "UsdAmount".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": ["string", "number"],
            "description": "Dollars, e.g. \"2.50\" or 2.5 (at most 6 decimals)"
        })
    }
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
    /// The project's SQL database; absent until it was first used.
    pub database: Option<DatabaseOut>,
}

/// A project's SQL database.
#[derive(Debug, Serialize, JsonSchema)]
pub struct DatabaseOut {
    /// The names your code reaches it under (`env.DB`).
    pub bindings: Vec<String>,
    pub size_bytes: u64,
    /// Writes fail past this size; reads keep working.
    pub max_size_bytes: u64,
    pub tables: Vec<TableOut>,
    pub hour: RowsOut,
    pub day: RowsOut,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct TableOut {
    pub name: String,
    pub rows: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct RowsOut {
    pub rows_read: u64,
    pub rows_written: u64,
    /// What those rows cost (dollars).
    pub cost_usd: String,
}

#[derive(Debug, Serialize, JsonSchema)]
pub struct QueryOut {
    pub columns: Vec<String>,
    /// Each row: values in column order (blobs as arrays of bytes).
    pub rows: Vec<serde_json::Value>,
    /// More rows matched than `max_rows`.
    pub truncated: bool,
    pub rows_read: u64,
    /// What this query cost (dollars).
    pub cost_usd: String,
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

pub(crate) fn status_str<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub(crate) fn deploy_out(out: tollgate_control::DeployOutcome) -> DeployOut {
    DeployOut {
        project_id: out.project_id,
        deployment_id: out.deployment_id,
        url: out.url,
        status: status_str(&out.status),
        version: out.version,
        charged_usd: format_usd6(0),
        balance_usd: None,
        expires_at_ms: 0,
    }
}

pub(crate) fn deployment_out(d: &tollgate_control::Deployment) -> DeploymentOut {
    DeploymentOut {
        deployment_id: d.id.clone(),
        version: d.version,
        status: status_str(&d.status),
        reason: d.reason.clone(),
        created_ms: d.created_ms,
    }
}

/// p$ per request and per CPU-µs, (0, 0) where nothing is charged.
/// Prices the views quote costs with (p$ per unit).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct UsagePrices {
    pub per_request: i64,
    pub per_cpu_us: i64,
    pub per_row_read: i64,
    pub per_row_written: i64,
}

fn times(n: u64, price: i64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX).saturating_mul(price)
}

pub(crate) fn project_out(v: ProjectView, prices: UsagePrices) -> ProjectOut {
    let req_cost = |n: u64| format_usd6(times(n, prices.per_request));
    let rows = |(r, w): (u64, u64)| RowsOut {
        rows_read: r,
        rows_written: w,
        cost_usd: format_usd6(
            times(r, prices.per_row_read).saturating_add(times(w, prices.per_row_written)),
        ),
    };
    let database = v.database.map(|d| DatabaseOut {
        bindings: d.bindings,
        size_bytes: d.size_bytes,
        max_size_bytes: d.max_size_bytes,
        tables: d
            .tables
            .into_iter()
            .map(|t| TableOut {
                name: t.name,
                rows: t.rows,
            })
            .collect(),
        hour: rows(d.rows_hour),
        day: rows(d.rows_day),
    });
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
            cpu_cost_live_usd: format_usd6(
                i64::try_from(v.usage.cpu_ms_live)
                    .unwrap_or(i64::MAX)
                    .saturating_mul(1000)
                    .saturating_mul(prices.per_cpu_us),
            ),
        },
        database,
    }
}
