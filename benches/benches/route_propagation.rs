//! Route change propagation: a write to Redis → served by every proxy node.
//!
//! Starts a private redis-server and two independent sync loops ("nodes", each with its own
//! connections and table), then writes 10,000 route changes one after another and measures, for
//! each, the time from just before the write call until *both* tables serve it. Prints
//! p50/p99/p99.9/max. Then the same on a 3 + 3 Redis Cluster (the write waits for a replica,
//! the channel is sharded), in the same run. Run:
//! `cargo bench -p tollgate-benches --bench route_propagation`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::watch;
use tollgate_kv::Target;
use tollgate_routes::{
    Route, RouteKey, RouteStore, RouteSync, RouteTable, SyncMetrics, SyncOptions,
};
use tollgate_testkit::{RedisCluster, RedisServer};

const CHANGES: u64 = 10_000;
const KEYS: u64 = 1_000;

fn main() {
    tollgate_benches::run_probe("route_propagation", run());
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let redis = RedisServer::start();
    measure(Target::One(redis.url()), "loopback redis-server").await?;
    drop(redis);
    let cluster = RedisCluster::start();
    let target = Target::Cluster {
        seeds: cluster.urls(),
        replica_acks: 1,
    };
    measure(target, "loopback Redis Cluster, 3 masters + 3 replicas").await
}

async fn measure(target: Target, what: &str) -> Result<(), Box<dyn std::error::Error>> {
    let store = RouteStore::connect(&target, "tollgate").await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let table = Arc::new(RouteTable::new("localhost", vec![]));
        let metrics = SyncMetrics::new(&prometheus::Registry::new())?;
        let sync = RouteSync::new(SyncOptions::new(&target), table.clone(), metrics);
        tokio::spawn(sync.run(stop_rx.clone()));
        nodes.push(table);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !nodes.iter().all(|t| t.is_synced()) {
        if Instant::now() > deadline {
            return Err("nodes never synced".into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut watchers: Vec<_> = nodes.iter().map(|t| t.watch_version()).collect();
    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let started = Instant::now();
    for i in 0..CHANGES {
        let key = RouteKey::slug(&format!("svc-{}", i % KEYS))?;
        let route = Route {
            upstreams: vec![SocketAddr::from((
                [127, 0, 0, 1],
                1024 + (i % 50_000) as u16,
            ))],
            account_id: None,
            project_id: None,
            deployment_id: None,
        };
        let t0 = Instant::now();
        let v = store.put(&key, &route).await?;
        for w in watchers.iter_mut() {
            tokio::time::timeout(Duration::from_secs(2), w.wait_for(|seen| *seen >= v)).await??;
        }
        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
        // Both tables must now serve exactly this route.
        for t in &nodes {
            let port = t
                .lookup(&format!("svc-{}.localhost", i % KEYS))
                .map(|r| r.upstreams[0].port());
            if port != Some(route.upstreams[0].port()) {
                return Err(format!("change {i} not served").into());
            }
        }
    }
    let total = started.elapsed();
    let _ = stop_tx.send(true);
    println!("route_propagation: {CHANGES} changes over {KEYS} keys, 2 nodes, {what}");
    println!(
        "  write -> served by both nodes (µs): p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max()
    );
    println!(
        "  {:.0} changes/s sequential ({:.2} s total)",
        CHANGES as f64 / total.as_secs_f64(),
        total.as_secs_f64()
    );
    Ok(())
}
