//! The glue between crates that must not know each other: the runtime's CPU charged to the
//! balance cache, the proxy holding the runtime's in-flight guard, MCP's caller in `dev`.
//! Written once, here; every wiring (the run modes, the tests, loadtest, the benches) uses these.

use std::sync::Arc;

use tollgate_balance_cache::BalanceCache;
use tollgate_proxy::RequestHooks;
use tollgate_runtime::{CpuDelta, CpuSink, Supervisor};

/// The runtime's CPU deltas, charged to the owning accounts through a balance cache as they
/// accrue; and the deployments whose owner can no longer pay for the CPU they keep using (the
/// runtime interrupts them).
pub struct ChargeCpu(pub Arc<BalanceCache>);

impl CpuSink for ChargeCpu {
    fn record(&self, deltas: &[CpuDelta]) {
        for d in deltas {
            self.0.charge_cpu(&d.account_id, d.cpu_us);
        }
    }

    fn unpaid(&self, deltas: &[CpuDelta]) -> Vec<Arc<str>> {
        deltas
            .iter()
            .filter(|d| self.0.cpu_unpaid(&d.account_id))
            .map(|d| d.deployment_id.clone())
            .collect()
    }
}

/// The proxy holds the runtime's in-flight guard per request (the per-request CPU cap and the
/// drain before a version stops need it).
pub struct InflightHooks(pub Supervisor);

impl RequestHooks for InflightHooks {
    fn begin(&self, deployment_id: &str) -> Option<Box<dyn Send + Sync>> {
        let guard = self.0.inflight(deployment_id)?.begin();
        Some(Box::new(guard))
    }
}

/// `tollgate dev --dev-account A`: every MCP call acts as `A`. Local development only (no
/// payment, no proof; deploys are free there); `tollgate control` never uses it.
pub struct DevIdentity(pub String);

#[async_trait::async_trait]
impl tollgate_mcp::Identify for DevIdentity {
    async fn account(
        &self,
        _parts: Option<&http::request::Parts>,
        _meta: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<tollgate_mcp::Caller, tollgate_mcp::Refusal> {
        Ok(tollgate_mcp::Caller::unpaid(self.0.clone()))
    }

    // Without payments the MCP server has no prices and never charges; if it ever asked, the
    // answer must not be "paid".
    async fn charge(&self, _: &str, _: &str, _: i64) -> Result<bool, tollgate_mcp::ToolFailure> {
        Err(no_payments())
    }

    async fn refund(&self, _: &str, _: &str, _: i64) -> Result<(), tollgate_mcp::ToolFailure> {
        Err(no_payments())
    }
}

fn no_payments() -> tollgate_mcp::ToolFailure {
    tollgate_mcp::ToolFailure {
        code: "PAYMENT_UNAVAILABLE",
        message: "the dev account takes no payments".into(),
        hint: "run tollgate dev without --dev-account to pay over MPP".into(),
    }
}
