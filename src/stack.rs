//! Wiring of the control service with its runtime, for `tollgate control` and `tollgate dev`.

use std::sync::Arc;

use anyhow::Context;
use tollgate_balance_cache::BalanceCache;
use tollgate_control::{
    Control, ControlConfig, ControlStore, EmbeddedControlStore, LocalRoutes, RedisControlStore,
    RoutePublisher,
};
use tollgate_proxy::RequestHooks;
use tollgate_routes::RouteStore;
use tollgate_runtime::{CpuDelta, CpuSink, RuntimeConfig, Supervisor, Toolchain};

use crate::config::Config;

/// The runtime's CPU deltas, charged to the owning accounts through a balance cache (the proxy's
/// in `dev`, the control node's own otherwise) as they accrue.
pub struct ChargeCpu(pub Arc<BalanceCache>);

impl CpuSink for ChargeCpu {
    fn record(&self, deltas: &[CpuDelta]) {
        for d in deltas {
            self.0.charge_cpu(&d.account_id, d.cpu_us);
        }
    }

    fn unpaid(&self, deltas: &[CpuDelta]) -> Vec<Arc<str>> {
        deltas
            .iter()
            .filter(|d| self.0.cpu_unpaid(&d.account_id))
            .map(|d| d.deployment_id.clone())
            .collect()
    }
}

/// The proxy holds the runtime's in-flight guard per request (the per-request CPU cap and the
/// drain before a version stops need it).
pub struct InflightHooks(pub Supervisor, pub tokio::runtime::Handle);

impl RequestHooks for InflightHooks {
    fn begin(&self, deployment_id: &str) -> Option<Box<dyn Send + Sync>> {
        let guard = self.0.inflight(deployment_id)?.begin();
        Some(Box::new(guard))
    }

    /// `dev`: stop the deployments (their last CPU is charged to this proxy's cache) before
    /// the proxy's final settle carries it to the store.
    fn before_final_settle(&self) {
        self.1.block_on(self.0.shutdown());
    }
}

/// The runtime half: toolchain checked (installed when missing), supervisor started.
pub fn runtime(
    cfg: &Config,
    cpu: Arc<dyn CpuSink>,
) -> anyhow::Result<(
    Supervisor,
    tokio::sync::mpsc::UnboundedReceiver<tollgate_runtime::RuntimeEvent>,
    Toolchain,
)> {
    let toolchain = Toolchain::ensure(&cfg.control.toolchain_dir)
        .with_context(|| "the JS toolchain (control.toolchain_dir)".to_string())?;
    tracing::info!(workerd = %toolchain.workerd_version, esbuild = %toolchain.esbuild_version, "JS toolchain ready");
    let rt = RuntimeConfig {
        data_dir: cfg.control.data_dir.join("runtime"),
        ..RuntimeConfig::default()
    };
    let (sup, events) = Supervisor::new(rt, toolchain.clone(), cpu)?;
    Ok((sup, events, toolchain))
}

/// What the control listener offers agents: MCP with a dev identity (no payment; `dev
/// --dev-account` only) or with MPP payments, the top-up endpoint, and `/metrics` when the
/// process has no proxy admin listener to carry them.
pub struct Agents {
    pub dev_identity: Option<Arc<dyn tollgate_mcp::Identify>>,
    pub payments: Option<Arc<tollgate_payments::Payments>>,
    pub registry: Option<prometheus::Registry>,
}

/// The control service on `cfg.control.listen` until `stop` fires. Needs Redis (state and
/// routes); returns an error saying so without it.
pub async fn serve_control(
    cfg: Config,
    sup: Supervisor,
    events: tokio::sync::mpsc::UnboundedReceiver<tollgate_runtime::RuntimeEvent>,
    toolchain: Toolchain,
    agents: Agents,
    local_table: Option<Arc<tollgate_routes::RouteTable>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Redis when configured (shared by every node); otherwise one node alone: the embedded store
    // in the data dir, and routes straight into this process's proxy table.
    let (store, routes): (Arc<dyn ControlStore>, Arc<dyn RoutePublisher>) = match (
        &cfg.redis,
        local_table,
    ) {
        (Some(redis), _) => (
            Arc::new(
                RedisControlStore::connect(&redis.url, &redis.key_prefix)
                    .await
                    .map_err(|e| anyhow::anyhow!("control store: {e}"))?,
            ),
            Arc::new(RouteStore::connect(&redis.url, &redis.key_prefix).await?),
        ),
        (None, Some(table)) => (
            Arc::new(
                EmbeddedControlStore::open(&cfg.control.data_dir.join("control.redb"))
                    .map_err(|e| anyhow::anyhow!("control store: {e}"))?,
            ),
            Arc::new(LocalRoutes::new(table)),
        ),
        (None, None) => anyhow::bail!(
            "the control service keeps projects and routes in Redis: configure [redis] (only `tollgate dev` can run it without, beside its own proxy)"
        ),
    };
    let bundler = tollgate_control::bundler_for(&toolchain, cfg.control.data_dir.join("builds"))
        .map_err(|e| anyhow::anyhow!("bundler: {e}"))?;
    let public_url = cfg.control.public_url.clone().unwrap_or_else(|| {
        format!(
            "http://{{slug}}.{}:{}",
            cfg.proxy.base_domain,
            cfg.proxy.listen.port()
        )
    });
    let control = Control::new(
        store,
        bundler,
        sup.clone(),
        routes,
        ControlConfig {
            url_template: public_url,
            inactivity_ttl: std::time::Duration::from_secs(cfg.control.inactivity_ttl_seconds),
            ..ControlConfig::default()
        },
    );
    tokio::spawn(control.clone().follow_runtime(events));
    let n = control
        .recover()
        .await
        .map_err(|e| anyhow::anyhow!("recovery: {e}"))?;
    tracing::info!(deployments = n, "live deployments restarted");
    // The cleanup job (after recovery, so it never sees a project mid-restart): expire and collect unused projects (idempotent, so a missed or repeated
    // run is harmless).
    let sweeper = control.clone();
    let every =
        std::time::Duration::from_secs((cfg.control.inactivity_ttl_seconds / 10).clamp(1, 60));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match sweeper.sweep().await {
                Ok(expired) if !expired.is_empty() => {
                    tracing::info!(n = expired.len(), "expired unused projects")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cleanup sweep failed"),
            }
        }
    });
    let mut app =
        tollgate_control::http::admin_router(control.clone(), cfg.control.admin_token.clone())
            .route("/healthz", axum::routing::get(|| async { "ok" }));
    let host = cfg.control.listen.ip().to_string();
    // Deploys cost money where payments run (and never with a dev identity).
    let pricing = match (&agents.payments, &agents.dev_identity) {
        (Some(_), None) => {
            let prices = cfg.prices.prices().map_err(anyhow::Error::msg)?;
            Some(tollgate_mcp::DeployPricing {
                deploy_picos: prices.per_deploy,
                per_request_picos: prices.per_request,
                per_cpu_us_picos: prices.per_cpu_us,
                default_prepay: tollgate_payments::units::parse_usd(
                    &cfg.payments.default_prepay_usd,
                    9_000,
                )
                .map_err(|e| anyhow::anyhow!("payments.default_prepay_usd: {e}"))?,
            })
        }
        _ => None,
    };
    let mut allowed_hosts = vec!["localhost".into(), "127.0.0.1".into(), "::1".into(), host];
    if let Ok(public) = cfg.public_mcp_host() {
        // `Host` is compared without its port.
        let name = public
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map_or(public.as_str(), |(h, _)| h);
        allowed_hosts.push(name.trim_matches(['[', ']']).to_owned());
    }
    let mcp_cfg = tollgate_mcp::McpConfig {
        allowed_hosts,
        pricing,
        ..tollgate_mcp::McpConfig::default()
    };
    let identity: Option<Arc<dyn tollgate_mcp::Identify>> = match agents.dev_identity {
        Some(identity) => {
            anyhow::ensure!(
                cfg.control.listen.ip().is_loopback(),
                "--dev-account serves MCP without payment or proof: control.listen must be a loopback address, not {}",
                cfg.control.listen
            );
            Some(identity)
        }
        None => agents
            .payments
            .clone()
            .map(|p| Arc::new(crate::paid::PaidIdentity(p)) as Arc<dyn tollgate_mcp::Identify>),
    };
    if let Some(identity) = identity {
        app = app.merge(tollgate_mcp::router(control, identity, &mcp_cfg));
        tracing::info!(addr = %cfg.control.listen, "MCP at /mcp");
    }
    if let Some(p) = agents.payments {
        app = app.merge(tollgate_payments::http::router(p));
    }
    if let Some(registry) = agents.registry {
        app = app.route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut out = String::new();
                    let _ =
                        prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out);
                    out
                }
            }),
        );
    }
    let listener = tokio::net::TcpListener::bind(cfg.control.listen)
        .await
        .with_context(|| format!("cannot listen on {} (control.listen)", cfg.control.listen))?;
    tracing::info!(addr = %cfg.control.listen, "control listening (/v1/admin, /healthz)");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    sup.shutdown().await;
    Ok(())
}

/// A CPU sink whose balance cache is set once it exists (in `dev` the proxy creates it after the
/// runtime must already be running for the proxy's hooks).
#[derive(Default)]
pub struct LateCpu(pub std::sync::OnceLock<Arc<BalanceCache>>);

impl CpuSink for LateCpu {
    fn record(&self, deltas: &[CpuDelta]) {
        match self.0.get() {
            Some(cache) => ChargeCpu(cache.clone()).record(deltas),
            // Only before the proxy exists, when no deployment can run yet.
            None => tracing::warn!(n = deltas.len(), "CPU usage before metering started"),
        }
    }

    fn unpaid(&self, deltas: &[CpuDelta]) -> Vec<Arc<str>> {
        self.0
            .get()
            .map(|cache| ChargeCpu(cache.clone()).unpaid(deltas))
            .unwrap_or_default()
    }
}

/// A metering node of its own (balance cache + settling agent) for `tollgate control`, which
/// charges CPU without a proxy in the process.
pub async fn metering_node(
    cfg: &Config,
    node_id: &str,
    registry: &prometheus::Registry,
    stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Arc<BalanceCache>, tokio::task::JoinHandle<()>)> {
    use tollgate_balance_cache::{Agent, AgentConfig, CacheMetrics};
    use tollgate_metering::{RedisStore, Store};
    let redis = cfg
        .redis
        .clone()
        .context("the control service charges CPU through Redis: give --redis URL")?;
    let prices = cfg.prices.prices().map_err(anyhow::Error::msg)?;
    let lease_ttl = std::time::Duration::from_secs(cfg.metering.lease_ttl_seconds);
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&redis.url, &redis.key_prefix, lease_ttl)
            .await?
            .with_ledger_retention(cfg.metering.ledger_retention()),
    );
    let cache = BalanceCache::new(prices);
    let mut agent_cfg = AgentConfig::new(
        node_id,
        cfg.control.data_dir.join(format!("{node_id}.journal")),
    );
    agent_cfg.lease_ttl = lease_ttl;
    agent_cfg.lease_margin = lease_ttl / 5;
    agent_cfg.cpu_debt_limit_ms = cfg.metering.cpu_debt_limit_ms;
    // On the control service's /metrics: the CPU it charges, its settles, its feed lag.
    let metrics = CacheMetrics::new(registry)?;
    let agent = Agent::start(cache.clone(), store, agent_cfg, metrics).await?;
    let task = tokio::spawn(agent.run(stop));
    Ok((cache, task))
}

/// `tollgate dev --dev-account A`: every MCP call acts as `A`. Local development only (no
/// payment, no proof); `tollgate control` never uses it.
pub struct DevIdentity(pub String);

#[async_trait::async_trait]
impl tollgate_mcp::Identify for DevIdentity {
    async fn account(
        &self,
        _parts: Option<&http::request::Parts>,
        _meta: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<tollgate_mcp::Caller, tollgate_mcp::Refusal> {
        Ok(tollgate_mcp::Caller::unpaid(self.0.clone()))
    }
}
