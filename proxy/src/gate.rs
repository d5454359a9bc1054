//! The money gate on the request path: each request to a service that has an owning account is
//! paid from this node's lease in the balance cache (lock-free, no I/O) before it is proxied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use std::path::PathBuf;
use tollgate_balance_cache::{AgentConfig, BalanceCache, Spend};

use tollgate_metering::{EmbeddedStore, Prices, RedisStore, Store};

/// Called for each paid request with its deployment id; the returned guard lives as long as the
/// request (the runtime's in-flight count, which its per-request CPU cap needs).
pub trait RequestHooks: Send + Sync + 'static {
    fn begin(&self, deployment_id: &str) -> Option<Box<dyn Send + Sync>>;

    /// Called once the node has stopped serving, before its final settle (blocking, on a thread
    /// outside any async runtime): whatever still charges this node (the runtime's last CPU
    /// samples) must be done by then, or its charges would miss the last batch.
    fn before_final_settle(&self) {}
}

/// MPP at the proxy, for services whose owner ran out of credit: the 402 carries a
/// `WWW-Authenticate: Payment` challenge to top up the owner's account, and a retried request
/// that carries the owner's `Authorization: Payment` credential is taken as that top-up. Only
/// such requests reach it (the paid path never does), so the proxy crate stays free of the
/// payment protocol and the hot path of any I/O.
#[async_trait::async_trait]
pub trait PaymentDesk: Send + Sync + 'static {
    /// The `WWW-Authenticate` value for the 402 of a service owned by `account`.
    fn challenge(&self, account: &str, host: &str) -> Option<String>;
    /// Takes the request's credential as a top-up of `account`.
    async fn redeem(&self, account: &str, headers: &http::HeaderMap) -> Result<Redeemed, Refused>;
}

/// A credential taken at the proxy.
#[derive(Debug, Clone)]
pub enum Redeemed {
    /// Credit landed: the request goes on, its response carries this `Payment-Receipt`.
    Paid(String),
    /// A deposit change (top-up of the channel, close): answered 204 with this receipt, not
    /// proxied.
    Management(String),
}

/// Why a credential at the proxy was not taken.
#[derive(Debug, Clone)]
pub struct Refused {
    /// Shown in the 402's problem body.
    pub detail: String,
    /// The store or chain was unavailable: 503, the same credential may be sent again.
    pub retryable: bool,
}

/// Where balances, leases and the ledger live.
#[derive(Clone)]
pub enum StoreSource {
    /// Already open (tests).
    Ready(Arc<dyn Store>),
    /// Shared by every node of a deployment; connected (and reconnected) by the node itself.
    Redis {
        url: String,
        prefix: String,
        lease_ttl: Duration,
        /// Ledger entries older than this are trimmed (zero: keep all).
        ledger_retention: Duration,
    },
    /// One node alone (`tollgate dev`, a single-node install): a durable file.
    Embedded { path: PathBuf, lease_ttl: Duration },
}

impl StoreSource {
    pub(crate) async fn open(&self) -> Result<Arc<dyn Store>, String> {
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
                .map_err(|e| e.to_string()),
            StoreSource::Embedded { path, lease_ttl } => EmbeddedStore::open(path, *lease_ttl)
                .map(|s| Arc::new(s) as Arc<dyn Store>)
                .map_err(|e| format!("{}: {e}", path.display())),
        }
    }
}

impl From<Arc<dyn Store>> for StoreSource {
    fn from(s: Arc<dyn Store>) -> Self {
        StoreSource::Ready(s)
    }
}

/// Metering, as the embedding binary configures it.
#[derive(Clone)]
pub struct MeteringOptions {
    pub store: StoreSource,
    pub prices: Prices,
    pub agent: AgentConfig,
    /// How long a request waits for this node's first lease on an account before it gets 503.
    pub lease_wait: Duration,
    /// How an owner tops up (shown on the 402 answer and the suspension page).
    pub top_up: String,
    pub hooks: Option<Arc<dyn RequestHooks>>,
    pub payments: Option<Arc<dyn PaymentDesk>>,
}

impl std::fmt::Debug for MeteringOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteringOptions")
            .field("prices", &self.prices)
            .field("node_id", &self.agent.node_id)
            .field("lease_wait", &self.lease_wait)
            .field("top_up", &self.top_up)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Gate {
    pub cache: Arc<BalanceCache>,
    pub lease_wait: Duration,
    pub top_up: String,
    pub hooks: Option<Arc<dyn RequestHooks>>,
    pub payments: Option<Arc<dyn PaymentDesk>>,
    pub metered: IntCounter,
    pub rejected_suspended: IntCounter,
    pub rejected_unavailable: IntCounter,
}

impl Gate {
    pub fn new(
        cache: Arc<BalanceCache>,
        opts: &MeteringOptions,
        registry: &Registry,
    ) -> prometheus::Result<Gate> {
        let metered = IntCounter::new(
            "tollgate_metered_requests_total",
            "Requests paid from a balance (routes with an owning account).",
        )?;
        registry.register(Box::new(metered.clone()))?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "tollgate_metering_rejected_total",
                "Requests refused by the money gate, by reason (suspended → 402, metering_unavailable → 503).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(rejected.clone()))?;
        Ok(Gate {
            cache,
            lease_wait: opts.lease_wait,
            top_up: opts.top_up.clone(),
            hooks: opts.hooks.clone(),
            payments: opts.payments.clone(),
            metered,
            rejected_suspended: rejected.with_label_values(&["suspended"]),
            rejected_unavailable: rejected.with_label_values(&["metering_unavailable"]),
        })
    }

    /// Pays one request after a top-up: waits up to `wait` for the credit to reach this
    /// node's cache (the change feed, usually within milliseconds).
    pub async fn pay_after_credit(&self, account: &str, wait: Duration) -> Spend {
        let end = Instant::now() + wait;
        loop {
            let changed = self.cache.changed_notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.pay(account).await {
                Spend::Suspended => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Spend::Suspended;
                    }
                    let _ = tokio::time::timeout(left, changed).await;
                }
                other => return other,
            }
        }
    }

    /// Pays one request. `Pending` (no lease here yet) waits up to `lease_wait` for the agent's
    /// refill; what is still pending then counts as unavailable (503), never as suspended.
    pub async fn pay(&self, account: &str) -> Spend {
        match self.cache.try_spend_request(account) {
            Spend::Pending => {}
            other => return other,
        }
        let end = Instant::now() + self.lease_wait;
        loop {
            // Registered before the next try: a settle reply or feed update that lands between
            // the try and the wait still wakes us.
            let changed = self.cache.changed_notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.cache.try_spend_request(account) {
                Spend::Pending => {
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Spend::Unavailable;
                    }
                    let _ = tokio::time::timeout(left, changed).await;
                }
                other => return other,
            }
        }
    }
}
