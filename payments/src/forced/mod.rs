//! Closes the payer forces on chain. A payer may `requestClose` a channel and, once the grace
//! period is over, `withdraw` whatever the payee has not settled. Every voucher we accepted was
//! credited to the payer's account, so a close request makes that credit unbacked unless the
//! payee captures the highest voucher before the grace period ends.
//!
//! The watcher, each round (and at once when a voucher accept finds a close request):
//! 1. reads the escrow's events for channels paying us since its block cursor, re-reading the
//!    last [`OVERLAP`] blocks (a node behind the one that told us the head may have answered
//!    short), one `eth_getLogs` per range however many channels there are, halving the range
//!    while a node refuses it;
//! 2. applies them in log order: a request marks the channel `closing` (no more vouchers) and
//!    puts it on a small index; a cancellation ends only a request before it in the log; a
//!    close records what the payee got. Reading a channel's state may start a request (a newer
//!    one is real: a lagging node shows older state, never newer) but never ends one;
//! 3. for each indexed channel, settles the highest accepted voucher in full;
//! 4. if that has not landed by `grace_end − write_off_margin` (chain time), writes the credit
//!    that voucher no longer backs off the account (idempotent, pinned amount, ledger
//!    `write_off`), and keeps trying to capture: a capture that lands later, or a cancellation,
//!    gives it back (a reversal of the write-off's key, queued with the record);
//! 5. once the channel is gone on chain, trues the books up to what the payee got: a further
//!    write-off if the credit left unbacked is larger, a give-back if it is smaller.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::B256;
use mpp::VerificationError;

use crate::Payments;
use crate::chain::{ChainError, ChannelEvent, EVENT_RANGE, OnChain};
use crate::channels::{ChainOp, ChannelRecord, ForcedClose};
use crate::close::now_ms;

mod books;
mod case;
mod clock;

use books::{close_books, write_off};
pub(crate) use case::request;
use case::{cancel, captured, closed, finish, unindex};
pub use clock::ChainClock;

/// Where the event scan resumes (a block number), in the channel store's meta values.
pub(crate) const CURSOR: &str = "close-watch:next-block";

/// Blocks re-read below the cursor every round. Events are applied idempotently and in order,
/// so reading one twice changes nothing; missing one (a load-balanced node answering
/// `eth_getLogs` from behind the head another node reported) would.
pub const OVERLAP: u64 = 64;

/// Ranges one round reads at most (a watcher far behind catches up over several rounds).
const MAX_RANGES: usize = 20;

/// Rounds a channel may read as gone before its `ChannelClosed` event is looked up directly.
const GONE_LOOKUP: u32 = 3;

/// How long, and over how many rounds, a channel may read as gone with its close event not
/// found before its books are closed on what we know we captured (the conservative reading:
/// anything more the payee got is given back by no one, so an operator hears of it).
const GONE_GIVE_UP: (u32, Duration) = (10, Duration::from_secs(600));

/// A chain read that takes longer than this is a failed read (each JSON-RPC call is bounded by
/// `payments.chain_timeout_seconds` too; this bounds a whole read of several calls, so a
/// write-off never waits behind a stalled load balancer).
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// A settlement: gas price, clock, send, and up to 30 s for the receipt.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);

async fn within<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, ChainError>>,
) -> Result<T, ChainError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(ChainError::Unavailable(format!("no answer in {limit:?}"))))
}

/// The watcher's memory between rounds (per process; everything that matters is in the store).
pub struct WatchState {
    /// The chain's clock as last read.
    pub(crate) clock: ChainClock,
    /// The `eth_getLogs` range the node accepted last.
    span: AtomicU64,
    /// Channels read as gone without their close event: rounds, since when, and where the
    /// lookup by channel goes on.
    gone: Mutex<HashMap<String, Gone>>,
}

#[derive(Clone, Copy)]
struct Gone {
    rounds: u32,
    since: Instant,
    lookup_from: Option<u64>,
}

impl Default for WatchState {
    fn default() -> Self {
        WatchState {
            clock: ChainClock::default(),
            span: AtomicU64::new(EVENT_RANGE),
            gone: Mutex::new(HashMap::new()),
        }
    }
}

impl WatchState {
    fn gone_round(&self, id: &str) -> Gone {
        let Ok(mut g) = self.gone.lock() else {
            return Gone {
                rounds: 0,
                since: Instant::now(),
                lookup_from: None,
            };
        };
        let e = g.entry(id.to_owned()).or_insert(Gone {
            rounds: 0,
            since: Instant::now(),
            lookup_from: None,
        });
        e.rounds += 1;
        *e
    }

    fn lookup_from(&self, id: &str, from: u64) {
        if let Ok(mut g) = self.gone.lock()
            && let Some(e) = g.get_mut(id)
        {
            e.lookup_from = Some(from);
        }
    }

    fn not_gone(&self, id: &str) {
        if let Ok(mut g) = self.gone.lock() {
            g.remove(id);
        }
    }
}

/// One watcher round: new events; then the write-offs that are due, for every open case at
/// once (they need no chain, and must not wait behind slow captures); then captures and closes.
pub(crate) async fn watch(p: &Payments) -> Result<(), String> {
    if let Ok(t) = within(READ_TIMEOUT, p.chain.now()).await {
        p.watch.clock.observe(t);
    }
    let scanned = scan(p).await;
    let ids = p.backend.forced_ids().await.map_err(|e| e.message)?;
    for id in &ids {
        if let Err(e) = write_off_if_due(p, id).await {
            tracing::warn!(channel = %id, error = %e, "write-off not done yet; retried next round");
        }
    }
    for id in &ids {
        if let Err(e) = handle(p, id).await {
            tracing::warn!(channel = %id, error = %e, "forced close not resolved yet; retried next round");
        }
    }
    scanned
}

/// From `grace_end − write_off_margin` on (chain time), the credit an uncaptured voucher backed
/// is written off; retried every round until the write-off is recorded.
async fn write_off_if_due(p: &Payments, id: &str) -> Result<(), String> {
    let Some(record) = p.backend.get(id).await.map_err(|e| e.message)? else {
        return Ok(());
    };
    if record.state.finalized || record.closed_on_chain.is_some() {
        return Ok(());
    }
    let Some(fc) = record.forced_close.as_ref().filter(|f| f.active()) else {
        return Ok(());
    };
    let deadline = fc
        .grace_end
        .saturating_sub(p.cfg.write_off_margin.as_secs());
    if p.watch.clock.now() >= deadline && fc.written_off.is_none() {
        let high = record.state.highest_voucher_amount;
        let settled = record.state.settled_on_chain;
        if high > settled {
            write_off(p, &record, high - settled).await?;
        }
    }
    Ok(())
}

fn chain_failed<'a>(p: &'a Payments, what: &'static str) -> impl Fn(ChainError) -> String + 'a {
    move |e| {
        p.metrics.chain_op(what, false);
        format!("chain: {e}")
    }
}

/// Reads escrow events from the cursor (less the overlap) to the head, in ranges.
async fn scan(p: &Payments) -> Result<(), String> {
    let latest = within(READ_TIMEOUT, p.chain.latest_block())
        .await
        .map_err(chain_failed(p, "events"))?;
    let cursor = match p.backend.meta_get(CURSOR).await.map_err(|e| e.message)? {
        Some(v) => v.parse::<u64>().map_err(|_| format!("bad cursor {v:?}"))?,
        // First run: look back far enough to see every close whose grace period may still
        // run (accepting a voucher also finds a close request, for older ones).
        None => latest.saturating_sub(p.cfg.close_watch_lookback_blocks),
    };
    // The overlap is a few ranges at most, so a node that only takes small ranges still
    // leaves the round its budget for new blocks.
    let span = p.watch.span.load(Ordering::Relaxed).max(1);
    let mut from = cursor.saturating_sub(OVERLAP.min(span.saturating_mul(4)));
    let mut ranges = 0;
    while from <= latest && (from < cursor || ranges < MAX_RANGES) {
        let (events, to) = events_in(p, from, latest, None).await?;
        for ev in events {
            apply_event(p, ev).await.map_err(|e| e.message)?;
        }
        from = to + 1;
        if from > cursor {
            ranges += 1;
            // Another node may have moved it further meanwhile: the next round then reads a
            // few blocks twice, which changes nothing.
            p.backend
                .meta_set(CURSOR, &from.to_string())
                .await
                .map_err(|e| e.message)?;
        }
    }
    Ok(())
}

/// One range of events from `from` (as many blocks as the node accepts, up to `to`): the
/// events and the last block read.
async fn events_in(
    p: &Payments,
    from: u64,
    to: u64,
    channel: Option<B256>,
) -> Result<(Vec<ChannelEvent>, u64), String> {
    loop {
        let span = p.watch.span.load(Ordering::Relaxed).max(1);
        let end = to.min(from.saturating_add(span - 1));
        match within(READ_TIMEOUT, p.chain.channel_events(from, end, channel)).await {
            Ok(events) => {
                p.metrics.chain_op("events", true);
                // A refusal may have been a passing one (a rate limit, a node behind the head):
                // ranges grow back while they are accepted.
                if span < EVENT_RANGE && end - from + 1 == span {
                    p.watch
                        .span
                        .store(span.saturating_mul(2).min(EVENT_RANGE), Ordering::Relaxed);
                }
                return Ok((events, end));
            }
            Err(ChainError::Refused(e)) if span > 1 => {
                // The node caps ranges (or results): ask for half, and remember it.
                let half = (end - from + 1).div_ceil(2).max(1);
                p.watch.span.store(half, Ordering::Relaxed);
                tracing::info!(blocks = half, error = %e, "the node refused an event range; asking for smaller ones");
            }
            Err(e) => return Err(chain_failed(p, "events")(e)),
        }
    }
}

async fn apply_event(p: &Payments, ev: ChannelEvent) -> Result<(), VerificationError> {
    let id = format!("{:#x}", ev.channel());
    match ev {
        ChannelEvent::CloseRequested { grace_end, pos, .. } => {
            request(p, &id, grace_end, Some(pos)).await.map(|_| ())
        }
        ChannelEvent::CloseCancelled { pos, .. } => cancel(p, &id, pos).await,
        ChannelEvent::Closed {
            settled_to_payee, ..
        } => closed(p, &id, settled_to_payee).await,
    }
}

/// Drives one channel on the index towards captured, written off or closed.
async fn handle(p: &Payments, id: &str) -> Result<(), String> {
    let Some(mut record) = p.backend.get(id).await.map_err(|e| e.message)? else {
        p.backend.forced_remove(id).await.map_err(|e| e.message)?;
        return Ok(());
    };
    if record.state.finalized {
        p.watch.not_gone(id);
        p.backend.forced_remove(id).await.map_err(|e| e.message)?;
        return Ok(());
    }
    if let Some(settled) = record.closed_on_chain {
        close_books(p, &record, settled).await?;
        finish(p, id).await?;
        p.watch.not_gone(id);
        tracing::info!(channel = %id, settled, "channel gone on chain; books closed");
        return Ok(());
    }
    let channel: B256 = id.parse().map_err(|_| format!("bad channel id {id}"))?;
    match within(READ_TIMEOUT, p.chain.channel(channel)).await {
        Ok(oc) if oc.deposit == 0 => gone(p, &record, channel).await?,
        Ok(oc) => {
            p.watch.not_gone(id);
            if oc.close_requested_at != 0 {
                let grace_end = oc
                    .close_requested_at
                    .saturating_add(p.cfg.close_grace.as_secs());
                request(p, id, grace_end, None)
                    .await
                    .map_err(|e| e.message)?;
                record = match p.backend.get(id).await.map_err(|e| e.message)? {
                    Some(r) => r,
                    None => return Ok(()),
                };
            }
            if !record
                .forced_close
                .as_ref()
                .is_some_and(ForcedClose::active)
            {
                // Cancelled or captured, and not requested again: nothing left to do.
                return unindex(p, id).await;
            }
            // Active, whatever this read says: a read showing no request may be a lagging node,
            // or a cancellation whose event is not read yet. Capturing settles both.
            if try_capture(p, &record, oc).await? {
                return Ok(());
            }
        }
        Err(e) => {
            p.metrics.chain_op("read", false);
            tracing::warn!(channel = %id, error = %e, "cannot read a channel with a close request");
        }
    }
    // Not captured (yet): the write-off may have fallen due while the capture was tried.
    write_off_if_due(p, id).await
}

/// Settles the highest voucher of an active forced close. True once every accepted voucher is
/// captured.
async fn try_capture(p: &Payments, record: &ChannelRecord, oc: OnChain) -> Result<bool, String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    let high = record.state.highest_voucher_amount;
    let settled = oc.settled.max(record.state.settled_on_chain);
    if settled >= high {
        captured(p, &id, settled, None).await?;
        return Ok(true);
    }
    match capture(p, record, high).await {
        Ok(op) => {
            captured(p, &id, high, Some(op)).await?;
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(channel = %id, error = %e, "capture of the highest voucher failed");
            Ok(false)
        }
    }
}

/// The channel reads as gone, and its `ChannelClosed` event (which says what we got) is not
/// read yet. The scan normally brings it next round; after a few rounds it is looked up by
/// channel, and after more the books are closed on what we know we captured.
async fn gone(p: &Payments, record: &ChannelRecord, channel: B256) -> Result<(), String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    let g = p.watch.gone_round(&id);
    if g.rounds >= GONE_LOOKUP {
        // A bounded part of the look-back per round, resumed next round.
        let latest = within(READ_TIMEOUT, p.chain.latest_block())
            .await
            .map_err(chain_failed(p, "events"))?;
        let mut from = g
            .lookup_from
            .unwrap_or_else(|| latest.saturating_sub(p.cfg.close_watch_lookback_blocks));
        for _ in 0..MAX_RANGES {
            if from > latest {
                break;
            }
            let (events, to) = events_in(p, from, latest, Some(channel)).await?;
            for ev in events {
                if let ChannelEvent::Closed {
                    settled_to_payee, ..
                } = ev
                {
                    closed(p, &id, settled_to_payee)
                        .await
                        .map_err(|e| e.message)?;
                    return Ok(());
                }
            }
            from = to + 1;
        }
        // Looked back all the way: start over next time (the event may land late).
        p.watch.lookup_from(
            &id,
            if from > latest {
                latest.saturating_sub(OVERLAP)
            } else {
                from
            },
        );
    }
    if g.rounds >= GONE_GIVE_UP.0 && g.since.elapsed() >= GONE_GIVE_UP.1 {
        let settled = record.state.settled_on_chain;
        tracing::error!(channel = %id, account = %record.account, settled, "channel gone on chain and its close event not found: closing its books on what we captured (anything else the payee got is not given back; check the channel on chain)");
        closed(p, &id, settled).await.map_err(|e| e.message)?;
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
    match within(SEND_TIMEOUT, p.chain.settle(&descriptor, high, &sig)).await {
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
