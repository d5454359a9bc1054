//! Test tool (not shipped): a metering node that spends `SPEND` requests for `ACCOUNT`, journals
//! the settle batch and then hangs before sending it, so a test can `kill -9` it at that point.
//! Usage: metering-fault-node REDIS_URL JOURNAL NODE_ID ACCOUNT SPEND

use std::sync::Arc;
use std::time::Duration;

use tollgate_balance_cache::{Agent, AgentConfig, BalanceCache, CacheMetrics, Spend};
use tollgate_metering::{Prices, RedisStore, Store};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    let [_, url, journal, node, account, spend] = a.as_slice() else {
        return Err("usage: metering-fault-node REDIS_URL JOURNAL NODE_ID ACCOUNT SPEND".into());
    };
    let spend: u64 = spend.parse()?;
    let store: Arc<dyn Store> =
        Arc::new(RedisStore::connect(url, "tollgate", Duration::from_secs(10)).await?);
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
