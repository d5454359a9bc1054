//! One Redis against a Redis Cluster of 6 processes (3 masters, 3 replicas), same machine, same
//! run: settle account lines per second with 1, 4 and 16 nodes settling at once; the change
//! feed's propagation (write through node A, seen by node B); a cold resync of `ACCOUNTS`
//! (default 100,000) accounts; and a proxy node's start with `PROJECTS` (default 10,000)
//! projects' routes in Redis (routes are on one Redis only).
//! Run: `cargo bench -p tollgate-benches --bench cluster_scale`

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tollgate_metering::{ClusterStore, RedisStore, SettleBatch, SettleEntry, Store, Usage};
use tollgate_testkit::{RedisCluster, RedisServer};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    tollgate_benches::run_probe("cluster_scale", run());
}

/// CPU time (user + system) a process has used, in µs (/proc/<pid>/stat, 100 ticks/s).
fn cpu_us(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // Fields 14 and 15 of stat (utime, stime) are 11 and 12 after the command name.
    (t(11) + t(12)) * 10_000
}

const LINES: usize = 500;

async fn run() -> Res<()> {
    let n: usize = std::env::var("ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let ids: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("acct-{i:07}")).collect());
    let redis = RedisServer::start();
    let cluster = RedisCluster::start();
    let one = || async {
        Ok::<Arc<dyn Store>, Box<dyn std::error::Error>>(Arc::new(
            RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10)).await?,
        ))
    };
    let many = || async {
        Ok::<Arc<dyn Store>, Box<dyn std::error::Error>>(Arc::new(
            ClusterStore::connect(
                &cluster.urls(),
                "tollgate",
                Duration::from_secs(10),
                tollgate_metering::DEFAULT_SHARDS,
            )
            .await?,
        ))
    };
    // (pid, is a master) of the Redis processes serving each store.
    let procs = |cluster_side: bool| -> Vec<(u32, bool)> {
        if cluster_side {
            cluster.pids()
        } else {
            vec![(redis.pid(), true)]
        }
    };
    for (name, store) in [("one Redis", one().await?), ("cluster", many().await?)] {
        // Accounts made through the store (a credit each), as payments make them.
        let t = Instant::now();
        for chunk in ids.chunks(2_000) {
            let calls = chunk
                .iter()
                .map(|id| store.credit(id, id, 5_000_000_000_000));
            for r in futures_util::future::join_all(calls).await {
                r?;
            }
        }
        println!(
            "{name}: {n} accounts credited in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let t = Instant::now();
        let mut found = 0;
        for chunk in ids.chunks(1000) {
            found += store.account_changes(chunk).await?.iter().flatten().count();
        }
        println!(
            "{name}: cold resync of {found} accounts (node view, chunks of 1,000) in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        for nodes in [1usize, 4, 16] {
            let batches = 240 / nodes as u64;
            let pids = procs(name == "cluster");
            let cpu0: Vec<u64> = pids.iter().map(|(p, _)| cpu_us(*p)).collect();
            let t = Instant::now();
            let mut tasks = Vec::new();
            for k in 0..nodes {
                let (store, ids) = (store.clone(), ids.clone());
                let node = format!("bench-{name}-{nodes}-{k}").replace(' ', "-");
                tasks.push(tokio::spawn(async move {
                    let inc = store.begin(&node).await?;
                    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                    for seq in 1..=batches {
                        let entries = (0..LINES)
                            .map(|j| SettleEntry {
                                account: ids
                                    [((k * 7_777 + seq as usize * LINES + j) * 7919) % ids.len()]
                                .clone(),
                                usage: Usage {
                                    requests: 100,
                                    cpu_us: 2_000,
                                    ..Default::default()
                                },
                                cost: 100 * 500_000 + 2_000 * 12_500,
                                give_back: 0,
                                ask: 50_000_000,
                            })
                            .collect::<Vec<_>>();
                        let mut seen = std::collections::HashSet::new();
                        let entries = entries
                            .into_iter()
                            .filter(|e| seen.insert(e.account.clone()))
                            .collect();
                        let b = SettleBatch {
                            node_id: node.clone(),
                            epoch: inc.epoch,
                            seq,
                            entries,
                        };
                        let t0 = Instant::now();
                        store.settle(&b).await?;
                        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
                    }
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hist)
                }));
            }
            let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            for t in tasks {
                all.add(t.await?.map_err(|e| e.to_string())?)?;
            }
            let took = t.elapsed();
            let lines = (batches as usize * nodes * LINES) as f64;
            let (mut masters, mut replicas, mut busiest) = (0u64, 0u64, 0u64);
            for ((p, master), before) in pids.iter().zip(&cpu0) {
                let used = cpu_us(*p).saturating_sub(*before);
                if *master {
                    masters += used;
                    busiest = busiest.max(used);
                } else {
                    replicas += used;
                }
            }
            println!(
                "{name}: {nodes} nodes settling at once, 500-line batches: p50 {:.2} ms, p99 {:.2} ms; {:.0} account lines/s; Redis CPU per line: masters {:.1} µs (busiest master {:.1} µs), replicas {:.1} µs",
                all.value_at_quantile(0.5) as f64 / 1000.0,
                all.value_at_quantile(0.99) as f64 / 1000.0,
                lines / took.as_secs_f64(),
                masters as f64 / lines,
                busiest as f64 / lines,
                replicas as f64 / lines,
            );
        }
        // The change feed: a credit through one handle, seen by another's subscriber.
        let b_store = if name == "cluster" {
            many().await?
        } else {
            one().await?
        };
        let mut feed = b_store.subscribe();
        tollgate_benches::feed_live(&mut feed).await?;
        let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let changes = 5_000;
        for i in 0..changes {
            let account = &ids[(i * 31) % ids.len()];
            let t0 = Instant::now();
            let out = store.credit(account, &format!("feed{i}"), 1_000).await?;
            let want = out.state.version;
            tollgate_benches::feed_reaches(&mut feed, account, want).await?;
            hist.record(t0.elapsed().as_micros().max(1) as u64)?;
        }
        println!(
            "{name}: feed, {changes} credits through A -> seen by B: p50 {} µs, p99 {} µs, max {} µs",
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99),
            hist.max()
        );
    }
    routes_at_start(&redis).await
}

/// A node's start with `PROJECTS` routes in Redis: the time until its route table is synced and
/// serves them all, and the process's RSS growth for the table.
async fn routes_at_start(redis: &RedisServer) -> Res<()> {
    use tollgate_routes::{
        Route, RouteKey, RouteStore, RouteSync, RouteTable, SyncMetrics, SyncOptions,
    };
    let n: usize = std::env::var("PROJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let store = RouteStore::connect(&redis.url(), "tollgate").await?;
    for i in 0..n {
        let route = Route {
            upstreams: vec![std::net::SocketAddr::from((
                [10, 0, (i / 250) as u8, (i % 250) as u8],
                8_000 + (i % 1_000) as u16,
            ))],
            account_id: Some(format!("did:pkh:eip155:42431:0x{:040x}", i)),
            project_id: Some(format!("prj_{i:08}")),
            deployment_id: Some(format!("dep_{i:08}")),
        };
        store
            .put(&RouteKey::slug(&format!("project-{i}"))?, &route)
            .await?;
    }
    let before = rss_bytes();
    let t = Instant::now();
    let table = Arc::new(RouteTable::new("localhost", vec![]));
    let metrics = SyncMetrics::new(&prometheus::Registry::new())?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(
        RouteSync::new(SyncOptions::new(redis.url()), table.clone(), metrics).run(stop_rx),
    );
    let last = format!("project-{}.localhost", n - 1);
    while !(table.is_synced()
        && table.lookup(&last).is_some()
        && table.lookup("project-0.localhost").is_some())
    {
        if t.elapsed() > Duration::from_secs(60) {
            return Err("the route table never synced".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = t.elapsed();
    let grown = rss_bytes().saturating_sub(before);
    if table
        .lookup(&format!("project-{}.localhost", n - 1))
        .is_none()
    {
        return Err("the last project's route is not served".into());
    }
    let _ = stop.send(true);
    println!(
        "node start with {n} projects' routes: table synced in {:.0} ms; RSS +{:.1} MiB ({:.0} bytes per route)",
        took.as_secs_f64() * 1000.0,
        grown as f64 / 1_048_576.0,
        grown as f64 / n as f64
    );
    Ok(())
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    s.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}
