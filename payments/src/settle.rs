//! The settlement schedule: money the payer has spent is moved to the payee on chain with the
//! escrow's `settle`, using a voucher the payer signed.
//!
//! What counts as spent: the channel's accepted cumulative minus the account's unspent credit
//! (available plus what proxies hold in leases). With one channel per account that is exact;
//! with several it errs low (each channel assumes all unspent credit could be its own), so a
//! settlement never takes money the payer may still get back on close. Only signed amounts can
//! be settled: the largest kept voucher at or below the target. A retried or duplicated
//! settlement is harmless: the escrow refuses a cumulative at or below what it has settled.

use alloy::primitives::B256;

use crate::Payments;
use crate::channels::{ChainOp, edit};
use crate::close::now_ms;
use tollgate_metering::units::picos_to_base;

pub(crate) async fn settle_due(p: &Payments) -> Result<usize, String> {
    let ids = p.backend.channel_ids().await.map_err(|e| e.message)?;
    let mut sent = 0;
    for id in ids {
        // Closes the client started and did not see through (a lost answer, a chain error) are
        // finished here: the close is recorded, and the payee holds the signed voucher.
        if let Ok(Some(r)) = p.backend.get(&id).await
            && r.state.closing
            && !r.state.finalized
            && r.close.is_some()
        {
            if let Err(e) = crate::close::finish_close(p, &id).await {
                tracing::warn!(channel = %id, error = %e.problem.detail, "close not finished yet; retried next round");
            }
            continue;
        }
        match settle_one(p, &id).await {
            Ok(true) => sent += 1,
            Ok(false) => {}
            Err(e) => {
                p.metrics.chain_op("settle", false);
                tracing::warn!(channel = %id, error = %e, "settlement failed; retried next round")
            }
        }
    }
    Ok(sent)
}

async fn settle_one(p: &Payments, id: &str) -> Result<bool, String> {
    let Some(record) = p.backend.get(id).await.map_err(|e| e.message)? else {
        return Ok(false);
    };
    let st = &record.state;
    // Channels closing on chain are the close watcher's (it captures in full).
    if st.finalized
        || st.closing
        || record.forced_close.as_ref().is_some_and(|f| !f.cancelled)
        || st.highest_voucher_amount <= st.settled_on_chain
    {
        return Ok(false);
    }
    let Some(descriptor) = record.descriptor.clone() else {
        return Ok(false);
    };
    let channel: B256 = id.parse().map_err(|_| format!("bad channel id {id}"))?;
    // The chain is the truth for what was settled (a previous round may have landed after
    // its answer was lost).
    let on_chain = p.chain.channel(channel).await.map_err(|e| e.to_string())?;
    // This read may be the first sign of a close on chain (the watcher's scan brings it too):
    // hand the channel over, the watcher captures in full.
    if on_chain.deposit == 0 {
        p.backend.forced_add(id).await.map_err(|e| e.message)?;
        p.close_watch_wake.notify_one();
        return Ok(false);
    }
    if on_chain.close_requested_at != 0 {
        let grace_end = on_chain
            .close_requested_at
            .saturating_add(p.cfg.close_grace.as_secs());
        if crate::forced::request(p, id, grace_end, None)
            .await
            .map_err(|e| e.message)?
        {
            p.close_watch_wake.notify_one();
        }
        return Ok(false);
    }
    let settled = on_chain.settled.max(st.settled_on_chain);
    // Credit the account is owed but does not hold yet is unspent too: set aside (poisoned,
    // until an operator retries or drops it), held (a start's reversal), pending. Credits move
    // held → pending, poisoned ⇄ pending and pending → the account: the lists are read so
    // that each move lands in a list read after the one it left (set-aside ones before and
    // after the pending ones), each key counted once, and the account last. A single move is
    // thus never missed; one applied between the last read and the account is counted twice
    // (we settle less). A reversal under way, which takes its charge again for a moment
    // before crediting it back, is still counted. Not covered: a credit set aside and put back
    // by an operator's retry between two of these reads (two moves inside one round), and a
    // dropped one (the operator credits it by other means): rare, operator-made, and bounded
    // by that one credit for one round.
    let mut seen = std::collections::HashSet::new();
    let mut owed: i64 = 0;
    let mut count = |c: crate::channels::PendingCredit| {
        if c.account == record.account && seen.insert(c.key) {
            owed = owed.saturating_add(c.picos.max(0));
        }
    };
    let poisoned = p.backend.poisoned().await.map_err(|e| e.message)?;
    poisoned.into_iter().for_each(|c| count(c.credit));
    let held = p.backend.held_credits().await.map_err(|e| e.message)?;
    held.into_iter().for_each(&mut count);
    let pending = p.backend.pending_credits().await.map_err(|e| e.message)?;
    pending.into_iter().for_each(&mut count);
    let poisoned = p.backend.poisoned().await.map_err(|e| e.message)?;
    poisoned.into_iter().for_each(|c| count(c.credit));
    let unspent = match p.money.account(&record.account).await {
        Ok(Some(a)) => picos_to_base(a.available.saturating_add(a.leased).saturating_add(owed)),
        Ok(None) => picos_to_base(owed),
        Err(e) => return Err(format!("money store: {e}")),
    };
    // A close that began meanwhile withdrew the unused credit (the account now reads as all
    // spent): the close captures what is due, a settlement here would take the payer's refund.
    match p.backend.get(id).await.map_err(|e| e.message)? {
        Some(now)
            if !now.state.closing
                && !now.state.finalized
                && now.forced_close.as_ref().is_none_or(|f| f.cancelled) => {}
        _ => return Ok(false),
    }
    let target = st.highest_voucher_amount.saturating_sub(unspent);
    let Some(voucher) = record
        .vouchers
        .iter()
        .filter(|v| v.cumulative <= target && v.cumulative > settled)
        .max_by_key(|v| v.cumulative)
        .cloned()
    else {
        refresh(p, id, settled, None).await?;
        return Ok(false);
    };
    if voucher.cumulative - settled < p.cfg.settle_min {
        refresh(p, id, settled, None).await?;
        return Ok(false);
    }
    let tx = match p
        .chain
        .settle(&descriptor, voucher.cumulative, &voucher.signature)
        .await
    {
        Ok(tx) => {
            p.metrics.chain_op("settle", true);
            tx
        }
        // Counted by the caller, with every other failure of the round.
        Err(e) => return Err(e.to_string()),
    };
    let op = ChainOp {
        kind: "settle".into(),
        cumulative: voucher.cumulative,
        settled: voucher.cumulative,
        tx_hash: format!("{tx:#x}"),
        at_ms: now_ms(),
    };
    tracing::info!(channel = %id, cumulative = voucher.cumulative, tx = %op.tx_hash, "settled on chain");
    refresh(p, id, voucher.cumulative, Some(op)).await?;
    Ok(true)
}

/// Records what the chain has settled (never lowering it) and the operation, if any.
async fn refresh(p: &Payments, id: &str, settled: u128, op: Option<ChainOp>) -> Result<(), String> {
    let current = p.backend.get(id).await.map_err(|e| e.message)?;
    if op.is_none() && current.is_some_and(|r| r.state.settled_on_chain >= settled) {
        return Ok(());
    }
    p.backend
        .update(
            id,
            edit(move |r| {
                r.record_settled(settled, op);
                Vec::new()
            }),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.message)
}
