//! The node's background half: cuts usage into settle batches every `settle_interval` (or at
//! once when a slot asks for a refill), journals each batch before sending it, applies the
//! store's lease grants to the slots, and follows the account change feed.
//!
//! Only this task talks to the store; the request path never waits on the network.
//!
//! Over 600 lines on purpose: the settle round (cut, journal, resend, send, apply, start a new
//! incarnation) is one state machine over the journal and the leases; its invariants are checked
//! more easily in one file than across several.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tollgate_metering::{
    Incarnation, Journal, LeaseGrant, SettleBatch, SettleEntry, SettleError, Status, Store,
    StoreError, Usage,
};

use crate::cache::{BalanceCache, DIRTY, REFILL, Slot};
use crate::metrics::CacheMetrics;
use crate::slots::SlotId;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Stable name of this node (its journal and its leases are keyed by it).
    pub node_id: String,
    /// How often usage is settled (a refill request settles at once).
    pub settle_interval: Duration,
    /// Lease lifetime on the store's clock; must equal the store's.
    pub lease_ttl: Duration,
    /// Stop spending leases this long before the store would expire them.
    pub lease_margin: Duration,
    /// Smallest and largest lease asked for (p$).
    pub min_lease: i64,
    pub max_lease: i64,
    /// A lease unused this long goes back to the account.
    pub idle_return: Duration,
    pub journal_path: PathBuf,
    /// Entries per settle batch. Each line costs ≈ 26 µs inside Redis (docs/benchmarks.md), and
    /// Redis runs one script at a time: 100 lines keep a settle under ≈ 3 ms.
    pub max_batch: usize,
    /// CPU (ms at the CPU price) an account may run past its lease here once it cannot pay,
    /// before the runtime interrupts it ([`BalanceCache::cpu_unpaid`]).
    pub cpu_debt_limit_ms: u64,
    /// How long the closing round keeps trying an unreachable store before it leaves the rest
    /// to the journal (the next start sends it). Below the caller's own stop timeout.
    pub closing_budget: Duration,
    /// Fault injection for crash tests (feature `testing`): stop (forever) right after
    /// journaling a batch, before sending it, so a test can `kill -9` the process there.
    #[cfg(feature = "testing")]
    pub hang_after_journal: bool,
}

impl AgentConfig {
    pub fn new(node_id: &str, journal_path: PathBuf) -> Self {
        AgentConfig {
            node_id: node_id.to_owned(),
            settle_interval: Duration::from_millis(50),
            lease_ttl: Duration::from_secs(10),
            lease_margin: Duration::from_secs(2),
            // 100 requests at the default price, and $0.50.
            min_lease: 50_000_000,
            max_lease: 500_000_000_000,
            idle_return: Duration::from_secs(5),
            journal_path,
            max_batch: 100,
            cpu_debt_limit_ms: crate::cache::DEFAULT_CPU_DEBT_MS,
            closing_budget: Duration::from_secs(4),
            #[cfg(feature = "testing")]
            hang_after_journal: false,
        }
    }
}

impl AgentConfig {
    /// Refuses settings that cannot work (they would panic or never refresh a lease in time).
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |m: &str| Err(AgentError::Config(m.to_owned()));
        if self.min_lease < 1 || self.min_lease > self.max_lease {
            return bad("min_lease must be at least 1 p$ and at most max_lease");
        }
        if self.max_lease > tollgate_metering::MAX_OP_AMOUNT {
            return bad("max_lease is above the largest single store operation");
        }
        if self.lease_margin.is_zero() || self.lease_margin >= self.lease_ttl {
            return bad("lease_margin must be above 0 and below lease_ttl");
        }
        if self.settle_interval.is_zero() || self.settle_interval >= self.lease_margin / 2 {
            return bad("settle_interval must be above 0 and below half of lease_margin");
        }
        if self.max_batch == 0 || self.max_batch > tollgate_metering::MAX_BATCH_ENTRIES {
            return bad("max_batch must be 1..=1000");
        }
        Ok(())
    }

    /// A lease is refreshed when its last settle is older than this, so that even after one
    /// more settle interval it is younger than `lease_ttl − lease_margin`.
    fn refresh_after(&self) -> Duration {
        self.lease_margin / 2
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent configuration: {0}")]
    Config(String),
    #[error("stopped while the store was unreachable; the journal keeps the batch")]
    Interrupted,
    #[error("{0}")]
    Journal(#[from] tollgate_metering::JournalError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("settle refused: {0}")]
    Settle(#[from] SettleError),
}

/// What the agent remembers of an account beyond its slot.
#[derive(Default)]
struct Known {
    /// This node's outstanding lease as the store last reported it.
    lease: i64,
    /// Cost settled per interval, smoothed (p$), to size the next lease.
    rate: i64,
    /// When the batch that last refreshed this lease was *first sent*: the store's expiry is
    /// counted from no earlier than that.
    last_settled: Option<Instant>,
}

pub struct Agent {
    cache: Arc<BalanceCache>,
    store: Arc<dyn Store>,
    cfg: AgentConfig,
    inc: Incarnation,
    journal: Journal,
    next_seq: u64,
    known: HashMap<Box<str>, Known>,
    metrics: CacheMetrics,
    shutdown: Option<watch::Receiver<bool>>,
    /// For logging the moment spending stops (and starts again).
    leases_were_valid: bool,
    /// When the book's marks were last read (see `release_booked`).
    marks_read: Option<Instant>,
    /// The store keeps no ledger generation (embedded): nothing to record or keep.
    generation_absent: bool,
    /// The store's count of lost settle parts when last looked at (see `renew_if_lost`).
    lost_seen: u64,
    /// The store lost what this incarnation settled (a shard's acknowledged parts, or a
    /// stream's data): begin a new one once nothing is pending.
    renew: bool,
    renewed_at: Option<Instant>,
}

impl Agent {
    /// Replays what the previous incarnation journaled but never had acknowledged, releases its
    /// leases, and starts a new incarnation.
    pub async fn start(
        cache: Arc<BalanceCache>,
        store: Arc<dyn Store>,
        cfg: AgentConfig,
        metrics: CacheMetrics,
    ) -> Result<Agent, AgentError> {
        cfg.validate()?;
        crate::clock::ensure_running().map_err(AgentError::Config)?;
        cache.set_cpu_debt_limit_ms(cfg.cpu_debt_limit_ms);
        let mut journal = Journal::open(&cfg.journal_path)?;
        let pending: Vec<SettleBatch> = journal.pending().to_vec();
        if !pending.is_empty() {
            tracing::info!(batches = pending.len(), "replaying the settle journal");
        }
        for b in pending {
            let mut wait = Duration::from_millis(100);
            loop {
                match send(&*store, &b, &metrics).await {
                    // Applied now or before: done.
                    Ok(_) | Err(SettleError::Stale { .. }) => {
                        journal.ack(&b)?;
                        break;
                    }
                    // The store cannot take it yet: never drop usage, wait for it.
                    Err(SettleError::Unavailable(e)) => {
                        tracing::warn!(error = %e, seq = b.seq, "store unreachable during replay");
                        tokio::time::sleep(wait).await;
                        wait = (wait * 2).min(Duration::from_secs(2));
                    }
                    // The store lost earlier writes of that incarnation (data loss) or holds
                    // other content: an operator must look. Keep it journaled, go on.
                    Err(e) => {
                        metrics.settle_failures_total.inc();
                        tracing::error!(seq = b.seq, error = %e, "journaled batch refused; kept in the journal");
                        break;
                    }
                }
            }
        }
        if let Some(old) = journal.incarnation().cloned()
            && old.node_id == cfg.node_id
        {
            let n = store.release(&old).await?;
            tracing::info!(
                epoch = old.epoch,
                leases = n,
                "released the previous incarnation"
            );
        }
        let inc = store
            .begin_after(&cfg.node_id, journal.max_epoch(&cfg.node_id))
            .await?;
        journal.set_incarnation(&inc)?;
        let generation_absent = !record_generation(&*store, &mut journal, &inc).await;
        tracing::info!(node = %inc.node_id, epoch = inc.epoch, "metering agent started");
        cache.agent_started.store(true, Ordering::Release);
        let lost_seen = store.lost_parts();
        Ok(Agent {
            cache,
            store,
            cfg,
            inc,
            journal,
            next_seq: 1,
            known: HashMap::new(),
            metrics,
            shutdown: None,
            leases_were_valid: true,
            marks_read: None,
            generation_absent,
            lost_seen,
            renew: false,
            renewed_at: None,
        })
    }

    /// Replaces the configuration (tests switch fault injection on mid-run).
    #[cfg(feature = "testing")]
    pub fn with_config(mut self, cfg: AgentConfig) -> Agent {
        self.cfg = cfg;
        self
    }

    pub fn incarnation(&self) -> &Incarnation {
        &self.inc
    }

    /// Runs until `shutdown`; then settles what is left, returns every lease and releases the
    /// incarnation.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        self.shutdown = Some(shutdown.clone());
        let feed = tokio::spawn(crate::feed::follow_feed(
            self.cache.clone(),
            self.store.clone(),
            self.store.subscribe(),
            shutdown.clone(),
            self.metrics.feed_lag_seconds.clone(),
        ));
        let mut reap = tokio::time::interval(self.cfg.lease_ttl / 2);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.settle_interval) => {}
                _ = self.cache.wake.notified() => {}
                _ = reap.tick() => {
                    if let Err(e) = self.store.reap_expired().await {
                        tracing::debug!(error = %e, "lease reaper");
                    }
                }
                _ = shutdown.changed() => break,
            }
            if let Err(e) = self.tick(false).await {
                tracing::error!(error = %e, "settle failed");
            }
            self.release_booked().await;
            if let Err(e) = self.renew_if_lost().await {
                tracing::warn!(error = %e, "beginning a new incarnation failed; tried again");
            }
        }
        // A refused batch starts a new incarnation with the cut's usage back in the slots: the
        // closing round runs again to carry it (bounded: a store that keeps refusing needs an
        // operator, and the usage is in the log below).
        for attempt in 1..=3 {
            match self.tick(true).await {
                Ok(()) => {
                    if let Err(e) = self.store.release(&self.inc).await {
                        tracing::warn!(error = %e, "release at shutdown failed; leases expire instead");
                    }
                    break;
                }
                Err(AgentError::Interrupted) => {
                    tracing::error!(
                        pending = self.journal.pending().len(),
                        "final settle: the store is unreachable; the journal keeps every batch and the next start sends them"
                    );
                    break;
                }
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, "final settle refused; settling again under a new incarnation");
                }
                Err(e) => {
                    tracing::error!(error = %e, unsettled = ?self.unsettled(), "final settle failed; this usage is not recorded");
                }
            }
        }
        // The journal left behind keeps only what the book may still lack (one short try:
        // a store that is away must not hold up the stop).
        if !self.cache.store_down.load(Ordering::Acquire) {
            self.marks_read = None;
            let _ = tokio::time::timeout(Duration::from_secs(1), self.release_booked()).await;
        }
        feed.abort();
    }

    /// Begins a new incarnation when the store lost what this one settled: on a cluster a shard
    /// applies the next part past a lost one (reported, not refused, as one Redis's gap is), so
    /// without this the incarnation would go on under a generation no shard has any more and
    /// its journal would keep every later batch until its cap pushed out the ones a rebuild
    /// needs. At most every 10 s, and only with nothing pending (nothing is re-cut).
    async fn renew_if_lost(&mut self) -> Result<(), AgentError> {
        let lost = self.store.lost_parts();
        if lost > self.lost_seen {
            self.lost_seen = lost;
            self.renew = true;
        }
        // Only this incarnation's pending batches count: an older one's (a replay the store
        // refused) stays in the journal and must not hold the renewal back for good.
        let pending = self
            .journal
            .pending()
            .iter()
            .any(|b| b.node_id == self.inc.node_id && b.epoch == self.inc.epoch);
        if !self.renew
            || pending
            || self
                .renewed_at
                .is_some_and(|t| t.elapsed() < Duration::from_secs(10))
        {
            return Ok(());
        }
        // `renew` stays set until a new incarnation began (a failure is tried again).
        self.renewed_at = Some(Instant::now());
        tracing::warn!(
            epoch = self.inc.epoch,
            "the store lost settle parts of this incarnation (or a stream its data): beginning a new one"
        );
        self.reincarnate(Vec::new()).await
    }

    /// Drops from the journal the acknowledged batches the book of record holds (at most every
    /// 250 ms: one small Redis call). Until then they stay, so that a rebuild after a Redis
    /// data loss finds each batch in the book or in a journal. Errors wait for the next try.
    async fn release_booked(&mut self) {
        if self.journal.kept().next().is_none()
            || self
                .marks_read
                .is_some_and(|t| t.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        self.marks_read = Some(Instant::now());
        let incs = self.journal.kept_incarnations();
        match self.store.book_marks(&incs).await {
            Ok(Some(marks)) => {
                if let Err(e) = self.journal.release_booked(&marks, &incs) {
                    tracing::warn!(error = %e, "journal: dropping booked batches failed");
                }
                // A stream whose generation moved lost its data under this incarnation.
                if self
                    .journal
                    .generation_of(&self.inc)
                    .is_some_and(|g| marks.generation_moved(g))
                {
                    self.renew = true;
                }
            }
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "book marks unavailable"),
        }
    }

    /// One settle round. `closing`: return every lease.
    pub async fn tick(&mut self, closing: bool) -> Result<(), AgentError> {
        crate::clock::advance();
        // The generation could not be read when the incarnation began: again, before any
        // batch of it is acknowledged unkept.
        if !self.journal.has_generation(&self.inc) && !self.generation_absent {
            self.generation_absent =
                !record_generation(&*self.store, &mut self.journal, &self.inc).await;
        }
        self.refresh_deadline();
        let now_s = self.cache.now_s();
        self.cache.adopt_pending();
        let idle_s = self.cfg.idle_return.as_secs() as u32;
        let refresh_after = self.cfg.refresh_after();
        // Visit the slots used or flagged since the last cut, plus leases due for a refresh
        // (or to be handed back when idle); at shutdown, every slot.
        let mut visit: Vec<SlotId> = if closing {
            self.cache.map.ids().collect()
        } else {
            std::mem::take(&mut *self.cache.dirty.lock().unwrap_or_else(|e| e.into_inner()))
        };
        if !closing {
            for (account, k) in &self.known {
                let due = k.last_settled.is_none_or(|t| t.elapsed() > refresh_after);
                if k.lease > 0
                    && due
                    && let Some(id) = self.cache.map.find(account)
                {
                    visit.push(id);
                }
            }
        }
        visit.sort_unstable();
        visit.dedup();
        let mut entries = Vec::new();
        for id in visit {
            let (Some(slot), Some(account)) = (self.cache.map.slot(id), self.cache.map.name(id))
            else {
                continue;
            };
            let entry = (|| {
                // Off the visit list first: a spend after this line puts it back on.
                let state = slot.state.fetch_and(!(REFILL | DIRTY), Ordering::AcqRel);
                let (rows_read, rows_written) = self.cache.take_rows(id);
                let usage = Usage {
                    requests: u64::from(slot.requests.swap(0, Ordering::AcqRel)),
                    cpu_us: slot.cpu_us.swap(0, Ordering::AcqRel),
                    deploys: 0,
                    rows_read,
                    rows_written,
                };
                let k = self.known.get(account.as_str());
                let lease = k.map_or(0, |k| k.lease);
                let idle = now_s.saturating_sub(slot.last_used_s.load(Ordering::Relaxed)) > idle_s;
                let stale = k
                    .and_then(|k| k.last_settled)
                    .is_none_or(|t| t.elapsed() > refresh_after);
                let wants_refill = state & REFILL != 0;
                if usage.is_zero() && !wants_refill && !closing && !(lease > 0 && (stale || idle)) {
                    return None;
                }
                let cost = i64::try_from(self.cache.prices.cost(&usage))
                    .unwrap_or(i64::MAX)
                    .min(tollgate_metering::MAX_OP_AMOUNT);
                let target = if closing || (idle && !wants_refill) {
                    0
                } else {
                    let rate = k.map_or(0, |k| k.rate).max(cost);
                    (rate * 4).clamp(self.cfg.min_lease, self.cfg.max_lease)
                };
                // Hand back what is above twice the target (all of it when the target is 0):
                // taken out of `remaining` first, so it can never be spent here afterwards.
                let keep_max = if target == 0 { 0 } else { target * 2 };
                let give_back = take_above(slot, keep_max, target);
                let left = slot.remaining.load(Ordering::Acquire);
                let ask = if target > 0 && left < target {
                    (target - left.max(0)).min(tollgate_metering::MAX_OP_AMOUNT)
                } else {
                    0
                };
                Some(SettleEntry {
                    account: account.clone(),
                    usage,
                    cost,
                    give_back,
                    ask,
                })
            })();
            if let Some(e) = entry {
                entries.push(e);
            }
        }
        // What this incarnation journaled and has not had applied goes first (a round cut
        // short by a stop while the store was away): sending the new cut before it would leave
        // a gap in the sequence the store refuses.
        let mut batches: Vec<SettleBatch> = self
            .journal
            .pending()
            .iter()
            .filter(|b| b.node_id == self.inc.node_id && b.epoch == self.inc.epoch)
            .cloned()
            .collect();
        // Every chunk of the cut is journaled before the first is sent: whatever happens from
        // here (the store away past the closing budget, the process killed), the next start
        // replays it. A chunk that cannot be journaled goes back to its slots, untouched.
        let mut chunks = entries.chunks(self.cfg.max_batch.max(1));
        let mut journal_failed = None;
        for chunk in chunks.by_ref() {
            let batch = SettleBatch {
                node_id: self.inc.node_id.clone(),
                epoch: self.inc.epoch,
                seq: self.next_seq,
                entries: chunk.to_vec(),
            };
            if let Err(e) = self.journal.append(&batch) {
                self.restore(&batch.entries);
                journal_failed = Some(e);
                break;
            }
            self.next_seq += 1;
            batches.push(batch);
        }
        for rest in chunks {
            self.restore(rest);
        }
        self.metrics
            .journal_depth
            .set(self.journal.pending().len() as i64);
        #[cfg(feature = "testing")]
        if self.cfg.hang_after_journal && !batches.is_empty() {
            for b in &batches {
                println!("JOURNALED {} {}", b.epoch, b.seq);
            }
            std::future::pending::<()>().await;
        }
        let started = Instant::now();
        let mut batches = batches.into_iter();
        while let Some(batch) = batches.next() {
            // The store counts a lease's expiry from no earlier than the first send.
            let sent_at = Instant::now();
            let outcome = loop {
                match send(&*self.store, &batch, &self.metrics).await {
                    Ok(g) => break Ok(g),
                    Err(SettleError::Unavailable(e)) => {
                        self.cache.store_down.store(true, Ordering::Release);
                        self.refresh_deadline();
                        let stopping = self.shutdown.as_ref().is_some_and(|s| *s.borrow());
                        if (stopping && !closing)
                            || (closing && started.elapsed() >= self.cfg.closing_budget)
                        {
                            // Every batch of this round is journaled: the closing round (or
                            // the next start) sends them.
                            return Err(AgentError::Interrupted);
                        }
                        tracing::warn!(error = %e, seq = batch.seq, "store unreachable; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => break Err(e),
                }
            };
            match outcome {
                Ok(grants) => {
                    // Redis just answered: the generation, if still unknown, so this batch is
                    // kept for the book.
                    if !self.generation_absent && !self.journal.has_generation(&self.inc) {
                        self.generation_absent =
                            !record_generation(&*self.store, &mut self.journal, &self.inc).await;
                    }
                    self.apply(&batch, &grants, sent_at);
                    self.cache.store_down.store(false, Ordering::Release);
                    self.refresh_deadline();
                    if let Err(e) = self.journal.ack(&batch) {
                        // Applied; a replay of it would be answered as a duplicate.
                        tracing::error!(error = %e, seq = batch.seq, "journal ack failed");
                    }
                    self.metrics
                        .journal_depth
                        .set(self.journal.pending().len() as i64);
                }
                Err(e) => {
                    // Gap, stale or mismatch: this incarnation's sequence is broken (the store
                    // lost writes, or a bug). Start a new one; nothing cut is lost.
                    tracing::error!(error = %e, seq = batch.seq, "settle refused; starting a new incarnation");
                    let mut unsent = vec![batch];
                    unsent.extend(batches.by_ref());
                    self.reincarnate(unsent).await?;
                    return Err(e.into());
                }
            }
        }
        if let Some(e) = journal_failed {
            return Err(e.into());
        }
        self.cache.changed.notify_waiters();
        Ok(())
    }

    /// Usage still in the slots, not cut into any batch: (accounts, requests, CPU µs). For the
    /// log when it cannot be recorded.
    fn unsettled(&self) -> (usize, u64, u64) {
        let mut out = (0, 0, 0);
        for id in self.cache.map.ids() {
            if let Some(slot) = self.cache.map.slot(id) {
                let r = u64::from(slot.requests.load(Ordering::Acquire));
                let c = slot.cpu_us.load(Ordering::Acquire);
                if r > 0 || c > 0 {
                    out.0 += 1;
                    out.1 += r;
                    out.2 += c;
                }
            }
        }
        out
    }

    /// Puts the usage and the hand-back of entries that were never applied back into their
    /// slots, so the next cut carries them.
    fn restore(&self, entries: &[SettleEntry]) {
        for e in entries {
            let id = self.cache.map.with(&e.account, |id, slot| {
                // A cut never takes more than a u32 of requests out of a slot (see `Slot`).
                let requests = u32::try_from(e.usage.requests).unwrap_or(u32::MAX);
                slot.requests.fetch_add(requests, Ordering::AcqRel);
                slot.cpu_us.fetch_add(e.usage.cpu_us, Ordering::AcqRel);
                self.cache
                    .restore_rows(id, e.usage.rows_read, e.usage.rows_written);
                slot.remaining.fetch_add(e.give_back, Ordering::AcqRel);
                slot.state.fetch_or(DIRTY, Ordering::AcqRel);
                id
            });
            if let Some(id) = id {
                self.cache
                    .dirty
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(id);
            }
        }
    }

    /// Abandons the current incarnation after the store refused its sequence: the unapplied
    /// batches' usage goes back to the slots (and their journal lines are acked, so a replay
    /// cannot count them too), each slot's `remaining` drops by the lease it is about to lose,
    /// and only then every lease of the old incarnation returns to its account: the store may
    /// hand that money to another node at once, so this node must have stopped spending it.
    async fn reincarnate(&mut self, unsent: Vec<SettleBatch>) -> Result<(), AgentError> {
        for b in &unsent {
            self.restore(&b.entries);
            if b.seq != 0 {
                self.journal.abandon(b)?;
            }
        }
        for (account, k) in self.known.drain() {
            self.cache.map.with(&account, |_, slot| {
                slot.remaining.fetch_sub(k.lease, Ordering::AcqRel);
            });
        }
        self.refresh_deadline();
        self.store.release(&self.inc).await?;
        self.inc = self
            .store
            .begin_after(&self.cfg.node_id, self.journal.max_epoch(&self.cfg.node_id))
            .await?;
        self.journal.set_incarnation(&self.inc)?;
        self.generation_absent =
            !record_generation(&*self.store, &mut self.journal, &self.inc).await;
        self.next_seq = 1;
        // Whatever asked for a new incarnation is answered by this one.
        self.renew = false;
        self.lost_seen = self.store.lost_parts();
        tracing::warn!(epoch = self.inc.epoch, "new incarnation");
        Ok(())
    }

    /// Publishes when spending must stop: the earliest `last refresh + lease_ttl − lease_margin`
    /// of the leases held (the store may give a lease away after its ttl; the refresh counts
    /// from when its batch was first sent, which is no later than the store's own clock saw
    /// it). The request path compares it with the coarse clock on every spend.
    fn refresh_deadline(&mut self) {
        let limit = self.cfg.lease_ttl.saturating_sub(self.cfg.lease_margin);
        let limit_ms = limit.as_millis() as u64;
        let deadline = self
            .known
            .values()
            .filter(|k| k.lease > 0)
            .filter_map(|k| k.last_settled)
            .min()
            .map_or(u64::MAX, |t| {
                crate::clock::ms_of(t).saturating_add(limit_ms)
            });
        self.cache
            .spend_deadline_ms
            .store(deadline, Ordering::Release);
        let valid = self.cache.leases_valid();
        if self.leases_were_valid && !valid {
            tracing::warn!(
                "a lease was not refreshed in time: spending stops until the store answers"
            );
        } else if !self.leases_were_valid && valid {
            tracing::info!("leases refreshed: spending again");
        }
        self.leases_were_valid = valid;
    }

    fn apply(&mut self, batch: &SettleBatch, grants: &[LeaseGrant], sent_at: Instant) {
        let cpu_us: u64 = batch.entries.iter().map(|e| e.usage.cpu_us).sum();
        self.metrics
            .metered_cpu_seconds_total
            .inc_by(cpu_us as f64 / 1e6);
        for (e, g) in batch.entries.iter().zip(grants) {
            let k = self.known.entry(e.account.as_str().into()).or_default();
            if g.prev != k.lease {
                // Cannot happen while node and store follow this protocol; alert if it does.
                self.metrics.lease_drift_total.inc();
                tracing::error!(account = %e.account, node_view = k.lease, store_view = g.prev, seq = batch.seq, "lease drift");
            }
            // The store took `cost` and `give_back` out of the lease we knew (both already gone
            // from `remaining`), then granted more: add exactly what it added.
            let delta = g.lease - (k.lease - e.cost - e.give_back);
            if delta > 0 {
                self.metrics.lease_refills_total.inc();
            }
            k.lease = g.lease;
            k.rate = (k.rate * 3 + e.cost) / 4;
            k.last_settled = Some(sent_at);
            let refill_below = (g.lease / 2).max(self.cache.prices.per_request);
            // Suspended for this node only when the store had nothing left to give it: a
            // reply that granted a lease may say `suspended` (it took the last of `available`),
            // but once that lease is spent the node asks again before answering 402.
            let status = if g.lease >= self.cache.prices.per_request {
                Status::Active
            } else {
                g.status
            };
            // Slots are never removed, so the one the batch was cut from is still there.
            self.cache.map.with(&e.account, |_, slot| {
                slot.remaining.fetch_add(delta, Ordering::AcqRel);
                slot.refill_below.store(refill_below, Ordering::Relaxed);
                let overdrawn = g.available < -self.cache.cpu_debt_limit();
                crate::feed::apply_status(
                    slot,
                    g.version,
                    status,
                    overdrawn,
                    crate::feed::Source::Reply,
                );
            });
        }
        self.known.retain(|_, k| k.lease > 0 || k.rate > 0);
    }
}

/// Records in the journal the ledger generation an incarnation settles into, so that its
/// acknowledged batches are kept until the book holds them. False when the store has none
/// (embedded: nothing to keep); an error is logged and the next round tries again.
async fn record_generation(store: &dyn Store, journal: &mut Journal, inc: &Incarnation) -> bool {
    match store.ledger_generation().await {
        Ok(Some(g)) => {
            if let Err(e) = journal.set_generation(inc, &g) {
                tracing::warn!(error = %e, "journal: recording the ledger generation failed; tried again next round");
            }
            true
        }
        // No generation in this store (embedded): nothing to keep.
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(error = %e, "reading the ledger generation failed; tried again next round");
            true
        }
    }
}

async fn send(
    store: &dyn Store,
    b: &SettleBatch,
    metrics: &CacheMetrics,
) -> Result<Vec<LeaseGrant>, SettleError> {
    let t = Instant::now();
    let r = store.settle(b).await;
    metrics.settle_seconds.observe(t.elapsed().as_secs_f64());
    match r {
        Ok(o) => {
            metrics.settle_batches_total.inc();
            Ok(o.grants().to_vec())
        }
        Err(e) => {
            metrics.settle_failures_total.inc();
            Err(e)
        }
    }
}

/// Atomically lowers `remaining` to `to` if it is above `above`; returns what was taken.
fn take_above(slot: &Slot, above: i64, to: i64) -> i64 {
    let mut cur = slot.remaining.load(Ordering::Acquire);
    loop {
        if cur <= above || cur <= to {
            return 0;
        }
        match slot
            .remaining
            .compare_exchange(cur, to, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return cur - to,
            Err(now) => cur = now,
        }
    }
}
