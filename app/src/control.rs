//! The control service's half of a process: the runtime (workerd), the control service over
//! its stores, and what its listener offers (operator API, MCP, top-up, health, metrics).

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tollgate_control::hosts::HostsRuntime;
use tollgate_control::{
    Control, ControlConfig, ControlStore, EmbeddedControlStore, LocalRoutes, RedisControlStore,
    RoutePublisher, Runtime,
};
use tollgate_routes::RouteStore;
use tollgate_runtime::{CpuSink, RuntimeConfig, RuntimeEvent, Supervisor, Toolchain};

use crate::settings::Settings;

/// The runtime half: toolchain checked (installed when missing), supervisor started; CPU
/// charged through `cpu`.
pub fn runtime(
    settings: &Settings,
    cpu: Arc<dyn CpuSink>,
) -> anyhow::Result<(
    Supervisor,
    tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    Toolchain,
)> {
    runtime_in(
        settings,
        cpu,
        settings.config.control.data_dir.join("runtime"),
    )
}

/// [`runtime`], its deployment folders under `data_dir` (a runtime host: one of its own, so
/// hosts sharing a machine and a `control.data_dir` never share a deployment's folder).
pub fn runtime_in(
    settings: &Settings,
    cpu: Arc<dyn CpuSink>,
    data_dir: std::path::PathBuf,
) -> anyhow::Result<(
    Supervisor,
    tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    Toolchain,
)> {
    let cfg = &settings.config;
    let toolchain = Toolchain::ensure(&cfg.control.toolchain_dir)
        .with_context(|| "the JS toolchain (control.toolchain_dir)".to_string())?;
    tracing::info!(workerd = %toolchain.workerd_version, esbuild = %toolchain.esbuild_version, "JS toolchain ready");
    let rt = RuntimeConfig {
        data_dir,
        idle_timeout: (cfg.control.idle_stop_seconds > 0)
            .then(|| std::time::Duration::from_secs(cfg.control.idle_stop_seconds)),
        listen_ip: cfg.control.runtime_ip,
        ..RuntimeConfig::default()
    };
    let (sup, events) = Supervisor::new(rt, toolchain.clone(), cpu)?;
    Ok((sup, events, toolchain))
}

/// Where the control service runs deployments.
pub enum Placement {
    /// In this process.
    Local(Supervisor),
    /// On runtime hosts (`tollgate runtime`), through Redis.
    Hosts(Arc<HostsRuntime>),
}

/// What the control listener offers agents: MCP with a dev identity (no payment; `dev
/// --dev-account` only) or with MPP payments, the top-up endpoint, and `/metrics` when the
/// process has no proxy admin listener to carry them.
pub struct Agents {
    pub dev_identity: Option<Arc<dyn tollgate_mcp::Identify>>,
    pub payments: Option<Arc<tollgate_payments::Payments>>,
    /// Served at the control listener's `/metrics` (when no proxy admin listener carries them).
    pub registry: Option<prometheus::Registry>,
    /// Where the control process's own components (the database service) register.
    pub metrics: prometheus::Registry,
    /// Whether this instance runs the background rounds now (the cleanup sweep here; payments
    /// are gated by the caller).
    pub leader: Arc<tollgate_control::locks::Leadership>,
}

/// A control service ready to serve: its HTTP app, and its background tasks (runtime events,
/// the cleanup sweep), which stop with `stop`.
pub struct ControlService {
    /// What agents reach (`control.listen`).
    pub router: axum::Router,
    /// `tollgate control`'s private listener (`control.admin_listen`): operator API, metrics,
    /// probes.
    pub admin: Option<axum::Router>,
    pub tasks: Vec<JoinHandle<()>>,
    /// The database service and its usage flusher, with their own stop: workerd processes
    /// call it until the runtime has stopped them.
    pub after_runtime: Option<(watch::Sender<bool>, Vec<JoinHandle<()>>)>,
}

/// Builds the control service: its stores (Redis when configured, shared by every node;
/// otherwise the embedded store in the data dir and routes straight into `local_table`, this
/// process's proxy), recovery of live deployments, the sweep, and the listener's routes.
#[allow(clippy::too_many_arguments)]
pub async fn control_service(
    settings: &Settings,
    placement: Placement,
    events: tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    toolchain: Toolchain,
    agents: Agents,
    local_table: Option<Arc<tollgate_routes::RouteTable>>,
    money: Option<Arc<tollgate_balance_cache::BalanceCache>>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<ControlService> {
    let cfg = &settings.config;
    let (store, routes): (Arc<dyn ControlStore>, Arc<dyn RoutePublisher>) = match (
        &cfg.redis,
        local_table,
    ) {
        (Some(redis), _) => (
            Arc::new(
                RedisControlStore::connect(redis.target(), &redis.key_prefix)
                    .await
                    .map_err(|e| anyhow::anyhow!("control store ({}): {e}", redis.describe()))?,
            ),
            Arc::new(RouteStore::connect(redis.target(), &redis.key_prefix).await?),
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
        match &cfg.public.base_domain {
            // A public name: served over HTTPS on the standard port (docs/operations.md).
            Some(d) => format!("https://{{slug}}.{d}"),
            None => format!(
                "http://{{slug}}.{}:{}",
                cfg.proxy.base_domain,
                cfg.proxy.listen.port()
            ),
        }
    });
    let ready_store = store.clone();
    let ready_money = money.clone();
    let mut tasks = Vec::new();
    let runtime: Arc<dyn Runtime> = match &placement {
        Placement::Local(sup) => {
            sup.register_metrics(&agents.metrics)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Arc::new(sup.clone())
        }
        Placement::Hosts(hosts) => {
            tasks.push(tokio::spawn(hosts.clone().run(stop.clone())));
            hosts.clone()
        }
    };
    let control = Control::new(
        store.clone(),
        bundler,
        runtime,
        routes,
        ControlConfig {
            url_template: public_url,
            inactivity_ttl: std::time::Duration::from_secs(cfg.control.inactivity_ttl_seconds),
            ..ControlConfig::default()
        },
    );
    control.register_metrics(&agents.metrics)?;
    // Databases before recovery: the deployments it restarts get their database tokens.
    let mut after_runtime = None;
    let on_hosts = matches!(placement, Placement::Hosts(_));
    if cfg.database.enabled && on_hosts {
        // Their tokens live in this process and their socket on this machine: not yet offered
        // to deployments on runtime hosts (docs/scale-out.md).
        tracing::warn!("control.runtime = hosts: projects' SQL databases are not offered");
    }
    if cfg.database.enabled && !on_hosts {
        let (db_stop_tx, db_stop) = watch::channel(false);
        let (access, db_tasks) =
            databases(settings, store, money, &agents.metrics, db_stop).await?;
        control.attach_databases(access);
        after_runtime = Some((db_stop_tx, db_tasks));
    }
    {
        let (control, mut stop) = (control.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = control.follow_runtime(events) => {}
                _ = stop.wait_for(|s| *s) => {}
            }
        }));
    }
    let n = control
        .recover()
        .await
        .map_err(|e| anyhow::anyhow!("recovery: {e}"))?;
    tracing::info!(deployments = n, "live deployments restarted");
    // The book of record: the Redis ledger copied into PostgreSQL (docs/book.md).
    if let (Some(book), Some(redis)) = (&cfg.book, &cfg.redis) {
        let metrics = tollgate_book::BookMetrics::new(&agents.metrics)?;
        // It connects (and reconnects) by itself: a Redis or PostgreSQL away does not stop the
        // control service from starting.
        tasks.push(tokio::spawn(tollgate_book::run(
            book.postgres_url.clone(),
            redis.target(),
            redis.key_prefix.clone(),
            redis.money_shards,
            std::time::Duration::from_millis(book.copy_interval_ms),
            metrics,
            stop.clone(),
        )));
        tracing::info!("book of record: copying the ledger into PostgreSQL");
    }
    // Runtime hosts: every live route checked against where its deployment runs now (events
    // can be lost; a move's start can outlive its wait), by the instance holding the rounds.
    if on_hosts {
        let (repairer, leader, mut stop) = (control.clone(), agents.leader.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            // Every live project costs a few Redis reads per round (docs/scale-out.md, "How
            // far it scales").
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                if !leader.is_held() {
                    continue;
                }
                if let Err(e) = repairer.repair_routes().await {
                    tracing::warn!(error = %e, "route repair round failed");
                }
            }
        }));
    }
    // The cleanup job (after recovery, so it never sees a project mid-restart): expire and
    // collect unused projects (idempotent, so a missed or repeated run is harmless).
    let sweeper = control.clone();
    let leader = agents.leader.clone();
    let every =
        std::time::Duration::from_secs((cfg.control.inactivity_ttl_seconds / 10).clamp(1, 60));
    let mut sweep_stop = stop;
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = sweep_stop.wait_for(|s| *s) => return,
            }
            if !leader.is_held() {
                continue;
            }
            match sweeper.sweep().await {
                Ok(expired) if !expired.is_empty() => {
                    tracing::info!(n = expired.len(), "expired unused projects")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cleanup sweep failed"),
            }
            if let Err(e) = sweeper.collect_orphans().await {
                tracing::warn!(error = %e, "orphaned deployments not collected");
            }
        }
    }));
    let health = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route("/livez", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || ready(ready_store.clone(), ready_money.clone())),
        );
    let operator =
        tollgate_control::http::admin_router(control.clone(), cfg.control.admin_token.clone());
    // `tollgate control` (its own registry): the operator API and metrics go to the private
    // admin listener. `tollgate dev` keeps them on its one control listener.
    let (mut app, mut admin) = if agents.registry.is_some() {
        (health.clone(), Some(operator.merge(health)))
    } else {
        (operator.merge(health), None)
    };
    // Deploys cost money where payments run (and never with a dev identity).
    let pricing = match (&agents.payments, &agents.dev_identity) {
        (Some(_), None) => Some(tollgate_mcp::DeployPricing {
            deploy_picos: settings.prices.per_deploy,
            per_request_picos: settings.prices.per_request,
            per_cpu_us_picos: settings.prices.per_cpu_us,
            per_row_read_picos: settings.prices.per_row_read,
            per_row_written_picos: settings.prices.per_row_written,
            default_prepay: settings.payments.default_prepay,
        }),
        _ => None,
    };
    let mut allowed_hosts = vec![
        "localhost".into(),
        "127.0.0.1".into(),
        "::1".into(),
        cfg.control.listen.ip().to_string(),
    ];
    if let Ok(public) = cfg.public_mcp_host() {
        // `Host` is compared without its port.
        let name = public
            .rsplit_once(':')
            .filter(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
            .map_or(public.as_str(), |(h, _)| h);
        allowed_hosts.push(name.trim_matches(['[', ']']).to_owned());
    }
    allowed_hosts.extend(cfg.public.allowed_hosts.iter().cloned());
    let mcp_cfg = tollgate_mcp::McpConfig {
        allowed_hosts,
        allowed_origins: cfg.public.allowed_origins.clone(),
        pricing,
        registry: Some(agents.metrics.clone()),
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
        None => agents.payments.clone().map(|p| {
            Arc::new(crate::paid::PaidIdentity {
                payments: p,
                start_hold: settings.payments.start_refund_hold,
            }) as Arc<dyn tollgate_mcp::Identify>
        }),
    };
    if let Some(identity) = identity {
        app = app.merge(tollgate_mcp::router(control, identity, &mcp_cfg));
        tracing::info!(addr = %cfg.control.listen, "MCP at /mcp");
    }
    if let Some(p) = agents.payments {
        app = app.merge(tollgate_payments::http::router(p));
    }
    if let Some(registry) = agents.registry {
        admin = admin.map(|a| a.route("/metrics", crate::telemetry::metrics_route(registry)));
    }
    Ok(ControlService {
        // Outermost: the span covers every route (MCP, top-ups, health), a caller's
        // `traceparent` as its parent.
        router: app.layer(axum::middleware::from_fn(crate::telemetry::trace_requests)),
        admin,
        tasks,
        after_runtime,
    })
}

/// The per-project databases and their D1 service on a loopback port (workerd reaches it through
/// each deployment's binding; tenant `fetch()` cannot), rows charged through `money` (the
/// balance cache that charges the runtime's CPU) and counted per project for agents' views.
async fn databases(
    settings: &Settings,
    store: Arc<dyn ControlStore>,
    money: Option<Arc<tollgate_balance_cache::BalanceCache>>,
    registry: &prometheus::Registry,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<(tollgate_control::DatabaseAccess, Vec<JoinHandle<()>>)> {
    let cfg = &settings.config;
    let limits = cfg.database.limits().map_err(|e| anyhow::anyhow!(e))?;
    let dir = cfg.database.dir(&cfg.control.data_dir);
    let dbs = tollgate_database::Databases::open(&dir, limits)
        .map_err(|e| anyhow::anyhow!("database.dir {}: {e}", dir.display()))?;
    let meter: Arc<dyn tollgate_database::Meter> = match money {
        Some(cache) => Arc::new(crate::adapters::ChargeRows {
            cache,
            lease_wait: settings.lease_wait,
        }),
        None => {
            tracing::warn!("metering.enabled = false: database rows are charged to nobody");
            Arc::new(crate::adapters::FreeRows)
        }
    };
    let rows = tollgate_control::rows::RowsUsage::new(store);
    let dbs_for_idle = dbs.clone();
    if let Err(e) = dbs.check_disk(cfg.database.min_free_disk_mb.saturating_mul(1_000_000)) {
        tracing::warn!(error = %e, "database disk check failed");
    }
    let service = tollgate_database::Service::new(
        dbs.clone(),
        meter,
        Some(rows.clone() as Arc<dyn tollgate_database::Usage>),
        tollgate_database::DbMetrics::new(registry)?,
    );
    // A Unix socket in the data dir (only this user can reach it; cheaper than TCP per query),
    // or loopback TCP when the path is too long for a socket address.
    let app = service.router();
    let mut server_stop = stop.clone();
    let shutdown = async move {
        let _ = server_stop.wait_for(|s| *s).await;
    };
    let socket = dir.join(".d1.sock");
    let (address, served) = if socket.as_os_str().len() < 100 {
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .with_context(|| format!("the database service's socket {}", socket.display()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        }
        let served: futures_util::future::BoxFuture<'static, std::io::Result<()>> = Box::pin(
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .into_future(),
        );
        (format!("unix:{}", socket.display()), served)
    } else {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("the database service's loopback listener")?;
        let addr = listener.local_addr()?;
        let served: futures_util::future::BoxFuture<'static, std::io::Result<()>> = Box::pin(
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .into_future(),
        );
        (addr.to_string(), served)
    };
    tracing::info!(%address, dir = %dir.display(), "databases served to deployments (D1)");
    let server = tokio::spawn(async move {
        if let Err(e) = served.await {
            tracing::error!(error = %e, "database service failed");
        }
        // Checkpoint every WAL into its file before the process ends.
        let _ = tokio::task::spawn_blocking(move || dbs.close_all()).await;
    });
    let flusher = tokio::spawn(rows.run(stop.clone()));
    // Every 5 s: writes pause while the disk is nearly full; every minute: connections idle
    // for 5 minutes are closed (each holds three file descriptors).
    let idle_dbs = dbs_for_idle;
    let mut idle_stop = stop;
    let min_free = cfg.database.min_free_disk_mb.saturating_mul(1_000_000);
    let closer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        let mut n = 0u64;
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = idle_stop.wait_for(|s| *s) => true,
            };
            if stopping {
                return;
            }
            n += 1;
            let dbs = idle_dbs.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = dbs.check_disk(min_free) {
                    tracing::warn!(error = %e, "database disk check failed");
                }
                if n.is_multiple_of(12) {
                    dbs.close_idle(std::time::Duration::from_secs(300));
                }
            })
            .await;
        }
    });
    Ok((
        tollgate_control::DatabaseAccess { service, address },
        vec![server, flusher, closer],
    ))
}

/// `/readyz`: 200 when the control store answers (a read of a key that does not exist) and
/// the CPU metering node's agent runs (its lease and settle loop against the money store: a
/// runtime whose CPU cannot be charged must not take deploys); 503 with the reason otherwise,
/// so a load balancer stops sending deploys to a control instance that cannot keep them.
async fn ready(
    store: Arc<dyn ControlStore>,
    money: Option<Arc<tollgate_balance_cache::BalanceCache>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let probe = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        store.project("readyz-probe"),
    )
    .await;
    let store = match probe {
        Ok(Ok(_)) => Ok("ok".to_owned()),
        Ok(Err(e)) => Err(e.message),
        Err(_) => Err("no answer in 2 s".to_owned()),
    };
    let metering = match &money {
        None => Ok("off".to_owned()),
        Some(m) if m.agent_started() => Ok("ok".to_owned()),
        Some(_) => Err("the CPU metering agent has not started".to_owned()),
    };
    let ready = store.is_ok() && metering.is_ok();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "not ready" },
        "store": store.unwrap_or_else(|e| e),
        "metering": metering.unwrap_or_else(|e| e),
    });
    if ready {
        axum::Json(body).into_response()
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(body),
        )
            .into_response()
    }
}

/// Binds the control listener (first thing at start: a port in use stops the start before
/// anything runs).
pub async fn bind_control(settings: &Settings) -> anyhow::Result<tokio::net::TcpListener> {
    let listen = settings.config.control.listen;
    tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (control.listen)"))
}

/// Serves `app` on `listener` until `stop` (then it finishes the requests it has).
pub fn serve_on(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "listening");
    }
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "control listener failed");
        }
    })
}
