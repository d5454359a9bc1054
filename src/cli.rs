//! Command line: `tollgate dev | proxy | control | check-config | routes`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tollgate_balance_cache::AgentConfig;
use tollgate_proxy::{MeteringOptions, Proxy, ProxyOptions, StaticRoute, StoreSource};
use tollgate_routes::{Route, RouteKey, RouteStore};

use crate::config::{Config, LogFormat, parse_addr, parse_host, parse_threads};

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "Hosting that AI agents pay for themselves: a metered Pingora proxy, MPP payments, MCP deploys",
    long_about = None
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole stack on this machine (proxy :8080, control + MCP :8790, admin :9090).
    Dev(DevArgs),
    /// Run a proxy node: routes from Redis and/or static routes.
    Proxy(ProxyArgs),
    /// Run the control service (deploys, MCP).
    Control(ControlArgs),
    /// Validate a config file; prints FILE:LINE:COLUMN and the reason of the first error.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Read and write routes in Redis (what the control service does), for operators.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Read accounts and add credit by hand in Redis, for operators (refunds, goodwill, tests).
    #[command(subcommand)]
    Accounts(AccountsCommand),
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Show an account: credited, debited, available, leased, status (JSON).
    Show {
        #[arg(long)]
        redis: String,
        account: String,
    },
    /// Add credit exactly once per --key (repeating the command with the same key adds nothing).
    Credit {
        #[arg(long)]
        redis: String,
        #[arg(long)]
        account: String,
        /// Dollars, e.g. 1.50.
        #[arg(long)]
        usd: String,
        /// Idempotency key, e.g. a ticket number.
        #[arg(long)]
        key: String,
    },
    /// Check that every account's balance is backed by money held or still collectable:
    /// `credited − debited ≤ Σ capturable vouchers + direct credits`, the ledger against the
    /// accounts, and each payment channel against the chain. Prints every difference; exits 1
    /// on any.
    Audit {
        /// The shared Redis (money, channels); without it, the embedded stores in --data-dir
        /// (stop `tollgate dev` first: it holds them).
        #[arg(long, env = "TOLLGATE_REDIS_URL")]
        redis: Option<String>,
        #[arg(long, default_value = "tollgate")]
        key_prefix: String,
        #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = ".tollgate")]
        data_dir: PathBuf,
        /// The chain's JSON-RPC endpoint, to compare channels with what the escrow holds
        /// (read only). Without it, only the stores are compared.
        #[arg(long)]
        rpc: Option<String>,
        #[arg(long, default_value_t = 42431)]
        chain_id: u64,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Pending credits the money store refused for good (set aside so others go on): list
    /// them, or resolve one by putting it back in the drain (--retry) or dropping it (--drop).
    Credits {
        #[arg(long, env = "TOLLGATE_REDIS_URL")]
        redis: Option<String>,
        #[arg(long, default_value = "tollgate")]
        key_prefix: String,
        #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = ".tollgate")]
        data_dir: PathBuf,
        /// Put this key back among the pending credits (after fixing the cause).
        #[arg(long, conflicts_with = "drop")]
        retry: Option<String>,
        /// Forget this key (settle it by other means, e.g. `tollgate accounts credit`).
        #[arg(long)]
        drop: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Config file (optional; flags and TOLLGATE_* variables override it).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    #[arg(long, value_parser = parse_addr)]
    pub proxy_listen: Option<SocketAddr>,
    #[arg(long, value_parser = parse_addr)]
    pub control_listen: Option<SocketAddr>,
    #[arg(long, value_parser = parse_addr)]
    pub admin_listen: Option<SocketAddr>,
    /// Where the embedded store lives (default ./.tollgate).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Use this Redis instead of the in-process route table, exactly as a multi-node deployment.
    #[arg(long)]
    pub redis: Option<String>,
    /// Serve HOST from ADDR (repeatable), e.g. --route hello.localhost=127.0.0.1:3000
    #[arg(long = "route", value_parser = StaticRoute::parse_flag)]
    pub routes: Vec<StaticRoute>,
    /// Local development only: every MCP call acts as this account (no payment, no proof), so an
    /// agent on this machine can deploy before payments are wired. Credit it with
    /// `tollgate accounts credit`. Not available in `tollgate control`.
    #[arg(long)]
    pub dev_account: Option<String>,
    /// With --dev-account: credit it this many dollars at start (once per amount; repeated starts
    /// add nothing), e.g. --dev-credit-usd 1.00.
    #[arg(long, requires = "dev_account")]
    pub dev_credit_usd: Option<String>,
    /// Where the local test chain (no real money) listens for the payment clients' RPC.
    #[arg(long, value_parser = parse_addr, default_value = "127.0.0.1:8545")]
    pub chain_listen: SocketAddr,
    /// Use this chain JSON-RPC endpoint instead of starting the local test chain.
    #[arg(long)]
    pub chain_rpc: Option<String>,
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Public listener (default 127.0.0.1:8080).
    #[arg(long, value_parser = parse_addr)]
    pub listen: Option<SocketAddr>,
    #[arg(long, value_parser = parse_addr)]
    pub admin_listen: Option<SocketAddr>,
    /// Proxy worker threads.
    #[arg(long, value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Platform services answer at <slug>.<BASE_DOMAIN>.
    #[arg(long, value_parser = parse_host)]
    pub base_domain: Option<String>,
    /// Load and follow routes from this Redis.
    #[arg(long)]
    pub redis: Option<String>,
    /// Serve HOST from ADDR[,ADDR...] (repeatable): front any HTTP upstream with no other setup.
    #[arg(long = "route", value_parser = StaticRoute::parse_flag)]
    pub routes: Vec<StaticRoute>,
    /// Take over the listeners of a running proxy that got SIGQUIT (zero-downtime upgrade).
    #[arg(long, short)]
    pub upgrade: bool,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    #[arg(long, short)]
    pub config: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// Write a route; every proxy following this Redis serves it within milliseconds.
    Put {
        #[arg(long)]
        redis: String,
        #[command(flatten)]
        key: KeyArgs,
        /// Upstream IP:PORT (repeatable).
        #[arg(long = "upstream", required = true, value_parser = parse_addr)]
        upstreams: Vec<SocketAddr>,
        #[arg(long)]
        account_id: Option<String>,
    },
    /// Delete a route.
    Delete {
        #[arg(long)]
        redis: String,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// List every route (JSON lines).
    List {
        #[arg(long)]
        redis: String,
    },
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct KeyArgs {
    /// Platform subdomain: served at <SLUG>.<base_domain>.
    #[arg(long)]
    pub slug: Option<String>,
    /// Exact custom hostname.
    #[arg(long)]
    pub host: Option<String>,
}

impl KeyArgs {
    fn key(&self) -> Result<RouteKey, String> {
        match (&self.slug, &self.host) {
            (Some(s), _) => RouteKey::slug(s).map_err(|e| format!("slug '{s}': {e}")),
            (None, Some(h)) => RouteKey::host(h).map_err(|e| format!("host '{h}': {e}")),
            (None, None) => Err("give --slug or --host".into()),
        }
    }
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { file } => Ok(check_config(&file)),
        Command::Proxy(args) => {
            let cfg = proxy_config(&args, &env)?;
            init_logging(&cfg);
            run_proxy(cfg, args.upgrade)
        }
        Command::Dev(args) => {
            let cfg = dev_config(&args, &env)?;
            init_logging(&cfg);
            run_dev(
                cfg,
                DevChoices {
                    dev_account: args.dev_account,
                    dev_credit_usd: args.dev_credit_usd,
                    chain_listen: args.chain_listen,
                    chain_rpc: args.chain_rpc,
                },
            )
        }
        Command::Control(args) => {
            let cfg = Config::load(Some(&args.config), &env)?;
            init_logging(&cfg);
            run_control(cfg)
        }
        Command::Routes(cmd) => routes(cmd),
        Command::Accounts(cmd) => accounts(cmd),
    }
}

/// Config for `tollgate proxy`: file, then environment, then flags.
pub fn proxy_config(
    args: &ProxyArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Config> {
    let mut cfg = Config::load(args.config.as_deref(), env)?;
    if let Some(a) = args.listen {
        cfg.proxy.listen = a;
    }
    if let Some(a) = args.admin_listen {
        cfg.admin.listen = a;
    }
    if let Some(t) = args.threads {
        cfg.proxy.threads = t;
    }
    if let Some(d) = &args.base_domain {
        cfg.proxy.base_domain = d.clone();
    }
    if let Some(url) = &args.redis {
        cfg.set_redis_url(url).map_err(anyhow::Error::msg)?;
    }
    cfg.routes.extend(args.routes.iter().cloned());
    Ok(cfg)
}

/// Config for `tollgate dev`: the same layering, with dev's own flags.
pub fn dev_config(args: &DevArgs, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
    let mut cfg = Config::load(args.config.as_deref(), env)?;
    if let Some(a) = args.proxy_listen {
        cfg.proxy.listen = a;
    }
    if let Some(a) = args.control_listen {
        cfg.control.listen = a;
    }
    if let Some(a) = args.admin_listen {
        cfg.admin.listen = a;
    }
    if let Some(d) = &args.data_dir {
        cfg.control.data_dir = d.clone();
    }
    if let Some(url) = &args.redis {
        cfg.set_redis_url(url).map_err(anyhow::Error::msg)?;
    }
    cfg.routes.extend(args.routes.iter().cloned());
    Ok(cfg)
}

fn check_config(file: &Path) -> ExitCode {
    match Config::from_file(file) {
        Ok(cfg) => {
            println!(
                "{}: ok (proxy {}, admin {}, {} static route(s), routes from {})",
                file.display(),
                cfg.proxy.listen,
                cfg.admin.listen,
                cfg.routes.len(),
                if cfg.redis.is_some() {
                    "Redis"
                } else {
                    "this file only"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

/// Metering for this node: Redis when configured (every node shares it), else the embedded,
/// durable store in the data dir (one node alone).
fn metering(cfg: &Config) -> anyhow::Result<Option<MeteringOptions>> {
    let m = &cfg.metering;
    if !m.enabled {
        return Ok(None);
    }
    let prices = cfg.prices.prices().map_err(anyhow::Error::msg)?;
    let lease_ttl = Duration::from_secs(m.lease_ttl_seconds);
    let node_id = m
        .node_id
        .clone()
        .unwrap_or_else(|| format!("proxy-{}", cfg.proxy.listen.port()));
    let store = match &cfg.redis {
        Some(r) => StoreSource::Redis {
            url: r.url.clone(),
            prefix: r.key_prefix.clone(),
            lease_ttl,
            ledger_retention: m.ledger_retention(),
        },
        None => StoreSource::Embedded {
            path: cfg.control.data_dir.join("money.redb"),
            lease_ttl,
        },
    };
    let mut agent = AgentConfig::new(
        &node_id,
        cfg.control.data_dir.join(format!("{node_id}.journal")),
    );
    agent.settle_interval = Duration::from_millis(m.settle_interval_ms);
    agent.lease_ttl = lease_ttl;
    agent.lease_margin = lease_ttl / 5;
    agent.cpu_debt_limit_ms = m.cpu_debt_limit_ms;
    agent
        .validate()
        .map_err(|e| anyhow::anyhow!("[metering]: {e}"))?;
    Ok(Some(MeteringOptions {
        store,
        prices,
        agent,
        lease_wait: Duration::from_millis(m.lease_wait_ms),
        top_up: m.top_up.clone(),
        hooks: None,
        payments: None,
    }))
}

fn options(cfg: &Config, upgrade: bool) -> anyhow::Result<ProxyOptions> {
    if cfg.metering.enabled {
        std::fs::create_dir_all(&cfg.control.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create data dir {} (journals, embedded store): {e}",
                cfg.control.data_dir.display()
            )
        })?;
    }
    let mut proxy = cfg.proxy.clone();
    if proxy.payment_realms.is_empty()
        && let Ok(realm) = cfg.payment_realm()
    {
        // The platform's own credentials never reach hosted services.
        proxy.payment_realms = vec![tollgate_payments::config::services_realm_of(&realm), realm];
    }
    Ok(ProxyOptions {
        proxy,
        admin: cfg.admin.clone(),
        redis: cfg.redis.clone(),
        shutdown: cfg.shutdown.clone(),
        routes: cfg.routes.clone(),
        upgrade,
        exit_when_drained: true,
        os_signals: true,
        metering: metering(cfg)?,
    })
}

fn run_proxy(cfg: Config, upgrade: bool) -> anyhow::Result<ExitCode> {
    let proxy = Proxy::prepare(options(&cfg, upgrade)?)?;
    proxy.run()?;
    Ok(ExitCode::SUCCESS)
}

/// `tollgate control`: the control service, its runtime and a metering node for CPU, until
/// SIGTERM/SIGINT.
fn run_control(cfg: Config) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&cfg.control.data_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // Payments first: a missing secret or a test chain stops the start before anything runs.
        let redis = cfg
            .redis
            .clone()
            .context("the control service needs [redis]")?;
        let money: Arc<dyn tollgate_metering::Store> = Arc::new(
            tollgate_metering::RedisStore::connect(
                &redis.url,
                &redis.key_prefix,
                Duration::from_secs(cfg.metering.lease_ttl_seconds),
            )
            .await?,
        );
        let payments = crate::paid::payments(
            &cfg,
            money,
            crate::paid::PaymentStores::Redis {
                url: redis.url.clone(),
                prefix: redis.key_prefix.clone(),
            },
            false,
        )
        .await?;
        let node_id = format!("control-{}", cfg.control.listen.port());
        let registry = prometheus::Registry::new();
        // The agent stops after the runtime (below), so the deployments' last CPU is settled.
        let (agent_stop, agent_stop_rx) = tokio::sync::watch::channel(false);
        let (cache, agent) =
            crate::stack::metering_node(&cfg, &node_id, &registry, agent_stop_rx).await?;
        let (sup, events, toolchain) =
            crate::stack::runtime(&cfg, Arc::new(crate::stack::ChargeCpu(cache)))?;
        payments.metrics.register(&registry)?;
        tokio::spawn(payments.clone().run(stop_rx.clone()));
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let served = crate::stack::serve_control(
            cfg,
            sup,
            events,
            toolchain,
            crate::stack::Agents {
                dev_identity: None,
                payments: Some(payments),
                registry: Some(registry),
            },
            None,
            stop_rx,
        )
        .await;
        // serve_control has shut the runtime down: now settle and return leases.
        let _ = agent_stop.send(true);
        let _ = agent.await;
        served?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub struct DevChoices {
    pub dev_account: Option<String>,
    pub dev_credit_usd: Option<String>,
    pub chain_listen: SocketAddr,
    pub chain_rpc: Option<String>,
}

fn run_dev(mut cfg: Config, choices: DevChoices) -> anyhow::Result<ExitCode> {
    let DevChoices {
        dev_account,
        dev_credit_usd,
        chain_listen,
        chain_rpc,
    } = choices;
    let dev_account_shown = dev_account.clone();
    std::fs::create_dir_all(&cfg.control.data_dir).map_err(|e| {
        anyhow::anyhow!(
            "cannot create data dir {}: {e}",
            cfg.control.data_dir.display()
        )
    })?;
    // The control service and the runtime run in this process too: the proxy holds the runtime's
    // in-flight guard per request and CPU is charged through the proxy's cache. Without Redis the
    // control service keeps its state in the data dir and publishes routes into this proxy.
    let bg = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tollgate-control")
        .enable_all()
        .build()?;
    let mut opts = options(&cfg, false)?;
    let late_cpu = Arc::new(crate::stack::LateCpu::default());
    let control = {
        let _enter = bg.enter();
        let (sup, events, toolchain) = crate::stack::runtime(&cfg, late_cpu.clone())?;
        if let Some(m) = &mut opts.metering {
            m.hooks = Some(Arc::new(crate::stack::InflightHooks(
                sup.clone(),
                bg.handle().clone(),
            )));
        }
        Some((sup, events, toolchain))
    };
    let money = dev_money(&bg, &cfg, &mut opts)?;
    if let (Some(account), Some(usd)) = (&dev_account, &dev_credit_usd) {
        dev_credit(&bg, &money, account, usd)?;
    }
    // The local test chain (no real money), unless another chain is named.
    let chain = match &chain_rpc {
        Some(url) => {
            cfg.payments.rpc_url = url.clone();
            None
        }
        None => {
            let chain = bg
                .block_on(tollgate_testchain::TestChain::spawn(
                    chain_listen,
                    tollgate_testchain::ChainConfig {
                        state_file: Some(cfg.control.data_dir.join("testchain.json")),
                        ..Default::default()
                    },
                ))
                .with_context(|| {
                    format!("starting the local test chain on {chain_listen} (--chain-listen)")
                })?;
            cfg.payments.rpc_url = chain.url();
            cfg.payments.chain_id = chain.chain().chain_id();
            cfg.payments.allow_test_chain = true;
            Some(chain)
        }
    };
    let payments = bg.block_on(crate::paid::payments(
        &cfg,
        money,
        match &cfg.redis {
            Some(r) => crate::paid::PaymentStores::Redis {
                url: r.url.clone(),
                prefix: r.key_prefix.clone(),
            },
            None => crate::paid::PaymentStores::Embedded {
                dir: cfg.control.data_dir.join("payments"),
            },
        },
        true,
    ))?;
    if let Some(m) = &mut opts.metering {
        m.payments = Some(Arc::new(crate::paid::ProxyDesk {
            payments: payments.clone(),
            amount: tollgate_payments::units::parse_usd(&cfg.payments.default_prepay_usd, 9_000)
                .map_err(|e| anyhow::anyhow!("payments.default_prepay_usd: {e}"))?
                .max(1),
        }));
    }
    let proxy = Proxy::prepare(opts)?;
    payments.metrics.register(&proxy.registry())?;
    let local_table = cfg.redis.is_none().then(|| proxy.table());
    if let Some(cache) = proxy.balance_cache() {
        let _ = late_cpu.0.set(cache);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    bg.spawn(payments.clone().run(stop_rx.clone()));
    let payee = payments.payee();
    let control_task = control.map(|(sup, events, toolchain)| {
        let cfg = cfg.clone();
        bg.spawn(async move {
            let identity = dev_account
                .map(|a| Arc::new(crate::stack::DevIdentity(a)) as Arc<dyn tollgate_mcp::Identify>);
            if let Err(e) = crate::stack::serve_control(
                cfg,
                sup,
                events,
                toolchain,
                crate::stack::Agents {
                    dev_identity: identity,
                    payments: Some(payments),
                    registry: None,
                },
                local_table,
                stop_rx,
            )
            .await
            {
                tracing::error!(error = %format!("{e:#}"), "control service stopped");
            }
        })
    });
    let port = cfg.proxy.listen.port();
    let routes_from = match &cfg.redis {
        Some(r) => format!("Redis at {}", r.url),
        None => "the config file and --route (in process)".to_owned(),
    };
    println!(
        "\ntollgate dev: everything on one machine\n\
         \x20 proxy     http://<slug>.{base}:{port}/\n\
         \x20 admin     http://{admin}/metrics  /livez  /readyz\n\
         \x20 routes    from {routes_from}; {n} static route(s)\n\
         \x20 data      {data}\n\
         \x20 control   {control_line}\n\
         \x20 MCP       http://{control}/mcp  (agents: tools deploy_project, top_up, get_balance, ...)\n\
         \x20 top-up    POST http://{control}/v1/top-up?amount_usd=5  (MPP 402 challenge)\n\
         \x20 chain     {chain_line}\n\
         \x20 payee     {payee:#x} (key in {data}/payee.key)\n",
        control = cfg.control.listen,
        chain_line = match &chain {
            Some(c) => format!(
                "{} (chain id {}): the local TEST chain, NO REAL MONEY; fund a wallet with tempo_fundAddress",
                c.url(),
                c.chain().chain_id()
            ),
            None => format!(
                "{} (chain id {})",
                cfg.payments.rpc_url, cfg.payments.chain_id
            ),
        },
        base = cfg.proxy.base_domain,
        admin = cfg.admin.listen,
        n = cfg.routes.len(),
        data = cfg.control.data_dir.display(),
        control_line = {
            let mcp = match &dev_account_shown {
                Some(a) => format!(
                    "\n\x20           MCP http://{}/mcp, acting as account {a:?} (dev only: no payment)",
                    cfg.control.listen
                ),
                None => String::new(),
            };
            format!(
                "http://{}/v1/admin/projects (operator API; token from TOLLGATE_ADMIN_TOKEN), runtime (workerd), state in {}{mcp}",
                cfg.control.listen,
                if cfg.redis.is_some() {
                    "Redis".to_owned()
                } else {
                    cfg.control
                        .data_dir
                        .join("control.redb")
                        .display()
                        .to_string()
                }
            )
        },
    );
    for r in &cfg.routes {
        println!("  route     http://{}:{port}/ -> {:?}", r.host, r.upstreams);
    }
    proxy.run()?;
    let _ = stop_tx.send(true);
    if let Some(task) = control_task {
        let _ = bg.block_on(async { tokio::time::timeout(Duration::from_secs(10), task).await });
    }
    if let Some(chain) = chain {
        bg.block_on(chain.shutdown());
    }
    bg.shutdown_timeout(Duration::from_secs(2));
    Ok(ExitCode::SUCCESS)
}

/// The money store of `dev`, shared by the proxy and payments (the embedded file is opened here
/// and handed to the proxy, since only one process may hold it).
fn dev_money(
    bg: &tokio::runtime::Runtime,
    cfg: &Config,
    opts: &mut ProxyOptions,
) -> anyhow::Result<Arc<dyn tollgate_metering::Store>> {
    use tollgate_metering::{EmbeddedStore, RedisStore, Store};
    let lease_ttl = Duration::from_secs(cfg.metering.lease_ttl_seconds);
    let store: Arc<dyn Store> = match &cfg.redis {
        Some(r) => Arc::new(bg.block_on(RedisStore::connect(&r.url, &r.key_prefix, lease_ttl))?),
        None => {
            let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(
                &cfg.control.data_dir.join("money.redb"),
                lease_ttl,
            )?);
            if let Some(m) = &mut opts.metering {
                m.store = StoreSource::Ready(store.clone());
            }
            store
        }
    };
    Ok(store)
}

/// Credits the dev account once per amount.
fn dev_credit(
    bg: &tokio::runtime::Runtime,
    store: &Arc<dyn tollgate_metering::Store>,
    account: &str,
    usd: &str,
) -> anyhow::Result<()> {
    let amount = tollgate_metering::Picos::parse_usd(usd)
        .map_err(|e| anyhow::anyhow!("--dev-credit-usd {usd}: {e}"))?;
    let key = format!("dev-credit:{account}:{}", amount.0);
    let out = bg
        .block_on(store.credit(account, &key, amount.0))
        .map_err(|e| anyhow::anyhow!("dev credit: {e}"))?;
    tracing::info!(account, usd, ?out, "dev account credited");
    Ok(())
}

fn routes(cmd: RoutesCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match cmd {
            RoutesCommand::Put {
                redis,
                key,
                upstreams,
                account_id,
            } => {
                let key = key.key().map_err(anyhow::Error::msg)?;
                let store = RouteStore::connect(&redis, "tollgate").await?;
                let route = Route {
                    upstreams,
                    account_id,
                    project_id: None,
                    deployment_id: None,
                };
                let v = store.put(&key, &route).await?;
                println!("{} = {:?} (version {v})", key.field(), route.upstreams);
            }
            RoutesCommand::Delete { redis, key } => {
                let key = key.key().map_err(anyhow::Error::msg)?;
                let store = RouteStore::connect(&redis, "tollgate").await?;
                let v = store.delete(&key).await?;
                println!("{} deleted (version {v})", key.field());
            }
            RoutesCommand::List { redis } => {
                let store = RouteStore::connect(&redis, "tollgate").await?;
                for (key, rec) in store.load_all().await? {
                    if let Some(route) = rec.route {
                        println!(
                            "{}",
                            serde_json::json!({"key": key.field(), "version": rec.v, "route": route})
                        );
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn accounts(cmd: AccountsCommand) -> anyhow::Result<ExitCode> {
    use tollgate_metering::{Picos, RedisStore, Store};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let (redis, account) = match &cmd {
            AccountsCommand::Show { redis, account } => (redis, account),
            AccountsCommand::Credit { redis, account, .. } => (redis, account),
            AccountsCommand::Audit {
                redis,
                key_prefix,
                data_dir,
                rpc,
                chain_id,
                json,
            } => {
                let (money, channels) =
                    crate::paid::open_money_and_channels(redis.as_deref(), key_prefix, data_dir)
                        .await?;
                let chain = match rpc {
                    Some(url) => Some(
                        tollgate_payments::RpcChain::read_only(
                            url,
                            *chain_id,
                            tollgate_payments::config::ESCROW,
                        )
                        .map_err(|e| anyhow::anyhow!("--rpc {url}: {e}"))?,
                    ),
                    None => None,
                };
                let report = tollgate_payments::audit::audit(
                    &*channels,
                    &*money,
                    chain.as_ref().map(|c| c as &dyn tollgate_payments::Chain),
                )
                .await
                .map_err(anyhow::Error::msg)?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    print!("{}", report.render());
                }
                return Ok(if report.is_clean() {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                });
            }
            AccountsCommand::Credits {
                redis,
                key_prefix,
                data_dir,
                retry,
                drop,
            } => {
                let (_, channels) =
                    crate::paid::open_money_and_channels(redis.as_deref(), key_prefix, data_dir)
                        .await?;
                if let Some(key) = retry.as_ref().or(drop.as_ref()) {
                    return match channels
                        .unpoison(key, retry.is_some())
                        .await
                        .map_err(|e| anyhow::anyhow!("{}", e.message))?
                    {
                        Some(p) => {
                            println!("{}", serde_json::to_string(&p)?);
                            Ok(ExitCode::SUCCESS)
                        }
                        None => {
                            eprintln!("no set-aside credit {key:?}");
                            Ok(ExitCode::from(1))
                        }
                    };
                }
                for p in channels
                    .poisoned()
                    .await
                    .map_err(|e| anyhow::anyhow!("{}", e.message))?
                {
                    println!("{}", serde_json::to_string(&p)?);
                }
                return Ok(ExitCode::SUCCESS);
            }
        };
        let store = RedisStore::connect(redis, "tollgate", Duration::from_secs(10)).await?;
        if let AccountsCommand::Credit { usd, key, .. } = &cmd {
            let amount = Picos::parse_usd(usd).map_err(|e| anyhow::anyhow!("--usd {usd}: {e}"))?;
            let out = store
                .credit(account, key, amount.0)
                .await
                .map_err(|e| anyhow::anyhow!("credit refused: {e}"))?;
            eprintln!("{out:?}");
        }
        match store.account(account).await? {
            Some(a) => println!("{}", serde_json::to_string(&a)?),
            None => {
                eprintln!("no account {account:?}");
                return Ok(ExitCode::from(1));
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `TOLLGATE_LOG` (a tracing filter) wins over `[log] level`.
fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOLLGATE_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
