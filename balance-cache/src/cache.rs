//! The hot path: one lock-free map lookup and a few atomic operations on the account's own slot.
//! No lock, no allocation for a known account, no network.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tollgate_metering::Prices;

use crate::slots::{KeyWords, SlotId, SlotMap};

/// Per-account state on one node: exactly one cache line, holding everything the hot path
/// touches and the account id itself, so two accounts never share a line and a cached account
/// costs 64 bytes plus a 4-byte index entry.
#[derive(Debug)]
#[repr(align(64))]
pub struct Slot {
    /// What is left of this node's lease (p$). CPU charges may push it below zero.
    pub(crate) remaining: AtomicI64,
    /// Refill when `remaining` drops below this (half the last lease; set by the agent).
    pub(crate) refill_below: AtomicI64,
    /// Usage not yet cut into a settle batch. Requests fit 32 bits: spending stops once
    /// leases are not refreshed for `lease_ttl` (10 s), so a slot never holds more than
    /// seconds of requests; CPU, charged even then, keeps 64.
    pub(crate) cpu_us: AtomicU64,
    /// `version << SHIFT | OVERDRAWN | DIRTY | REFILL | SUSPENDED`.
    pub(crate) state: AtomicU64,
    pub(crate) requests: AtomicU32,
    /// Coarse seconds since the cache started, of the last spend (idle leases are returned).
    pub(crate) last_used_s: AtomicU32,
    /// The account id, packed (see `slots`).
    pub(crate) key: KeyWords,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

pub(crate) const SUSPENDED: u64 = 1;
pub(crate) const REFILL: u64 = 2;
/// On the agent's list of slots to visit at the next cut.
pub(crate) const DIRTY: u64 = 4;
/// The account's balance at the store (last reply or feed change) is below minus the CPU
/// debt limit: its CPU on this node is no longer paid for.
pub(crate) const OVERDRAWN: u64 = 8;
pub(crate) const SHIFT: u32 = 4;

impl Slot {
    pub(crate) fn new() -> Slot {
        Slot {
            remaining: AtomicI64::new(0),
            refill_below: AtomicI64::new(0),
            cpu_us: AtomicU64::new(0),
            state: AtomicU64::new(REFILL),
            requests: AtomicU32::new(0),
            last_used_s: AtomicU32::new(0),
            key: KeyWords::default(),
        }
    }

    pub(crate) fn is_suspended(&self) -> bool {
        self.state.load(Ordering::Acquire) & SUSPENDED != 0
    }
}

/// Default CPU debt limit: a quarter of a CPU-second (at the default price, $0.003125) lets a
/// normal request in flight finish, and stops a runaway one.
pub const DEFAULT_CPU_DEBT_MS: u64 = 250;

fn debt_limit(prices: &Prices, ms: u64) -> i64 {
    i64::try_from(i128::from(ms) * 1000 * i128::from(prices.per_cpu_us))
        .unwrap_or(i64::MAX)
        .min(tollgate_metering::MAX_OP_AMOUNT)
}

/// The answer to "may this request go through?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spend {
    /// Paid from this node's lease.
    Ok,
    /// The account has nothing left anywhere: 402 / suspension page.
    Suspended,
    /// No lease here yet (new account, or just spent): a refill is on its way; wait for
    /// [`BalanceCache::changed`] briefly and try again.
    Pending,
    /// Leases are gone and the store cannot be reached: 503 + Retry-After, never 402.
    Unavailable,
}

pub struct BalanceCache {
    pub(crate) map: SlotMap,
    /// Slots used or flagged since the last cut: the agent visits only these (and the leases it
    /// must refresh), not every cached account.
    pub(crate) dirty: Mutex<Vec<SlotId>>,
    /// Accounts first seen on the request path, for the agent to add (cold path).
    pub(crate) pending: Mutex<HashMap<String, u64>>,
    /// Database rows (read, written) charged and not yet cut into a batch, by slot. Few
    /// accounts use a database and a slot stays one cache line, so they live here, behind a
    /// lock (a query costs tens of µs; the lock, nanoseconds).
    pub(crate) rows: Mutex<HashMap<SlotId, (u64, u64)>>,
    /// Set once any rows were charged on this node: cuts skip the lock until then.
    pub(crate) rows_used: AtomicBool,
    /// Rows of accounts not cached yet, applied once their slot exists.
    pending_rows: Mutex<HashMap<String, (u64, u64)>>,
    pub(crate) prices: Prices,
    /// The agent wakes on this when a slot wants a refill or a new account appears.
    pub(crate) wake: Notify,
    /// The agent signals this after every settle reply or feed update.
    pub(crate) changed: Notify,
    /// Leases may be spent while the coarse clock ([`crate::clock`], ms) is below this: the
    /// earliest `lease start + ttl − margin` of the leases this node holds, set by the agent
    /// from its settle replies. Checked by time on every spend, so a settle call blocked by a
    /// partitioned store cannot extend it. `u64::MAX` while no lease is held.
    pub(crate) spend_deadline_ms: AtomicU64,
    /// True while the last settle attempt failed to reach the store.
    pub(crate) store_down: AtomicBool,
    /// Set once an agent has begun an incarnation for this cache: refills are answered from
    /// then on (a proxy taking over listeners in an upgrade waits for it).
    pub(crate) agent_started: AtomicBool,
    /// CPU this node lets an account run past its lease once it cannot pay (p$); see
    /// [`BalanceCache::cpu_unpaid`].
    cpu_debt_limit: AtomicI64,
}

impl BalanceCache {
    pub fn new(prices: Prices) -> Arc<BalanceCache> {
        Arc::new(BalanceCache {
            map: SlotMap::new(),
            dirty: Mutex::new(Vec::new()),
            pending: Mutex::new(HashMap::new()),
            rows: Mutex::new(HashMap::new()),
            rows_used: AtomicBool::new(false),
            pending_rows: Mutex::new(HashMap::new()),
            prices,
            wake: Notify::new(),
            changed: Notify::new(),
            spend_deadline_ms: AtomicU64::new(u64::MAX),
            store_down: AtomicBool::new(false),
            agent_started: AtomicBool::new(false),
            cpu_debt_limit: AtomicI64::new(debt_limit(&prices, DEFAULT_CPU_DEBT_MS)),
        })
    }

    pub fn prices(&self) -> &Prices {
        &self.prices
    }

    /// (accounts with a slot here, of which suspended): every account this node metered since
    /// it started, and those it answers 402 for now.
    pub fn count_accounts(&self) -> (usize, usize) {
        let mut n = 0;
        let mut suspended = 0;
        for id in self.map.ids() {
            if let Some(slot) = self.map.slot(id) {
                n += 1;
                if slot.is_suspended() {
                    suspended += 1;
                }
            }
        }
        (n, suspended)
    }

    /// Exports `tollgate_cached_accounts` and `tollgate_suspended_accounts` of this cache on
    /// `registry` (counted at scrape time).
    pub fn register_account_metrics(
        self: &Arc<Self>,
        registry: &prometheus::Registry,
    ) -> prometheus::Result<()> {
        registry.register(Box::new(crate::metrics::AccountsCollector::new(self)?))
    }

    /// Whether an agent has started for this cache (replayed its journal and begun an
    /// incarnation with the store): before that, no request can get a lease.
    pub fn agent_started(&self) -> bool {
        self.agent_started.load(Ordering::Acquire)
    }

    /// How much CPU (ms, at the CPU price) an account may run past its lease on this node once
    /// it cannot pay, before [`BalanceCache::cpu_unpaid`] says to interrupt it. This is the
    /// `D` of the overspend bound (docs/money.md).
    pub fn set_cpu_debt_limit_ms(&self, ms: u64) {
        self.cpu_debt_limit
            .store(debt_limit(&self.prices, ms), Ordering::Relaxed);
    }

    /// True when `account` keeps using CPU nobody will pay for: its balance at the store is
    /// below minus the CPU debt limit (CPU past an empty balance is settled as debt, by every
    /// node), or this node's lease is overdrawn by more than the limit and the store refused a
    /// refill or cannot be reached. The runtime then interrupts the
    /// account's work on this node; new requests already get 402 (or 503).
    pub fn cpu_unpaid(&self, account: &str) -> bool {
        self.map
            .with(account, |_, slot| {
                // Debt already settled shows at the store (any node's); debt not yet settled
                // shows here, and only counts when it cannot be settled or refilled.
                slot.state.load(Ordering::Acquire) & OVERDRAWN != 0
                    || (slot.remaining.load(Ordering::Acquire) < -self.cpu_debt_limit()
                        && (slot.is_suspended()
                            || self.store_down.load(Ordering::Relaxed)
                            || !self.leases_valid()))
            })
            .unwrap_or(false)
    }

    /// The CPU debt limit in p$.
    pub(crate) fn cpu_debt_limit(&self) -> i64 {
        self.cpu_debt_limit.load(Ordering::Relaxed)
    }

    /// The coarse clock in seconds (idle detection).
    pub(crate) fn now_s(&self) -> u32 {
        (crate::clock::now_ms() / 1000) as u32
    }

    /// Whether the leases this node holds may still be spent: their deadline, on this node's
    /// own clock, has not passed.
    #[inline]
    pub fn leases_valid(&self) -> bool {
        crate::clock::now_ms() < self.spend_deadline_ms.load(Ordering::Relaxed)
    }

    /// Charges one request to `account`. Lock-free; never blocks, never does I/O.
    #[inline]
    pub fn try_spend_request(&self, account: &str) -> Spend {
        self.try_spend(account, self.prices.per_request, true)
    }

    /// Charges `amount` p$ of usage that is counted in `requests` (so it is settled).
    #[inline]
    fn try_spend(&self, account: &str, amount: i64, count_request: bool) -> Spend {
        match self.map.with(account, |key, slot| {
            self.spend_slot(key, slot, amount, count_request)
        }) {
            Some(s) => s,
            None => {
                self.register(account, 0);
                Spend::Pending
            }
        }
    }

    /// Puts the slot on the agent's visit list (once per cut) and sets `bits`; wakes the agent
    /// when this sets `REFILL`.
    pub(crate) fn mark(&self, id: SlotId, slot: &Slot, bits: u64) {
        let prev = slot.state.fetch_or(bits | DIRTY, Ordering::AcqRel);
        if prev & DIRTY == 0 {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(id);
        }
        if bits & REFILL != 0 && prev & REFILL == 0 {
            self.wake.notify_one();
        }
    }

    #[inline]
    fn spend_slot(&self, key: SlotId, slot: &Slot, amount: i64, count_request: bool) -> Spend {
        if !self.leases_valid() {
            return Spend::Unavailable;
        }
        let now = self.now_s();
        if slot.last_used_s.load(Ordering::Relaxed) != now {
            slot.last_used_s.store(now, Ordering::Relaxed);
        }
        let left = slot.remaining.fetch_sub(amount, Ordering::AcqRel) - amount;
        if left >= 0 {
            if count_request {
                slot.requests.fetch_add(1, Ordering::Relaxed);
            }
            if left < slot.refill_below.load(Ordering::Relaxed) {
                self.mark(key, slot, REFILL);
            } else if slot.state.load(Ordering::Relaxed) & DIRTY == 0 {
                self.mark(key, slot, 0);
            }
            return Spend::Ok;
        }
        slot.remaining.fetch_add(amount, Ordering::AcqRel);
        if slot.is_suspended() {
            return Spend::Suspended;
        }
        if self.store_down.load(Ordering::Relaxed) {
            return Spend::Unavailable;
        }
        self.mark(key, slot, REFILL);
        Spend::Pending
    }

    /// Charges CPU as it accrues, even past the lease (it was already used): the excess is
    /// settled as debt, and a refill is asked for. CPU of an account not cached yet is kept
    /// until its slot exists, so none is dropped.
    pub fn charge_cpu(&self, account: &str, cpu_us: u64) {
        let charged = self.map.with(account, |id, slot| {
            let cost = i64::try_from(i128::from(cpu_us) * i128::from(self.prices.per_cpu_us))
                .unwrap_or(i64::MAX / 4);
            slot.cpu_us.fetch_add(cpu_us, Ordering::Relaxed);
            self.take_used(id, slot, cost);
        });
        if charged.is_none() {
            self.register(account, cpu_us);
        }
    }

    /// Takes `cost` of use that already happened (CPU, database rows) from the slot's lease,
    /// even below zero; marks the slot used now (use is use: such an account must not look
    /// idle) and asks for a refill when the lease runs low.
    fn take_used(&self, id: SlotId, slot: &Slot, cost: i64) {
        let now = self.now_s();
        if slot.last_used_s.load(Ordering::Relaxed) != now {
            slot.last_used_s.store(now, Ordering::Relaxed);
        }
        let left = slot.remaining.fetch_sub(cost, Ordering::AcqRel) - cost;
        let bits = if left < slot.refill_below.load(Ordering::Relaxed) {
            REFILL
        } else {
            0
        };
        self.mark(id, slot, bits);
    }

    /// May `account` start something that costs about `amount` p$ (a database query, whose
    /// exact cost is known only after it ran)? Checks this node's lease without spending it;
    /// `Pending` asks for a refill, as [`BalanceCache::try_spend_request`] does.
    pub fn admit(&self, account: &str, amount: i64) -> Spend {
        let r = self.map.with(account, |key, slot| {
            if !self.leases_valid() {
                return Spend::Unavailable;
            }
            if slot.remaining.load(Ordering::Acquire) >= amount.max(1) {
                return Spend::Ok;
            }
            if slot.is_suspended() {
                return Spend::Suspended;
            }
            if self.store_down.load(Ordering::Relaxed) {
                return Spend::Unavailable;
            }
            self.mark(key, slot, REFILL);
            Spend::Pending
        });
        r.unwrap_or_else(|| {
            self.register(account, 0);
            Spend::Pending
        })
    }

    /// Charges database rows as they were used (like CPU: even past the lease, the excess
    /// settled as debt); counted into the next settle batch's usage.
    pub fn charge_rows(&self, account: &str, rows_read: u64, rows_written: u64) {
        if rows_read == 0 && rows_written == 0 {
            return;
        }
        let cost = i64::try_from(self.prices.cost(&tollgate_metering::Usage {
            rows_read,
            rows_written,
            ..Default::default()
        }))
        .unwrap_or(i64::MAX / 4);
        let charged = self.map.with(account, |id, slot| {
            self.rows_used.store(true, Ordering::Relaxed);
            {
                let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
                let r = rows.entry(id).or_insert((0, 0));
                r.0 = r.0.saturating_add(rows_read);
                r.1 = r.1.saturating_add(rows_written);
            }
            self.take_used(id, slot, cost);
        });
        if charged.is_none() {
            if tollgate_metering::validate_account_id(account).is_err() {
                return;
            }
            {
                let mut p = self.pending_rows.lock().unwrap_or_else(|e| e.into_inner());
                let r = p.entry(account.to_owned()).or_insert((0, 0));
                r.0 = r.0.saturating_add(rows_read);
                r.1 = r.1.saturating_add(rows_written);
            }
            self.register(account, 0);
        }
    }

    /// The rows of slot `id` not cut yet, taken (the agent, while cutting).
    pub(crate) fn take_rows(&self, id: SlotId) -> (u64, u64) {
        if !self.rows_used.load(Ordering::Relaxed) {
            return (0, 0);
        }
        self.rows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
            .unwrap_or((0, 0))
    }

    /// Puts rows of a batch that was never applied back (the agent).
    pub(crate) fn restore_rows(&self, id: SlotId, rows_read: u64, rows_written: u64) {
        if rows_read == 0 && rows_written == 0 {
            return;
        }
        self.rows_used.store(true, Ordering::Relaxed);
        let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
        let r = rows.entry(id).or_insert((0, 0));
        r.0 = r.0.saturating_add(rows_read);
        r.1 = r.1.saturating_add(rows_written);
    }

    fn register(&self, account: &str, cpu_us: u64) {
        if tollgate_metering::validate_account_id(account).is_err() {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p.entry(account.to_owned()).or_insert(0) += cpu_us;
        drop(p);
        self.wake.notify_one();
    }

    /// Adds the accounts first seen since the last call (the agent, each tick).
    pub(crate) fn adopt_pending(&self) {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return;
        }
        let cpu: Vec<(String, u64)> = pending.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for id in self.map.insert_many(pending.into_keys(), |_| {}) {
            if let Some(slot) = self.map.slot(id) {
                self.mark(id, slot, REFILL);
            }
        }
        for (account, cpu_us) in cpu {
            if cpu_us > 0 {
                self.charge_cpu(&account, cpu_us);
            }
        }
        let rows =
            std::mem::take(&mut *self.pending_rows.lock().unwrap_or_else(|e| e.into_inner()));
        for (account, (r, w)) in rows {
            self.charge_rows(&account, r, w);
        }
    }

    /// Resolves when the agent applied a settle reply or a feed change (then retry a
    /// [`Spend::Pending`]).
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// The same as [`BalanceCache::changed`], as a future to create (and `enable`) *before*
    /// trying to spend, so a change that lands between the try and the wait is not missed.
    pub fn changed_notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Accounts cached on this node.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// What this node may still spend for `account` (p$), for tests and debugging.
    pub fn remaining(&self, account: &str) -> Option<i64> {
        self.map
            .with(account, |_, s| s.remaining.load(Ordering::Acquire))
    }

    /// Whether the node currently believes `account` is suspended.
    pub fn is_suspended(&self, account: &str) -> Option<bool> {
        self.map.with(account, |_, s| s.is_suspended())
    }

    /// Benchmarks only (feature `testing`): a slot holding `lease` p$ that no store granted.
    /// Never use it where money is real; it creates spendable credit out of nothing.
    #[cfg(feature = "testing")]
    pub fn bench_preload(&self, account: &str, lease: i64) {
        self.bench_preload_many(std::iter::once(account.to_owned()), lease);
    }

    /// Benchmarks only (feature `testing`): many such slots at once.
    #[cfg(feature = "testing")]
    pub fn bench_preload_many(&self, accounts: impl IntoIterator<Item = String>, lease: i64) {
        self.map.insert_many(accounts, |s| {
            s.remaining.store(lease, Ordering::Release);
            s.state.store(0, Ordering::Release);
        });
    }
}
