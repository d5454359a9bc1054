//! The money gate on the request path: each request to a service that has an owning account is
//! paid from this node's lease in the balance cache (lock-free, no I/O) before it is proxied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntCounterVec, Opts, Registry};
use tollgate_balance_cache::{BalanceCache, Spend};

/// Called for each paid request with its deployment id; the returned guard lives as long as the
/// request (the runtime's in-flight count, which its per-request CPU cap needs).
pub trait RequestHooks: Send + Sync + 'static {
    fn begin(&self, deployment_id: &str) -> Option<Box<dyn Send + Sync>>;
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

/// The money gate's parts, built by the application: the node's balance cache (its metering
/// node settles it in the background), and what the request path needs around it.
#[derive(Clone)]
pub struct Metering {
    pub cache: Arc<BalanceCache>,
    /// How long a request waits for this node's first lease on an account before it gets 503.
    pub lease_wait: Duration,
    /// How an owner tops up (shown on the 402 answer and the suspension page).
    pub top_up: String,
    pub hooks: Option<Arc<dyn RequestHooks>>,
    pub payments: Option<Arc<dyn PaymentDesk>>,
    /// The money store is shared between processes (Redis): the new process of an upgrade
    /// meters as a stand-in at once, so it takes the listeners over only once its agent runs.
    /// False for a node's embedded file, which the old process holds until it exits (metered
    /// routes answer 503 in between).
    pub shared_store: bool,
}

impl std::fmt::Debug for Metering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metering")
            .field("lease_wait", &self.lease_wait)
            .field("top_up", &self.top_up)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Gate {
    pub cache: Arc<BalanceCache>,
    pub shared_store: bool,
    pub lease_wait: Duration,
    pub top_up: String,
    pub hooks: Option<Arc<dyn RequestHooks>>,
    pub payments: Option<Arc<dyn PaymentDesk>>,
    pub metered: IntCounter,
    pub rejected_suspended: IntCounter,
    pub rejected_unavailable: IntCounter,
}

impl Gate {
    pub fn new(opts: &Metering, registry: &Registry) -> prometheus::Result<Gate> {
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
            cache: opts.cache.clone(),
            shared_store: opts.shared_store,
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
