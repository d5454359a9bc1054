//! Money-core numbers that are not micro-benchmarks, printed as a table:
//! memory per cached account at 1,000,000 accounts; cold resync of 1,000,000 accounts from
//! Redis; settle script latency with 500-account batches and settles per second; change-feed
//! propagation from one store handle ("node A") to another ("node B").
//! Run: `cargo bench -p tollgate-benches --bench money_scale`

use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tollgate_balance_cache::BalanceCache;
use tollgate_metering::{Prices, RedisStore, SettleBatch, SettleEntry, Store, Usage};
use tollgate_testkit::RedisServer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    tollgate_benches::run_probe("money_scale", run());
}

async fn run() -> Res<()> {
    let n: usize = std::env::var("ACCOUNTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let ids: Vec<String> = (0..n).map(|i| format!("acct-{i:07}")).collect();

    // 1. Memory per cached account, with short ids or (`IDS=did`) real ones:
    // `did:pkh:eip155:<chain>:0x<address>`, 63 bytes. One form per process, so that memory
    // freed by one measurement cannot flatter the next. Ids are made before measuring: they
    // are the caller's, not the cache's.
    let did = std::env::var("IDS").is_ok_and(|v| v == "did");
    let mem_ids: Vec<String> = if did {
        (0..n)
            .map(|i| {
                format!(
                    "did:pkh:eip155:42431:0x{:040x}",
                    i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                )
            })
            .collect()
    } else {
        ids.clone()
    };
    let before = rss_bytes();
    let cache = BalanceCache::new(Prices::default());
    for id in &mem_ids {
        cache.bench_preload(id, 1_000_000_000);
    }
    let after = rss_bytes();
    println!(
        "cache, {}: {n} accounts, RSS +{:.1} MiB = {:.0} bytes per account",
        if did {
            "did:pkh ids (63 bytes)"
        } else {
            "12-byte ids"
        },
        (after - before) as f64 / 1048576.0,
        (after - before) as f64 / n as f64
    );
    drop(cache);
    drop(mem_ids);
    if std::env::var("ONLY_MEMORY").is_ok() {
        return Ok(());
    }

    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10)).await?;

    // 2. Cold resync: accounts written directly (set-up), then read back as a restarting node
    //    does, in pipelined chunks of 1,000.
    let client = redis::Client::open(redis.url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    for chunk in ids.chunks(10_000) {
        let mut p = redis::pipe();
        for id in chunk {
            p.cmd("HSET")
                .arg(format!("tollgate:acct:{id}"))
                .arg(&[
                    "credited",
                    "5000000000000",
                    "debited",
                    "0",
                    "avail",
                    "5000000000000",
                ])
                .arg(&["leased", "0", "status", "active", "ver", "1"])
                .ignore();
        }
        let () = p.query_async(&mut conn).await?;
    }
    // What a restarting node reads (version, available, status), then the full records.
    for (what, full) in [
        ("resync (node view)", false),
        ("resync (full records)", true),
    ] {
        let t = Instant::now();
        let mut found = 0usize;
        for chunk in ids.chunks(1000) {
            found += if full {
                store.accounts(chunk).await?.iter().flatten().count()
            } else {
                store.account_changes(chunk).await?.iter().flatten().count()
            };
        }
        let took = t.elapsed();
        println!(
            "{what}: {found} accounts read from Redis in {:.2} s ({:.0} accounts/s)",
            took.as_secs_f64(),
            found as f64 / took.as_secs_f64()
        );
    }

    // 3. Settle script: 200 batches of 500 accounts each (usage, cost, a lease top-up).
    let inc = store.begin("bench").await?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let t = Instant::now();
    let batches = 200u64;
    for seq in 1..=batches {
        let entries = (0..500)
            .map(|j| {
                let id = &ids[((seq as usize * 500 + j) * 7919) % n];
                SettleEntry {
                    account: id.clone(),
                    usage: Usage {
                        requests: 100,
                        cpu_us: 2_000,
                        deploys: 0,
                        ..Default::default()
                    },
                    cost: 100 * 500_000 + 2_000 * 12_500,
                    give_back: 0,
                    ask: 50_000_000,
                }
            })
            .collect();
        let b = SettleBatch {
            node_id: "bench".into(),
            epoch: inc.epoch,
            seq,
            entries,
        };
        let t0 = Instant::now();
        store.settle(&b).await?;
        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
    }
    let total = t.elapsed();
    println!(
        "settle: 500-account batches, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.0} batches/s = {:.0} account lines/s (one client, sequential)",
        hist.value_at_quantile(0.5) as f64 / 1000.0,
        hist.value_at_quantile(0.99) as f64 / 1000.0,
        hist.max() as f64 / 1000.0,
        batches as f64 / total.as_secs_f64(),
        (batches * 500) as f64 / total.as_secs_f64()
    );

    // Where the settle time goes: Redis' own accounting of the script.
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await?;
    for line in stats.lines().filter(|l| l.starts_with("cmdstat_evalsha")) {
        println!("settle: redis {line}");
    }

    // 4. Change feed: a change made through node A's handle, seen by node B's subscriber.
    let b_store = RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(10)).await?;
    let mut feed = b_store.subscribe();
    tollgate_benches::feed_live(&mut feed).await?;
    let a: Arc<dyn Store> = Arc::new(store);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let changes = 10_000;
    for i in 0..changes {
        let t0 = Instant::now();
        let out = a.credit("feed-acct", &format!("k{i}"), 1_000).await?;
        let want = out.state.version;
        tollgate_benches::feed_reaches(&mut feed, "feed-acct", want).await?;
        hist.record(t0.elapsed().as_micros().max(1) as u64)?;
    }
    println!(
        "feed: {changes} changes, write through A -> seen by B: p50 {} µs, p99 {} µs, max {} µs",
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    Ok(())
}
