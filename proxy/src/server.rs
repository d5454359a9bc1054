//! One proxy node: the Pingora proxy service on threads of its own, and the node's background
//! work (admin listener, route sync, usage flush) on a runtime the application provides.
//!
//! The application owns the order of shutdown (docs/architecture.md); a running node gives it
//! the steps: [`RunningProxy::stop_intake`], [`RunningProxy::drained`],
//! [`RunningProxy::stop_background`].

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};
use prometheus::Registry;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tollgate_routes::{RouteSync, RouteTable, SyncMetrics, SyncOptions};

use crate::admin::{AdminState, router};
use crate::config::{AdminConfig, ProxyConfig, RedisConfig, ShutdownConfig, StaticRoute};
use crate::dispatch::{Dispatch, Health};
use crate::gate::{Gate, Metering};
use crate::metrics::{ProxyMetrics, register_build_info};
use crate::tls::{Certificates, TlsConfig};

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
    /// Charge requests to the routes' owning accounts (see `docs/money.md`). Without it every
    /// route is free (static routes, the proxy-only benchmarks).
    pub metering: Option<Metering>,
    /// The HTTPS listener (off unless `tls.listen` is set).
    pub tls: TlsConfig,
    pub access_log: crate::access_log::AccessLogConfig,
}

/// How a node stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Fail `/readyz`, wait `drain_delay_seconds`, stop accepting, finish in-flight requests.
    Graceful,
    /// Hand the listening sockets to a new process (zero-downtime upgrade), then finish
    /// in-flight requests.
    Upgrade,
    /// Stop now.
    Fast,
}

/// A node that has bound its admin listener and built its state, ready to [`Proxy::start`].
pub struct Proxy {
    opts: ProxyOptions,
    registry: Registry,
    table: Arc<RouteTable>,
    health: Arc<Health>,
    metrics: Arc<ProxyMetrics>,
    sync_metrics: SyncMetrics,
    admin_listener: TcpListener,
    gate: Option<Gate>,
    certs: Option<Arc<Certificates>>,
    access_log: Option<Arc<crate::access_log::AccessLog>>,
}

impl Proxy {
    /// Builds the node; its metrics go to `registry` (the application's metering node may
    /// already have registered there).
    pub fn prepare(opts: ProxyOptions, registry: Registry) -> anyhow::Result<Proxy> {
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
        let certs = match opts.tls.listen {
            Some(_) => Some(Certificates::load(&opts.tls, &registry)?),
            None => {
                opts.tls.check().map_err(anyhow::Error::msg)?;
                None
            }
        };
        // SO_REUSEPORT: during an upgrade the new process binds it while the old one still
        // serves it (the old one closes its own as it hands over).
        if !opts.upgrade {
            // Only an upgrade shares the port: two nodes configured with one admin address
            // must not silently split its probes and scrapes.
            drop(TcpListener::bind(opts.admin.listen).with_context(|| {
                format!("cannot listen on {} (admin.listen)", opts.admin.listen)
            })?);
        }
        let admin_listener = bind_reuseport(opts.admin.listen)
            .with_context(|| format!("cannot listen on {} (admin.listen)", opts.admin.listen))?;
        if !opts.upgrade {
            // Pingora binds later, on its own threads, where a failure cannot be reported well:
            // check the addresses now.
            drop(TcpListener::bind(opts.proxy.listen).with_context(|| {
                format!("cannot listen on {} (proxy.listen)", opts.proxy.listen)
            })?);
            if let Some(tls) = opts.tls.listen {
                drop(
                    TcpListener::bind(tls)
                        .with_context(|| format!("cannot listen on {tls} (tls.listen)"))?,
                );
            }
        }
        let gate = match &opts.metering {
            Some(m) => Some(Gate::new(m, &registry)?),
            None => None,
        };
        let access_log = crate::access_log::AccessLog::start(&opts.access_log, &registry)?;
        Ok(Proxy {
            gate,
            certs,
            access_log,
            opts,
            registry,
            table,
            health: Arc::new(Health::default()),
            metrics,
            sync_metrics,
            admin_listener,
        })
    }

    pub fn table(&self) -> Arc<RouteTable> {
        self.table.clone()
    }

    pub fn registry(&self) -> Registry {
        self.registry.clone()
    }

    /// Serves: Pingora on a thread of its own (with its own runtimes), the admin listener,
    /// route sync and usage flush on `rt`.
    pub fn start(self, rt: &tokio::runtime::Handle) -> anyhow::Result<RunningProxy> {
        let Proxy {
            opts,
            registry,
            table,
            health,
            metrics,
            sync_metrics,
            admin_listener,
            gate,
            certs,
            access_log,
        } = self;
        let (bg_stop, bg_stop_rx) = watch::channel(false);
        let (admin_stop_tx, mut admin_stop) = watch::channel(false);
        let mut background = Vec::new();

        let admin_state = AdminState {
            registry,
            table: table.clone(),
            health: health.clone(),
            ready: metrics.ready.clone(),
        };
        let admin_addr = opts.admin.listen;
        let listener = {
            let _enter = rt.enter();
            tokio::net::TcpListener::from_std(admin_listener)
                .context("admin listener (admin.listen)")?
        };
        background.push(rt.spawn(async move {
            tracing::info!(addr = %admin_addr, "admin listening (/metrics /livez /readyz)");
            let serve =
                axum::serve(listener, router(admin_state)).with_graceful_shutdown(async move {
                    let _ = admin_stop.wait_for(|s| *s).await;
                });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "admin server failed");
            }
        }));

        if let Some(certs) = &certs
            && opts.tls.reload_check_seconds > 0.0
        {
            background.push(rt.spawn(certs.clone().watch(
                Duration::from_secs_f64(opts.tls.reload_check_seconds),
                bg_stop_rx.clone(),
            )));
        }

        if let Some(redis) = &opts.redis {
            let sync_opts = SyncOptions {
                redis: redis.target(),
                key_prefix: redis.key_prefix.clone(),
                ping_interval: Duration::from_millis(redis.ping_interval_ms.max(10)),
                ping_timeout: Duration::from_millis(redis.ping_timeout_ms.max(10)),
                retry_initial: Duration::from_millis(50),
            };
            let sync = RouteSync::new(sync_opts, table.clone(), sync_metrics);
            background.push(rt.spawn(sync.run(bg_stop_rx.clone())));
            background.push(rt.spawn(crate::usage::flush_loop(
                table.clone(),
                redis.target(),
                redis.key_prefix.clone(),
                Duration::from_secs(1),
                bg_stop_rx.clone(),
            )));
        }

        let drain_timeout = Duration::from_secs(opts.shutdown.drain_timeout_seconds);
        let conf = ServerConf {
            threads: opts.proxy.threads,
            work_stealing: opts.proxy.work_stealing,
            // Pingora keeps serving what it has this long after it stops accepting; the
            // application's own drain (in-flight count) usually ends well before.
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
        if opts.upgrade {
            // The upgrade socket opens (and the old process hands over) only once this one can
            // serve as the old one does: a request it took earlier would get 503.
            wait_ready_to_take_over(&table, opts.redis.is_some(), gate.as_ref())?;
        }
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        server.bootstrap();
        let mut dispatch = Dispatch::new(
            &opts.proxy,
            &opts.tls,
            table,
            health.clone(),
            metrics.clone(),
            gate,
        );
        dispatch.access_log = access_log.clone();
        let mut proxy = pingora::proxy::HttpProxy::new(dispatch, server.configuration.clone());
        proxy.handle_init_modules();
        // Every HTTP/1 request header under one deadline (Pingora limits each read only).
        let app = crate::header_guard::HeaderGuard::new(
            proxy,
            Duration::from_secs_f64(opts.proxy.header_timeout_seconds),
            metrics.rejected_header_timeout.clone(),
        );
        let mut service =
            pingora::services::listening::Service::new("tollgate proxy".to_owned(), app);
        service.add_tcp(&opts.proxy.listen.to_string());
        if let (Some(addr), Some(certs)) = (opts.tls.listen, &certs) {
            // The paths are unused: the resolver picks the certificate per handshake.
            let mut tls = pingora::listeners::tls::TlsSettings::intermediate("", "")
                .map_err(|e| anyhow::anyhow!("TLS listener: {e}"))?;
            tls.set_cert_resolver(certs.resolver());
            if opts.tls.http2 {
                tls.enable_h2();
            }
            service.add_tls_with_settings(&addr.to_string(), None, tls);
        }
        server.add_service(service);
        let (to_pingora, from_app) = mpsc::unbounded_channel();
        let pingora = std::thread::Builder::new()
            .name("tollgate-pingora".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(AppSignal(tokio::sync::Mutex::new(from_app))),
                })
            })
            .context("starting the proxy thread")?;
        tracing::info!(
            addr = %opts.proxy.listen,
            tls = ?opts.tls.listen,
            http2 = opts.tls.listen.is_some() && opts.tls.http2,
            threads = opts.proxy.threads,
            base_domain = %opts.proxy.base_domain,
            "proxy listening"
        );
        Ok(RunningProxy {
            addr: opts.proxy.listen,
            tls_addr: opts.tls.listen,
            admin: opts.admin.listen,
            certs,
            access_log,
            admin_stop: admin_stop_tx,
            health,
            in_flight: metrics.in_flight.clone(),
            drain_delay: Duration::from_secs_f64(opts.shutdown.drain_delay_seconds),
            drain_timeout,
            to_pingora,
            bg_stop,
            background,
            _pingora: pingora,
        })
    }
}

/// How long a new process of an upgrade waits to be ready before it gives up (exit 1, the old
/// one keeps serving). Below the 20 s `deploy/systemd/tollgate-upgrade` allows.
const UPGRADE_READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Blocks (the process's start, before any listener is taken) until the routes are loaded
/// from Redis and the metering agent has begun its incarnation, at most
/// [`UPGRADE_READY_TIMEOUT`].
fn wait_ready_to_take_over(
    table: &RouteTable,
    synced_routes: bool,
    gate: Option<&Gate>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let routes = !synced_routes || table.is_synced();
        // An embedded store stays with the old process until it exits: nothing to wait for.
        let metering = gate.is_none_or(|g| !g.shared_store || g.cache.agent_started());
        if routes && metering {
            tracing::info!(
                waited_ms = started.elapsed().as_millis() as u64,
                "upgrade: ready to take the listeners over"
            );
            return Ok(());
        }
        if started.elapsed() >= UPGRADE_READY_TIMEOUT {
            let missing = match (routes, metering) {
                (false, false) => {
                    "the routes are not loaded from Redis and the metering agent has not started"
                }
                (false, true) => "the routes are not loaded from Redis",
                _ => "the metering agent has not started (the money store does not answer)",
            };
            anyhow::bail!(
                "upgrade: not ready to take over after {} s: {missing}; the old process keeps serving (check redis.url)",
                UPGRADE_READY_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A serving node.
pub struct RunningProxy {
    pub addr: SocketAddr,
    /// The HTTPS listener, when configured.
    pub tls_addr: Option<SocketAddr>,
    pub admin: SocketAddr,
    certs: Option<Arc<Certificates>>,
    access_log: Option<Arc<crate::access_log::AccessLog>>,
    admin_stop: watch::Sender<bool>,
    health: Arc<Health>,
    in_flight: prometheus::IntGauge,
    drain_delay: Duration,
    drain_timeout: Duration,
    to_pingora: mpsc::UnboundedSender<ShutdownSignal>,
    bg_stop: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
    /// Not joined: after its listeners close, Pingora sleeps out its grace period; the
    /// application is done before that (its own drain follows the in-flight count).
    _pingora: std::thread::JoinHandle<()>,
}

impl RunningProxy {
    /// Requests being served now.
    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    /// Step 1, stop taking new work. `Graceful`: `/readyz` fails and responses close their
    /// connections, so load balancers move away; after `drain_delay_seconds` the listeners
    /// close. `Upgrade`: the listeners go to the new process (which serves from then on).
    /// `Fast`: the listeners close now.
    pub async fn stop_intake(&self, how: Stop) {
        match how {
            Stop::Graceful => {
                self.health.set_draining();
                tracing::info!(
                    delay_seconds = self.drain_delay.as_secs_f64(),
                    in_flight = self.in_flight.get(),
                    "graceful shutdown: /readyz now fails; draining"
                );
                tokio::time::sleep(self.drain_delay).await;
                let _ = self.to_pingora.send(ShutdownSignal::GracefulTerminate);
            }
            Stop::Upgrade => {
                self.health.set_draining();
                // The new process serves the admin port too (SO_REUSEPORT): probes and
                // scrapes go to it from now on, not to this draining one.
                let _ = self.admin_stop.send(true);
                tracing::info!("upgrade: handing the listeners to the new process");
                let _ = self.to_pingora.send(ShutdownSignal::GracefulUpgrade);
            }
            Stop::Fast => {
                tracing::info!("fast shutdown");
                let _ = self.to_pingora.send(ShutdownSignal::FastShutdown);
            }
        }
    }

    /// Step 2: requests in flight finish (at most `drain_timeout_seconds`). After an upgrade
    /// handover, Pingora keeps accepting on the old sockets for 5 s (what the new process has
    /// not taken yet): wait that out first.
    pub async fn drained(&self, how: Stop) {
        if how == Stop::Fast {
            return;
        }
        if how == Stop::Upgrade {
            tokio::time::sleep(Duration::from_secs(6)).await;
        } else {
            // Pingora stops accepting right after the signal; give it a moment.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let deadline = Instant::now() + self.drain_timeout;
        while self.in_flight.get() > 0 {
            if Instant::now() >= deadline {
                tracing::warn!(
                    in_flight = self.in_flight.get(),
                    "drain timeout: requests still in flight are cut"
                );
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!("drained: no request in flight");
    }

    /// Last step: the route sync and the admin listener stop, and the usage counted so far is
    /// flushed to Redis.
    pub async fn stop_background(self) {
        let _ = self.bg_stop.send(true);
        let _ = self.admin_stop.send(true);
        if let Some(log) = self.access_log.clone() {
            // Requests are drained: what is queued is written before the process exits (at
            // most 2 s: a stalled log pipe must not hold the shutdown).
            let done = tokio::task::spawn_blocking(move || log.finish());
            if tokio::time::timeout(Duration::from_secs(2), done)
                .await
                .is_err()
            {
                tracing::warn!("the access log writer did not finish in 2 s; lines may be lost");
            }
        }
        for t in self.background {
            if tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .is_err()
            {
                tracing::warn!("a proxy background task did not stop in time");
            }
        }
    }

    /// Stops without waiting (a harness being dropped): listeners close now, background work
    /// is told to stop.
    pub fn abort(&self) {
        let _ = self.to_pingora.send(ShutdownSignal::FastShutdown);
        let _ = self.bg_stop.send(true);
        let _ = self.admin_stop.send(true);
    }

    /// The node's certificates (reload them on SIGHUP), when it serves HTTPS.
    pub fn certificates(&self) -> Option<Arc<Certificates>> {
        self.certs.clone()
    }

    /// The three steps, for a node with nothing else to stop in between.
    pub async fn shutdown(self, how: Stop) {
        self.stop_intake(how).await;
        self.drained(how).await;
        self.stop_background().await;
        tracing::info!("proxy stopped");
    }
}

/// A listening socket with SO_REUSEADDR and SO_REUSEPORT (an upgrading process binds it
/// beside the running one; the kernel allows that only to the same user).
fn bind_reuseport(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Pingora's shutdown signal, as the application gives it.
struct AppSignal(tokio::sync::Mutex<mpsc::UnboundedReceiver<ShutdownSignal>>);

#[async_trait]
impl ShutdownSignalWatch for AppSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut rx = self.0.lock().await;
        // The application gone without a word: stop now.
        rx.recv().await.unwrap_or(ShutdownSignal::FastShutdown)
    }
}
