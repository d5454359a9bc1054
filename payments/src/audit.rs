//! `tollgate accounts audit`: checks that every credit is backed by money we hold or can still
//! collect, against the money store, the channel store and (optionally) the chain, and lists
//! every difference.
//!
//! Per account: `credited − debited = available + leased` (the money store's invariant), the
//! ledger's totals equal the account's, and
//! `credited − debited ≤ Σ capturable vouchers + Σ direct credits`, where a channel's
//! capturable amount is what is captured once it is closed or written off, else its highest
//! accepted voucher (the payee can settle it while the channel lives), and direct credits are
//! credits that came from no payment channel (an operator's `tollgate accounts credit`, the
//! `dev` account's test credit). Per channel, against the chain: nothing captured that the
//! chain did not settle, no close request or close left unhandled, no voucher above the deposit.

use std::collections::BTreeMap;

use alloy::primitives::B256;
use serde::Serialize;
use tollgate_metering::{LedgerEntry, Store};

use crate::chain::Chain;
use crate::channels::{ChannelBackend, ChannelRecord, Lifecycle};
use tollgate_metering::units::base_to_picos;

/// Credit keys that give back an earlier debit (their debit is in the ledger too), rather than
/// add money: reversals of charges, a close's return of withdrawn credit, a write-off given back.
const REVERSAL_PREFIXES: &[&str] = &[
    "refund:",
    "mpp-close-return:",
    "mpp-writeoff-undo:",
    "mpp-writeoff-trueup:",
];

/// Voucher credits: `mpp:{channel}:{cumulative}`.
const VOUCHER_PREFIX: &str = "mpp:";

#[derive(Debug, Clone, Default, Serialize)]
pub struct AccountAudit {
    pub account: String,
    pub credited: i64,
    pub debited: i64,
    pub available: i64,
    pub leased: i64,
    /// Credits from vouchers (p$).
    pub voucher_credits: i64,
    /// Credits from no payment channel (p$).
    pub direct_credits: i64,
    /// What this account's channels can still bring, or brought (p$).
    pub capturable: i64,
    pub channels: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChannelAudit {
    pub channel: String,
    pub account: String,
    pub lifecycle: Lifecycle,
    pub highest_voucher: String,
    pub settled_recorded: String,
    /// As the chain reports it (absent without a chain, or when gone).
    pub settled_on_chain: Option<String>,
    pub deposit_on_chain: Option<String>,
    pub capturable: String,
    /// Vouchers accepted (and credited) that will never be captured: revenue lost when the
    /// payer spent the credit before a forced close took the rest back (base units).
    pub uncollected: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// An account or a channel id.
    pub subject: String,
    pub what: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditReport {
    pub accounts: Vec<AccountAudit>,
    pub channels: Vec<ChannelAudit>,
    pub differences: Vec<Difference>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }

    /// One line per account and per difference, for people.
    pub fn render(&self) -> String {
        let usd = tollgate_metering::units::picos_to_usd_string;
        let mut out = String::new();
        for a in &self.accounts {
            out.push_str(&format!(
                "account {}: balance ${} (available ${}, leased ${}), credited ${} (vouchers ${}, direct ${}), debited ${}, capturable ${} over {} channel(s)\n",
                a.account,
                usd(a.available.saturating_add(a.leased)),
                usd(a.available),
                usd(a.leased),
                usd(a.credited),
                usd(a.voucher_credits),
                usd(a.direct_credits),
                usd(a.debited),
                usd(a.capturable),
                a.channels
            ));
        }
        for c in &self.channels {
            out.push_str(&format!(
                "channel {} ({}): {:?}, highest voucher {}, settled {} (chain: {}), capturable {}, uncollected {}\n",
                c.channel,
                c.account,
                c.lifecycle,
                c.highest_voucher,
                c.settled_recorded,
                c.settled_on_chain.as_deref().unwrap_or("-"),
                c.capturable,
                c.uncollected
            ));
        }
        if self.differences.is_empty() {
            out.push_str("no differences\n");
        }
        for d in &self.differences {
            out.push_str(&format!("DIFFERENCE {}: {}\n", d.subject, d.what));
        }
        out
    }
}

fn credit_class(key: &str) -> Option<&'static str> {
    let key = key.strip_prefix("credit:").unwrap_or(key);
    // A rebuild's gap credit (`rebuild:mpp:…`, docs/book.md) is the credit of accepted vouchers.
    if key.starts_with(VOUCHER_PREFIX) || key.starts_with("rebuild:mpp:") {
        Some("voucher")
    } else if REVERSAL_PREFIXES.iter().any(|p| key.starts_with(p)) {
        None
    } else {
        Some("direct")
    }
}

/// Runs every check. `chain`: also compare channels with the chain (one read per channel).
pub async fn audit(
    backend: &dyn ChannelBackend,
    money: &dyn Store,
    chain: Option<&dyn Chain>,
) -> Result<AuditReport, String> {
    let mut report = AuditReport::default();
    let diff = |r: &mut AuditReport, subject: &str, what: String| {
        r.differences.push(Difference {
            subject: subject.to_owned(),
            what,
        })
    };

    let ledger: Vec<LedgerEntry> = money.ledger().await.map_err(|e| e.to_string())?;
    let mut by_account: BTreeMap<String, AccountAudit> = BTreeMap::new();
    let mut ledger_debits: BTreeMap<String, i64> = BTreeMap::new();
    let mut ledger_credits: BTreeMap<String, i64> = BTreeMap::new();
    for e in &ledger {
        let a = by_account.entry(e.account.clone()).or_default();
        match e.kind.as_str() {
            "credit" => {
                *ledger_credits.entry(e.account.clone()).or_default() += e.amount;
                match credit_class(&e.key) {
                    Some("voucher") => a.voucher_credits += e.amount,
                    Some(_) => a.direct_credits += e.amount,
                    None => {}
                }
            }
            "settle" | "charge" | "write_off" => {
                *ledger_debits.entry(e.account.clone()).or_default() += e.amount;
            }
            _ => {}
        }
    }

    let mut records: Vec<ChannelRecord> = Vec::new();
    for id in backend.channel_ids().await.map_err(|e| e.message)? {
        if let Some(r) = backend.get(&id).await.map_err(|e| e.message)? {
            by_account.entry(r.account.clone()).or_default();
            records.push(r);
        }
    }

    let ids: Vec<String> = by_account.keys().cloned().collect();
    let states = money.accounts(&ids).await.map_err(|e| e.to_string())?;
    for (id, st) in ids.iter().zip(states) {
        let a = by_account.entry(id.clone()).or_default();
        a.account = id.clone();
        let Some(st) = st else {
            continue;
        };
        a.credited = st.credited;
        a.debited = st.debited;
        a.available = st.available;
        a.leased = st.leased;
    }

    for r in &records {
        let id = r.state.channel_id.to_ascii_lowercase();
        let capturable = r.capturable();
        if let Some(a) = by_account.get_mut(&r.account) {
            a.channels += 1;
            a.capturable = a
                .capturable
                .saturating_add(base_to_picos(capturable).unwrap_or(i64::MAX));
        }
        let mut audit = ChannelAudit {
            channel: id.clone(),
            account: r.account.clone(),
            lifecycle: r.lifecycle(),
            highest_voucher: r.state.highest_voucher_amount.to_string(),
            settled_recorded: r.state.settled_on_chain.to_string(),
            settled_on_chain: None,
            deposit_on_chain: None,
            capturable: capturable.to_string(),
            // Only a close the payer forced leaves credited vouchers uncaptured: a cooperative
            // close withdraws the unspent part from the account instead.
            uncollected: if r.forced_close.is_some() {
                r.state.highest_voucher_amount.saturating_sub(capturable)
            } else {
                0
            }
            .to_string(),
        };
        if let Some(chain) = chain
            && let Ok(cid) = id.parse::<B256>()
        {
            match chain.channel(cid).await {
                Ok(oc) if oc.deposit == 0 => {
                    if !r.state.finalized {
                        diff(
                            &mut report,
                            &id,
                            "gone on chain but its books are not closed (the close watcher has not seen its ChannelClosed event)".into(),
                        );
                    }
                }
                Ok(oc) => {
                    audit.settled_on_chain = Some(oc.settled.to_string());
                    audit.deposit_on_chain = Some(oc.deposit.to_string());
                    if r.state.finalized {
                        diff(
                            &mut report,
                            &id,
                            "closed in our books but open on chain".into(),
                        );
                    }
                    if r.state.settled_on_chain > oc.settled {
                        diff(
                            &mut report,
                            &id,
                            format!(
                                "recorded as settled up to {} but the chain settled {}",
                                r.state.settled_on_chain, oc.settled
                            ),
                        );
                    }
                    if r.state.highest_voucher_amount > oc.deposit {
                        diff(
                            &mut report,
                            &id,
                            format!(
                                "highest voucher {} is above the deposit on chain {}",
                                r.state.highest_voucher_amount, oc.deposit
                            ),
                        );
                    }
                    let handled = r.forced_close.as_ref().is_some_and(|f| !f.cancelled);
                    if oc.close_requested_at != 0 && !handled {
                        diff(
                            &mut report,
                            &id,
                            "the payer requested a close on chain and it is not being handled"
                                .into(),
                        );
                    }
                }
                Err(e) => diff(&mut report, &id, format!("cannot read the chain: {e}")),
            }
        }
        report.channels.push(audit);
    }

    for a in by_account.values() {
        let subject = a.account.as_str();
        if i128::from(a.credited) - i128::from(a.debited)
            != i128::from(a.available) + i128::from(a.leased)
        {
            diff(
                &mut report,
                subject,
                format!(
                    "credited − debited ({} − {}) is not available + leased ({} + {})",
                    a.credited, a.debited, a.available, a.leased
                ),
            );
        }
        let lc = ledger_credits.get(subject).copied().unwrap_or(0);
        let ld = ledger_debits.get(subject).copied().unwrap_or(0);
        if lc != a.credited || ld != a.debited {
            diff(
                &mut report,
                subject,
                format!(
                    "the ledger has {lc} p$ credited and {ld} p$ debited; the account says {} and {} (a trimmed ledger also shows here)",
                    a.credited, a.debited
                ),
            );
        }
        let balance = i128::from(a.credited) - i128::from(a.debited);
        let backing = i128::from(a.capturable) + i128::from(a.direct_credits);
        if balance > backing {
            diff(
                &mut report,
                subject,
                format!(
                    "a balance of {balance} p$ is more than what backs it: {} p$ capturable from its channels + {} p$ direct credits",
                    a.capturable, a.direct_credits
                ),
            );
        }
    }
    for p in backend.poisoned().await.map_err(|e| e.message)? {
        diff(
            &mut report,
            &p.credit.account,
            format!(
                "credit {} ({} p$) is set aside: {} (tollgate payments credits)",
                p.credit.key, p.credit.picos, p.reason
            ),
        );
    }
    report.accounts = by_account.into_values().collect();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::credit_class;

    #[test]
    fn voucher_credits_and_rebuild_gap_credits_are_voucher_credits() {
        assert_eq!(credit_class("credit:mpp:0xab:100"), Some("voucher"));
        assert_eq!(credit_class("credit:rebuild:mpp:0xab:100"), Some("voucher"));
        assert_eq!(credit_class("credit:topup-1"), Some("direct"));
    }
}
