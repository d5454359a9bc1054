//! The run modes: `tollgate proxy`, `tollgate control`, `tollgate dev`. Each builds its parts
//! once, in dependency order, on one runtime, and stops them in one order
//! (docs/architecture.md, "Shutdown"):
//!
//! 1. stop intake (the proxy's `/readyz` fails and its listeners close; the control listener
//!    stops accepting);
//! 2. drain (requests in flight finish);
//! 3. stop the runtime (workerd processes; their last CPU is charged);
//! 4. final settle (the metering node settles what is left and returns its leases);
//! 5. flush (usage counts) and stop background work.
//!
//! Then they return to `main`. Signal handlers are installed before anything starts (a signal
//! during start-up is acted on once start-up is done, instead of killing the process half
//! way); every wait of the shutdown is bounded, and a second signal cuts the waits short. A
//! start that fails half way stops what it started, in the same order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tollgate_metering::Store;
use tollgate_proxy::ProxyOptions;

use crate::adapters::{ChargeCpu, DevIdentity, InflightHooks};
use crate::control::{Agents, Placement, bind_control, control_service, runtime, serve_on};
use crate::metering::{MeteringNode, MeteringSpec, StoreSource};
use crate::node::{GateSpec, PreparedNode};
use crate::paid::{PaymentStores, ProxyDesk, payments};
use crate::settings::Settings;
use crate::shutdown::{Parts, Signals};

/// The process's one runtime for everything that is not Pingora's own.
fn runtime_for(name: &str) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// The proxy's options from the settings: the platform's payment realms are never forwarded to
/// hosted services. `standalone` (`tollgate proxy`): the realm must be named, whatever the
/// listen address (a proxy behind a local load balancer is just as public, and the default, the
/// loopback MCP host of this file, is not what a control service elsewhere issues).
pub fn proxy_options(
    settings: &Settings,
    upgrade: bool,
    standalone: bool,
) -> anyhow::Result<ProxyOptions> {
    let cfg = &settings.config;
    let mut proxy = cfg.proxy.clone();
    if standalone && cfg.public.mcp_url.is_none() && cfg.payments.realm.is_none() {
        anyhow::bail!(
            "the platform's payment realm is not set: set public.mcp_url (or TOLLGATE_PUBLIC_MCP_URL, or payments.realm) to what the control service uses; the proxy strips the platform's payment credentials before forwarding to hosted services and must know them"
        );
    }
    let realm = cfg.payment_realm().map_err(|e| {
        anyhow::anyhow!(
            "{e}; the proxy must know the platform's payment realm to keep its credentials from hosted services"
        )
    })?;
    // Configured realms add to the platform's own (an operator's extra names never replace it).
    for r in [
        realm.clone(),
        tollgate_payments::config::services_realm_of(&realm),
    ] {
        if !proxy.payment_realms.contains(&r) {
            proxy.payment_realms.push(r);
        }
    }
    Ok(ProxyOptions {
        proxy,
        admin: cfg.admin.clone(),
        redis: cfg.redis.clone(),
        shutdown: cfg.shutdown.clone(),
        routes: cfg.routes.clone(),
        upgrade,
        metering: None,
        tls: cfg.tls.clone(),
        access_log: cfg.access_log.clone(),
    })
}

/// The money gate of this node: Redis when configured (every node shares it), else the
/// embedded store in the data dir, or `store` when the process opened it already.
fn gate_spec(
    settings: &Settings,
    node_id: &str,
    store: Option<Arc<dyn Store>>,
) -> anyhow::Result<Option<GateSpec>> {
    let cfg = &settings.config;
    if !cfg.metering.enabled {
        return Ok(None);
    }
    std::fs::create_dir_all(&cfg.control.data_dir).with_context(|| {
        format!(
            "cannot create the data dir {} (control.data_dir: journals, embedded store)",
            cfg.control.data_dir.display()
        )
    })?;
    let store = match store {
        Some(s) => StoreSource::Ready(s),
        None => StoreSource::configured(cfg, settings.lease_ttl),
    };
    Ok(Some(GateSpec {
        metering: MeteringSpec {
            store,
            prices: settings.prices,
            agent: settings.agent(node_id)?,
        },
        lease_wait: settings.lease_wait,
        top_up: cfg.metering.top_up.clone(),
        hooks: None,
        desk: None,
    }))
}

/// `tollgate proxy`: one proxy node until a signal.
pub fn run_proxy(settings: Settings, upgrade: bool) -> anyhow::Result<()> {
    let rt = runtime_for("tollgate")?;
    let mut signals = rt.block_on(async { Signals::install() })?;
    signals.upgradable = true;
    let opts = proxy_options(&settings, upgrade, true)?;
    // The plain listener only: a probe of the TLS one would log a failed handshake.
    let listens = vec![opts.proxy.listen];
    if let Some(p) = &settings.pid_file {
        crate::process::PidFile::check(p)?;
    }
    let gate = gate_spec(&settings, &settings.proxy_node_id(), None)?;
    // With --upgrade, `start` returns once the old process has handed its listeners over.
    let node = PreparedNode::prepare(opts, gate, rt.handle())?.start(rt.handle())?;
    let result = rt.block_on(async move {
        // READY (and the PID file the upgrade script waits for) only once every listener
        // accepts: a listener Pingora could not open leaves the process unready, and it exits.
        if let Err(e) = crate::process::wait_accepting(&listens).await {
            node.shutdown(tollgate_proxy::Stop::Fast).await;
            return Err(e);
        }
        let pid_file = settings.pid_file.as_deref().and_then(|p| {
            crate::process::PidFile::write(p)
                .map_err(|e| tracing::error!(error = %e, "serving without a PID file"))
                .ok()
        });
        signals.reload_on_hangup(node.proxy.certificates());
        crate::process::ready(upgrade);
        let how = signals.next().await;
        node.shutdown(how).await;
        drop(pid_file);
        if how == tollgate_proxy::Stop::Upgrade && !crate::process::accepting(listens[0]).await {
            // The successor took the listeners and is gone (or never served): exit non-zero
            // so a supervisor (Restart=on-failure) starts the node again.
            anyhow::bail!(
                "upgrade: no process holds {} after the hand-over (the new process is gone)",
                listens[0]
            );
        }
        Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The shared money store, opened once (payments and the metering node use the same).
/// `tollgate control` retries while Redis is not up yet, saying where it looks.
async fn open_money(settings: &Settings, retry_for: Duration) -> anyhow::Result<Arc<dyn Store>> {
    let source = StoreSource::configured(&settings.config, settings.lease_ttl);
    let deadline = tokio::time::Instant::now() + retry_for;
    let mut wait = Duration::from_millis(200);
    loop {
        match source.open().await {
            Ok(s) => return Ok(s),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "money store not reachable yet ([redis]); retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => anyhow::bail!("the money store: {e}"),
        }
    }
}

/// What `control` and `runtime` need before anything starts: the data dir (created) and a
/// Redis (`why` says what for).
fn data_dir_and_redis(
    settings: &Settings,
    why: &str,
) -> anyhow::Result<tollgate_proxy::RedisConfig> {
    let cfg = &settings.config;
    std::fs::create_dir_all(&cfg.control.data_dir).with_context(|| {
        format!(
            "cannot create the data dir {} (control.data_dir)",
            cfg.control.data_dir.display()
        )
    })?;
    cfg.redis
        .clone()
        .with_context(|| format!("{why}: configure [redis] url (or TOLLGATE_REDIS_URL)"))
}

/// `tollgate control`: the control service, its runtime and a metering node for CPU, until a
/// signal.
pub fn run_control(settings: Settings) -> anyhow::Result<()> {
    let redis = data_dir_and_redis(&settings, "the control service keeps its state in Redis")?;
    let rt = runtime_for("tollgate")?;
    let handle = rt.handle().clone();
    let result = rt.block_on(async move {
        let signals = Signals::install()?;
        // The listeners first: a port in use stops the start before anything runs.
        let listener = bind_control(&settings).await?;
        let admin_addr = settings.config.control.admin_listen;
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot listen on {admin_addr} (control.admin_listen)"))?;
        let mut parts = Parts {
            drain: settings.drain_timeout,
            ..Parts::default()
        };
        let started = start_control(
            &settings,
            redis,
            (listener, admin_listener),
            &handle,
            &mut parts,
        )
        .await;
        parts
            .run_until_signal(started, signals, settings.pid_file.clone())
            .await?;
        tracing::info!("control service stopped");
        anyhow::Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn start_control(
    settings: &Settings,
    redis: tollgate_proxy::RedisConfig,
    (listener, admin_listener): (tokio::net::TcpListener, tokio::net::TcpListener),
    handle: &tokio::runtime::Handle,
    parts: &mut Parts,
) -> anyhow::Result<()> {
    let money = open_money(settings, Duration::from_secs(60)).await?;
    // Payments first: a missing secret or a test chain stops the start before anything runs.
    let payments = payments(
        settings,
        money.clone(),
        PaymentStores::Redis {
            target: redis.target(),
            prefix: redis.key_prefix.clone(),
        },
        false,
    )
    .await?;
    let registry = prometheus::Registry::new();
    tollgate_proxy::metrics::register_build_info(&registry)?;
    let mut rows_cache = None;
    let on_hosts = settings.config.control.runtime == crate::config::RuntimePlacement::Hosts;
    let cpu: Arc<dyn tollgate_runtime::CpuSink> = if on_hosts {
        // Each runtime host charges its own processes' CPU.
        Arc::new(tollgate_runtime::NoCpuSink)
    } else if settings.config.metering.enabled {
        let (cpu, cache) = cpu_node(
            settings,
            money,
            &settings.control_node_id(),
            &registry,
            handle,
            parts,
        )?;
        rows_cache = Some(cache);
        cpu
    } else {
        tracing::warn!("metering.enabled = false: the runtime's CPU is charged to nobody");
        Arc::new(tollgate_runtime::NoCpuSink)
    };
    let (placement, events, toolchain) = if on_hosts {
        let toolchain = tollgate_runtime::Toolchain::ensure(&settings.config.control.toolchain_dir)
            .context("the JS toolchain (control.toolchain_dir)")?;
        let (hosts, events) = tollgate_control::hosts::HostsRuntime::connect(
            redis.target(),
            &redis.key_prefix,
            tollgate_control::hosts::HostsRuntimeConfig::default(),
        )
        .await
        .map_err(|e| anyhow::anyhow!("runtime hosts ({}): {e}", redis.describe()))?;
        hosts.register_metrics(&registry)?;
        tracing::info!("control.runtime = hosts: deployments run on `tollgate runtime` hosts");
        (Placement::Hosts(hosts), events, toolchain)
    } else {
        let (sup, events, toolchain) = runtime(settings, cpu)?;
        parts.sup = Some(sup.clone());
        (Placement::Local(sup), events, toolchain)
    };
    payments.metrics.register(&registry)?;
    let (intake_tx, intake_rx) = watch::channel(false);
    let (bg_tx, bg_rx) = watch::channel(false);
    parts.intake = Some(intake_tx);
    parts.background = Some(bg_tx);
    // Several control instances may share this Redis: one at a time runs the background
    // rounds (docs/scale-out.md).
    let leader = tollgate_control::locks::Leadership::shared();
    parts.tasks.push(tokio::spawn(leader.clone().run(
        redis.target(),
        format!(
            "{}:ctl:rounds",
            redis.target().family_prefix(&redis.key_prefix)
        ),
        tollgate_control::locks::LEASE_TTL,
        bg_rx.clone(),
    )));
    payments.gate_rounds({
        let leader = leader.clone();
        Arc::new(move || leader.is_held())
    });
    parts.payments = Some(tokio::spawn(payments.clone().run(bg_rx.clone())));
    let bg_rx_admin = bg_rx.clone();
    let svc = control_service(
        settings,
        placement,
        events,
        toolchain,
        Agents {
            dev_identity: None,
            payments: Some(payments),
            registry: Some(registry.clone()),
            metrics: registry,
            leader,
        },
        None,
        rows_cache,
        bg_rx,
    )
    .await?;
    parts.tasks = svc.tasks;
    parts.after_runtime = svc.after_runtime;
    if let Some(admin) = svc.admin {
        // Stops with the background work, after the drain: probes and scrapes keep answering
        // while the public listener drains.
        parts
            .tasks
            .push(serve_on(admin_listener, admin, bg_rx_admin));
    }
    parts.server = Some(serve_on(listener, svc.router, intake_rx));
    Ok(())
}

/// A metering node `node_id` that charges the runtime's CPU (the control process's, or a
/// runtime host's), kept in `parts` for the ordered stop; its sink and its balance cache.
fn cpu_node(
    settings: &Settings,
    store: Arc<dyn Store>,
    node_id: &str,
    registry: &prometheus::Registry,
    handle: &tokio::runtime::Handle,
    parts: &mut Parts,
) -> anyhow::Result<(
    Arc<dyn tollgate_runtime::CpuSink>,
    Arc<tollgate_balance_cache::BalanceCache>,
)> {
    let metering = MeteringNode::start(
        MeteringSpec {
            store: StoreSource::Ready(store),
            prices: settings.prices,
            agent: settings.agent(node_id)?,
        },
        registry,
        handle,
    )?;
    let cache = metering.cache().clone();
    parts.metering = Some(metering);
    Ok((Arc::new(ChargeCpu(cache.clone())), cache))
}

/// `tollgate runtime`: a runtime host. It runs the deployments control places on it, charges
/// their CPU through its own metering node, and hands them over before it stops
/// (docs/scale-out.md).
pub fn run_runtime(settings: Settings) -> anyhow::Result<()> {
    let cfg = &settings.config;
    let redis = data_dir_and_redis(&settings, "a runtime host takes its deployments from Redis")?;
    // Routes point proxies at this address: a loopback one would send every proxy to its own
    // machine (to whatever listens there) as soon as they run elsewhere.
    let local = |url: &str| match redis_host(url) {
        Some(h) => {
            h == "localhost"
                || h.parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        // A Unix socket: this machine.
        None => url.starts_with("unix:") || url.starts_with("redis+unix:"),
    };
    let redis_local = if redis.cluster.is_empty() {
        local(&redis.url)
    } else {
        redis.cluster.iter().all(|u| local(u))
    };
    anyhow::ensure!(
        !cfg.control.runtime_ip.is_loopback() || redis_local,
        "control.runtime_ip is {} (loopback) but Redis is elsewhere: set control.runtime_ip (or TOLLGATE_CONTROL_RUNTIME_IP) to this host's private address, which the proxies reach (docs/scale-out.md)",
        cfg.control.runtime_ip
    );
    let rt = runtime_for("tollgate")?;
    let handle = rt.handle().clone();
    let result = rt.block_on(async move {
        let signals = Signals::install()?;
        let admin_addr = settings.config.host.admin_listen;
        let admin_listener = tokio::net::TcpListener::bind(admin_addr)
            .await
            .with_context(|| format!("cannot listen on {admin_addr} (host.admin_listen)"))?;
        let mut parts = Parts {
            drain: settings.drain_timeout,
            // The hand-over, then each deployment's drain.
            host_wait: Duration::from_secs(settings.config.host.handover_seconds)
                + settings.drain_timeout
                + Duration::from_secs(5),
            ..Parts::default()
        };
        let started =
            start_runtime_host(&settings, redis, admin_listener, &handle, &mut parts).await;
        parts
            .run_until_signal(started, signals, settings.pid_file.clone())
            .await?;
        tracing::info!("runtime host stopped");
        anyhow::Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

/// The host part of a `redis://` or `rediss://` URL (no user, port, path or brackets).
fn redis_host(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))?;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let authority = rest.split('/').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next();
    }
    authority.split(':').next().filter(|h| !h.is_empty())
}

/// 80 % of the machine's memory (`/proc/meminfo`), or 4 GiB when unreadable.
fn default_host_memory() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    total_kib.map_or(4 << 30, |k| k * 1024 / 10 * 8)
}

async fn start_runtime_host(
    settings: &Settings,
    redis: tollgate_proxy::RedisConfig,
    admin_listener: tokio::net::TcpListener,
    handle: &tokio::runtime::Handle,
    parts: &mut Parts,
) -> anyhow::Result<()> {
    let cfg = &settings.config;
    let host_id = settings.host_id();
    let registry = prometheus::Registry::new();
    tollgate_proxy::metrics::register_build_info(&registry)?;
    let mut money = None;
    let cpu: Arc<dyn tollgate_runtime::CpuSink> = if cfg.metering.enabled {
        let store = open_money(settings, Duration::from_secs(60)).await?;
        let (cpu, cache) = cpu_node(settings, store, &host_id, &registry, handle, parts)?;
        money = Some(cache);
        cpu
    } else {
        tracing::warn!("metering.enabled = false: this host's CPU is charged to nobody");
        Arc::new(tollgate_runtime::NoCpuSink)
    };
    let (sup, events, _toolchain) = crate::control::runtime_in(
        settings,
        cpu,
        cfg.control.data_dir.join("runtime").join(&host_id),
    )?;
    sup.register_metrics(&registry)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    parts.sup = Some(sup.clone());
    let memory_bytes = match cfg.host.memory_mib {
        0 => default_host_memory(),
        m => m.saturating_mul(1 << 20),
    };
    let info = tollgate_control::hosts::HostInfo {
        id: host_id.clone(),
        ip: cfg.control.runtime_ip,
        processes: cfg.host.processes,
        memory_bytes,
        per_deployment_bytes: cfg.host.per_deployment_mib.saturating_mul(1 << 20),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        started_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let mut agent = tollgate_control::hosts::HostAgent::connect(
        redis.target(),
        &redis.key_prefix,
        tollgate_control::hosts::HostAgentConfig {
            info,
            lease: Duration::from_millis(cfg.host.lease_ms),
            handover: Duration::from_secs(cfg.host.handover_seconds),
            log_entries: 1000,
        },
        sup,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e} ({})", redis.describe()))?;
    agent.register_metrics(&registry)?;
    let registered = agent.ready_flag();
    let (bg_tx, bg_rx) = watch::channel(false);
    parts.background = Some(bg_tx);
    parts.host = Some(tokio::spawn(agent.run(events, bg_rx.clone())));
    let admin = axum::Router::new()
        .route("/livez", axum::routing::get(|| async { "ok" }))
        .route(
            "/readyz",
            axum::routing::get(move || {
                let registered = registered.load(std::sync::atomic::Ordering::Acquire);
                let metering = money.as_ref().is_none_or(|m| m.agent_started());
                async move {
                    let body = serde_json::json!({
                        "status": if registered && metering { "ready" } else { "not ready" },
                        "lease": if registered { "held" } else { "not held" },
                        "metering": if metering { "ok" } else { "the CPU metering agent has not started" },
                    });
                    let code = if registered && metering {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, axum::Json(body))
                }
            }),
        )
        .route("/metrics", crate::telemetry::metrics_route(registry));
    parts.tasks.push(serve_on(admin_listener, admin, bg_rx));
    tracing::info!(host = %host_id, ip = %cfg.control.runtime_ip, "runtime host started");
    Ok(())
}

/// What `tollgate dev` takes beside the settings.
pub struct DevChoices {
    pub dev_account: Option<String>,
    pub dev_credit_usd: Option<String>,
    pub chain_listen: std::net::SocketAddr,
    pub chain_rpc: Option<String>,
}

/// `tollgate dev`: everything on one machine (proxy, control, runtime, payments, and the local
/// test chain when built with it), until a signal.
pub fn run_dev(settings: Settings, choices: DevChoices) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.config.control.data_dir).with_context(|| {
        format!(
            "cannot create the data dir {} (--data-dir)",
            settings.config.control.data_dir.display()
        )
    })?;
    let rt = runtime_for("tollgate")?;
    let handle = rt.handle().clone();
    let result = rt.block_on(async move {
        let signals = Signals::install()?;
        let listener = bind_control(&settings).await?;
        let mut parts = Parts {
            drain: settings.drain_timeout,
            ..Parts::default()
        };
        let pid_file = settings.pid_file.clone();
        let started = start_dev(settings, &choices, listener, &handle, &mut parts).await;
        parts.run_until_signal(started, signals, pid_file).await?;
        tracing::info!("dev stopped");
        anyhow::Ok(())
    });
    rt.shutdown_timeout(Duration::from_secs(2));
    result
}

async fn start_dev(
    mut settings: Settings,
    choices: &DevChoices,
    listener: tokio::net::TcpListener,
    handle: &tokio::runtime::Handle,
    parts: &mut Parts,
) -> anyhow::Result<()> {
    let money = open_money(&settings, Duration::ZERO).await?;
    if let (Some(account), Some(usd)) = (&choices.dev_account, &choices.dev_credit_usd) {
        dev_credit(&money, account, usd).await?;
    }
    parts.chain = crate::devchain::start(&mut settings, choices).await?;
    let cfg = settings.config.clone();
    let payments = payments(
        &settings,
        money.clone(),
        match &cfg.redis {
            Some(r) => PaymentStores::Redis {
                target: r.target(),
                prefix: r.key_prefix.clone(),
            },
            None => PaymentStores::Embedded {
                dir: cfg.control.data_dir.join("payments"),
            },
        },
        true,
    )
    .await?;
    // The proxy node, its cache charged by the runtime, which the proxy holds an in-flight
    // guard of per request.
    let mut gate = gate_spec(&settings, &settings.proxy_node_id(), Some(money))?;
    if let Some(g) = &mut gate {
        g.desk = Some(Arc::new(ProxyDesk {
            payments: payments.clone(),
            amount: settings.payments.default_prepay.max(1),
        }));
    }
    let mut started_runtime = None;
    let mut rows_cache = None;
    let prepared = PreparedNode::prepare_with(
        proxy_options(&settings, false, false)?,
        gate,
        handle,
        |cache| {
            let (sup, events, toolchain) = runtime(&settings, Arc::new(ChargeCpu(cache.clone())))?;
            let hooks = Arc::new(InflightHooks(sup.clone()));
            started_runtime = Some((sup, events, toolchain));
            rows_cache = Some(cache.clone());
            Ok(Some(hooks as Arc<dyn tollgate_proxy::RequestHooks>))
        },
    )?;
    let (sup, events, toolchain) = match started_runtime {
        Some(r) => r,
        // Metering off: the runtime is charged to nobody.
        None => runtime(&settings, Arc::new(tollgate_runtime::NoCpuSink))?,
    };
    parts.sup = Some(sup.clone());
    let registry = prepared.registry();
    let local_table = cfg.redis.is_none().then(|| prepared.table());
    parts.prepared = Some(prepared);
    payments.metrics.register(&registry)?;
    if let Some(prepared) = parts.prepared.take() {
        // A start that fails here drops the node: nothing was served on it yet, so its agent
        // has nothing to settle.
        parts.node = Some(prepared.start(handle)?);
    }
    let (intake_tx, intake_rx) = watch::channel(false);
    let (bg_tx, bg_rx) = watch::channel(false);
    parts.intake = Some(intake_tx);
    parts.background = Some(bg_tx);
    parts.payments = Some(tokio::spawn(payments.clone().run(bg_rx.clone())));
    let payee = payments.payee();
    let svc = control_service(
        &settings,
        Placement::Local(sup),
        events,
        toolchain,
        Agents {
            dev_identity: choices
                .dev_account
                .clone()
                .map(|a| Arc::new(DevIdentity(a)) as Arc<dyn tollgate_mcp::Identify>),
            payments: Some(payments),
            registry: None,
            metrics: registry,
            leader: tollgate_control::locks::Leadership::always(),
        },
        local_table,
        rows_cache,
        bg_rx,
    )
    .await?;
    parts.tasks = svc.tasks;
    parts.after_runtime = svc.after_runtime;
    parts.server = Some(serve_on(listener, svc.router, intake_rx));
    print_banner(
        &settings,
        choices,
        parts.chain.as_ref().map(|c| c.describe()),
        payee,
    );
    Ok(())
}

/// Credits the dev account once per amount.
async fn dev_credit(store: &Arc<dyn Store>, account: &str, usd: &str) -> anyhow::Result<()> {
    let amount = tollgate_metering::units::parse_usd(usd)
        .map_err(|e| anyhow::anyhow!("--dev-credit-usd {usd}: {e}"))?;
    let key = format!("dev-credit:{account}:{}", amount.0);
    let out = store
        .credit(account, &key, amount.0)
        .await
        .map_err(|e| anyhow::anyhow!("dev credit: {e}"))?;
    tracing::info!(account, usd, ?out, "dev account credited");
    Ok(())
}

fn print_banner(
    settings: &Settings,
    choices: &DevChoices,
    chain: Option<String>,
    payee: alloy::primitives::Address,
) {
    let cfg = &settings.config;
    let port = cfg.proxy.listen.port();
    let routes_from = match &cfg.redis {
        Some(r) if r.cluster.is_empty() => format!("Redis at {}", r.url),
        Some(r) => format!("the Redis Cluster of {}", r.cluster.join(", ")),
        None => "the config file and --route (in process)".to_owned(),
    };
    let mcp = match &choices.dev_account {
        Some(a) => format!(
            "\n\x20           MCP http://{}/mcp, acting as account {a:?} (dev only: no payment)",
            cfg.control.listen
        ),
        None => String::new(),
    };
    let state = if cfg.redis.is_some() {
        "Redis".to_owned()
    } else {
        cfg.control
            .data_dir
            .join("control.redb")
            .display()
            .to_string()
    };
    println!(
        "\ntollgate dev: everything on one machine\n\
         \x20 proxy     http://<slug>.{base}:{port}/\n\
         \x20 admin     http://{admin}/metrics  /livez  /readyz\n\
         \x20 routes    from {routes_from}; {n} static route(s)\n\
         \x20 data      {data}\n\
         \x20 control   http://{control}/v1/admin/projects (operator API; token from TOLLGATE_ADMIN_TOKEN), runtime (workerd), state in {state}{mcp}\n\
         \x20 MCP       http://{control}/mcp  (agents: tools deploy_project, top_up, get_balance, ...)\n\
         \x20 top-up    POST http://{control}/v1/top-up?amount_usd=5  (MPP 402 challenge)\n\
         \x20 chain     {chain_line}\n\
         \x20 payee     {payee:#x} (key in {data}/payee.key)\n",
        control = cfg.control.listen,
        chain_line = chain.unwrap_or_else(|| format!(
            "{} (chain id {})",
            cfg.payments.rpc_url, cfg.payments.chain_id
        )),
        base = cfg.proxy.base_domain,
        admin = cfg.admin.listen,
        n = cfg.routes.len(),
        data = cfg.control.data_dir.display(),
    );
    for r in &cfg.routes {
        println!("  route     http://{}:{port}/ -> {:?}", r.host, r.upstreams);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_redis_host_is_read_whole() {
        use super::redis_host;
        assert_eq!(redis_host("redis://127.0.0.1:6379/0"), Some("127.0.0.1"));
        assert_eq!(
            redis_host("redis://:pw@localhost-cache.internal:6379"),
            Some("localhost-cache.internal")
        );
        assert_eq!(redis_host("rediss://user:p@ss@[::1]:6380/"), Some("::1"));
        assert_eq!(redis_host("redis://10.0.0.5"), Some("10.0.0.5"));
        assert_eq!(redis_host("unix:///tmp/redis.sock"), None);
    }
}
