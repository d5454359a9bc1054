//! The MCP server agents talk to: Streamable HTTP at `/mcp` (rmcp, stateless), tools over the
//! control service, each with a description, an input and an output schema, and
//! `structuredContent`. Tool failures are results with `isError: true` and `{code, message,
//! hint}`; protocol problems stay JSON-RPC errors. See docs/agents.md.
//!
//! Who is calling, and payment, come from an [`Identify`] implementation: the payments layer
//! verifies MPP credentials (a zero-amount proof for free tools, a session voucher for paid
//! ones) and answers with the MPP MCP binding (`-32042` and a challenge) when one is missing.

mod metrics;
mod tools;

use std::sync::Arc;

use async_trait::async_trait;
use axum::http::HeaderValue;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tollgate_control::Control;

pub use tools::TollgateMcp;

/// A tool failure an agent can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolFailure {
    pub code: &'static str,
    pub message: String,
    pub hint: String,
}

/// Why a call cannot go ahead: a tool failure the agent reads, or a JSON-RPC error (payment
/// required, `-32042` with challenges in `data`; verification failed, `-32043`).
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    Tool(ToolFailure),
    Rpc {
        code: i32,
        message: String,
        data: serde_json::Value,
    },
}

impl From<ToolFailure> for Refusal {
    fn from(f: ToolFailure) -> Self {
        Refusal::Tool(f)
    }
}

/// The caller of a tool, and the payment receipt to return in `result._meta` (if it paid).
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    pub account: String,
    /// `(meta key, receipt)`, e.g. `("org.paymentauth/receipt", {...})`.
    pub receipt: Option<(String, serde_json::Value)>,
}

impl Caller {
    pub fn unpaid(account: impl Into<String>) -> Self {
        Caller {
            account: account.into(),
            receipt: None,
        }
    }
}

/// An account's money, for `get_balance` (p$ inside, dollars at the edge).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balance {
    pub available_picos: i64,
    /// Held by proxies for requests in flight (leases): not spent yet, not available either.
    pub reserved_picos: i64,
    pub credited_picos: i64,
    pub spent_picos: i64,
}

/// Resolves the calling account from the HTTP request and the MCP request's `_meta`, takes
/// payments, and reads balances.
#[async_trait]
pub trait Identify: Send + Sync + 'static {
    /// Who calls a free tool.
    async fn account(
        &self,
        parts: Option<&http::request::Parts>,
        meta: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Caller, Refusal>;

    /// Takes a payment of `amount` base units ($0.000001 each) as credit for the caller's
    /// account; `what` says in words what it is for (it goes into the payment-required message).
    async fn pay(
        &self,
        _parts: Option<&http::request::Parts>,
        _meta: &serde_json::Map<String, serde_json::Value>,
        _amount: u128,
        _what: &str,
    ) -> Result<Caller, Refusal> {
        Err(Refusal::Tool(ToolFailure {
            code: "PAYMENT_UNAVAILABLE",
            message: "this server takes no payments".into(),
            hint: "run tollgate with payments configured ([payments] in the config)".into(),
        }))
    }

    /// Debits `picos` from `account` once per `key` (a deploy's price). `Ok(false)` when the
    /// balance is short (nothing taken). No default: a server that charges must say how, and
    /// one that does not (no pricing) never calls it.
    async fn charge(&self, account: &str, key: &str, picos: i64) -> Result<bool, ToolFailure>;

    /// Gives a charge back (a deploy that failed), once per key.
    async fn refund(&self, account: &str, key: &str, picos: i64) -> Result<(), ToolFailure>;

    /// The start charged under `key` went live: the charge stands. A server whose charges
    /// give themselves back unless kept (see `PaidIdentity`) is told here; called once, after
    /// the start is live and before the answer.
    async fn keep(&self, _account: &str, _key: &str) {}

    async fn balance(&self, _account: &str) -> Result<Balance, ToolFailure> {
        Err(ToolFailure {
            code: "PAYMENT_UNAVAILABLE",
            message: "this server keeps no balances".into(),
            hint: "run tollgate with metering enabled".into(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct McpConfig {
    /// `Host` values accepted (DNS-rebinding protection); must not be empty.
    pub allowed_hosts: Vec<String>,
    /// `Origin` values accepted when a client sends one (browsers); agents usually send none.
    pub allowed_origins: Vec<String>,
    /// Largest request body: inline `files` of a deploy must fit (500 KB of source + JSON).
    pub max_body_bytes: usize,
    /// What a deploy costs; `None`: deploys are free (development without payments).
    pub pricing: Option<DeployPricing>,
    /// Where tool-call metrics go (`tollgate_mcp_*`); `None`: not measured.
    pub registry: Option<prometheus::Registry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeployPricing {
    /// The deploy price (p$), charged from the balance once the new version is live; a failed
    /// deploy is refunded.
    pub deploy_picos: i64,
    /// Credit a deploy buys for the service unless the agent sets `prepay_usd` (base units).
    pub default_prepay: u128,
    /// Prices the tools quote usage with (p$ per request, per CPU-µs, per database row read
    /// and written).
    pub per_request_picos: i64,
    pub per_cpu_us_picos: i64,
    pub per_row_read_picos: i64,
    pub per_row_written_picos: i64,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: Vec::new(),
            max_body_bytes: 4 * 1024 * 1024,
            pricing: None,
            registry: None,
        }
    }
}

/// `/mcp`, to merge into the control listener's router.
pub fn router(control: Arc<Control>, identify: Arc<dyn Identify>, cfg: &McpConfig) -> axum::Router {
    let tools = Arc::new(TollgateMcp::tool_router_shared());
    let metrics = cfg.registry.as_ref().and_then(|r| {
        let names = tools
            .list_all()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        metrics::McpMetrics::register(r, names)
            .map_err(|e| tracing::warn!(error = %e, "MCP metrics not registered"))
            .ok()
            .map(Arc::new)
    });
    let pricing = cfg.pricing;
    let svc_cfg = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_allowed_hosts(cfg.allowed_hosts.clone())
        .with_allowed_origins(cfg.allowed_origins.clone())
        .enforce_origin_validation()
        .with_max_request_body_bytes(cfg.max_body_bytes);
    let svc = StreamableHttpService::new(
        move || {
            Ok(
                TollgateMcp::new(control.clone(), identify.clone(), tools.clone())
                    .with_pricing(pricing)
                    .with_metrics(metrics.clone()),
            )
        },
        Arc::new(NeverSessionManager::default()),
        svc_cfg,
    );
    let limit = cfg.max_body_bytes;
    axum::Router::new()
        .nest_service("/mcp", svc)
        .layer(axum::middleware::from_fn(move |req, next| {
            check_message(req, next, limit)
        }))
        .layer(axum::middleware::from_fn(normalize_accept))
}

/// A JSON-RPC error answer for a request that never reached the MCP server: `status`, the
/// JSON-RPC `code`, what was wrong and what to do.
fn rpc_refusal(
    status: http::StatusCode,
    code: i64,
    message: &str,
    hint: &str,
) -> axum::response::Response {
    let body = serde_json::json!({
        "jsonrpc": "2.0",
        "id": null,
        "error": {"code": code, "message": message, "data": {"hint": hint}},
    });
    let mut r = axum::response::Response::new(axum::body::Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A POST to `/mcp` must be one JSON-RPC message as JSON: anything else gets a JSON-RPC error
/// with the right status (415 wrong media type, 413 over the limit, 400 not JSON / not a
/// JSON-RPC message) before the server sees it, so a client learns what it did wrong.
async fn check_message(
    req: axum::extract::Request,
    next: axum::middleware::Next,
    limit: usize,
) -> axum::response::Response {
    use http::StatusCode;
    if req.method() != http::Method::POST {
        return next.run(req).await;
    }
    // One Content-Type, and JSON (two are ambiguous: refused, not guessed).
    let mut types = req.headers().get_all(http::header::CONTENT_TYPE).iter();
    let json = match (types.next(), types.next()) {
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json")),
        _ => false,
    };
    if !json {
        return rpc_refusal(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            -32600,
            "an MCP request is JSON: Content-Type must be application/json",
            "send the JSON-RPC message with Content-Type: application/json",
        );
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return rpc_refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                -32600,
                &format!("the request body is over {limit} bytes"),
                "send fewer or smaller files per deploy (use `changes` for edits)",
            );
        }
    };
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Err(e) => {
            return rpc_refusal(
                StatusCode::BAD_REQUEST,
                -32700,
                &format!("parse error: the body is not JSON ({e})"),
                "send one JSON-RPC 2.0 message as JSON",
            );
        }
        Ok(v) if v.get("jsonrpc").and_then(|j| j.as_str()) != Some("2.0") => {
            return rpc_refusal(
                StatusCode::BAD_REQUEST,
                -32600,
                "invalid request: not a JSON-RPC 2.0 message (an object with \"jsonrpc\": \"2.0\"; batches are not accepted)",
                "send one JSON-RPC 2.0 message per request",
            );
        }
        Ok(_) => {}
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Some MCP clients send no `Accept`, or `*/*`; the transport wants both media types listed.
async fn normalize_accept(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let ok = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/json") && v.contains("text/event-stream"));
    if !ok {
        req.headers_mut().insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json, text/event-stream"),
        );
    }
    next.run(req).await
}
