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
use crate::chain::{ChainError, ChannelEvent, EVENT_RANGE, EventPos, OnChain};
use crate::channels::{ChainOp, ChannelRecord, CloseBooks, ForcedClose, PendingCredit, Update};
use crate::close::now_ms;
use tollgate_metering::units::base_to_picos;

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

/// A chain read that takes longer than this is a failed read (the HTTP client has no timeout
/// of its own, and a write-off must not wait behind a stalled load balancer).
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

/// Records what the payee got once a channel is gone; `handle` closes the books on it.
async fn closed(p: &Payments, id: &str, settled_to_payee: u128) -> Result<(), VerificationError> {
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
                Box::new(move |prev| {
                    let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                    if r.closed_on_chain.is_none() {
                        r.closed_on_chain = Some(settled_to_payee);
                        r.state.settled_on_chain = r.state.settled_on_chain.max(settled_to_payee);
                    }
                    Ok(Update {
                        record: r,
                        credits: Vec::new(),
                    })
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
/// then on the books are trued up to what the payee got ([`close_books`]) and nothing else
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
    })
}

fn write_off_key(id: &str, cycle: u32) -> String {
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
                Box::new(move |prev| {
                    let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                    let mut credits = Vec::new();
                    if r.closed_on_chain.is_none()
                        && !r.state.finalized
                        && opens(r.forced_close.as_ref())
                    {
                        // A newer request means the last one ended: its write-off goes back
                        // (the new cycle writes off on its own, if it must).
                        credits.extend(restore(&mut r));
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
                    Ok(Update { record: r, credits })
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
async fn cancel(p: &Payments, id: &str, pos: EventPos) -> Result<(), VerificationError> {
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
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                let mut credits = Vec::new();
                if r.closed_on_chain.is_none() && ends(r.forced_close.as_ref()) {
                    credits.extend(restore(&mut r));
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
                Ok(Update { record: r, credits })
            }),
        )
        .await?;
    tracing::info!(channel = %id, "the payer cancelled the close request");
    let _ = p.drain_credits().await;
    p.backend.forced_add(id).await
}

/// Takes a channel off the index, then puts it back if a new case opened meanwhile (the
/// decision to remove was made on an older read).
async fn unindex(p: &Payments, id: &str) -> Result<(), String> {
    p.backend.forced_remove(id).await.map_err(|e| e.message)?;
    if let Some(r) = p.backend.get(id).await.map_err(|e| e.message)?
        && !r.state.finalized
        && (r.closed_on_chain.is_some() || r.forced_close.as_ref().is_some_and(ForcedClose::active))
    {
        p.backend.forced_add(id).await.map_err(|e| e.message)?;
    }
    Ok(())
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
                let covered = r.state.settled_on_chain >= r.state.highest_voucher_amount;
                if covered
                    && r.closed_on_chain.is_none()
                    && r.forced_close.as_ref().is_some_and(ForcedClose::active)
                {
                    credits.extend(restore(&mut r));
                    let at = r.state.settled_on_chain;
                    if let Some(f) = r.forced_close.as_mut() {
                        f.captured = Some(at);
                    }
                }
                Ok(Update { record: r, credits })
            }),
        )
        .await
        .map_err(|e| e.message)?;
    unindex(p, id).await?;
    let _ = p.drain_credits().await;
    Ok(())
}

/// What a cooperative close already withdrew from the account (p$): the same idempotent
/// charge, applied now if it had not landed.
async fn close_refund_taken(p: &Payments, record: &ChannelRecord) -> Result<i64, String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    match record.close.as_ref().and_then(|c| c.refund_ask_picos) {
        Some(ask) if ask > 0 => Ok(p
            .money
            .charge(&record.account, &format!("mpp-close:{id}"), ask, true)
            .await
            .map_err(|e| format!("money store: {e}"))?
            .taken),
        _ => Ok(0),
    }
}

/// Writes off the credit `unbacked` base units backed, for the channel's current close request
/// (once per request: the amount is pinned first, and the key carries the request's cycle).
async fn write_off(p: &Payments, record: &ChannelRecord, unbacked: u128) -> Result<(), String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    let Some(cycle) = record
        .forced_close
        .as_ref()
        .filter(|f| f.active())
        .map(|f| f.cycle)
    else {
        return Ok(());
    };
    let want = base_to_picos(unbacked)
        .unwrap_or(tollgate_metering::MAX_OP_AMOUNT)
        .saturating_sub(close_refund_taken(p, record).await?)
        .min(tollgate_metering::MAX_OP_AMOUNT);
    if want <= 0 {
        return Ok(());
    }
    // Pinned only while this request is still unresolved: a write-off must never start for a
    // request already captured or cancelled (nothing would give it back).
    let pinned = p
        .backend
        .update(
            &id,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                let open = r.closed_on_chain.is_none() && !r.state.finalized;
                if let Some(f) = r.forced_close.as_mut()
                    && open
                    && f.cycle == cycle
                    && f.active()
                    && f.write_off_ask.is_none()
                {
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
        .filter(|f| f.cycle == cycle)
        .and_then(|f| f.write_off_ask);
    let Some(ask) = pinned else {
        return Ok(());
    };
    let taken = p
        .money
        .write_off(&record.account, &write_off_key(&id, cycle), ask)
        .await
        .map_err(|e| format!("money store: {e}"))?
        .taken;
    p.backend
        .update(
            &id,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                if let Some(f) = r.forced_close.as_mut()
                    && f.cycle == cycle
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

/// The channel is gone and the payee got `settled` in all: what the account was credited above
/// that is unbacked for good. A write-off of the current request counts towards it; the rest is
/// written off now, or what was written off too much is given back.
async fn close_books(p: &Payments, record: &ChannelRecord, settled: u128) -> Result<(), String> {
    let id = record.state.channel_id.to_ascii_lowercase();
    let high = record.state.highest_voucher_amount;
    let unbacked = base_to_picos(high.saturating_sub(settled))
        .unwrap_or(tollgate_metering::MAX_OP_AMOUNT)
        .saturating_sub(close_refund_taken(p, record).await?)
        .max(0);
    let f = record.forced_close.clone().unwrap_or_default();
    // A write-off of the last request that stands (not given back) is part of what is due;
    // it must be known before the difference is.
    let mut counted = 0;
    if let Some(ask) = f.write_off_ask.filter(|_| !f.restored) {
        counted = match f.written_off {
            Some(t) => t,
            None => {
                p.money
                    .write_off(&record.account, &write_off_key(&id, f.cycle), ask)
                    .await
                    .map_err(|e| format!("money store: {e}"))?
                    .taken
            }
        };
    }
    let books = record.close_books.clone().unwrap_or_default();
    if unbacked > counted && books.given_back.is_none() {
        let want = (unbacked - counted).min(tollgate_metering::MAX_OP_AMOUNT);
        let ask = pin_books(p, &id, move |b| {
            b.write_off_ask.get_or_insert(want);
        })
        .await?
        .write_off_ask
        .unwrap_or(want);
        let taken = p
            .money
            .write_off(&record.account, &format!("mpp-writeoff:{id}:final"), ask)
            .await
            .map_err(|e| format!("money store: {e}"))?
            .taken;
        if taken > 0 {
            p.metrics.written_off(taken);
            tracing::error!(channel = %id, account = %record.account, asked = ask, taken, "channel gone with credit above what the payee got: written off");
        }
    } else if counted > unbacked && books.write_off_ask.is_none() && books.given_back.is_none() {
        let back = counted - unbacked;
        let account = record.account.clone();
        let key = format!("mpp-writeoff-trueup:{id}");
        p.backend
            .update(
                &id,
                Box::new(move |prev| {
                    let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                    let b = r.close_books.get_or_insert_with(CloseBooks::default);
                    let mut credits = Vec::new();
                    if b.given_back.is_none() && b.write_off_ask.is_none() {
                        b.given_back = Some(back);
                        credits.push(PendingCredit {
                            key,
                            account,
                            picos: back,
                            reverses: None,
                        });
                    }
                    Ok(Update { record: r, credits })
                }),
            )
            .await
            .map_err(|e| e.message)?;
        tracing::info!(channel = %id, picos = back, "the payee got more than was known when the credit was written off: the difference is given back");
        p.drain_credits().await.map_err(|e| e.message)?;
    }
    Ok(())
}

async fn pin_books(
    p: &Payments,
    id: &str,
    f: impl FnOnce(&mut CloseBooks) + Send + 'static,
) -> Result<CloseBooks, String> {
    let r = p
        .backend
        .update(
            id,
            Box::new(move |prev| {
                let mut r = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
                f(r.close_books.get_or_insert_with(CloseBooks::default));
                Ok(Update {
                    record: r,
                    credits: Vec::new(),
                })
            }),
        )
        .await
        .map_err(|e| e.message)?;
    Ok(r.close_books.unwrap_or_default())
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
/// grace period still ends while the chain cannot be reached), and never behind the system
/// clock: a node that reports an old head must not push a write-off past the moment the payer
/// can withdraw.
#[derive(Default)]
pub struct ChainClock {
    seen: std::sync::Mutex<Option<(u64, Instant)>>,
}

impl ChainClock {
    pub fn observe(&self, chain_s: u64) {
        if let Ok(mut g) = self.seen.lock() {
            let keep = g.is_some_and(|(t, at)| t.saturating_add(at.elapsed().as_secs()) > chain_s);
            if !keep {
                *g = Some((chain_s, Instant::now()));
            }
        }
    }

    /// Chain time now (Unix seconds).
    pub fn now(&self) -> u64 {
        let system = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let seen = self.seen.lock().ok().and_then(|g| *g);
        match seen {
            Some((t, at)) => t.saturating_add(at.elapsed().as_secs()).max(system),
            None => system,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn system_now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    #[test]
    fn the_chain_clock_is_never_behind_the_system_clock_nor_goes_back() {
        let c = ChainClock::default();
        // A node reporting an old head does not hold the write-off deadline back.
        c.observe(1_000);
        assert!(c.now() >= system_now());
        // A chain ahead of us (its clock moved forward) is followed...
        let ahead = system_now() + 3_600;
        c.observe(ahead);
        assert!(c.now() >= ahead);
        // ...and an older reading after it changes nothing.
        c.observe(ahead - 600);
        assert!(c.now() >= ahead);
    }
}
