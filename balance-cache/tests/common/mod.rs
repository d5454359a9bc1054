//! Harness: a metering node (cache + agent) against a real Redis.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tollgate_balance_cache::{Agent, AgentConfig, BalanceCache, CacheMetrics, Spend};
use tollgate_kv::Target;
use tollgate_metering::{Prices, RedisStore, Store};

pub const PRICE: i64 = 500_000; // one request at the default price

pub struct Node {
    pub cache: Arc<BalanceCache>,
    pub metrics: CacheMetrics,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// A node named `name`, journaling to `<dir>/<name>.journal`.
pub async fn node(at: impl Into<Target>, name: &str, dir: &tempfile::TempDir) -> Node {
    node_on(shared(at).await, name, dir).await
}

/// The money store at `at`: one Redis's, or a Redis Cluster's.
pub async fn shared(at: impl Into<Target>) -> Arc<dyn Store> {
    tollgate_metering::connect_shared(
        &at.into(),
        "tollgate",
        Duration::from_secs(10),
        tollgate_metering::DEFAULT_SHARDS,
    )
    .await
    .unwrap()
}

/// A node named `name` on a given store (a Redis Cluster's, say).
pub async fn node_on(store: Arc<dyn Store>, name: &str, dir: &tempfile::TempDir) -> Node {
    let cache = BalanceCache::new(Prices::default());
    let cfg = AgentConfig::new(name, dir.path().join(format!("{name}.journal")));
    let metrics = CacheMetrics::new(&prometheus::Registry::new()).unwrap();
    let agent = Agent::start(cache.clone(), store, cfg, metrics.clone())
        .await
        .unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(agent.run(rx));
    Node {
        cache,
        metrics,
        stop,
        task,
    }
}

impl Node {
    /// Final settle, leases returned, incarnation released.
    pub async fn shutdown(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap();
    }

    /// Spends one request, waiting out `Pending`.
    pub async fn spend(&self, account: &str) -> Spend {
        let t = Instant::now();
        loop {
            match self.cache.try_spend_request(account) {
                Spend::Pending if t.elapsed() < Duration::from_secs(5) => {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(20), self.cache.changed()).await;
                }
                other => return other,
            }
        }
    }
}

/// Runs the `metering-fault-node` test tool as node `name` (journal `<dir>/<name>.journal`):
/// it spends `spend` requests of `account`, journals the settle batch, and is `kill -9`ed
/// right there, before sending it.
pub async fn crash_after_journal(
    at: impl Into<Target>,
    dir: &tempfile::TempDir,
    name: &str,
    account: &str,
    spend: u64,
) {
    use std::process::{Command, Stdio};
    let journal = dir.path().join(format!("{name}.journal"));
    let at = match at.into() {
        Target::One(url) => url,
        Target::Cluster { seeds, .. } => format!("cluster:{}", seeds.join(",")),
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_metering-fault-node"))
        .args([at.as_str(), journal.to_str().unwrap(), name, account])
        .arg(spend.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut l = String::new();
        std::io::BufReader::new(stdout).read_line(&mut l).unwrap();
        l
    })
    .await
    .unwrap();
    assert!(line.starts_with("JOURNALED"), "{line}");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// A durable (AOF) Redis, a temp dir for journals, and an admin store handle with `amount` p$
/// credited to `account`.
pub struct Fixture {
    pub redis: tollgate_testkit::RedisServer,
    pub url: String,
    pub dir: tempfile::TempDir,
    pub admin: RedisStore,
}

pub async fn durable_with_credit(account: &str, amount: i64) -> Fixture {
    let redis = tollgate_testkit::RedisServer::start_durable();
    let url = redis.url();
    let admin = RedisStore::connect(&url, "tollgate", Duration::from_secs(10))
        .await
        .unwrap();
    admin.credit(account, "v1", amount).await.unwrap();
    Fixture {
        redis,
        url,
        dir: tempfile::tempdir().unwrap(),
        admin,
    }
}

/// `tollgate accounts audit` over this Redis: every difference (the books must show none:
/// each account's invariant, the ledger's totals against the accounts, every balance backed).
pub async fn audit(at: impl Into<Target>) -> Vec<tollgate_payments::audit::Difference> {
    let at = at.into();
    let store = shared(&at).await;
    let channels = tollgate_payments::RedisChannels::connect(&at, "tollgate")
        .await
        .unwrap();
    for _ in 0..50 {
        if let Ok(r) = tollgate_payments::audit::audit(&channels, &*store, None).await {
            return r.differences;
        }
        // The admin connection reconnects after a Redis restart.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the audit could not read the books");
}

/// Spends until the account stays suspended; returns how many requests were paid. Like a
/// client that retries a 402 once a little later: near the end of a balance, a node can be out
/// while another still hands money back.
pub async fn hammer(cache: Arc<BalanceCache>, account: &'static str) -> u64 {
    let mut paid = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut suspended_since: Option<Instant> = None;
    loop {
        assert!(Instant::now() < deadline, "never suspended");
        match cache.try_spend_request(account) {
            Spend::Ok => {
                paid += 1;
                suspended_since = None;
            }
            Spend::Suspended => {
                let since = *suspended_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(300) {
                    return paid;
                }
                let _ = tokio::time::timeout(Duration::from_millis(20), cache.changed()).await;
            }
            Spend::Pending => {
                let _ = tokio::time::timeout(Duration::from_millis(20), cache.changed()).await;
            }
            Spend::Unavailable => panic!("store is up"),
        }
    }
}

/// Waits (up to 2 s) until every node sees `account` active again, then checks that each one
/// measured the feed's lag on at least `samples` changes, with a mean under 100 ms (on
/// loopback it is far under the 5 ms target).
pub async fn resumed_everywhere(nodes: &[&Node], account: &str, samples: u64) {
    let t = Instant::now();
    while nodes
        .iter()
        .any(|n| n.cache.is_suspended(account) != Some(false))
    {
        assert!(t.elapsed() < Duration::from_secs(2), "resumption not seen");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for n in nodes {
        let lag = &n.metrics.feed_lag_seconds;
        assert!(
            lag.get_sample_count() >= samples,
            "{}",
            lag.get_sample_count()
        );
        let mean = lag.get_sample_sum() / lag.get_sample_count() as f64;
        assert!((0.0..0.1).contains(&mean), "mean feed lag {mean} s");
    }
}

/// Each ledger stream's key prefix at `at`: one Redis's, or every money shard's.
pub fn streams(at: &Target) -> Vec<String> {
    match at {
        Target::One(_) => vec!["tollgate".to_owned()],
        Target::Cluster { .. } => (0..tollgate_metering::DEFAULT_SHARDS)
            .map(|s| format!("{{tollgate:m{s}}}"))
            .collect(),
    }
}

/// Declares a book of record on every ledger stream at `at` (what the book's writer does).
pub async fn declare_book(at: &Target) {
    let mut c = at.connect().await.unwrap();
    for p in streams(at) {
        redis::cmd("SET")
            .arg(format!("{p}:ledger:book"))
            .arg("1")
            .query_async::<()>(&mut c)
            .await
            .unwrap();
    }
}

/// Moves every stream's book mark to its last entry: a book that copied everything.
pub async fn book_everything(at: &Target) {
    let mut c = at.connect().await.unwrap();
    for p in streams(at) {
        let last: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(format!("{p}:ledger"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut c)
            .await
            .unwrap();
        if let Some(id) = last.ids.first() {
            redis::cmd("SET")
                .arg(format!("{p}:ledger:booked"))
                .arg(&id.id)
                .query_async::<()>(&mut c)
                .await
                .unwrap();
        }
    }
}
