//! MCP tool calls as SREs see them (docs/metrics.md): by tool and result, and their duration.
//! `tool` is one of the server's own tools (or `unknown`), so the label set stays closed.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use rmcp::ErrorData;
use rmcp::model::CallToolResponse;

/// JSON-RPC error code of the MPP MCP binding: payment required.
const PAYMENT_REQUIRED: i32 = -32042;

pub(crate) struct McpMetrics {
    calls: IntCounterVec,
    duration: HistogramVec,
    tools: Vec<String>,
}

impl McpMetrics {
    pub(crate) fn register(registry: &Registry, tools: Vec<String>) -> prometheus::Result<Self> {
        let calls = IntCounterVec::new(
            Opts::new(
                "tollgate_mcp_tool_calls_total",
                "MCP tool calls by tool and result: ok, error (the tool answered with an error, or the call failed), payment_required (answered -32042 with an MPP challenge)",
            ),
            &["tool", "result"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_mcp_tool_duration_seconds",
                "An MCP tool call from request to answer (a deploy includes its build and start)",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ]),
            &["tool"],
        )?;
        for t in tools.iter().map(String::as_str).chain(["unknown"]) {
            for r in ["ok", "error", "payment_required"] {
                calls.with_label_values(&[t, r]);
            }
            duration.with_label_values(&[t]);
        }
        registry.register(Box::new(calls.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(McpMetrics {
            calls,
            duration,
            tools,
        })
    }

    /// The label for a requested tool name: its own name if the server has it.
    pub(crate) fn tool<'a>(&'a self, name: &str) -> &'a str {
        self.tools
            .iter()
            .find(|t| *t == name)
            .map_or("unknown", String::as_str)
    }
}

/// A tool call's result label: `ok`, `error` or `payment_required`.
pub(crate) fn result_of(out: &Result<CallToolResponse, ErrorData>) -> &'static str {
    match out {
        Ok(CallToolResponse::Complete(r)) if r.is_error == Some(true) => "error",
        Ok(_) => "ok",
        Err(e) if e.code.0 == PAYMENT_REQUIRED => "payment_required",
        Err(_) => "error",
    }
}

impl McpMetrics {
    pub(crate) fn observe(
        &self,
        tool: &str,
        out: &Result<CallToolResponse, ErrorData>,
        seconds: f64,
    ) {
        let result = result_of(out);
        self.calls.with_label_values(&[tool, result]).inc();
        self.duration.with_label_values(&[tool]).observe(seconds);
    }
}
