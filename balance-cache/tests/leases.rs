//! Leases are valid by time, on the node's own clock, whatever the agent is doing; and a node
//! never hands a lease back to the store while it can still spend it. Real Redis.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{PRICE, durable_with_credit};
use tokio::sync::{broadcast, watch};
use tollgate_balance_cache::{Agent, AgentConfig, BalanceCache, CacheMetrics, Spend};
use tollgate_metering::{
    AccountState, ChargeError, ChargeOutcome, CreditError, CreditOutcome, DebitMode, FeedEvent,
    Incarnation, LedgerEntry, Prices, RedisStore, SettleBatch, SettleError, SettleOutcome, Store,
    StoreError,
};

const USD: i64 = 1_000_000_000_000;

/// A node whose leases live `ttl` at the store and stop `margin` before that here.
async fn start_node(
    store: Arc<dyn Store>,
    dir: &tempfile::TempDir,
    name: &str,
    ttl: Duration,
    margin: Duration,
) -> (
    Arc<BalanceCache>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let cache = BalanceCache::new(Prices::default());
    let mut cfg = AgentConfig::new(name, dir.path().join(format!("{name}.journal")));
    cfg.lease_ttl = ttl;
    cfg.lease_margin = margin;
    // Leases far larger than what the test spends: only time may stop the spending.
    cfg.min_lease = cfg.max_lease;
    let metrics = CacheMetrics::new(&prometheus::Registry::new()).unwrap();
    let agent = Agent::start(cache.clone(), store, cfg, metrics)
        .await
        .unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(agent.run(rx));
    (cache, stop, task)
}

async fn spend_one(cache: &BalanceCache, account: &str) -> Spend {
    let t = Instant::now();
    loop {
        match cache.try_spend_request(account) {
            Spend::Pending if t.elapsed() < Duration::from_secs(5) => {
                let _ = tokio::time::timeout(Duration::from_millis(20), cache.changed()).await;
            }
            other => return other,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spending_stops_at_the_lease_deadline_while_a_settle_call_hangs() {
    let fx = durable_with_credit("part", 100 * USD).await;
    let ttl = Duration::from_secs(3);
    let margin = Duration::from_secs(1);
    let store: Arc<dyn Store> =
        Arc::new(RedisStore::connect(&fx.url, "tollgate", ttl).await.unwrap());
    let (cache, stop, task) = start_node(store, &fx.dir, "p1", ttl, margin).await;
    let mut paid = 0i64;
    for _ in 0..20 {
        assert_eq!(spend_one(&cache, "part").await, Spend::Ok);
        paid += 1;
    }
    // Let a settle round carry those requests, so the agent is busy with a call when Redis
    // freezes: the call hangs for the client's response timeout (5 s, longer than the margin).
    tokio::time::sleep(Duration::from_millis(200)).await;
    fx.redis.pause();
    let paused_at = Instant::now();
    let mut last_ok = None;
    let mut unavailable_at = None;
    while paused_at.elapsed() < Duration::from_secs(4) {
        match cache.try_spend_request("part") {
            Spend::Ok => {
                paid += 1;
                last_ok = Some(paused_at.elapsed());
            }
            Spend::Unavailable => {
                unavailable_at.get_or_insert(paused_at.elapsed());
            }
            Spend::Suspended => panic!("402 while the store is unreachable"),
            Spend::Pending => {}
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The last refresh was before the pause, so the deadline is at most ttl − margin after it
    // (plus one tick of the coarse clock and this loop's step).
    let deadline = ttl - margin + Duration::from_millis(60);
    let last_ok = last_ok.expect("the lease held before the pause was usable");
    assert!(
        last_ok <= deadline,
        "spent {last_ok:?} after the pause, past the lease deadline {deadline:?}"
    );
    assert!(unavailable_at.is_some(), "never stopped spending");
    // The CPU debt limit holds the same way: CPU past the lease (50 s of CPU, $0.625, more
    // than the $0.50 lease plus the 250 ms debt limit) is unpaid once leases expired, although
    // the agent has not seen a single error yet.
    cache.charge_cpu("part", 50_000_000);
    assert!(
        cache.cpu_unpaid("part"),
        "CPU past an expired lease must be interrupted"
    );

    fx.redis.resume();
    let t = Instant::now();
    loop {
        if cache.try_spend_request("part") == Spend::Ok {
            paid += 1;
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "did not recover: {:?}, remaining {:?}, valid {}",
            cache.try_spend_request("part"),
            cache.remaining("part"),
            cache.leases_valid()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap();
    let st = fx.admin.account("part").await.unwrap().unwrap();
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(st.leased, 0);
    let cpu_cost = Prices::default().per_cpu_us * 50_000_000;
    assert_eq!(st.debited, paid * PRICE + cpu_cost, "{st:?}");
}

/// A store that refuses one settle batch as out of sequence (as after a store data loss), and
/// checks, when the node hands its leases back, that the node can no longer spend them.
struct Refusing {
    inner: RedisStore,
    refuse_next: AtomicBool,
    cache: OnceLock<Arc<BalanceCache>>,
    account: &'static str,
    spent_while_releasing: AtomicU64,
    releases: AtomicU64,
}

#[async_trait]
impl Store for Refusing {
    async fn begin(&self, node_id: &str) -> Result<Incarnation, StoreError> {
        self.inner.begin(node_id).await
    }
    async fn begin_after(&self, node_id: &str, floor: u64) -> Result<Incarnation, StoreError> {
        self.inner.begin_after(node_id, floor).await
    }
    async fn ledger_generation(&self) -> Result<Option<String>, StoreError> {
        self.inner.ledger_generation().await
    }
    async fn book_marks(
        &self,
        incs: &[Incarnation],
    ) -> Result<Option<tollgate_metering::LedgerMarks>, StoreError> {
        self.inner.book_marks(incs).await
    }
    async fn settle(&self, batch: &SettleBatch) -> Result<SettleOutcome, SettleError> {
        if self.refuse_next.swap(false, Ordering::AcqRel) {
            return Err(SettleError::Gap {
                expected: batch.seq + 1,
                got: batch.seq,
            });
        }
        self.inner.settle(batch).await
    }
    async fn release(&self, inc: &Incarnation) -> Result<u64, StoreError> {
        if let Some(cache) = self.cache.get() {
            self.releases.fetch_add(1, Ordering::AcqRel);
            if cache.try_spend_request(self.account) == Spend::Ok {
                self.spent_while_releasing.fetch_add(1, Ordering::AcqRel);
            }
        }
        self.inner.release(inc).await
    }
    async fn credit(&self, a: &str, k: &str, n: i64) -> Result<CreditOutcome, CreditError> {
        self.inner.credit(a, k, n).await
    }
    async fn debit(
        &self,
        a: &str,
        k: &str,
        n: i64,
        mode: DebitMode,
    ) -> Result<ChargeOutcome, ChargeError> {
        self.inner.debit(a, k, n, mode).await
    }
    async fn accounts(&self, ids: &[String]) -> Result<Vec<Option<AccountState>>, StoreError> {
        self.inner.accounts(ids).await
    }
    async fn reap_expired(&self) -> Result<u64, StoreError> {
        self.inner.reap_expired().await
    }
    async fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        self.inner.ledger().await
    }
    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.inner.subscribe()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_refused_batch_the_node_stops_spending_before_it_returns_its_leases() {
    let fx = durable_with_credit("back", 100 * USD).await;
    let ttl = Duration::from_secs(10);
    let store = Arc::new(Refusing {
        inner: RedisStore::connect(&fx.url, "tollgate", ttl).await.unwrap(),
        refuse_next: AtomicBool::new(false),
        cache: OnceLock::new(),
        account: "back",
        spent_while_releasing: AtomicU64::new(0),
        releases: AtomicU64::new(0),
    });
    let (cache, stop, task) =
        start_node(store.clone(), &fx.dir, "r1", ttl, Duration::from_secs(2)).await;
    store.cache.set(cache.clone()).ok().unwrap();
    let mut paid = 0i64;
    for _ in 0..10 {
        assert_eq!(spend_one(&cache, "back").await, Spend::Ok);
        paid += 1;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(cache.remaining("back").unwrap() > 0, "a lease is held");
    store.refuse_next.store(true, Ordering::Release);
    assert_eq!(spend_one(&cache, "back").await, Spend::Ok);
    paid += 1;
    // Database rows in the refused batch go back to the slot with the requests.
    cache.charge_rows("back", 7, 2);
    let t = Instant::now();
    while store.releases.load(Ordering::Acquire) == 0 {
        assert!(t.elapsed() < Duration::from_secs(5), "no new incarnation");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = store.spent_while_releasing.load(Ordering::Acquire);
    paid += during as i64;
    assert_eq!(
        during, 0,
        "the node spent a lease it was handing back (another node may already hold that money)"
    );
    // It goes on with a new incarnation and fresh leases.
    assert_eq!(spend_one(&cache, "back").await, Spend::Ok);
    paid += 1;
    stop.send(true).unwrap();
    task.await.unwrap();
    let st = fx.admin.account("back").await.unwrap().unwrap();
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(st.leased, 0);
    let p = tollgate_metering::Prices::default();
    let rows = 7 * p.per_row_read + 2 * p.per_row_written;
    assert_eq!(st.debited, paid * PRICE + rows, "{st:?}");
    let ledger = fx.admin.ledger().await.unwrap();
    assert_eq!(ledger.iter().map(|e| e.rows_read).sum::<u64>(), 7);
    assert_eq!(ledger.iter().map(|e| e.rows_written).sum::<u64>(), 2);
}
