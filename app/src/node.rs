//! A proxy node as every wiring builds it (the run modes, the tests, loadtest, the benches): the
//! metering node first, then the proxy with its money gate over that node's cache.

use std::sync::Arc;
use std::time::Duration;

use tollgate_balance_cache::BalanceCache;
use tollgate_proxy::{
    Metering, PaymentDesk, Proxy, ProxyOptions, RequestHooks, RunningProxy, Stop,
};

use crate::metering::{MeteringNode, MeteringSpec};

/// What the money gate needs beside the cache.
#[derive(Clone)]
pub struct GateSpec {
    pub metering: MeteringSpec,
    /// How long a request waits for this node's first lease on an account before it gets 503.
    pub lease_wait: Duration,
    /// How an owner tops up (on the 402 answer and the suspension page).
    pub top_up: String,
    pub hooks: Option<Arc<dyn RequestHooks>>,
    pub desk: Option<Arc<dyn PaymentDesk>>,
}

/// A node not yet serving: its metering node runs (and can be charged, e.g. by a runtime
/// started next), its proxy is bound.
pub struct PreparedNode {
    proxy: Proxy,
    metering: Option<MeteringNode>,
}

impl PreparedNode {
    /// Binds the proxy's listeners and starts the metering node on `rt` (its metrics on the
    /// proxy's registry).
    pub fn prepare(
        options: ProxyOptions,
        gate: Option<GateSpec>,
        rt: &tokio::runtime::Handle,
    ) -> anyhow::Result<PreparedNode> {
        Self::prepare_with(options, gate, rt, |_| Ok(None))
    }

    /// [`PreparedNode::prepare`], with the request hooks made from the metering node's cache
    /// (a runtime started there charges its CPU to the cache, and the proxy holds its
    /// in-flight guard).
    pub fn prepare_with(
        mut options: ProxyOptions,
        gate: Option<GateSpec>,
        rt: &tokio::runtime::Handle,
        hooks: impl FnOnce(&Arc<BalanceCache>) -> anyhow::Result<Option<Arc<dyn RequestHooks>>>,
    ) -> anyhow::Result<PreparedNode> {
        let registry = prometheus::Registry::new();
        let metering = match gate {
            Some(g) => {
                let shared_store = !matches!(
                    g.metering.store,
                    crate::metering::StoreSource::Embedded { .. }
                );
                // Dropped on an error below: its agent then settles and stops by itself.
                let node = MeteringNode::start(g.metering, &registry, rt)?;
                let made = hooks(node.cache())?;
                options.metering = Some(Metering {
                    cache: node.cache().clone(),
                    lease_wait: g.lease_wait,
                    top_up: g.top_up,
                    hooks: made.or(g.hooks),
                    payments: g.desk,
                    shared_store,
                });
                Some(node)
            }
            None => None,
        };
        let proxy = Proxy::prepare(options, registry)?;
        Ok(PreparedNode { proxy, metering })
    }

    pub fn table(&self) -> Arc<tollgate_routes::RouteTable> {
        self.proxy.table()
    }

    pub fn registry(&self) -> prometheus::Registry {
        self.proxy.registry()
    }

    pub fn cache(&self) -> Option<&Arc<BalanceCache>> {
        self.metering.as_ref().map(|m| m.cache())
    }

    /// Not started after all (a later part of the start failed): the metering node settles
    /// and stops; the bound listeners close.
    pub async fn settle_and_stop(self) {
        if let Some(m) = self.metering {
            m.settle_and_stop().await;
        }
    }

    /// Starts serving (Pingora on its own thread, the node's background work on `rt`).
    pub fn start(self, rt: &tokio::runtime::Handle) -> anyhow::Result<ProxyNode> {
        let proxy = self.proxy.start(rt)?;
        Ok(ProxyNode {
            proxy,
            metering: self.metering,
        })
    }
}

/// A serving node.
pub struct ProxyNode {
    pub proxy: RunningProxy,
    metering: Option<MeteringNode>,
}

impl ProxyNode {
    pub fn cache(&self) -> Option<&Arc<BalanceCache>> {
        self.metering.as_ref().map(|m| m.cache())
    }

    /// Stops without waiting (a harness being dropped): the proxy closes now; the metering node,
    /// dropped, settles and stops by itself.
    pub fn abort(self) {
        self.proxy.abort();
    }

    /// The ordered shutdown of a node with nothing else in its process (docs/architecture.md):
    /// stop intake, drain, final settle, flush.
    pub async fn shutdown(self, how: Stop) {
        self.proxy.stop_intake(how).await;
        self.proxy.drained(how).await;
        self.settle_and_flush().await;
    }

    /// The last steps, once intake is stopped, requests are drained and whatever else charges
    /// this node (a runtime) has stopped: final settle (leases returned), then usage flushed.
    pub async fn settle_and_flush(self) {
        if let Some(m) = self.metering {
            m.settle_and_stop().await;
        }
        self.proxy.stop_background().await;
        tracing::info!("proxy node stopped");
    }
}
