//! One close case's records: a request opens it, a cancellation, a capture or the channel's
//! close ends it; what ends a case gives its write-off back, in the same atomic update.

use mpp::VerificationError;

use super::ForcedClose;
use crate::Payments;
use crate::chain::EventPos;
use crate::channels::{ChainOp, ChannelRecord, PendingCredit, edit};

/// Records what the payee got once a channel is gone; `handle` closes the books on it.
pub(super) async fn closed(
    p: &Payments,
    id: &str,
    settled_to_payee: u128,
) -> Result<(), VerificationError> {
    let Some(r) = p.backend.get(id).await? else {
        return Ok(());
    };
    if r.state.finalized {
        return Ok(());
    }
    if r.closed_on_chain.is_none() {
        p.backend
            .update(
                id,
                edit(move |r| {
                    if r.closed_on_chain.is_none() {
                        r.closed_on_chain = Some(settled_to_payee);
                        r.state.settled_on_chain = r.state.settled_on_chain.max(settled_to_payee);
                    }
                    Vec::new()
                }),
            )
            .await?;
    }
    // Within a round: `handle` comes to it after the scan.
    p.backend.forced_add(id).await
}

/// The reversal that gives a cycle's write-off back (queued with the record that ends the
/// cycle): it takes hold of the write-off's key first, so a write-off still in flight can
/// never land after it, unreversed. Once per cycle, and never once the channel is gone: from
/// then on the books are trued up to what the payee got (`close_books`) and nothing else
/// gives back.
fn restore(r: &mut ChannelRecord) -> Option<PendingCredit> {
    if r.closed_on_chain.is_some() || r.state.finalized {
        return None;
    }
    let (account, id) = (r.account.clone(), r.state.channel_id.clone());
    let f = r.forced_close.as_mut()?;
    let ask = f.write_off_ask.filter(|a| *a > 0 && !f.restored)?;
    f.restored = true;
    Some(PendingCredit {
        key: format!("mpp-writeoff-undo:{id}:{}", f.cycle),
        account,
        picos: ask,
        reverses: Some(write_off_key(&id, f.cycle)),
        not_before_ms: None,
    })
}

pub(super) fn write_off_key(id: &str, cycle: u32) -> String {
    format!("mpp-writeoff:{id}:{cycle}")
}

/// Records a close request on a channel we hold (no-op for others): `closing` (so no voucher
/// is accepted any more, whatever a stale chain read says), the grace end, and the index.
/// `pos`: where its event is in the log (`None` when a read of the channel found it).
///
/// A request starts a new cycle when there is none, when it is newer (a later grace end: the
/// previous one was cancelled, whether or not we saw it), or when it comes after the
/// cancellation of the last one in the log. A read can not reopen a cancelled request with the
/// same grace end (a lagging node may still show it); its event can.
///
/// True when a new case opened (callers outside the watcher wake it).
pub(crate) async fn request(
    p: &Payments,
    id: &str,
    grace_end: u64,
    pos: Option<EventPos>,
) -> Result<bool, VerificationError> {
    let Some(record) = p.backend.get(id).await? else {
        return Ok(false);
    };
    if record.state.finalized || record.closed_on_chain.is_some() {
        return Ok(false);
    }
    let grace = p.cfg.close_grace.as_secs();
    let opens = move |f: Option<&ForcedClose>| match f {
        None => true,
        Some(f) if grace_end > f.grace_end => true,
        Some(f) if f.cancelled => {
            matches!((pos, f.cancelled_at), (Some(at), Some(c)) if at > c)
        }
        Some(_) => false,
    };
    let changes = move |f: Option<&ForcedClose>| {
        opens(f)
            || f.is_some_and(|f| {
                !f.cancelled
                    && f.grace_end == grace_end
                    && f.requested_at.is_none()
                    && pos.is_some()
            })
    };
    let mut opened = false;
    if changes(record.forced_close.as_ref()) {
        let after = p
            .backend
            .update(
                id,
                edit(move |r| {
                    let mut credits = Vec::new();
                    if r.closed_on_chain.is_none()
                        && !r.state.finalized
                        && opens(r.forced_close.as_ref())
                    {
                        // A newer request means the last one ended: its write-off goes back
                        // (the new cycle writes off on its own, if it must).
                        credits.extend(restore(r));
                        let cycle = r.forced_close.as_ref().map_or(1, |old| old.cycle + 1);
                        r.forced_close = Some(ForcedClose {
                            grace_end,
                            cycle,
                            requested_at: pos,
                            ..ForcedClose::default()
                        });
                        r.state.closing = true;
                        r.state.close_requested_at = grace_end.saturating_sub(grace);
                    } else if let Some(f) = r.forced_close.as_mut()
                        && f.grace_end == grace_end
                        && !f.cancelled
                        && f.requested_at.is_none()
                    {
                        f.requested_at = pos;
                    }
                    credits
                }),
            )
            .await?;
        opened = after.forced_close.as_ref().is_some_and(|f| {
            record
                .forced_close
                .as_ref()
                .is_none_or(|o| o.cycle != f.cycle)
        });
        if opened {
            p.metrics.close_requests.inc();
            tracing::warn!(channel = %id, account = %record.account, grace_end, "the payer requested a close on chain: capturing the accepted vouchers");
            let _ = p.drain_credits().await;
        }
    }
    p.backend.forced_add(id).await?;
    Ok(opened)
}

/// A cancellation (a top-up on chain) at `pos` in the log: ends the current request if that
/// request is before it in the log. The channel lives on; vouchers are accepted again.
pub(super) async fn cancel(p: &Payments, id: &str, pos: EventPos) -> Result<(), VerificationError> {
    let Some(record) = p.backend.get(id).await? else {
        return Ok(());
    };
    let ends = move |f: Option<&ForcedClose>| {
        f.is_some_and(|f| !f.cancelled && f.requested_at.is_some_and(|r| r < pos))
    };
    if record.state.finalized || !ends(record.forced_close.as_ref()) {
        return Ok(());
    }
    p.backend
        .update(
            id,
            edit(move |r| {
                let mut credits = Vec::new();
                if r.closed_on_chain.is_none() && ends(r.forced_close.as_ref()) {
                    credits.extend(restore(r));
                    if let Some(f) = r.forced_close.as_mut() {
                        f.cancelled = true;
                        f.cancelled_at = Some(pos);
                    }
                    // A cooperative close in progress keeps the channel closing.
                    if r.close.is_none() {
                        r.state.closing = false;
                    }
                    r.state.close_requested_at = 0;
                }
                credits
            }),
        )
        .await?;
    tracing::info!(channel = %id, "the payer cancelled the close request");
    let _ = p.drain_credits().await;
    p.backend.forced_add(id).await
}

/// Takes a channel off the index, then puts it back if a new case opened meanwhile (the
/// decision to remove was made on an older read).
pub(super) async fn unindex(p: &Payments, id: &str) -> Result<(), String> {
    p.backend.forced_remove(id).await.map_err(|e| e.message)?;
    if let Some(r) = p.backend.get(id).await.map_err(|e| e.message)?
        && !r.state.finalized
        && (r.closed_on_chain.is_some() || r.forced_close.as_ref().is_some_and(ForcedClose::active))
    {
        p.backend.forced_add(id).await.map_err(|e| e.message)?;
    }
    Ok(())
}

/// Records a capture; gives back a write-off made before it landed.
pub(super) async fn captured(
    p: &Payments,
    id: &str,
    settled: u128,
    op: Option<ChainOp>,
) -> Result<(), String> {
    p.backend
        .update(
            id,
            edit(move |r| {
                r.record_settled(settled, op);
                let mut credits = Vec::new();
                let covered = r.state.settled_on_chain >= r.state.highest_voucher_amount;
                if covered
                    && r.closed_on_chain.is_none()
                    && r.forced_close.as_ref().is_some_and(ForcedClose::active)
                {
                    credits.extend(restore(r));
                    let at = r.state.settled_on_chain;
                    if let Some(f) = r.forced_close.as_mut() {
                        f.captured = Some(at);
                    }
                }
                credits
            }),
        )
        .await
        .map_err(|e| e.message)?;
    unindex(p, id).await?;
    let _ = p.drain_credits().await;
    Ok(())
}

/// The channel is gone on chain and our books are settled: finalized, off the index.
pub(super) async fn finish(p: &Payments, id: &str) -> Result<(), String> {
    p.backend
        .update(
            id,
            edit(move |r| {
                r.state.finalized = true;
                r.state.closing = false;
                Vec::new()
            }),
        )
        .await
        .map_err(|e| e.message)?;
    p.backend.forced_remove(id).await.map_err(|e| e.message)
}
