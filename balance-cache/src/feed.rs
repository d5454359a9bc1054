//! The change feed and statuses: what the store says about an account (a settle reply, a feed
//! change, a resync) applied to its slot, newest version only.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tollgate_metering::{FeedEvent, Status, Store};

use crate::cache::{BalanceCache, DIRTY, OVERDRAWN, REFILL, SHIFT, SUSPENDED, Slot};

/// Where a status comes from. Only this node's own settle reply may *set* the suspended flag:
/// it answered our request for a lease, so "nothing left" is confirmed for this node. The feed
/// may only clear it: `suspended` there means `available` touched zero, while other nodes may
/// still hand money back.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Reply,
    Feed,
}

/// Applies a status if its version is newer than the slot's.
pub(crate) fn apply_status(
    slot: &Slot,
    version: u64,
    status: Status,
    overdrawn: bool,
    source: Source,
) -> bool {
    let mut cur = slot.state.load(Ordering::Acquire);
    loop {
        // Our own reply at the version the feed already brought describes the same store state,
        // plus what only the reply knows (this node asked and got nothing): apply it. A settle
        // that grants nothing changes no version, so skipping it would leave the node asking
        // again and again until some later change, while requests wait.
        let seen = cur >> SHIFT;
        if seen > version || (seen == version && source == Source::Feed) {
            return false;
        }
        let susp = match (status, source) {
            (Status::Active, _) => 0,
            (Status::Suspended, Source::Reply) => SUSPENDED,
            (Status::Suspended, Source::Feed) => cur & SUSPENDED,
        };
        // "Nothing left for you" answers every refill asked for until now, including one a
        // request flagged while this reply was on its way. A stale flag would make this node
        // take the next top-up at its next tick, with no request waiting for it here, and hold
        // it (until `idle_return`) while the node that has the traffic answers 402.
        let flags = if source == Source::Reply && susp != 0 {
            cur & DIRTY
        } else {
            cur & (REFILL | DIRTY)
        };
        let over = if overdrawn { OVERDRAWN } else { 0 };
        let next = version << SHIFT | flags | susp | over;
        match slot
            .state
            .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return true,
            Err(now) => cur = now,
        }
    }
}

/// Applies one account change from the store (feed or resync) to its slot, if cached here;
/// true when the slot changed.
fn apply_change(cache: &BalanceCache, c: &tollgate_metering::AccountChange) -> bool {
    cache
        .map
        .with(&c.account, |_, slot| {
            apply_status(
                slot,
                c.version,
                c.status,
                c.available < -cache.cpu_debt_limit(),
                Source::Feed,
            )
        })
        .unwrap_or(false)
}

/// Applies the change feed: newer versions only; after a `Resync` (or lag), re-reads every
/// cached account from the store.
pub(crate) async fn follow_feed(
    cache: Arc<BalanceCache>,
    store: Arc<dyn Store>,
    mut rx: broadcast::Receiver<FeedEvent>,
    mut shutdown: watch::Receiver<bool>,
    lag: prometheus::Histogram,
) {
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = shutdown.changed() => return,
        };
        match ev {
            Ok(FeedEvent::Change(c)) => {
                // A resumed account gets its lease at its next request here (one store round
                // trip), not at once: every node asking at once would let a node with no traffic
                // for it take a small top-up and hold it until `idle_return`, while the node
                // that has the traffic answers 402.
                if apply_change(&cache, &c) {
                    cache.changed.notify_waiters();
                }
                // Store clock to this node's clock: exact on one machine; across machines it
                // also carries their clock offset (a negative lag counts as zero).
                if let Some(at) = c.at_us {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_micros() as u64);
                    lag.observe(now.saturating_sub(at) as f64 / 1e6);
                }
            }
            Ok(FeedEvent::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                let ids: Vec<String> = cache.map.keys();
                for chunk in ids.chunks(1000) {
                    // A missed resumption would keep a paid account at 402: retry until read.
                    let mut wait = Duration::from_millis(50);
                    let states = loop {
                        match store.account_changes(chunk).await {
                            Ok(states) => break states,
                            Err(e) => {
                                tracing::warn!(error = %e, "resync read failed; retrying");
                                tokio::select! {
                                    _ = tokio::time::sleep(wait) => {}
                                    _ = shutdown.changed() => return,
                                }
                                wait = (wait * 2).min(Duration::from_secs(2));
                            }
                        }
                    };
                    for c in states.into_iter().flatten() {
                        apply_change(&cache, &c);
                    }
                }
                cache.changed.notify_waiters();
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
