//! Keeps a [`RouteTable`] in step with Redis.
//!
//! Order matters: subscribe first, then read the whole hash. Every write publishes after it
//! lands in the hash, so anything published after our read is delivered to us, and anything
//! before it is in what we read; versions make the overlap harmless. A ping on the subscriber
//! connection detects a dead subscription (Redis restart, `CLIENT KILL`, a network cut); on loss
//! the loop resubscribes and re-reads.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::metrics::SyncMetrics;
use crate::schema::{RouteEvent, RouteKey};
use crate::store::{Keys, load_all};
use crate::table::{Change, RouteTable};

#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub redis: tollgate_kv::Target,
    pub key_prefix: String,
    /// How often the subscriber connection is pinged.
    pub ping_interval: Duration,
    /// A ping (or a connect) slower than this counts as a lost connection.
    pub ping_timeout: Duration,
    /// Wait between reconnect attempts (doubles up to 2 s).
    pub retry_initial: Duration,
}

impl SyncOptions {
    pub fn new(redis: impl Into<tollgate_kv::Target>) -> Self {
        SyncOptions {
            redis: redis.into(),
            key_prefix: "tollgate".to_owned(),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(1),
            retry_initial: Duration::from_millis(50),
        }
    }
}

pub struct RouteSync {
    opts: SyncOptions,
    keys: Keys,
    table: Arc<RouteTable>,
    metrics: SyncMetrics,
}

#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("{0}")]
    Lost(#[from] tollgate_kv::Lost),
}

impl RouteSync {
    pub fn new(opts: SyncOptions, table: Arc<RouteTable>, metrics: SyncMetrics) -> Self {
        let keys = Keys::new(&opts.redis.family_prefix(&opts.key_prefix));
        RouteSync {
            opts,
            keys,
            table,
            metrics,
        }
    }

    /// Runs until `shutdown` turns true. Never returns an error: Redis trouble is retried,
    /// counted and logged, and the last good table keeps serving.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = self.opts.retry_initial;
        let mut first = true;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let result = tokio::select! {
                r = self.session(&mut backoff) => r,
                _ = shutdown.changed() => return,
            };
            if let Err(e) = result {
                self.metrics.errors_total.inc();
                tracing::warn!(error = %e, "route sync lost its Redis connection; resubscribing");
            }
            if !first || self.table.is_synced() {
                self.metrics.resubscribes_total.inc();
            }
            first = false;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One subscription: connect, subscribe, full load, then apply changes until the connection
    /// fails.
    async fn session(&self, backoff: &mut Duration) -> Result<(), SyncError> {
        let t = self.opts.ping_timeout;
        let bounded = tollgate_kv::Timeouts::both(t);
        let channels = std::slice::from_ref(&self.keys.channel);
        let mut sub =
            timeout(t, "subscribe", self.opts.redis.subscribe(channels, bounded)).await??;
        let mut conn = timeout(t, "connect", self.opts.redis.connect_with(bounded)).await??;
        let records = load_all(&mut conn, &self.keys).await?;
        drop(conn);
        let n = records.len();
        self.table.replace_all(records);
        self.table.mark_synced();
        self.metrics.full_syncs_total.inc();
        self.metrics.routes.set(self.table.snapshot().len() as i64);
        self.metrics.last_sync_timestamp_seconds.set(unix_seconds());
        tracing::info!(records = n, "route table loaded from Redis");
        *backoff = self.opts.retry_initial;

        let mut ping = tokio::time::interval(self.opts.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                msg = sub.next() => {
                    batch.clear();
                    self.decode(&msg?, &mut batch);
                    // Drain what is already buffered so a burst becomes one swap.
                    while batch.len() < 1024 {
                        match sub.try_next() {
                            Some(m) => self.decode(&m?, &mut batch),
                            None => break,
                        }
                    }
                    self.apply(&mut batch);
                }
                _ = ping.tick() => {
                    timeout(t, "ping", sub.ping()).await??;
                }
            }
        }
    }

    fn decode(&self, payload: &[u8], out: &mut Vec<(RouteEvent, RouteKey)>) {
        match serde_json::from_slice::<RouteEvent>(payload) {
            Ok(ev) => match RouteKey::from_field(&ev.key) {
                Some(key) => out.push((ev, key)),
                None => tracing::warn!(key = ev.key, "route event with an invalid key"),
            },
            Err(e) => tracing::warn!(error = %e, "route event that does not parse"),
        }
    }

    fn apply(&self, batch: &mut Vec<(RouteEvent, RouteKey)>) {
        if batch.is_empty() {
            return;
        }
        let stamps: Vec<u64> = batch.iter().map(|(ev, _)| ev.ts_us).collect();
        let applied = self.table.apply(batch.drain(..).map(|(ev, key)| Change {
            key,
            version: ev.v,
            route: ev.route,
        }));
        let now_us = unix_micros();
        for ts in stamps {
            let lag = now_us.saturating_sub(ts) as f64 / 1e6;
            self.metrics.lag_seconds.observe(lag);
        }
        self.metrics.changes_applied_total.inc_by(applied as u64);
        self.metrics.routes.set(self.table.snapshot().len() as i64);
        self.metrics.last_sync_timestamp_seconds.set(unix_seconds());
    }
}

async fn timeout<F: std::future::Future>(
    d: Duration,
    what: &'static str,
    f: F,
) -> Result<F::Output, SyncError> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| SyncError::Timeout(what))
}

fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn unix_seconds() -> i64 {
    (unix_micros() / 1_000_000) as i64
}
