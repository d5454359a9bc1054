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

/// Database rows charged to the owning accounts through a balance cache: a query is admitted
/// when the owner can pay (waiting up to `lease_wait` for this node's first lease, as the proxy
/// does), and its exact rows are charged once it ran.
pub struct ChargeRows {
    pub cache: Arc<BalanceCache>,
    pub lease_wait: std::time::Duration,
}

#[async_trait::async_trait]
impl tollgate_database::Meter for ChargeRows {
    async fn admit(&self, account: &str) -> Result<(), tollgate_database::MeterRefusal> {
        use tollgate_balance_cache::Spend;
        use tollgate_database::MeterRefusal;
        // The cheapest query reads one row.
        let least = self.cache.prices().per_row_read;
        let end = tokio::time::Instant::now() + self.lease_wait;
        loop {
            let changed = self.cache.changed_notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.cache.admit(account, least) {
                Spend::Ok => return Ok(()),
                Spend::Suspended => return Err(MeterRefusal::Suspended),
                Spend::Unavailable => return Err(MeterRefusal::Unavailable),
                Spend::Pending => {
                    let left = end.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        return Err(MeterRefusal::Unavailable);
                    }
                    let _ = tokio::time::timeout(left, changed).await;
                }
            }
        }
    }

    fn charge(&self, account: &str, rows_read: u64, rows_written: u64, cpu_us: u64) {
        self.cache.charge_rows(account, rows_read, rows_written);
        if cpu_us > 0 {
            self.cache.charge_cpu(account, cpu_us);
        }
    }
}

/// Metering off (`metering.enabled = false`): queries run and nobody is charged.
pub struct FreeRows;

#[async_trait::async_trait]
impl tollgate_database::Meter for FreeRows {
    async fn admit(&self, _: &str) -> Result<(), tollgate_database::MeterRefusal> {
        Ok(())
    }

    fn charge(&self, _: &str, _: u64, _: u64, _: u64) {}
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
