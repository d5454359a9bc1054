//! The process's one metering node: a balance cache that the request path and the runtime's CPU
//! charge lock-free, and its agent, which settles with the money store in the background.
//!
//! A journal has one owner. When another process of this node holds it (the old process of a
//! zero-downtime upgrade, draining), this one meters at once as a *stand-in* node with its own
//! journal and leases instead of answering 503 until the old one exits. Once running, it replays
//! the journals of stand-ins no process holds (left by a crash), so their usage is not held back
//! until the next upgrade.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_balance_cache::{Agent, AgentConfig, AgentError, BalanceCache, CacheMetrics};
use tollgate_metering::{ClusterStore, EmbeddedStore, JournalError, Prices, RedisStore, Store};

/// Where balances, leases and the ledger live.
#[derive(Clone)]
pub enum StoreSource {
    /// Already open (shared with payments in `dev` and `control`; tests).
    Ready(Arc<dyn Store>),
    /// Shared by every node of a deployment; connected (and reconnected) by the node itself.
    Redis {
        url: String,
        prefix: String,
        lease_ttl: Duration,
        /// Ledger entries older than this are trimmed (zero: keep all).
        ledger_retention: Duration,
    },
    /// A Redis Cluster shared by every node: money sharded over its masters.
    Cluster {
        seeds: Vec<String>,
        prefix: String,
        lease_ttl: Duration,
        ledger_retention: Duration,
        shards: u32,
        replica_acks: u32,
    },
    /// One node alone (a single-node install): a durable file.
    Embedded { path: PathBuf, lease_ttl: Duration },
}

impl StoreSource {
    /// The money store `config` names: its `[redis]` (one Redis or a cluster), else the
    /// embedded file in the data dir.
    pub fn configured(config: &crate::config::Config, lease_ttl: Duration) -> StoreSource {
        match &config.redis {
            Some(r) if !r.cluster.is_empty() => StoreSource::Cluster {
                seeds: r.cluster.clone(),
                prefix: r.key_prefix.clone(),
                lease_ttl,
                ledger_retention: config.metering.ledger_retention(),
                shards: r.money_shards,
                replica_acks: r.replica_acks,
            },
            Some(r) => StoreSource::Redis {
                url: r.url.clone(),
                prefix: r.key_prefix.clone(),
                lease_ttl,
                ledger_retention: config.metering.ledger_retention(),
            },
            None => StoreSource::Embedded {
                path: config.control.data_dir.join("money.redb"),
                lease_ttl,
            },
        }
    }

    pub async fn open(&self) -> Result<Arc<dyn Store>, String> {
        match self {
            StoreSource::Ready(s) => Ok(s.clone()),
            StoreSource::Redis {
                url,
                prefix,
                lease_ttl,
                ledger_retention,
            } => RedisStore::connect(url, prefix, *lease_ttl)
                .await
                .map(|s| Arc::new(s.with_ledger_retention(*ledger_retention)) as Arc<dyn Store>)
                .map_err(|e| format!("{e} (redis.url {url})")),
            StoreSource::Cluster {
                seeds,
                prefix,
                lease_ttl,
                ledger_retention,
                shards,
                replica_acks,
            } => ClusterStore::connect_with(seeds, prefix, *lease_ttl, *shards, *replica_acks)
                .await
                .map(|s| Arc::new(s.with_ledger_retention(*ledger_retention)) as Arc<dyn Store>)
                .map_err(|e| format!("{e} (redis.cluster [{}])", seeds.join(", "))),
            StoreSource::Embedded { path, lease_ttl } => EmbeddedStore::open(path, *lease_ttl)
                .map(|s| Arc::new(s) as Arc<dyn Store>)
                .map_err(|e| format!("{}: {e}", path.display())),
        }
    }
}

/// What a metering node needs.
#[derive(Clone)]
pub struct MeteringSpec {
    pub store: StoreSource,
    pub prices: Prices,
    pub agent: AgentConfig,
}

/// A running metering node. Stopping it settles what is left and returns its leases.
pub struct MeteringNode {
    cache: Arc<BalanceCache>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl MeteringNode {
    /// Starts the node on `rt`: the cache at once (requests find no lease yet and wait or get
    /// 503), the agent as soon as the store answers (retried meanwhile). Its metrics go to
    /// `registry`.
    pub fn start(
        spec: MeteringSpec,
        registry: &prometheus::Registry,
        rt: &tokio::runtime::Handle,
    ) -> anyhow::Result<MeteringNode> {
        spec.agent.validate()?;
        let cache = BalanceCache::new(spec.prices);
        let metrics = CacheMetrics::new(registry)?;
        cache.register_account_metrics(registry)?;
        let (stop, stop_rx) = watch::channel(false);
        let task = rt.spawn(run_agent(
            cache.clone(),
            spec.store,
            spec.agent,
            metrics,
            stop_rx,
        ));
        Ok(MeteringNode { cache, stop, task })
    }

    pub fn cache(&self) -> &Arc<BalanceCache> {
        &self.cache
    }

    /// Final settle: what is left is settled, leases go back, the incarnation is released
    /// (the journal keeps what could not be sent).
    pub async fn settle_and_stop(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .is_err()
        {
            tracing::warn!("final settle did not finish in 10 s; the journal keeps the rest");
        }
    }
}

/// How many stand-in identities a node may take while another process of the same node holds
/// its journal.
const STAND_INS: u32 = 3;

/// The configuration of stand-in `n` of `base` (0 is `base` itself): node `<id>.<n>`, journal
/// `<id>.<n>.journal` beside the node's own.
fn stand_in(base: &AgentConfig, n: u32) -> AgentConfig {
    if n == 0 {
        return base.clone();
    }
    let mut cfg = base.clone();
    cfg.node_id = format!("{}.{n}", base.node_id);
    cfg.journal_path = base
        .journal_path
        .with_file_name(format!("{}.journal", cfg.node_id));
    cfg
}

/// Starts the agent (retrying while the store is unreachable: requests get 503 meanwhile) and
/// runs it until `stop`, when it settles what is left and returns its leases.
async fn run_agent(
    cache: Arc<BalanceCache>,
    store: StoreSource,
    cfg: AgentConfig,
    metrics: CacheMetrics,
    mut stop: watch::Receiver<bool>,
) {
    let mut wait = Duration::from_millis(100);
    let mut n = 0;
    let (agent, mine, opened) = loop {
        let try_cfg = stand_in(&cfg, n);
        let started = match store.open().await {
            Ok(store) => Agent::start(
                cache.clone(),
                store.clone(),
                try_cfg.clone(),
                metrics.clone(),
            )
            .await
            .map(|a| (a, store))
            .map_err(|e| {
                (
                    matches!(e, AgentError::Journal(JournalError::Locked { .. })),
                    e.to_string(),
                )
            }),
            Err(e) => Err((false, e)),
        };
        match started {
            Ok((a, opened)) => {
                if n > 0 {
                    tracing::info!(node = %try_cfg.node_id, "journal held by another process of this node (an upgrade?): metering as a stand-in");
                }
                break (a, n, opened);
            }
            Err((true, _)) if n < STAND_INS => n += 1,
            Err((_, e)) => {
                n = 0;
                tracing::warn!(error = %e, "metering agent cannot start yet; metered routes answer 503");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    };
    // The store this agent opened (an embedded store cannot be opened twice in one process).
    let orphans = tokio::spawn(replay_orphans(opened, cfg, mine, *cache.prices()));
    agent.run(stop).await;
    // A replay in progress finishes (it is short, and aborting it would leave its leases to
    // expire); bounded so a stop never hangs on it.
    if tokio::time::timeout(Duration::from_secs(5), orphans)
        .await
        .is_err()
    {
        tracing::warn!("a journal replay did not finish in 5 s; its leases expire instead");
    }
}

/// Settles what the journals of this node's unheld identities still hold (a crashed process),
/// each through a short-lived agent of its own: replay, then release that incarnation.
async fn replay_orphans(store: Arc<dyn Store>, base: AgentConfig, mine: u32, prices: Prices) {
    for n in (0..=STAND_INS).filter(|&n| n != mine) {
        let cfg = stand_in(&base, n);
        if !cfg.journal_path.exists() {
            continue;
        }
        // Held by a live process (it settles its own), or nothing left to send (the common case:
        // a process that exited cleanly): leave it. Leases of a crashed one expire by themselves.
        match tollgate_metering::Journal::open(&cfg.journal_path) {
            Ok(j) if !j.pending().is_empty() => {}
            _ => continue,
        }
        let metrics = match CacheMetrics::new(&prometheus::Registry::new()) {
            Ok(m) => m,
            Err(_) => return,
        };
        // Its own cache: the replayed batches' grants must not reach the serving cache.
        let scratch = BalanceCache::new(prices);
        match Agent::start(scratch, store.clone(), cfg.clone(), metrics).await {
            Ok(agent) => {
                // Started = replayed; a stop right away returns its leases and releases it.
                let (tx, rx) = watch::channel(false);
                let run = tokio::spawn(agent.run(rx));
                let _ = tx.send(true);
                let _ = run.await;
                tracing::info!(node = %cfg.node_id, "replayed a journal no process held");
            }
            Err(e) => {
                tracing::warn!(node = %cfg.node_id, error = %e, "a journal no process holds was not replayed (retried at the next start)")
            }
        }
    }
}
