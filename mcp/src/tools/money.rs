//! What tools cost and how it is taken: the deploy price for starts the owner asks for
//! (deploy, rollback), refunds of starts that did not go live, balances in dollars.

use rmcp::model::CallToolResult;
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer};
use tollgate_metering::units::format_usd6;

use super::types::{BalanceOut, ProjectCostOut, ProjectOut, project_out};
use super::{TollgateMcp, from_control, refused, tool_error};
use crate::Caller;

/// A key unique to one charge (one tool call).
pub(crate) fn unique_ref() -> String {
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

impl TollgateMcp {
    /// Where balances are kept and the owner's is used up, its active projects are suspended
    /// in fact (the proxy answers 402): say so.
    pub(crate) async fn mark_unpaid(&self, owner: &str, projects: &mut [ProjectOut]) {
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

    /// Charges the deploy price for a process start the owner asks for (a deploy or a
    /// rollback), once per call. `Ok(None)` where nothing is charged. When the balance is
    /// short, the answer is a payment challenge for the price.
    pub(crate) async fn charge_start(
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
                let words = format!("{what} (${}); your balance is short", format_usd6(price));
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
    pub(crate) async fn refund_start(
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
}

impl TollgateMcp {
    pub(crate) async fn balance_of(&self, account: &str) -> Result<BalanceOut, CallToolResult> {
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
            available_usd: format_usd6(b.available_picos),
            reserved_usd: format_usd6(b.reserved_picos),
            credited_usd: format_usd6(b.credited_picos),
            spent_usd: format_usd6(b.spent_picos),
            status: if b.available_picos > 0 {
                "active".into()
            } else {
                "suspended".into()
            },
        })
    }
}
