//! Test tool (not shipped): a metering node that spends `SPEND` requests for `ACCOUNT`, journals
//! the settle batch and then hangs before sending it, so a test can `kill -9` it at that point.
//! Usage: metering-fault-node REDIS JOURNAL NODE_ID ACCOUNT SPEND (REDIS: a URL, or
//! `cluster:<url>,<url>,…` for a Redis Cluster in the default money shards)

use std::sync::Arc;
use std::time::Duration;

use tollgate_balance_cache::{Agent, AgentConfig, BalanceCache, CacheMetrics, Spend};
use tollgate_metering::{DEFAULT_SHARDS, Prices, Store, Target};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let [_, url, journal, node, account, spend] = a.as_slice() else {
        return Err("usage: metering-fault-node REDIS JOURNAL NODE_ID ACCOUNT SPEND".into());
    };
    let spend: u64 = spend.parse()?;
    let target = match url.strip_prefix("cluster:") {
        // As the tests' cluster (`TestRedis::target`): every write acknowledged by a replica.
        Some(seeds) => Target::Cluster {
            seeds: seeds.split(',').map(str::to_owned).collect(),
            replica_acks: 1,
        },
        None => Target::One(url.clone()),
    };
    let store: Arc<dyn Store> = tollgate_metering::connect_shared(
        &target,
        "tollgate",
        Duration::from_secs(10),
        DEFAULT_SHARDS,
    )
    .await?;
    let cache = BalanceCache::new(Prices::default());
    let mut cfg = AgentConfig::new(node, journal.into());
    let metrics = CacheMetrics::new(&prometheus::Registry::new())?;
    let mut agent = Agent::start(cache.clone(), store, cfg.clone(), metrics.clone()).await?;
    // Get a lease, spend from it, then crash while settling.
    let mut done = 0;
    while done < spend {
        match cache.try_spend_request(account) {
            Spend::Ok => done += 1,
            Spend::Pending => agent.tick(false).await?,
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    cfg.hang_after_journal = true;
    let mut agent = agent.with_config(cfg);
    agent.tick(false).await?;
    Ok(())
}
