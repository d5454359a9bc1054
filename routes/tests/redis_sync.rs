//! Route store and sync against a real redis-server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::Registry;
use tokio::sync::watch;
use tollgate_routes::{
    Route, RouteKey, RouteStore, RouteSync, RouteTable, SyncMetrics, SyncOptions,
};
use tollgate_testkit::{RedisCluster, RedisServer, TestRedis};

fn route(port: u16) -> Route {
    Route {
        upstreams: vec![SocketAddr::from(([127, 0, 0, 1], port))],
        account_id: Some("acct-1".into()),
        project_id: None,
        deployment_id: None,
    }
}

fn port_of(t: &RouteTable, host: &str) -> Option<u16> {
    t.lookup(host).map(|r| r.upstreams[0].port())
}

struct Synced {
    table: Arc<RouteTable>,
    metrics: SyncMetrics,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_sync(redis: impl Into<tollgate_kv::Target>) -> Synced {
    let table = Arc::new(RouteTable::new("localhost", vec![]));
    let metrics = SyncMetrics::new(&Registry::new()).unwrap();
    let mut opts = SyncOptions::new(redis);
    opts.ping_interval = Duration::from_millis(100);
    opts.ping_timeout = Duration::from_millis(200);
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(RouteSync::new(opts, table.clone(), metrics.clone()).run(rx));
    Synced {
        table,
        metrics,
        stop,
        task,
    }
}

async fn wait_for(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    false
}

#[tokio::test]
async fn loads_existing_routes_then_follows_changes() {
    let redis = TestRedis::start();
    let store = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    let v1 = store
        .put(&RouteKey::slug("one").unwrap(), &route(1001))
        .await
        .unwrap();
    store
        .put(&RouteKey::host("Shop.Example.com").unwrap(), &route(1002))
        .await
        .unwrap();
    let s = start_sync(redis.target());
    assert!(wait_for(Duration::from_secs(5), || s.table.is_synced()).await);
    assert_eq!(port_of(&s.table, "one.localhost"), Some(1001));
    assert_eq!(port_of(&s.table, "shop.example.com"), Some(1002));
    assert_eq!(s.table.version_of("one.localhost"), Some(v1));
    assert_eq!(
        s.table
            .lookup("one.localhost")
            .unwrap()
            .account_id
            .as_deref(),
        Some("acct-1")
    );

    let v3 = store
        .put(&RouteKey::slug("one").unwrap(), &route(2001))
        .await
        .unwrap();
    assert!(v3 > v1);
    assert!(
        wait_for(Duration::from_secs(2), || port_of(
            &s.table,
            "one.localhost"
        ) == Some(2001))
        .await
    );
    store.delete(&RouteKey::slug("one").unwrap()).await.unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || port_of(
            &s.table,
            "one.localhost"
        )
        .is_none())
        .await
    );
    assert_eq!(s.table.snapshot().len(), 1);
    assert_eq!(s.metrics.routes.get(), 1);
    assert!(s.metrics.changes_applied_total.get() >= 2);
    s.stop.send(true).unwrap();
    s.task.await.unwrap();
}

#[tokio::test]
async fn resubscribes_and_rereads_after_the_subscriber_is_killed() {
    let redis = RedisServer::start();
    let store = RouteStore::connect(&redis.url(), "tollgate").await.unwrap();
    let s = start_sync(redis.url());
    assert!(wait_for(Duration::from_secs(5), || s.table.is_synced()).await);
    let full_before = s.metrics.full_syncs_total.get();

    assert!(redis.kill_pubsub_clients() >= 1);
    // Written while no subscription exists: only the re-read can deliver it.
    store
        .put(&RouteKey::slug("late").unwrap(), &route(3001))
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(3), || port_of(
            &s.table,
            "late.localhost"
        ) == Some(3001))
        .await,
        "a change written during the outage was never served"
    );
    assert!(s.metrics.full_syncs_total.get() > full_before);
    assert!(s.metrics.resubscribes_total.get() >= 1);
    // And the new subscription is live.
    store
        .put(&RouteKey::slug("after").unwrap(), &route(3002))
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(2), || port_of(
            &s.table,
            "after.localhost"
        ) == Some(3002))
        .await
    );
    s.stop.send(true).unwrap();
}

#[tokio::test]
async fn invalid_writes_are_refused_and_bad_records_skipped() {
    let redis = TestRedis::start();
    let store = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    let empty = Route {
        upstreams: vec![],
        account_id: None,
        project_id: None,
        deployment_id: None,
    };
    assert!(
        store
            .put(&RouteKey::slug("x").unwrap(), &empty)
            .await
            .is_err()
    );
    // A foreign writer put junk in the hash: the good routes still load.
    let mut c = redis.conn().await;
    let hash = format!("{}:routes", redis.prefix("tollgate"));
    let _: () = redis::cmd("HSET")
        .arg(&hash)
        .arg("slug:junk")
        .arg("{not json")
        .query_async(&mut c)
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&hash)
        .arg("nonsense")
        .arg("{}")
        .query_async(&mut c)
        .await
        .unwrap();
    store
        .put(&RouteKey::slug("good").unwrap(), &route(4001))
        .await
        .unwrap();
    let s = start_sync(redis.target());
    assert!(wait_for(Duration::from_secs(5), || s.table.is_synced()).await);
    assert_eq!(port_of(&s.table, "good.localhost"), Some(4001));
    assert_eq!(s.table.snapshot().len(), 1);
    assert!(
        store
            .load_all()
            .await
            .unwrap()
            .iter()
            .all(|(k, _)| k.field() == "slug:good")
    );
    s.stop.send(true).unwrap();
}

/// On a Redis Cluster the route channel is sharded: a failover moves it, the syncer notices
/// (its subscription is told the slot moved, or its ping fails), subscribes again and rereads,
/// so a route written while it was away is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_routes_through_a_cluster_failover() {
    let cluster = RedisCluster::start();
    let target = tollgate_kv::Target::Cluster {
        seeds: cluster.urls(),
        replica_acks: 1,
    };
    let store = RouteStore::connect(&target, "tollgate").await.unwrap();
    store
        .put(&RouteKey::slug("before").unwrap(), &route(5001))
        .await
        .unwrap();
    let s = start_sync(&target);
    assert!(
        wait_for(Duration::from_secs(5), || port_of(
            &s.table,
            "before.localhost"
        ) == Some(5001))
        .await
    );
    let full_before = s.metrics.full_syncs_total.get();
    // Every master hands over: the routes' slot moves wherever it is.
    for m in cluster.masters() {
        cluster.failover(m);
    }
    store
        .put(&RouteKey::slug("during").unwrap(), &route(5002))
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || port_of(
            &s.table,
            "during.localhost"
        ) == Some(5002))
        .await,
        "a route written across the failover was never served"
    );
    assert!(
        wait_for(Duration::from_secs(10), || s.metrics.full_syncs_total.get()
            > full_before)
        .await,
        "the syncer reread after the slot moved"
    );
    store
        .put(&RouteKey::slug("after").unwrap(), &route(5003))
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || port_of(
            &s.table,
            "after.localhost"
        ) == Some(5003))
        .await
    );
    s.stop.send(true).unwrap();
}
