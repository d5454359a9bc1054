//! Faults with real Redis: Redis down (leases keep serving, then 503-style `Unavailable`, then
//! recovery with nothing lost), Redis killed and restarted with AOF under load, and the change
//! feed's subscriber killed while a credit is published.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Fixture, PRICE, crash_after_journal, durable_with_credit, node};
use tollgate_balance_cache::{Agent, AgentConfig, BalanceCache, CacheMetrics, Spend};
use tollgate_metering::{Prices, RedisStore, Store};
use tollgate_testkit::RedisServer;

const USD: i64 = 1_000_000_000_000;

/// Reads an account, retrying while the admin connection reconnects after a Redis restart.
async fn read(store: &RedisStore, account: &str) -> tollgate_metering::AccountState {
    for _ in 0..50 {
        if let Ok(Some(st)) = store.account(account).await {
            return st;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot read {account}");
}

async fn read_ledger(store: &RedisStore) -> Vec<tollgate_metering::LedgerEntry> {
    for _ in 0..50 {
        if let Ok(l) = store.ledger().await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot read the ledger");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_serves_leases_then_unavailable_then_recovers_with_nothing_lost() {
    let Fixture {
        mut redis,
        url,
        dir,
        admin,
    } = durable_with_credit("acct", USD).await;
    let n = node(&url, "n1", &dir).await;
    let mut paid = 0i64;
    for _ in 0..50 {
        assert_eq!(n.spend("acct").await, Spend::Ok);
        paid += 1;
    }

    redis.kill();
    // The lease this node holds keeps paying; once it is spent, the answer is Unavailable
    // (503 upstream), never Suspended (402).
    let t = Instant::now();
    let mut during = 0i64;
    loop {
        match n.cache.try_spend_request("acct") {
            Spend::Ok => during += 1,
            Spend::Unavailable => break,
            Spend::Pending => tokio::time::sleep(Duration::from_millis(1)).await,
            Spend::Suspended => panic!("402 while the store is down"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never became unavailable"
        );
    }
    paid += during;
    assert!(
        during > 0,
        "the lease held before the outage was not usable"
    );

    redis.start_again();
    let t = Instant::now();
    loop {
        if n.cache.try_spend_request("acct") == Spend::Ok {
            paid += 1;
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "did not recover");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    n.shutdown().await;
    let st = read(&admin, "acct").await;
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(
        st.debited,
        paid * PRICE,
        "every paid request debited exactly once"
    );
    assert_eq!(st.leased, 0);
    assert_eq!(st.credited, USD, "the credit survived the restart (AOF)");
    assert_eq!(common::audit(&url).await, vec![], "tollgate accounts audit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load_loses_and_duplicates_nothing() {
    let Fixture {
        mut redis,
        url,
        dir,
        admin,
    } = durable_with_credit("busy", USD).await;
    let nodes = [node(&url, "a", &dir).await, node(&url, "b", &dir).await];
    let stop = Arc::new(AtomicBool::new(false));
    let paid = Arc::new(AtomicU64::new(0));
    // Database queries ride the same batches: every 8th paid request also reads 3 rows and
    // writes 1.
    let queries = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for n in &nodes {
        let (cache, stop, paid, queries) =
            (n.cache.clone(), stop.clone(), paid.clone(), queries.clone());
        load.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if cache.try_spend_request("busy") == Spend::Ok {
                    let n = paid.fetch_add(1, Ordering::Relaxed);
                    if n.is_multiple_of(8) {
                        cache.charge_rows("busy", 3, 1);
                        queries.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
                if i.is_multiple_of(32) {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart(); // kill -9, then start on the same AOF
    tokio::time::sleep(Duration::from_millis(600)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    for n in nodes {
        n.shutdown().await;
    }
    let paid = paid.load(Ordering::Relaxed) as i64;
    let queries = queries.load(Ordering::Relaxed);
    let st = read(&admin, "busy").await;
    assert!(st.holds_invariant(), "{st:?}");
    assert!(paid > 1000, "too little load: {paid}");
    let p = tollgate_metering::Prices::default();
    let rows_cost = queries as i64 * (3 * p.per_row_read + p.per_row_written);
    assert_eq!(
        st.debited,
        paid * PRICE + rows_cost,
        "paid {paid}, {queries} queries: debited {}",
        st.debited
    );
    assert_eq!(st.leased, 0);
    let ledger = read_ledger(&admin).await;
    assert_eq!(ledger.iter().map(|e| e.requests).sum::<u64>() as i64, paid);
    assert_eq!(ledger.iter().map(|e| e.rows_read).sum::<u64>(), 3 * queries);
    assert_eq!(ledger.iter().map(|e| e.rows_written).sum::<u64>(), queries);
    assert_eq!(common::audit(&url).await, vec![], "tollgate accounts audit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_published_while_the_subscriber_is_down_still_resumes_the_node() {
    let redis = RedisServer::start();
    let url = redis.url();
    let dir = tempfile::tempdir().unwrap();
    let admin = RedisStore::connect(&url, "tollgate", Duration::from_secs(10))
        .await
        .unwrap();
    admin.credit("s", "v1", 10 * PRICE).await.unwrap();
    let n = node(&url, "n", &dir).await;
    loop {
        match n.spend("s").await {
            Spend::Ok => {}
            Spend::Suspended => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(n.cache.count_accounts(), (1, 1), "(cached, suspended)");
    // Cut every subscriber and publish the credit before they can come back: the event is
    // lost, only the resync after resubscribing can deliver the resumption.
    assert!(redis.kill_pubsub_clients() >= 1);
    admin.credit("s", "v2", 10 * PRICE).await.unwrap();
    // The node serves again: from the change if it slipped through before the cut, else from
    // the re-read after resubscribing.
    let t = Instant::now();
    while n.spend("s").await != Spend::Ok {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "resumption never seen"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        n.cache.count_accounts(),
        (1, 0),
        "resumed: no longer suspended"
    );
    n.shutdown().await;
    let st = read(&admin, "s").await;
    assert!(st.holds_invariant());
    assert_eq!(st.debited, 11 * PRICE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_while_redis_is_down_finishes_and_the_journal_keeps_the_usage() {
    let Fixture {
        mut redis,
        url,
        dir,
        admin,
    } = durable_with_credit("down", USD).await;
    let n = node(&url, "d1", &dir).await;
    let mut paid = 0i64;
    for _ in 0..20 {
        assert_eq!(n.spend("down").await, Spend::Ok);
        paid += 1;
    }
    redis.kill();
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), n.shutdown())
        .await
        .expect("shutdown hung while Redis was down");
    assert!(t.elapsed() < Duration::from_secs(10));
    // Redis back, the node restarts: the journaled usage is settled exactly once.
    redis.start_again();
    let n = node(&url, "d1", &dir).await;
    n.shutdown().await;
    let st = read(&admin, "down").await;
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(st.debited, paid * PRICE);
    assert_eq!(st.leased, 0);
    assert_eq!(common::audit(&url).await, vec![], "tollgate accounts audit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_back_during_the_closing_round_settles_every_batch_in_order() {
    let Fixture {
        mut redis,
        url,
        dir,
        admin,
    } = durable_with_credit("late-close", USD).await;
    let n = node(&url, "c1", &dir).await;
    let mut paid = 0i64;
    for _ in 0..20 {
        assert_eq!(n.spend("late-close").await, Spend::Ok);
        paid += 1;
    }
    redis.kill();
    // Spent from the lease while Redis is away: a settle round journals this and keeps
    // retrying, until the stop cuts it short.
    for _ in 0..10 {
        assert_eq!(n.spend("late-close").await, Spend::Ok);
        paid += 1;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopping = tokio::spawn(n.shutdown());
    // Redis comes back while the closing round is still trying.
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.start_again();
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("shutdown hung")
        .unwrap();
    // Settled by the closing round itself (no restart replays anything here).
    let st = read(&admin, "late-close").await;
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(st.debited, paid * PRICE, "{st:?}");
    assert_eq!(st.leased, 0, "{st:?}");
    assert_eq!(common::audit(&url).await, vec![], "tollgate accounts audit");
}

#[test]
fn agent_config_is_checked() {
    use tollgate_balance_cache::AgentConfig;
    let ok = AgentConfig::new("n", "/tmp/j".into());
    assert!(ok.validate().is_ok());
    let mut c = ok.clone();
    c.min_lease = c.max_lease + 1;
    assert!(c.validate().is_err());
    let mut c = ok.clone();
    c.lease_margin = c.lease_ttl;
    assert!(c.validate().is_err());
    let mut c = ok.clone();
    c.settle_interval = Duration::ZERO;
    assert!(c.validate().is_err());
    let mut c = ok;
    c.max_batch = 0;
    assert!(c.validate().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_redis_is_down_waits_to_replay_and_drops_nothing() {
    let Fixture {
        mut redis,
        url,
        dir,
        admin,
    } = durable_with_credit("late", USD).await;
    crash_after_journal(url.as_str(), &dir, "r1", "late", 300).await;
    // The restarting node's store handle exists; then Redis goes away.
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&url, "tollgate", Duration::from_secs(10))
            .await
            .unwrap(),
    );
    redis.kill();
    let waiting = tokio::spawn({
        let journal = dir.path().join("r1.journal");
        async move {
            let cache = BalanceCache::new(Prices::default());
            let cfg = AgentConfig::new("r1", journal);
            let metrics = CacheMetrics::new(&prometheus::Registry::new()).unwrap();
            Agent::start(cache, store, cfg, metrics).await.unwrap()
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "started without replaying its journal"
    );
    redis.start_again();
    let agent = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("never started after Redis came back")
        .unwrap();
    drop(agent);
    let st = read(&admin, "late").await;
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(st.debited, 300 * PRICE, "the journaled usage, exactly once");
    assert_eq!(st.leased, 0, "the crashed incarnation's lease went back");
    assert_eq!(common::audit(&url).await, vec![], "tollgate accounts audit");
}
