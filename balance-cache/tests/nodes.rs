//! Several nodes, one real Redis: leases bound spending exactly, suspension and resumption
//! travel between nodes, and a node killed between journal and send loses nothing and counts
//! nothing twice.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PRICE, crash_after_journal, hammer, node, resumed_everywhere};
use tollgate_balance_cache::{BalanceCache, Spend};
use tollgate_metering::Status;
use tollgate_testkit::TestRedis;

const CENT: i64 = 10_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_never_spend_more_than_the_balance() {
    // One Redis, or a cluster (TOLLGATE_TEST_REDIS=cluster).
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = common::shared(redis.target()).await;
    admin.credit("tiny", "voucher:1", 2 * CENT).await.unwrap(); // 40,000 requests
    let nodes = [
        node(redis.target(), "n1", &dir).await,
        node(redis.target(), "n2", &dir).await,
        node(redis.target(), "n3", &dir).await,
    ];
    let mut tasks = Vec::new();
    for n in &nodes {
        for _ in 0..2 {
            tasks.push(tokio::spawn(hammer(n.cache.clone(), "tiny")));
        }
    }
    let mut paid = 0;
    for t in tasks {
        paid += t.await.unwrap();
    }
    for n in nodes {
        n.shutdown().await;
    }
    let st = admin.account("tiny").await.unwrap().unwrap();
    assert!(st.holds_invariant(), "{st:?}");
    // Request fees never overspend: the bound for requests alone is zero.
    assert!(
        paid as i64 * PRICE <= 2 * CENT,
        "paid {paid} requests for 2 cents"
    );
    // Every paid request was settled exactly once, and every lease went back.
    assert_eq!(st.debited, paid as i64 * PRICE);
    assert_eq!(st.leased, 0);
    assert_eq!(st.available, 2 * CENT - st.debited);
    // Leases are sized to the spend, so little is left stranded at the end.
    // At most a fraction of one request per node is stranded at the very end.
    assert!(
        paid >= 39_997,
        "only {paid} of 40,000 requests could be spent"
    );
    let ledger = admin.ledger().await.unwrap();
    let requests: u64 = ledger.iter().map(|e| e.requests).sum();
    assert_eq!(requests, paid, "the ledger counts each paid request once");
    assert_eq!(
        common::audit(redis.target()).await,
        vec![],
        "tollgate accounts audit"
    );
}

/// A service on one node, as the runtime's sampler sees it: every `T_S` it has used `K` cores
/// for the whole period, and it takes one request per period. It stops when the node says its
/// CPU can no longer be paid for (the runtime's interruption). Returns (CPU-µs charged,
/// requests paid, interrupted).
async fn busy_service(cache: Arc<BalanceCache>, account: &'static str) -> (u64, u64, bool) {
    let (mut cpu_us, mut paid) = (0u64, 0u64);
    let mut tick = tokio::time::interval(T_S);
    // Far past any bound: only reached if interruption never comes.
    while cpu_us < 10_000_000 {
        tick.tick().await;
        if cache.try_spend_request(account) == Spend::Ok {
            paid += 1;
        }
        let used = K * T_S.as_micros() as u64;
        cache.charge_cpu(account, used);
        cpu_us += used;
        if cache.cpu_unpaid(account) {
            return (cpu_us, paid, true);
        }
    }
    (cpu_us, paid, false)
}

const T_S: Duration = Duration::from_millis(10);
const K: u64 = 2;

/// The overspend bound of docs/money.md, tested with CPU: three nodes run a 2-core service of
/// one account that holds 2 cents, far more CPU than it can pay for. The account may end at
/// most `D + Σᵢ p_cpu·Kᵢ·(T_settle + T_s + R)` below zero: the debt limit, plus on each node
/// what runs before its debt is settled, between samples, and while the news travels back
/// (`R`, allowed 20 ms here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_burning_cpu_overspend_no_more_than_the_bound() {
    // One Redis, or a cluster (TOLLGATE_TEST_REDIS=cluster).
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = common::shared(redis.target()).await;
    admin.credit("cpu", "voucher:1", 2 * CENT).await.unwrap();
    let nodes = [
        node(redis.target(), "c1", &dir).await,
        node(redis.target(), "c2", &dir).await,
        node(redis.target(), "c3", &dir).await,
    ];
    const D_MS: u64 = 50;
    for n in &nodes {
        n.cache.set_cpu_debt_limit_ms(D_MS);
    }
    let tasks: Vec<_> = nodes
        .iter()
        .map(|n| tokio::spawn(busy_service(n.cache.clone(), "cpu")))
        .collect();
    let (mut cpu_us, mut paid) = (0u64, 0u64);
    for t in tasks {
        let (c, p, interrupted) = t.await.unwrap();
        assert!(interrupted, "a node let the service run on unpaid");
        cpu_us += c;
        paid += p;
    }
    let metrics: Vec<_> = nodes.iter().map(|n| n.metrics.clone()).collect();
    for n in nodes {
        n.shutdown().await;
    }
    // What SREs see: the CPU the nodes charged, in seconds.
    let seen: f64 = metrics
        .iter()
        .map(|m| m.metered_cpu_seconds_total.get())
        .sum();
    assert!((seen - cpu_us as f64 / 1e6).abs() < 1e-6, "{seen} s");
    let st = admin.account("cpu").await.unwrap().unwrap();
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(st.leased, 0);
    // Every µs and request the services used was charged, exactly once.
    let p_cpu = 12_500i64;
    assert_eq!(st.debited, cpu_us as i64 * p_cpu + paid as i64 * PRICE);
    let ledger = admin.ledger().await.unwrap();
    assert_eq!(ledger.iter().map(|e| e.cpu_us).sum::<u64>(), cpu_us);
    // And the overspend stays within the bound.
    let window_us = (Duration::from_millis(50) + T_S + Duration::from_millis(20)).as_micros();
    let bound = D_MS as i64 * 1000 * p_cpu + 3 * p_cpu * K as i64 * window_us as i64;
    let overspend = st.debited - st.credited;
    println!("overspend {overspend} p$ (bound {bound} p$), {cpu_us} CPU-µs, {paid} requests");
    assert!(
        overspend <= bound,
        "overspent {overspend} p$, bound {bound}"
    );
    assert_eq!(st.status, Status::Suspended);
    assert_eq!(
        common::audit(redis.target()).await,
        vec![],
        "tollgate accounts audit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_reaches_other_nodes_and_a_credit_resumes_them() {
    // One Redis, or a cluster (TOLLGATE_TEST_REDIS=cluster).
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = common::shared(redis.target()).await;
    admin.credit("acct", "v1", 1_000 * PRICE).await.unwrap();
    let a = node(redis.target(), "a", &dir).await;
    let b = node(redis.target(), "b", &dir).await;
    // B knows the account and holds a lease, then A drains everything it can get.
    assert!(matches!(b.cache.try_spend_request("acct"), Spend::Pending));
    let _ = hammer(a.cache.clone(), "acct").await;
    let _ = hammer(b.cache.clone(), "acct").await;
    let t = Instant::now();
    loop {
        if b.cache.try_spend_request("acct") == Spend::Suspended
            && a.cache.try_spend_request("acct") == Spend::Suspended
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(2), "suspension not seen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let st = admin.account("acct").await.unwrap().unwrap();
    assert_eq!(st.status, Status::Suspended);
    // Top-up: both nodes serve again (the feed clears the suspension, each node asks for a
    // lease on its own, before any request comes).
    admin.credit("acct", "v2", 10_000 * PRICE).await.unwrap();
    // Both nodes measured how late the feed brought them these changes (store clock to
    // theirs): the metric SREs alert on.
    resumed_everywhere(&[&a, &b], "acct", 2).await;
    for n in [&a, &b] {
        let t = Instant::now();
        while n.cache.try_spend_request("acct") != Spend::Ok {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "no lease after resumption"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    let st = admin.account("acct").await.unwrap().unwrap();
    assert!(st.holds_invariant());
    assert_eq!(st.leased, 0);
    assert!(st.debited <= st.credited);
    assert_eq!(
        common::audit(redis.target()).await,
        vec![],
        "tollgate accounts audit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_between_journal_and_send_loses_nothing_and_counts_nothing_twice() {
    // One Redis, or a cluster (TOLLGATE_TEST_REDIS=cluster).
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = common::shared(redis.target()).await;
    admin.credit("crash", "v1", 10 * CENT).await.unwrap();
    crash_after_journal(redis.target(), &dir, "crashy", "crash", 250).await;

    let before = admin.account("crash").await.unwrap().unwrap();
    assert!(
        before.debited < 250 * PRICE,
        "the journaled batch was not sent before the crash"
    );
    assert!(before.leased > 0, "the dead node still holds its lease");

    // Restart with the same journal: replay, release the dead incarnation, start anew.
    for round in 0..2 {
        let n = node(redis.target(), "crashy", &dir).await;
        // `node()` uses <name>.journal in the same dir as the child did.
        n.shutdown().await;
        let st = admin.account("crash").await.unwrap().unwrap();
        assert!(st.holds_invariant(), "{st:?}");
        assert_eq!(
            st.debited,
            250 * PRICE,
            "round {round}: exactly the 250 requests"
        );
        assert_eq!(st.leased, 0);
    }
    let ledger = admin.ledger().await.unwrap();
    assert_eq!(ledger.iter().map(|e| e.requests).sum::<u64>(), 250);
    assert_eq!(
        common::audit(redis.target()).await,
        vec![],
        "tollgate accounts audit"
    );
}

async fn spend_all(n: &common::Node, accounts: &[&str]) {
    for _ in 0..50 {
        for a in accounts {
            assert_eq!(n.spend(a).await, Spend::Ok);
        }
    }
}

/// With a book of record declared, a node keeps its acknowledged batches in its journal until
/// the book's mark passes them (so a rebuild after a Redis data loss finds each batch in the
/// book or a journal); without one it keeps none. On a cluster, until every shard the batch
/// has lines in shows its book past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_batches_stay_in_the_journal_until_the_book_holds_them() {
    use tollgate_metering::Journal;
    // One Redis, or a cluster (TOLLGATE_TEST_REDIS=cluster).
    let redis = TestRedis::start();
    let at = redis.target();
    let dir = tempfile::tempdir().unwrap();
    let admin = common::shared(redis.target()).await;
    // Accounts in several shards (on a cluster), one batch line each.
    let accounts = ["keeper", "keeper-2", "keeper-3", "keeper-4"];
    for a in accounts {
        admin
            .credit(a, &format!("voucher:{a}"), CENT)
            .await
            .unwrap();
    }
    let journal = dir.path().join("k1.journal");

    // No book: nothing kept.
    let n = node(redis.target(), "k1", &dir).await;
    spend_all(&n, &accounts).await;
    n.shutdown().await;
    let c = Journal::read_stopped(&journal).unwrap();
    assert!(c.kept.is_empty() && c.pending.is_empty(), "{c:?}");

    // A book declared, not yet copying: every acknowledged batch stays, with its usage.
    common::declare_book(&at).await;
    let n = node(redis.target(), "k1", &dir).await;
    spend_all(&n, &accounts).await;
    n.shutdown().await;
    let c = Journal::read_stopped(&journal).unwrap();
    let first = c.incarnation.clone().unwrap();
    let requests: u64 = c
        .kept
        .iter()
        .filter(|k| k.batch.epoch == first.epoch)
        .flat_map(|k| &k.batch.entries)
        .map(|e| e.usage.requests)
        .sum();
    assert_eq!(requests, 50 * accounts.len() as u64, "{c:?}");
    assert!(c.pending.is_empty());

    // A book that copies (its mark follows each stream's end): the next incarnation drops
    // them from its journal.
    let n = node(redis.target(), "k1", &dir).await;
    assert_eq!(n.spend("keeper").await, Spend::Ok);
    let deadline = Instant::now() + Duration::from_secs(5);
    let dropped = loop {
        common::book_everything(&at).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Read the file (the running node holds the lock, so parse it directly).
        let c = tollgate_metering::parse_journal(&std::fs::read(&journal).unwrap());
        if !c.kept.iter().any(|k| k.batch.epoch == first.epoch) {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    n.shutdown().await;
    assert!(dropped, "the booked batches were still kept");
}

/// Redis loses its data while a node runs (a restart without its AOF, emulated by FLUSHALL; on
/// a cluster, every master's): the node's kept batches were applied by the lost store and the
/// book never copied them, so they must stay in its journal for `book rebuild`, whatever the
/// new store says (no book declared yet, a new generation, marks of a new stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_batches_survive_a_redis_data_loss_under_a_running_node() {
    use tollgate_metering::Journal;
    // One Redis, or a cluster (TOLLGATE_TEST_REDIS=cluster).
    let redis = TestRedis::start();
    let at = redis.target();
    let dir = tempfile::tempdir().unwrap();
    let admin = common::shared(redis.target()).await;
    admin.credit("lossy", "voucher:l", CENT).await.unwrap();
    common::declare_book(&at).await;
    // Earlier incarnations: the node runs at epoch 3 (an empty Redis would count from 1).
    admin.begin("l1").await.unwrap();
    admin.begin("l1").await.unwrap();
    let journal = dir.path().join("l1.journal");
    let n = node(redis.target(), "l1", &dir).await;
    for _ in 0..40 {
        assert_eq!(n.spend("lossy").await, Spend::Ok);
    }
    // Settled (applied and acknowledged) before the loss.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.flush_all();
    // The node goes on in the empty store (one Redis: a new incarnation, a new generation);
    // the book declared again and its mark moved past everything the new streams hold.
    admin.credit("lossy", "voucher:l2", CENT).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    common::declare_book(&at).await;
    for _ in 0..10 {
        let _ = n.spend("lossy").await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    common::book_everything(&at).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    n.shutdown().await;
    let c = Journal::read_stopped(&journal).unwrap();
    let before_loss: u64 = c
        .kept
        .iter()
        .filter(|k| k.batch.epoch == 3)
        .flat_map(|k| &k.batch.entries)
        .map(|e| e.usage.requests)
        .sum();
    assert_eq!(before_loss, 40, "{c:?}");
    // The node began a new incarnation in the empty store (one Redis: at the gap; a cluster:
    // its streams' generations moved), and did not reuse an epoch (its settle keys would be
    // the lost ones'), although the empty store counted from 1 again.
    assert!(c.incarnation.as_ref().unwrap().epoch > 3, "{c:?}");
}
