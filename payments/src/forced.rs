//! Closes the payer forces on chain. A payer may `requestClose` a channel and, once the grace
//! period is over, `withdraw` whatever the payee has not settled. Every voucher we accepted was
//! credited to the payer's account, so a close request makes that credit unbacked unless the
//! payee captures the highest voucher before the grace period ends.
//!
//! The watcher, each round (and at once when a voucher accept finds a close request):
//! 1. reads the escrow's events for channels paying us since its block cursor (one
//!    `eth_getLogs` per block range, however many channels there are: quiet channels cost
//!    nothing);
//! 2. marks each requested channel `closing` (no more vouchers) and puts it on a small index;
//! 3. for each indexed channel, settles the highest accepted voucher in full;
//! 4. if that has not landed by `grace_end − write_off_margin` (chain time), writes the credit
//!    that voucher no longer backs off the account (idempotent, fixed amount, ledger
//!    `write_off`), and keeps trying to capture until the channel is gone: a capture that lands
//!    later gives the write-off back.

use std::time::Instant;

use alloy::primitives::B256;
use mpp::VerificationError;

use crate::Payments;
use crate::chain::{ChainError, ChannelEvent};
use crate::channels::{ChainOp, ChannelRecord, ForcedClose, PendingCredit, Update};
use crate::close::now_ms;
use tollgate_metering::units::base_to_picos;

/// Where the event scan resumes (a block number), in the channel store's meta values.
pub(crate) const CURSOR: &str = "close-watch:next-block";

/// One watcher round: new events, then every unresolved forced close.
pub(crate) async fn watch(p: &Payments) -> Result<(), String> {
    let scanned = scan(p).await;
    let ids = p.backend.forced_ids().await.map_err(|e| e.message)?;
    for id in ids {
        if let Err(e) = handle(p, &id).await {
            tracing::warn!(channel = %id, error = %e, "forced close not resolved yet; retried next round");
        }
    }
    scanned
}

/// Reads escrow events since the cursor (several ranges if behind, bounded per round).
async fn scan(p: &Payments) -> Result<(), String> {
    let chain_err = |e: ChainError| {
        p.metrics.chain_op("events", false);
        format!("chain: {e}")
    };
    let mut from = match p.backend.meta_get(CURSOR).await.map_err(|e| e.message)? {
        Some(v) => v.parse::<u64>().map_err(|_| format!("bad cursor {v:?}"))?,
        // First run: look back far enough to see every close whose grace period may still
        // run (accepting a voucher also finds a close request, for older ones).
        None => p
            .chain
            .latest_block()
            .await
            .map_err(chain_err)?
            .saturating_sub(p.cfg.close_watch_lookback_blocks),
    };
    for _ in 0..20 {
        let page = p.chain.channel_events(from).await.map_err(chain_err)?;
        p.metrics.chain_op("events", true);
        for ev in page.events {
            apply_event(p, ev).await.map_err(|e| e.message)?;
        }
        from = page.next_block;
        p.backend
            .meta_set(CURSOR, &from.to_string())
            .await
            .map_err(|e| e.message)?;
        if page.caught_up {
            break;
        }
    }
    Ok(())
}

async fn apply_event(p: &Payments, ev: ChannelEvent) -> Result<(), VerificationError> {
    match ev {
        ChannelEvent::CloseRequested { channel, grace_end } => {
            request(p, &format!("{channel:#x}"), grace_end).await
        }
        ChannelEvent::CloseCancelled { channel } => {
            let id = format!("{channel:#x}");
            if p.backend.get(&id).await?.is_some() {
                // Resolved by `handle`, which reads the channel's state on chain.
                p.backend.forced_add(&id).await?;
            }
            Ok(())
        }
        ChannelEvent::Closed {
            channel,
            settled_to_payee,
        } => {
            let id = format!("{channel:#x}");
            let Some(r) = p.backend.get(&id).await? else {
                return Ok(());
            };
            if r.state.finalized {
                return Ok(());
            }
            p.backend
                .update(
                    &id,
                    Box::new(move |prev| {
                        let mut r =
                            prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                        r.closed_on_chain = Some(settled_to_payee);
                        r.state.settled_on_chain = r.state.settled_on_chain.max(settled_to_payee);
                        Ok(Update {
                            record: r,
                            credits: Vec::new(),
                        })
                    }),
                )
                .await?;
            p.backend.forced_add(&id).await?;
            p.close_watch_wake.notify_one();
            Ok(())
        }
    }
}

/// Tempo's close grace period (seconds): dates a request from its grace end.
const GRACE: u64 = 900;

/// Records a close request on a channel we hold (no-op for others): `closing` (so no voucher
/// is accepted any more, whatever a stale chain read says), the grace end, and the index.
pub(crate) async fn request(
    p: &Payments,
    id: &str,
    grace_end: u64,
) -> Result<(), VerificationError> {
    let Some(record) = p.backend.get(id).await? else {
        return Ok(());
    };
    if record.state.finalized {
        return Ok(());
    }
    let fresh = record.forced_close.as_ref().is_none_or(|f| f.cancelled);
    if fresh {
        p.backend
            .update(
                id,
                Box::new(move |prev| {
                    let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                    if r.forced_close.as_ref().is_none_or(|f| f.cancelled) {
                        r.forced_close = Some(ForcedClose {
                            grace_end,
                            captured: None,
                            write_off_ask: None,
                            // A write-off given back after an earlier, cancelled request stays
                            // given back; a new request starts its own.
                            written_off: None,
                            restored: false,
                            cancelled: false,
                        });
                    }
                    r.state.closing = true;
                    r.state.close_requested_at = r
                        .state
                        .close_requested_at
                        .max(grace_end.saturating_sub(GRACE));
                    Ok(Update {
                        record: r,
                        credits: Vec::new(),
                    })
                }),
            )
            .await?;
        p.metrics.close_requests.inc();
        tracing::warn!(channel = %id, account = %record.account, grace_end, "the payer requested a close on chain: capturing the accepted vouchers");
    }
    p.backend.forced_add(id).await?;
    p.close_watch_wake.notify_one();
    Ok(())
}

/// Drives one channel on the index towards captured, written off or closed.
async fn handle(p: &Payments, id: &str) -> Result<(), String> {
    let Some(record) = p.backend.get(id).await.map_err(|e| e.message)? else {
        p.backend.forced_remove(id).await.map_err(|e| e.message)?;
        return Ok(());
    };
    if record.state.finalized {
        p.backend.forced_remove(id).await.map_err(|e| e.message)?;
        return Ok(());
    }
    let high = record.state.highest_voucher_amount;
    if let Some(settled) = record.closed_on_chain {
        // Gone on chain, with what we got known from the event: the rest is unbacked.
        let settled = settled.max(record.state.settled_on_chain);
        if high > settled {
            write_off(p, &record, high - settled).await?;
        }
        finish(p, id).await?;
        tracing::info!(channel = %id, settled, "channel gone on chain; books closed");
        return Ok(());
    }
    let channel: B256 = id.parse().map_err(|_| format!("bad channel id {id}"))?;
    if let Ok(t) = p.chain.now().await {
        p.chain_clock.observe(t);
    }
    match p.chain.channel(channel).await {
        // Gone, but its `ChannelClosed` event (which says what we got) is not read yet: the
        // next round's scan brings it.
        Ok(oc) if oc.deposit == 0 => return Ok(()),
        Ok(oc) if oc.close_requested_at == 0 => {
            if record.forced_close.as_ref().is_some_and(|f| !f.cancelled) {
                cancelled(p, id, oc.settled).await?;
            }
            p.backend.forced_remove(id).await.map_err(|e| e.message)?;
            return Ok(());
        }
        Ok(oc) => {
            let settled = oc.settled.max(record.state.settled_on_chain);
            if settled >= high {
                captured(p, id, settled, None).await?;
                return Ok(());
            }
            match capture(p, &record, high).await {
                Ok(op) => {
                    captured(p, id, high, Some(op)).await?;
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(channel = %id, error = %e, "capture of the highest voucher failed");
                }
            }
        }
        Err(e) => {
            p.metrics.chain_op("read", false);
            tracing::warn!(channel = %id, error = %e, "cannot read a channel with a close request");
        }
    }
    // Not captured (yet). From the point where the payer could withdraw first, the credit the
    // voucher backed is written off; capturing goes on, and gives it back if it lands.
    let Some(fc) = record.forced_close.as_ref() else {
        return Ok(());
    };
    let deadline = fc
        .grace_end
        .saturating_sub(p.cfg.write_off_margin.as_secs());
    if p.chain_clock.now() >= deadline && fc.written_off.is_none() {
        let settled = record.state.settled_on_chain;
        if high > settled {
            write_off(p, &record, high - settled).await?;
        }
    }
    Ok(())
}

/// `settle(highest voucher)`: captures every accepted voucher.
async fn capture(p: &Payments, record: &ChannelRecord, high: u128) -> Result<ChainOp, String> {
    let descriptor = record
        .descriptor
        .clone()
        .ok_or("no descriptor kept for this channel")?;
    let sig = record
        .vouchers
        .iter()
        .rev()
        .find(|v| v.cumulative == high)
        .map(|v| v.signature.clone())
        .or_else(|| record.state.highest_voucher_signature.clone())
        .ok_or("no signature kept for the highest voucher")?;
    match p.chain.settle(&descriptor, high, &sig).await {
        Ok(tx) => {
            p.metrics.chain_op("settle", true);
            tracing::info!(channel = %record.state.channel_id, cumulative = high, tx = %format!("{tx:#x}"), "captured the highest voucher of a channel closing on chain");
            Ok(ChainOp {
                kind: "capture".into(),
                cumulative: high,
                settled: high,
                tx_hash: format!("{tx:#x}"),
                at_ms: now_ms(),
            })
        }
        Err(e) => {
            p.metrics.chain_op("settle", false);
            Err(e.to_string())
        }
    }
}

/// Records a capture; gives back a write-off made before it landed.
async fn captured(
    p: &Payments,
    id: &str,
    settled: u128,
    op: Option<ChainOp>,
) -> Result<(), String> {
    p.backend
        .update(
            id,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                r.state.settled_on_chain = r.state.settled_on_chain.max(settled);
                if let Some(op) = op {
                    r.chain_ops.push(op);
                }
                let mut credits = Vec::new();
                if let Some(f) = r.forced_close.as_mut() {
                    f.captured = Some(settled);
                    credits.extend(restore(f, &r.account, &r.state.channel_id));
                }
                Ok(Update { record: r, credits })
            }),
        )
        .await
        .map_err(|e| e.message)?;
    p.backend.forced_remove(id).await.map_err(|e| e.message)?;
    let _ = p.drain_credits().await;
    Ok(())
}

/// The payer cancelled the close (a top-up): the channel lives on, vouchers are accepted again.
async fn cancelled(p: &Payments, id: &str, settled: u128) -> Result<(), String> {
    p.backend
        .update(
            id,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                r.state.settled_on_chain = r.state.settled_on_chain.max(settled);
                let mut credits = Vec::new();
                if let Some(f) = r.forced_close.as_mut() {
                    f.cancelled = true;
                    credits.extend(restore(f, &r.account, &r.state.channel_id));
                    // A cooperative close in progress keeps the channel closing.
                    if r.close.is_none() {
                        r.state.closing = false;
                    }
                    r.state.close_requested_at = 0;
                }
                Ok(Update { record: r, credits })
            }),
        )
        .await
        .map_err(|e| e.message)?;
    tracing::info!(channel = %id, "the payer cancelled the close request");
    let _ = p.drain_credits().await;
    Ok(())
}

/// The pending credit that gives a write-off back, once (the voucher is backed again).
fn restore(f: &mut ForcedClose, account: &str, id: &str) -> Option<PendingCredit> {
    let taken = f.written_off.filter(|t| *t > 0 && !f.restored)?;
    f.restored = true;
    Some(PendingCredit {
        key: format!("mpp-writeoff-undo:{id}:{}", f.grace_end),
        account: account.to_owned(),
        picos: taken,
        reverses: None,
    })
}

/// Writes off `unbacked` base units of credit (once per channel: the ask is fixed first).
pub(crate) async fn write_off(
    p: &Payments,
    record: &ChannelRecord,
    unbacked: u128,
) -> Result<(), String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    if record
        .forced_close
        .as_ref()
        .is_some_and(|f| f.written_off.is_some())
    {
        return Ok(());
    }
    let mut want = base_to_picos(unbacked).unwrap_or(tollgate_metering::MAX_OP_AMOUNT);
    // A cooperative close withdrew the unused credit already (the same idempotent charge:
    // applied now if it had not landed): only what is left is written off.
    if let Some(ask) = record.close.as_ref().and_then(|c| c.refund_ask_picos)
        && ask > 0
    {
        let taken = p
            .money
            .charge(&record.account, &format!("mpp-close:{id}"), ask, true)
            .await
            .map_err(|e| format!("money store: {e}"))?
            .taken;
        want = want.saturating_sub(taken);
    }
    let want = want.min(tollgate_metering::MAX_OP_AMOUNT);
    if want <= 0 {
        return Ok(());
    }
    let ask = p
        .backend
        .update(
            &id,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                let f = r.forced_close.get_or_insert(ForcedClose {
                    grace_end: 0,
                    captured: None,
                    write_off_ask: None,
                    written_off: None,
                    restored: false,
                    cancelled: false,
                });
                if f.write_off_ask.is_none() {
                    f.write_off_ask = Some(want);
                }
                Ok(Update {
                    record: r,
                    credits: Vec::new(),
                })
            }),
        )
        .await
        .map_err(|e| e.message)?
        .forced_close
        .and_then(|f| f.write_off_ask)
        .unwrap_or(want);
    // One write-off per close request (a payer may request, cancel and request again).
    let cycle = record.forced_close.as_ref().map_or(0, |f| f.grace_end);
    let taken = p
        .money
        .write_off(&record.account, &format!("mpp-writeoff:{id}:{cycle}"), ask)
        .await
        .map_err(|e| format!("money store: {e}"))?
        .taken;
    p.backend
        .update(
            &id,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                if let Some(f) = r.forced_close.as_mut()
                    && f.written_off.is_none()
                {
                    f.written_off = Some(taken);
                }
                Ok(Update {
                    record: r,
                    credits: Vec::new(),
                })
            }),
        )
        .await
        .map_err(|e| e.message)?;
    p.metrics.written_off(taken);
    tracing::error!(channel = %id, account = %record.account, asked = ask, taken, "voucher not captured before the payer could withdraw: unbacked credit written off");
    Ok(())
}

/// The channel is gone on chain and our books are settled: finalized, off the index.
async fn finish(p: &Payments, id: &str) -> Result<(), String> {
    p.backend
        .update(
            id,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                r.state.finalized = true;
                r.state.closing = false;
                Ok(Update {
                    record: r,
                    credits: Vec::new(),
                })
            }),
        )
        .await
        .map_err(|e| e.message)?;
    p.backend.forced_remove(id).await.map_err(|e| e.message)
}

/// The chain's clock as last read, carried forward by this node's monotonic clock (so a
/// grace period still ends while the chain cannot be reached).
#[derive(Default)]
pub struct ChainClock {
    seen: std::sync::Mutex<Option<(u64, Instant)>>,
}

impl ChainClock {
    pub fn observe(&self, chain_s: u64) {
        if let Ok(mut g) = self.seen.lock() {
            *g = Some((chain_s, Instant::now()));
        }
    }

    /// Chain time now (Unix seconds); the system clock until the chain was read once.
    pub fn now(&self) -> u64 {
        let seen = self.seen.lock().ok().and_then(|g| *g);
        match seen {
            Some((t, at)) => t.saturating_add(at.elapsed().as_secs()),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}
