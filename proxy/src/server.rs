//! Assembles and runs one proxy node: the Pingora proxy service, plus a small background runtime
//! for the admin listener and the route sync.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use prometheus::Registry;
use tokio::sync::{mpsc, watch};
use tollgate_routes::{RouteSync, RouteTable, SyncMetrics, SyncOptions};

use crate::admin::{AdminState, router};
use crate::config::{AdminConfig, ProxyConfig, RedisConfig, ShutdownConfig, StaticRoute};
use crate::dispatch::{Dispatch, Health};
use crate::gate::{Gate, MeteringOptions};
use crate::metrics::{ProxyMetrics, register_build_info};
use tollgate_balance_cache::{Agent, BalanceCache, CacheMetrics};

/// Everything one proxy node needs.
#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    /// Routes come from Redis when set; static routes apply either way.
    pub redis: Option<RedisConfig>,
    pub shutdown: ShutdownConfig,
    pub routes: Vec<StaticRoute>,
    /// Take the listening sockets over from a running old process (Pingora's `--upgrade`).
    pub upgrade: bool,
    /// After a graceful stop, exit the process as soon as no request is in flight instead of
    /// sleeping out the whole drain timeout. Only for the binary: it calls `process::exit`.
    pub exit_when_drained: bool,
    /// Also stop on SIGTERM/SIGINT/SIGQUIT (the binary); tests use [`StopHandle`] alone.
    pub os_signals: bool,
    /// Charge requests to the routes' owning accounts (see `docs/money.md`). Without it every
    /// route is free (static routes, the proxy-only benchmarks).
    pub metering: Option<MeteringOptions>,
}

/// How to stop a running node.
#[derive(Debug, Clone, Copy)]
pub enum Stop {
    /// Fail `/readyz`, wait `drain_delay_seconds`, stop accepting, finish in-flight requests.
    Graceful,
    /// Stop now.
    Fast,
}

#[derive(Clone)]
pub struct StopHandle(mpsc::UnboundedSender<Stop>);

impl StopHandle {
    pub fn stop(&self, how: Stop) {
        let _ = self.0.send(how);
    }
}

/// A node that has bound its admin listener and built its state, ready to `run`.
pub struct Proxy {
    opts: ProxyOptions,
    registry: Registry,
    table: Arc<RouteTable>,
    health: Arc<Health>,
    metrics: Arc<ProxyMetrics>,
    sync_metrics: SyncMetrics,
    admin_listener: TcpListener,
    stop_rx: mpsc::UnboundedReceiver<Stop>,
    stop_tx: mpsc::UnboundedSender<Stop>,
    metering: Option<(Arc<BalanceCache>, Gate, CacheMetrics)>,
}

impl Proxy {
    pub fn prepare(opts: ProxyOptions) -> anyhow::Result<Proxy> {
        let registry = Registry::new();
        register_build_info(&registry)?;
        let metrics = Arc::new(ProxyMetrics::new(&registry)?);
        let sync_metrics = SyncMetrics::new(&registry)?;
        let statics = opts
            .routes
            .iter()
            .map(|r| (r.host.clone(), r.to_route()))
            .collect();
        let table = Arc::new(RouteTable::new(&opts.proxy.base_domain, statics));
        if opts.redis.is_none() {
            table.mark_synced();
        }
        sync_metrics.routes.set(table.snapshot().len() as i64);
        let admin_listener = TcpListener::bind(opts.admin.listen)
            .with_context(|| format!("cannot listen on {} (admin.listen)", opts.admin.listen))?;
        admin_listener.set_nonblocking(true)?;
        if !opts.upgrade {
            // Pingora binds later, on its own threads, where a failure cannot be reported well:
            // check the address now.
            drop(TcpListener::bind(opts.proxy.listen).with_context(|| {
                format!("cannot listen on {} (proxy.listen)", opts.proxy.listen)
            })?);
        }
        let (stop_tx, stop_rx) = mpsc::unbounded_channel();
        let metering = match &opts.metering {
            Some(m) => {
                m.agent.validate()?;
                let cache = BalanceCache::new(m.prices);
                let gate = Gate::new(cache.clone(), m, &registry)?;
                let cache_metrics = CacheMetrics::new(&registry)?;
                Some((cache, gate, cache_metrics))
            }
            None => None,
        };
        Ok(Proxy {
            metering,
            opts,
            registry,
            table,
            health: Arc::new(Health::default()),
            metrics,
            sync_metrics,
            admin_listener,
            stop_rx,
            stop_tx,
        })
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.table.clone()
    }

    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// This node's balance cache, when metering is on: CPU usage from the runtime is charged
    /// through it (`charge_cpu`).
    pub fn balance_cache(&self) -> Option<Arc<BalanceCache>> {
        self.metering.as_ref().map(|(c, _, _)| c.clone())
    }

    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.stop_tx.clone())
    }

    /// Runs until stopped; returns once the proxy has drained and every runtime has exited.
    pub fn run(self) -> anyhow::Result<()> {
        let Proxy {
            opts,
            registry,
            table,
            health,
            metrics,
            sync_metrics,
            admin_listener,
            stop_rx,
            stop_tx: _,
            metering,
        } = self;

        let bg = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-bg")
            .enable_all()
            .build()?;
        let (bg_stop_tx, bg_stop_rx) = watch::channel(false);
        let bg_stop_tx = Arc::new(bg_stop_tx);
        // Background work that must finish before the process exits (the agent's final settle,
        // the last usage flush): each sends once when done.
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let mut must_finish = 0usize;

        let admin_state = AdminState {
            registry,
            table: table.clone(),
            health: health.clone(),
        };
        let mut admin_stop = bg_stop_rx.clone();
        let admin_addr = opts.admin.listen;
        bg.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(admin_listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "admin listener failed");
                    return;
                }
            };
            tracing::info!(addr = %admin_addr, "admin listening (/metrics /livez /readyz)");
            let serve =
                axum::serve(listener, router(admin_state)).with_graceful_shutdown(async move {
                    let _ = admin_stop.wait_for(|s| *s).await;
                });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin server failed");
            }
        });

        if let Some(redis) = &opts.redis {
            let sync_opts = SyncOptions {
                redis_url: redis.url.clone(),
                key_prefix: redis.key_prefix.clone(),
                ping_interval: Duration::from_millis(redis.ping_interval_ms.max(10)),
                ping_timeout: Duration::from_millis(redis.ping_timeout_ms.max(10)),
                retry_initial: Duration::from_millis(50),
            };
            let sync = RouteSync::new(sync_opts, table.clone(), sync_metrics);
            bg.spawn(sync.run(bg_stop_rx.clone()));
            let flush = crate::usage::flush_loop(
                table.clone(),
                redis.url.clone(),
                redis.key_prefix.clone(),
                Duration::from_secs(1),
                bg_stop_rx.clone(),
            );
            let done = done_tx.clone();
            must_finish += 1;
            bg.spawn(async move {
                flush.await;
                let _ = done.send(());
            });
        }

        let hooks = opts.metering.as_ref().and_then(|m| m.hooks.clone());
        let (gate, agent_task) = match (metering, &opts.metering) {
            (Some((cache, gate, cache_metrics)), Some(m)) => {
                let agent = run_agent(
                    cache,
                    m.store.clone(),
                    m.agent.clone(),
                    cache_metrics,
                    bg_stop_rx.clone(),
                );
                let done = done_tx.clone();
                must_finish += 1;
                let task = bg.spawn(async move {
                    agent.await;
                    let _ = done.send(());
                });
                (Some(gate), Some(task))
            }
            _ => (None, None),
        };

        let conf = ServerConf {
            threads: opts.proxy.threads,
            work_stealing: opts.proxy.work_stealing,
            grace_period_seconds: Some(opts.shutdown.drain_timeout_seconds),
            graceful_shutdown_timeout_seconds: Some(1),
            upgrade_sock: opts
                .proxy
                .upgrade_sock
                .clone()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_else(|| {
                    std::env::temp_dir()
                        .join(format!(
                            "tollgate-{}.upgrade.sock",
                            opts.proxy.listen.port()
                        ))
                        .to_string_lossy()
                        .into_owned()
                }),
            pid_file: std::env::temp_dir()
                .join(format!("tollgate-{}.pid", opts.proxy.listen.port()))
                .to_string_lossy()
                .into_owned(),
            ..ServerConf::default()
        };
        let opt = Opt {
            upgrade: opts.upgrade,
            ..Opt::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        server.bootstrap();
        let dispatch = Dispatch::new(&opts.proxy, table, health.clone(), metrics.clone(), gate);
        let mut service = pingora::proxy::http_proxy_service_with_name(
            &server.configuration,
            dispatch,
            "tollgate proxy",
        );
        service.add_tcp(&opts.proxy.listen.to_string());
        server.add_service(service);
        tracing::info!(
            addr = %opts.proxy.listen,
            threads = opts.proxy.threads,
            base_domain = %opts.proxy.base_domain,
            "proxy listening"
        );

        let watcher = Watcher {
            stop_rx: tokio::sync::Mutex::new(stop_rx),
            health,
            drain_delay: Duration::from_secs_f64(opts.shutdown.drain_delay_seconds),
            in_flight: metrics.in_flight.clone(),
            exit_when_drained: opts.exit_when_drained,
            os_signals: opts.os_signals,
            before_exit: {
                let stop = bg_stop_tx.clone();
                let done = std::sync::Mutex::new(done_rx);
                let hooks = hooks.clone();
                Arc::new(move || {
                    if let Some(h) = &hooks {
                        h.before_final_settle();
                    }
                    // Settle what is left, return leases, flush usage; then exit.
                    let _ = stop.send(true);
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    if let Ok(rx) = done.lock() {
                        for _ in 0..must_finish {
                            let left =
                                deadline.saturating_duration_since(std::time::Instant::now());
                            if rx.recv_timeout(left).is_err() {
                                tracing::warn!(
                                    "background work did not finish before exit; the journal keeps unsettled usage"
                                );
                                break;
                            }
                        }
                    }
                })
            },
        };
        server.run(RunArgs {
            shutdown_signal: Box::new(watcher),
        });

        if let Some(h) = &hooks {
            h.before_final_settle();
        }
        let _ = bg_stop_tx.send(true);
        if let Some(task) = agent_task {
            // The agent settles what is left and returns its leases; give it time to.
            let _ =
                bg.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
        }
        bg.shutdown_timeout(Duration::from_secs(1));
        tracing::info!("proxy stopped");
        Ok(())
    }
}

/// How many stand-in identities a node may take while another process of the same node holds
/// its journal (a zero-downtime upgrade runs the old and the new process side by side).
const STAND_INS: u32 = 3;

/// The configuration of stand-in `n` of `base` (0 is `base` itself): node `<id>.<n>`, journal
/// `<id>.<n>.journal` beside the node's own.
fn stand_in(
    base: &tollgate_balance_cache::AgentConfig,
    n: u32,
) -> tollgate_balance_cache::AgentConfig {
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

/// Starts the metering agent (retrying while the store is unreachable: requests get 503 meanwhile)
/// and runs it until shutdown, when it settles what is left and returns its leases.
///
/// A journal has one owner. When another process of this node holds it (the old process of a
/// zero-downtime upgrade, draining), this one meters at once as a stand-in node with its own
/// journal and leases instead of answering 503 until the old one exits. Once running, it replays
/// the journals of stand-ins no process holds (left by a crash), so their usage is not held back
/// until the next upgrade.
async fn run_agent(
    cache: Arc<BalanceCache>,
    store: crate::gate::StoreSource,
    cfg: tollgate_balance_cache::AgentConfig,
    metrics: CacheMetrics,
    mut stop: watch::Receiver<bool>,
) {
    use tollgate_balance_cache::AgentError;
    use tollgate_metering::JournalError;
    let mut wait = Duration::from_millis(100);
    let mut n = 0;
    let (agent, mine) = loop {
        let try_cfg = stand_in(&cfg, n);
        let started = match store.open().await {
            Ok(store) => Agent::start(cache.clone(), store, try_cfg.clone(), metrics.clone())
                .await
                .map_err(|e| {
                    (
                        matches!(e, AgentError::Journal(JournalError::Locked { .. })),
                        e.to_string(),
                    )
                }),
            Err(e) => Err((false, e)),
        };
        match started {
            Ok(a) => {
                if n > 0 {
                    tracing::info!(node = %try_cfg.node_id, "journal held by another process of this node (an upgrade?): metering as a stand-in");
                }
                break (a, n);
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
    tokio::spawn(replay_orphans(store, cfg, mine, *cache.prices()));
    agent.run(stop).await;
}

/// Settles what the journals of this node's unheld identities still hold (a crashed process),
/// each through a short-lived agent of its own: replay, then release that incarnation.
async fn replay_orphans(
    store: crate::gate::StoreSource,
    base: tollgate_balance_cache::AgentConfig,
    mine: u32,
    prices: tollgate_metering::Prices,
) {
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
        let Ok(store) = store.open().await else {
            return;
        };
        let metrics = match CacheMetrics::new(&prometheus::Registry::new()) {
            Ok(m) => m,
            Err(_) => return,
        };
        // Its own cache: the replayed batches' grants must not reach the serving cache.
        let scratch = BalanceCache::new(prices);
        match Agent::start(scratch, store, cfg.clone(), metrics).await {
            Ok(agent) => {
                // Started = replayed; a stop right away returns its leases and releases it.
                let (tx, rx) = watch::channel(false);
                let run = tokio::spawn(agent.run(rx));
                let _ = tx.send(true);
                let _ = run.await;
                tracing::info!(node = %cfg.node_id, "replayed a journal no process held");
            }
            // Held by a live process (it settles its own), or unreachable: nothing to do here.
            Err(e) => tracing::debug!(node = %cfg.node_id, error = %e, "journal not replayed"),
        }
    }
}

/// Exits the process once `after` has passed and no request is in flight (binary only), after
/// `before_exit` (final settle, lease return, usage flush).
fn exit_once_drained(
    in_flight: prometheus::IntGauge,
    after: Duration,
    before_exit: Arc<dyn Fn() + Send + Sync>,
) {
    std::thread::spawn(move || {
        std::thread::sleep(after);
        while in_flight.get() > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        before_exit();
        tracing::info!("drained: no request in flight; exiting");
        std::process::exit(0);
    });
}

struct Watcher {
    stop_rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<Stop>>,
    health: Arc<Health>,
    drain_delay: Duration,
    in_flight: prometheus::IntGauge,
    exit_when_drained: bool,
    os_signals: bool,
    before_exit: Arc<dyn Fn() + Send + Sync>,
}

enum Got {
    Stop(Stop),
    Upgrade,
}

impl Watcher {
    async fn next(&self) -> Got {
        let mut rx = self.stop_rx.lock().await;
        let from_handle = async {
            match rx.recv().await {
                Some(s) => Got::Stop(s),
                // Every handle dropped: only signals can stop us now.
                None => std::future::pending().await,
            }
        };
        if !self.os_signals {
            return from_handle.await;
        }
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            tracing::error!("cannot install signal handlers; stop only through the handle");
            return from_handle.await;
        };
        tokio::select! {
            g = from_handle => g,
            _ = term.recv() => Got::Stop(Stop::Graceful),
            _ = int.recv() => Got::Stop(Stop::Fast),
            _ = quit.recv() => Got::Upgrade,
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Watcher {
    async fn recv(&self) -> ShutdownSignal {
        match self.next().await {
            Got::Stop(Stop::Fast) => {
                tracing::info!("fast shutdown");
                ShutdownSignal::FastShutdown
            }
            Got::Stop(Stop::Graceful) => {
                self.health.set_draining();
                tracing::info!(
                    delay_seconds = self.drain_delay.as_secs_f64(),
                    in_flight = self.in_flight.get(),
                    "graceful shutdown: /readyz now fails; draining"
                );
                tokio::time::sleep(self.drain_delay).await;
                if self.exit_when_drained {
                    // Pingora stops accepting right after we return; give it a moment.
                    exit_once_drained(
                        self.in_flight.clone(),
                        Duration::from_millis(100),
                        self.before_exit.clone(),
                    );
                }
                ShutdownSignal::GracefulTerminate
            }
            Got::Upgrade => {
                self.health.set_draining();
                tracing::info!("SIGQUIT: handing listeners to the new process");
                if self.exit_when_drained {
                    // Pingora sends the sockets, keeps serving what it has for 5 s
                    // (CLOSE_TIMEOUT), then stops; exit once that is over and nothing is left.
                    exit_once_drained(
                        self.in_flight.clone(),
                        Duration::from_secs(6),
                        self.before_exit.clone(),
                    );
                }
                ShutdownSignal::GracefulUpgrade
            }
        }
    }
}
