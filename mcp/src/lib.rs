//! The MCP server agents talk to: Streamable HTTP at `/mcp` (rmcp, stateless), tools over the
//! control service, each with a description, an input and an output schema, and
//! `structuredContent`. Tool failures are results with `isError: true` and `{code, message,
//! hint}`; protocol problems stay JSON-RPC errors. See docs/agents.md.
//!
//! Who is calling comes from an [`Identify`] implementation: the payments layer (issue #5)
//! verifies MPP credentials (a zero-amount proof for free tools); until it is wired, the server is
//! not mounted by the binary.

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

/// Resolves the calling account from the HTTP request and the MCP request's `_meta`.
#[async_trait]
pub trait Identify: Send + Sync + 'static {
    async fn account(
        &self,
        parts: Option<&http::request::Parts>,
        meta: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, ToolFailure>;
}

#[derive(Debug, Clone)]
pub struct McpConfig {
    /// `Host` values accepted (DNS-rebinding protection); must not be empty.
    pub allowed_hosts: Vec<String>,
    /// `Origin` values accepted when a client sends one (browsers); agents usually send none.
    pub allowed_origins: Vec<String>,
    /// Largest request body: inline `files` of a deploy must fit (500 KB of source + JSON).
    pub max_body_bytes: usize,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            allowed_hosts: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            allowed_origins: Vec::new(),
            max_body_bytes: 4 * 1024 * 1024,
        }
    }
}

/// `/mcp`, to merge into the control listener's router.
pub fn router(control: Arc<Control>, identify: Arc<dyn Identify>, cfg: &McpConfig) -> axum::Router {
    let tools = Arc::new(TollgateMcp::tool_router_shared());
    let svc_cfg = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_allowed_hosts(cfg.allowed_hosts.clone())
        .with_allowed_origins(cfg.allowed_origins.clone())
        .enforce_origin_validation()
        .with_max_request_body_bytes(cfg.max_body_bytes);
    let svc = StreamableHttpService::new(
        move || {
            Ok(TollgateMcp::new(
                control.clone(),
                identify.clone(),
                tools.clone(),
            ))
        },
        Arc::new(NeverSessionManager::default()),
        svc_cfg,
    );
    axum::Router::new()
        .nest_service("/mcp", svc)
        .layer(axum::middleware::from_fn(normalize_accept))
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
