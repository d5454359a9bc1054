//! Metering nodes on a real Redis Cluster (3 masters, 3 replicas): money split over shards,
//! the sharded change feed, and a master failed over and killed under load.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{PRICE, hammer, node_on, resumed_everywhere};
use tollgate_balance_cache::Spend;
use tollgate_metering::{ClusterStore, Status, Store, shard_of};
use tollgate_testkit::RedisCluster;

const USD: i64 = 1_000_000_000_000;
const SHARDS: u32 = 16;

async fn store(cluster: &RedisCluster) -> Arc<dyn Store> {
    Arc::new(
        ClusterStore::connect(&cluster.urls(), "tollgate", Duration::from_secs(10), SHARDS)
            .await
            .unwrap(),
    )
}

/// A credit as payments make it: retried while the store answers `Unavailable` (a write
/// no replica acknowledged yet is not acknowledged).
async fn credit(store: &Arc<dyn Store>, account: &str, key: &str, amount: i64) {
    let t = Instant::now();
    loop {
        match store.credit(account, key, amount).await {
            Ok(_) => return,
            Err(tollgate_metering::CreditError::Unavailable(e))
                if t.elapsed() < Duration::from_secs(20) =>
            {
                println!("credit {key}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("credit {key}: {e}"),
        }
    }
}

/// Spends on every account, from every node, until `stop`; counts each paid request per
/// account.
fn load(
    nodes: &[common::Node],
    accounts: &[String],
    stop: &Arc<AtomicBool>,
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    Arc<HashMap<String, AtomicU64>>,
) {
    let paid: Arc<HashMap<String, AtomicU64>> = Arc::new(
        accounts
            .iter()
            .map(|a| (a.clone(), AtomicU64::new(0)))
            .collect(),
    );
    let mut tasks = Vec::new();
    for n in nodes {
        let (cache, stop, paid, accounts) = (
            n.cache.clone(),
            stop.clone(),
            paid.clone(),
            accounts.to_vec(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let a = &accounts[i % accounts.len()];
                if cache.try_spend_request(a) == Spend::Ok {
                    paid[a].fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                if i.is_multiple_of(32) {
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
            }
        }));
    }
    (tasks, paid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failed_over_and_another_killed_under_load_lose_and_double_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let mut cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = store(&cluster).await;
    // Twelve accounts over several shards, so every master holds some.
    let accounts: Vec<String> = (0..12).map(|i| format!("acct{i}")).collect();
    let shards: std::collections::HashSet<u32> =
        accounts.iter().map(|a| shard_of(a, SHARDS)).collect();
    assert!(
        shards.len() >= 6,
        "accounts in {} shards only",
        shards.len()
    );
    for a in &accounts {
        credit(&admin, a, &format!("v1:{a}"), USD).await;
    }
    let mut stores = Vec::new();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let s = Arc::new(
            ClusterStore::connect(&cluster.urls(), "tollgate", Duration::from_secs(10), SHARDS)
                .await
                .unwrap(),
        );
        stores.push(s.clone());
        nodes.push(node_on(s, name, &dir).await);
    }
    // One more account, spent to suspension on every node before the faults: its top-up after
    // them must reach every node through the feed (or the resync of a new subscription).
    credit(&admin, "feedcheck", "f1", 300 * PRICE).await;
    let mut feed_paid = 0;
    for n in &nodes {
        feed_paid += hammer(n.cache.clone(), "feedcheck").await as i64;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tasks, paid) = load(&nodes, &accounts, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // An operator's failover (maintenance): the replica takes over, nothing is lost.
    let masters = cluster.masters();
    let promoted = cluster.failover(masters[0]);
    println!("failed over {} to {promoted}", masters[0]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A master killed: its replica takes over after the node timeout (2 s).
    let victim = masters[1];
    let t = Instant::now();
    let promoted = cluster.kill(victim);
    println!("killed {victim}; {promoted} master after {:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(800)).await;
    cluster.start_again(victim);
    credit(&admin, "feedcheck", "f2", 10_000 * PRICE).await;
    let t = Instant::now();
    while nodes
        .iter()
        .any(|n| n.cache.is_suspended("feedcheck") != Some(false))
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "a top-up after the failovers did not reach every node"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "top-up seen by every node {:?} after its credit was acknowledged",
        t.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    for n in nodes {
        n.shutdown().await;
    }
    let mut total = 0;
    let ledger = admin.ledger().await.unwrap();
    for a in &accounts {
        let paid = paid[a].load(Ordering::Relaxed) as i64;
        total += paid;
        let st = admin.account(a).await.unwrap().unwrap();
        assert!(st.holds_invariant(), "{st:?}");
        assert_eq!(st.credited, USD);
        assert_eq!(st.leased, 0, "{a}: every lease returned");
        assert_eq!(
            st.debited,
            paid * PRICE,
            "{a}: paid {paid} requests, debited {} p$",
            st.debited
        );
        let requests: u64 = ledger
            .iter()
            .filter(|e| &e.account == a)
            .map(|e| e.requests)
            .sum();
        assert_eq!(
            requests as i64, paid,
            "{a}: the ledger counts each request once"
        );
    }
    let st = admin.account("feedcheck").await.unwrap().unwrap();
    assert!(st.holds_invariant(), "{st:?}");
    assert_eq!(st.debited, feed_paid * PRICE);
    assert_eq!(st.leased, 0);
    println!("{total} paid requests over {} accounts", accounts.len());
    for s in &stores {
        assert_eq!(s.lost_parts(), 0, "no shard lost an acknowledged part");
    }
    assert!(total > 2_000, "too little load: {total}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspension_and_resumption_reach_every_node_through_the_sharded_feed() {
    let cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    let admin = store(&cluster).await;
    credit(&admin, "acct", "v1", 1_000 * PRICE).await;
    let a = node_on(store(&cluster).await, "a", &dir).await;
    let b = node_on(store(&cluster).await, "b", &dir).await;
    assert!(matches!(b.cache.try_spend_request("acct"), Spend::Pending));
    // A spends all it can get, then B what it holds; each hears of the other's changes.
    let paid =
        (hammer(a.cache.clone(), "acct").await + hammer(b.cache.clone(), "acct").await) as i64;
    let t = Instant::now();
    while b.cache.try_spend_request("acct") != Spend::Suspended
        || a.cache.try_spend_request("acct") != Spend::Suspended
    {
        assert!(t.elapsed() < Duration::from_secs(2), "suspension not seen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(paid > 0);
    let st = admin.account("acct").await.unwrap().unwrap();
    assert_eq!(st.status, Status::Suspended);
    credit(&admin, "acct", "v2", 10_000 * PRICE).await;
    resumed_everywhere(&[&a, &b], "acct", 1).await;
    a.shutdown().await;
    b.shutdown().await;
    let st = admin.account("acct").await.unwrap().unwrap();
    assert!(st.holds_invariant());
    assert_eq!(st.leased, 0);
    assert_eq!(st.debited, paid * PRICE);
}

/// A shard loses a running node's acknowledged parts (its mark of the incarnation gone, as
/// when a master and its replica fail together): the node's next part there is applied past
/// the loss and reported, the node begins a new incarnation, and the batches the shard lost
/// stay in its journal however far the shard's mark and the book move past them (a rebuild
/// or an operator needs them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_lost_a_nodes_parts_leaves_them_in_its_journal_and_the_node_renews() {
    use tollgate_metering::{Journal, parse_journal};
    let cluster = RedisCluster::start();
    let at = tollgate_kv::Target::Cluster {
        seeds: cluster.urls(),
        replica_acks: 1,
    };
    let dir = tempfile::tempdir().unwrap();
    let admin = common::shared(at.clone()).await;
    admin.credit("loser", "voucher:x", USD).await.unwrap();
    common::declare_book(&at).await;
    let journal = dir.path().join("x1.journal");
    let n = common::node(at.clone(), "x1", &dir).await;
    for _ in 0..20 {
        assert_eq!(n.spend("loser").await, Spend::Ok);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let c = parse_journal(&std::fs::read(&journal).unwrap());
    let epoch = c.incarnation.as_ref().unwrap().epoch;
    let kept = |c: &tollgate_metering::JournalContent| -> u64 {
        c.kept
            .iter()
            .filter(|k| k.batch.epoch == epoch)
            .flat_map(|k| &k.batch.entries)
            .map(|e| e.usage.requests)
            .sum()
    };
    assert_eq!(kept(&c), 20, "{c:?}");
    let mark = format!(
        "{{tollgate:m{}}}:inc:x1:{epoch}",
        shard_of("loser", tollgate_metering::DEFAULT_SHARDS)
    );
    let mut conn = at.connect().await.unwrap();
    let gone: i64 = redis::cmd("DEL")
        .arg(&mark)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(gone, 1, "{mark}");
    // More usage: its part goes past the loss, and the node begins a new incarnation.
    let deadline = Instant::now() + Duration::from_secs(10);
    let renewed = loop {
        assert_eq!(n.spend("loser").await, Spend::Ok);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c = parse_journal(&std::fs::read(&journal).unwrap());
        if c.incarnation.as_ref().unwrap().epoch > epoch {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    assert!(
        renewed,
        "the node went on under the incarnation the shard lost"
    );
    // The book past everything in every shard: what the shard lost stays kept.
    for _ in 0..5 {
        assert_eq!(n.spend("loser").await, Spend::Ok);
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    common::book_everything(&at).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    n.shutdown().await;
    let c = Journal::read_stopped(&journal).unwrap();
    assert!(kept(&c) >= 20, "a lost batch left the journal: {c:?}");
}
