//! The command line: flags layered over the configuration, then one call into `tollgate-app`
//! per command. Nothing is wired here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tollgate_app::config::{Config, parse_addr, parse_host, parse_threads};
use tollgate_app::ops::{AccountOp, BooksAt, RouteOp};
use tollgate_app::{DevChoices, Settings};
use tollgate_proxy::StaticRoute;
use tollgate_routes::RouteKey;

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
    /// Run a runtime host: the deployments control places on it (`control.runtime = "hosts"`),
    /// their CPU charged here (docs/scale-out.md).
    Runtime(RuntimeArgs),
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
    /// Projects' SQL databases, for operators.
    #[command(subcommand)]
    Db(DbCommand),
    /// The book of record in PostgreSQL (docs/book.md), for operators.
    #[command(subcommand)]
    Book(BookCommand),
}

#[derive(Debug, Subcommand)]
pub enum BookCommand {
    /// Copy the Redis ledger into the book until it is caught up (the control service does this
    /// continuously when `[book]` is configured); idempotent. Prints what it copied as JSON.
    Copy {
        /// The configuration file with `[redis]` and `[book]` (or TOLLGATE_REDIS_URL and
        /// TOLLGATE_BOOK_POSTGRES_URL) (env TOLLGATE_CONFIG).
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the book writer on its own (what the control service runs when `[book]` is
    /// configured): copies the Redis ledger and the payment channel records into PostgreSQL
    /// every `copy_interval_ms`, reconnecting to either by itself, until SIGTERM or SIGINT.
    Run {
        /// As for `copy` (env TOLLGATE_CONFIG).
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// Serve the writer's Prometheus metrics at http://ADDR/metrics (env
        /// TOLLGATE_BOOK_METRICS_LISTEN).
        #[arg(long, env = "TOLLGATE_BOOK_METRICS_LISTEN")]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// Copy what is new, then compare the book with the Redis ledger (every line still there)
    /// and every account's credited/debited totals; prints each difference and exits 1 on any.
    Reconcile {
        /// As for `copy` (env TOLLGATE_CONFIG).
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// After a Redis data loss: fill the empty Redis with every account's balance, credit and
    /// charge key, and node incarnation from the book, plus the batches the (stopped) nodes'
    /// journals never had acknowledged (docs/book.md). Refuses a Redis that holds money keys.
    Rebuild {
        /// As for `copy` (env TOLLGATE_CONFIG).
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
        /// A stopped node's settle journal (`<node>.journal`), or a folder of them; repeat for
        /// every node (no env: the journals of this one rebuild).
        #[arg(long = "journal")]
        journals: Vec<PathBuf>,
    },
    /// After removing `[book]`: let the ledger be trimmed by age alone again (while a book is
    /// declared, nothing it has not copied is trimmed).
    Disable {
        /// The configuration file with `[redis]` (or TOLLGATE_REDIS_URL) (env TOLLGATE_CONFIG).
        #[arg(long, env = "TOLLGATE_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Copy a project's database to FILE with SQLite's online backup (safe while it serves).
    Backup {
        /// The configuration file the control service runs with (database.dir, control.data_dir).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The databases' folder (default: database.dir, else <control.data_dir>/databases).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The project id (p_…).
        project: String,
        /// Where to write the copy (a SQLite file; an existing file is replaced).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Show an account: credited, debited, available, leased, status (JSON).
    Show {
        #[command(flatten)]
        redis: RedisArgs,
        /// The account id, e.g. did:pkh:eip155:42431:0x….
        account: String,
    },
    /// Add credit exactly once per --key (repeating the command with the same key adds nothing).
    Credit {
        #[command(flatten)]
        redis: RedisArgs,
        /// The account id to credit.
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
        #[command(flatten)]
        books: BooksArgs,
        /// The chain's JSON-RPC endpoint, to compare channels with what the escrow holds
        /// (read only). Required: a close request or a withdrawal on chain that our books
        /// missed is the difference that matters most.
        #[arg(long, required_unless_present = "offline")]
        rpc: Option<String>,
        /// Compare the stores only, without the chain (says so in the report).
        #[arg(long, conflicts_with = "rpc")]
        offline: bool,
        /// The chain id (default: `payments.chain_id` of the config).
        #[arg(long)]
        chain_id: Option<u64>,
        /// One JSON document instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Pending credits the money store refused for good (set aside so others go on): list
    /// them, or resolve one by putting it back in the drain (--retry) or dropping it (--drop).
    Credits {
        #[command(flatten)]
        books: BooksArgs,
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
    #[command(flatten)]
    pub common: CommonArgs,
    /// The proxy's public listener (default 127.0.0.1:8080; env TOLLGATE_PROXY_LISTEN).
    #[arg(long, value_parser = parse_addr)]
    pub proxy_listen: Option<SocketAddr>,
    /// The control service and MCP (default 127.0.0.1:8790; env TOLLGATE_CONTROL_LISTEN).
    #[arg(long, value_parser = parse_addr)]
    pub control_listen: Option<SocketAddr>,
    /// Where journals and the embedded stores live (default ./.tollgate; env TOLLGATE_DATA_DIR).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub public: PublicArgs,
    /// Local development only: every MCP call acts as this account (no payment, no proof), so an
    /// agent on this machine can deploy before payments are wired. Credit it with
    /// `tollgate accounts credit`. Not available in `tollgate control`. No environment
    /// variable: serving MCP without payment is asked for on the command line each time.
    #[arg(long)]
    pub dev_account: Option<String>,
    /// With --dev-account: credit it this many dollars at start (once per amount; repeated starts
    /// add nothing), e.g. --dev-credit-usd 1.00. No environment variable: money is never
    /// created by a setting left in an environment.
    #[arg(long, requires = "dev_account")]
    pub dev_credit_usd: Option<String>,
    /// Where the local test chain (no real money) listens for the payment clients' RPC (env
    /// TOLLGATE_CHAIN_LISTEN).
    #[arg(long, env = "TOLLGATE_CHAIN_LISTEN", value_parser = parse_addr, default_value = "127.0.0.1:8545")]
    pub chain_listen: SocketAddr,
    /// Use this chain JSON-RPC endpoint instead of starting the local test chain (env
    /// TOLLGATE_CHAIN_RPC).
    #[arg(long, env = "TOLLGATE_CHAIN_RPC")]
    pub chain_rpc: Option<String>,
}

/// How agents reach the platform (`[public]`), for `dev` and `control`.
#[derive(Debug, Args)]
pub struct PublicArgs {
    /// The MCP URL agents use, e.g. https://mcp.example.com/mcp: its host is the payment realm
    /// and a Host the MCP endpoint answers (`public.mcp_url`; env TOLLGATE_PUBLIC_MCP_URL).
    #[arg(long)]
    pub public_mcp_url: Option<String>,
    /// Services are published at https://<slug>.<DOMAIN> (`public.base_domain`; env
    /// TOLLGATE_PUBLIC_BASE_DOMAIN).
    #[arg(long, value_parser = parse_host)]
    pub public_base_domain: Option<String>,
}

impl PublicArgs {
    fn apply(&self, cfg: &mut Config) -> anyhow::Result<()> {
        if let Some(u) = &self.public_mcp_url {
            tollgate_app::config::parse_public_url(u)
                .map_err(|e| anyhow::anyhow!("--public-mcp-url: {e}"))?;
            cfg.public.mcp_url = Some(u.clone());
        }
        if let Some(d) = &self.public_base_domain {
            cfg.public.base_domain = Some(d.clone());
        }
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Public plain-HTTP listener (default 127.0.0.1:8080; env TOLLGATE_PROXY_LISTEN). HTTPS:
    /// [tls] in the config file, or TOLLGATE_TLS_LISTEN + TOLLGATE_TLS_CERT + TOLLGATE_TLS_KEY.
    #[arg(long, value_parser = parse_addr)]
    pub listen: Option<SocketAddr>,
    /// Proxy worker threads (default 1; env TOLLGATE_PROXY_THREADS).
    #[arg(long, value_parser = parse_threads)]
    pub threads: Option<usize>,
    /// Platform services answer at <slug>.<BASE_DOMAIN> (env TOLLGATE_BASE_DOMAIN).
    #[arg(long, value_parser = parse_host)]
    pub base_domain: Option<String>,
    /// The platform's payment realm comes from the MCP URL agents use (`public.mcp_url`; env
    /// TOLLGATE_PUBLIC_MCP_URL): the proxy strips those credentials before forwarding.
    #[arg(long)]
    pub public_mcp_url: Option<String>,
    /// Take over the listeners of a running proxy, which is then sent SIGQUIT (zero-downtime
    /// upgrade; deploy/systemd/tollgate-upgrade does both). Both must use the same
    /// proxy.upgrade_sock. No env variable: a one-time action, never a standing setting.
    #[arg(long, short)]
    pub upgrade: bool,
}

/// Flags of both `dev` and `proxy`.
#[derive(Debug, Args)]
pub struct CommonArgs {
    /// Config file (optional; flags and TOLLGATE_* variables override it; every key and
    /// variable: deploy/tollgate.example.toml, docs/operations.md) (env TOLLGATE_CONFIG).
    #[arg(long, short, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// `/metrics`, `/livez`, `/readyz` (default 127.0.0.1:9090; env TOLLGATE_ADMIN_LISTEN).
    #[arg(long, value_parser = parse_addr)]
    pub admin_listen: Option<SocketAddr>,
    /// Load and follow routes (and, for `dev`, keep state) in this Redis, as every node of a
    /// multi-node deployment does (env TOLLGATE_REDIS_URL).
    #[arg(long)]
    pub redis: Option<String>,
    /// Write this process's id to FILE once it serves (removed at exit unless an upgraded
    /// successor has written its own).
    #[arg(long, value_name = "FILE", env = "TOLLGATE_PID_FILE")]
    pub pid_file: Option<PathBuf>,
    /// Serve HOST from ADDR[,ADDR...] (repeatable), e.g. --route hello.localhost=127.0.0.1:3000.
    /// As a standing setting: `[[route]]` in the config file (TOLLGATE_CONFIG).
    #[arg(long = "route", value_parser = StaticRoute::parse_flag)]
    pub routes: Vec<StaticRoute>,
}

#[derive(Debug, Args)]
pub struct RuntimeArgs {
    /// The configuration file (needs [redis]; `[host]` names and sizes this host; TOLLGATE_*
    /// variables override it: docs/scale-out.md) (env TOLLGATE_CONFIG).
    #[arg(long, short, env = "TOLLGATE_CONFIG")]
    pub config: PathBuf,
    /// Write this process's id to FILE once it serves (removed at exit).
    #[arg(long, value_name = "FILE", env = "TOLLGATE_PID_FILE")]
    pub pid_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The configuration file (needs [redis]; TOLLGATE_* variables override it; every key and
    /// variable: deploy/tollgate.example.toml, docs/operations.md) (env TOLLGATE_CONFIG).
    #[arg(long, short, env = "TOLLGATE_CONFIG")]
    pub config: PathBuf,
    /// Write this process's id to FILE once it serves (removed at exit).
    #[arg(long, value_name = "FILE", env = "TOLLGATE_PID_FILE")]
    pub pid_file: Option<PathBuf>,
    #[command(flatten)]
    pub public: PublicArgs,
}

#[derive(Debug, Subcommand)]
pub enum RoutesCommand {
    /// Write a route; every proxy following this Redis serves it within milliseconds.
    Put {
        #[command(flatten)]
        redis: RedisArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Upstream IP:PORT (repeatable).
        #[arg(long = "upstream", required = true, value_parser = parse_addr)]
        upstreams: Vec<SocketAddr>,
        /// The owning account: requests are paid from its balance (omit for a free route).
        #[arg(long)]
        account_id: Option<String>,
    },
    /// Delete a route.
    Delete {
        #[command(flatten)]
        redis: RedisArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// List every route (JSON lines).
    List {
        #[command(flatten)]
        redis: RedisArgs,
    },
}

/// Where the books are: the shared Redis, or the embedded stores of a stopped `tollgate dev`.
/// Read from the fleet's config file (and `TOLLGATE_*`), so an operator command looks at the
/// same keys as the nodes; flags win.
#[derive(Debug, Args)]
pub struct BooksArgs {
    /// The configuration file the nodes run with ([redis], control.data_dir).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The shared Redis (money, channels); without it, the embedded stores in the data dir
    /// (env TOLLGATE_REDIS_URL).
    #[arg(long)]
    pub redis: Option<String>,
    /// The prefix of every key (`redis.key_prefix`, default `tollgate`; env
    /// TOLLGATE_REDIS_KEY_PREFIX).
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// The data dir of a stopped `tollgate dev` (`control.data_dir`, default `.tollgate`; env
    /// TOLLGATE_DATA_DIR).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl BooksArgs {
    fn resolve(&self) -> anyhow::Result<BooksAt> {
        BooksAt::resolve(
            self.config.as_deref(),
            self.redis.as_deref(),
            self.key_prefix.as_deref(),
            self.data_dir.as_deref(),
            &env,
        )
    }
}

/// Which Redis, and its key prefix: flags, else the config file and `TOLLGATE_*`.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// The configuration file the nodes run with ([redis]).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The shared Redis, e.g. redis://127.0.0.1:6379/ (env TOLLGATE_REDIS_URL).
    #[arg(long = "redis")]
    pub url: Option<String>,
    /// The prefix of every key (`redis.key_prefix`, default `tollgate`; env
    /// TOLLGATE_REDIS_KEY_PREFIX).
    #[arg(long)]
    pub key_prefix: Option<String>,
}

impl RedisArgs {
    /// (where, prefix).
    fn resolve(&self) -> anyhow::Result<(tollgate_proxy::RedisConfig, String)> {
        BooksAt::resolve(
            self.config.as_deref(),
            self.url.as_deref(),
            self.key_prefix.as_deref(),
            None,
            &env,
        )?
        .redis_only()
    }
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

/// `tollgate book copy` / `reconcile`.
fn book(config: Option<&std::path::Path>, reconcile: bool) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config, &env)?;
    let (Some(redis), Some(book)) = (&cfg.redis, &cfg.book) else {
        anyhow::bail!(
            "the book needs [redis] and [book] postgres_url (or TOLLGATE_REDIS_URL and TOLLGATE_BOOK_POSTGRES_URL)"
        );
    };
    let (pg, prefix) = (&book.postgres_url, &redis.key_prefix);
    let at = (redis.target(), redis.money_shards);
    if reconcile {
        Ok(exit(tollgate_app::ops::book_reconcile(pg, &at, prefix)?))
    } else {
        tollgate_app::ops::book_copy(pg, &at, prefix)?;
        Ok(ExitCode::SUCCESS)
    }
}

fn env(var: &str) -> Option<String> {
    std::env::var(var).ok()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::from(1)
        }
    };
    tollgate_app::telemetry::shutdown();
    code
}

fn exit(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The configuration checked once; logging started from it.
fn settings(cfg: Config, service: &str) -> anyhow::Result<Settings> {
    let s = Settings::from_config(cfg)?;
    tollgate_app::init_logging(&s, service);
    Ok(s)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { file } => Ok(check_config(&file)),
        Command::Proxy(args) => {
            let mut s = settings(proxy_config(&args, &env)?, "tollgate-proxy")?;
            s.pid_file = args.common.pid_file.clone();
            tollgate_app::run_proxy(s, args.upgrade)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev(args) => {
            let mut s = settings(dev_config(&args, &env)?, "tollgate-dev")?;
            s.pid_file = args.common.pid_file.clone();
            tollgate_app::run_dev(
                s,
                DevChoices {
                    dev_account: args.dev_account,
                    dev_credit_usd: args.dev_credit_usd,
                    chain_listen: args.chain_listen,
                    chain_rpc: args.chain_rpc,
                },
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Control(args) => {
            let mut cfg = Config::load(Some(&args.config), &env)?;
            args.public.apply(&mut cfg)?;
            let mut s = settings(cfg, "tollgate-control")?;
            s.pid_file = args.pid_file;
            tollgate_app::run_control(s)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Runtime(args) => {
            let cfg = Config::load(Some(&args.config), &env)?;
            let mut s = settings(cfg, "tollgate-runtime")?;
            s.pid_file = args.pid_file;
            tollgate_app::run_runtime(s)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Routes(cmd) => {
            let (redis, op) = match cmd {
                RoutesCommand::Put {
                    redis,
                    key,
                    upstreams,
                    account_id,
                } => (
                    redis,
                    RouteOp::Put {
                        key: key.key().map_err(anyhow::Error::msg)?,
                        upstreams,
                        account_id,
                    },
                ),
                RoutesCommand::Delete { redis, key } => (
                    redis,
                    RouteOp::Delete {
                        key: key.key().map_err(anyhow::Error::msg)?,
                    },
                ),
                RoutesCommand::List { redis } => (redis, RouteOp::List),
            };
            let (redis, prefix) = redis.resolve()?;
            tollgate_app::ops::routes(redis.target(), &prefix, op)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Accounts(cmd) => accounts(cmd),
        Command::Book(BookCommand::Disable { config }) => {
            let cfg = Config::load(config.as_deref(), &env)?;
            let Some(redis) = &cfg.redis else {
                anyhow::bail!("book disable needs [redis] (or TOLLGATE_REDIS_URL)");
            };
            tollgate_app::ops::book_disable(
                &(redis.target(), redis.money_shards),
                &redis.key_prefix,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Book(BookCommand::Rebuild { config, journals }) => {
            let cfg = Config::load(config.as_deref(), &env)?;
            let (Some(redis), Some(book)) = (&cfg.redis, &cfg.book) else {
                anyhow::bail!(
                    "book rebuild needs [redis] and [book] postgres_url (or TOLLGATE_REDIS_URL and TOLLGATE_BOOK_POSTGRES_URL)"
                );
            };
            tollgate_app::ops::book_rebuild(
                &book.postgres_url,
                &(redis.target(), redis.money_shards),
                &redis.key_prefix,
                &journals,
                tollgate_app::settings::start_refund_hold(&cfg.payments)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            )?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Book(BookCommand::Copy { config }) => book(config.as_deref(), false),
        Command::Book(BookCommand::Reconcile { config }) => book(config.as_deref(), true),
        Command::Book(BookCommand::Run {
            config,
            metrics_listen,
        }) => {
            let cfg = Config::load(config.as_deref(), &env)?;
            let (Some(redis), Some(book)) = (cfg.redis.clone(), cfg.book.clone()) else {
                anyhow::bail!(
                    "book run needs [redis] and [book] postgres_url (or TOLLGATE_REDIS_URL and TOLLGATE_BOOK_POSTGRES_URL)"
                );
            };
            let _s = settings(cfg, "tollgate-book")?;
            tollgate_app::ops::book_run(
                &book.postgres_url,
                &(redis.target(), redis.money_shards),
                &redis.key_prefix,
                std::time::Duration::from_millis(book.copy_interval_ms),
                metrics_listen,
            )?;
            Ok(ExitCode::SUCCESS)
        }

        Command::Db(DbCommand::Backup {
            config,
            dir,
            project,
            file,
        }) => {
            let cfg = Config::load(config.as_deref(), &env)?;
            let dir = dir.unwrap_or_else(|| cfg.database.dir(&cfg.control.data_dir));
            tollgate_app::ops::db_backup(&dir, &project, &file)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn accounts(cmd: AccountsCommand) -> anyhow::Result<ExitCode> {
    use tollgate_app::ops;
    Ok(exit(match cmd {
        AccountsCommand::Show { redis, account } => {
            let (url, prefix) = redis.resolve()?;
            ops::account(&url, &prefix, &account, AccountOp::Show)?
        }
        AccountsCommand::Credit {
            redis,
            account,
            usd,
            key,
        } => {
            let op = AccountOp::Credit { usd, key };
            let (url, prefix) = redis.resolve()?;
            ops::account(&url, &prefix, &account, op)?
        }
        AccountsCommand::Audit {
            books,
            rpc,
            offline: _,
            chain_id,
            json,
        } => {
            let w = books.resolve()?;
            let chain_id = chain_id.unwrap_or(w.chain_id);
            ops::audit(w.books(), rpc.as_deref(), chain_id, json)?
        }
        AccountsCommand::Credits { books, retry, drop } => {
            let resolve = match (&retry, &drop) {
                (Some(k), _) => Some((k.as_str(), true)),
                (None, Some(k)) => Some((k.as_str(), false)),
                (None, None) => None,
            };
            ops::credits(books.resolve()?.books(), resolve)?
        }
    }))
}

/// File, then environment, then the common flags, then a command's own (`more`).
fn layered(
    c: &CommonArgs,
    env: &dyn Fn(&str) -> Option<String>,
    more: impl FnOnce(&mut Config),
) -> anyhow::Result<Config> {
    let mut cfg = Config::load(c.config.as_deref(), env)?;
    if let Some(a) = c.admin_listen {
        cfg.admin.listen = a;
    }
    if let Some(url) = &c.redis {
        cfg.set_redis_url(url).map_err(anyhow::Error::msg)?;
    }
    cfg.routes.extend(c.routes.iter().cloned());
    more(&mut cfg);
    Ok(cfg)
}

/// Config for `tollgate proxy`.
pub fn proxy_config(a: &ProxyArgs, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
    layered(&a.common, env, |cfg| {
        cfg.proxy.listen = a.listen.unwrap_or(cfg.proxy.listen);
        cfg.proxy.threads = a.threads.unwrap_or(cfg.proxy.threads);
        if let Some(d) = &a.base_domain {
            cfg.proxy.base_domain = d.clone();
        }
    })
    .and_then(|mut cfg| {
        if let Some(u) = &a.public_mcp_url {
            tollgate_app::config::parse_public_url(u)
                .map_err(|e| anyhow::anyhow!("--public-mcp-url: {e}"))?;
            cfg.public.mcp_url = Some(u.clone());
        }
        Ok(cfg)
    })
}

/// Config for `tollgate dev`.
pub fn dev_config(a: &DevArgs, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
    layered(&a.common, env, |cfg| {
        cfg.proxy.listen = a.proxy_listen.unwrap_or(cfg.proxy.listen);
        cfg.control.listen = a.control_listen.unwrap_or(cfg.control.listen);
        if let Some(d) = &a.data_dir {
            cfg.control.data_dir = d.clone();
        }
    })
    .and_then(|mut cfg| {
        a.public.apply(&mut cfg)?;
        Ok(cfg)
    })
}

/// `tollgate check-config`: the file parsed and every value checked.
fn check_config(file: &Path) -> ExitCode {
    match tollgate_app::check_config(file) {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// The long-running commands (what a unit file, a container or a chart starts) take every
    /// setting from a flag or a `TOLLGATE_*` variable, and `--help` says which variable.
    const SERVERS: [&str; 3] = ["dev", "proxy", "control"];
    /// Flags that are a one-time choice of a single run, never a standing setting.
    /// `routes`: a standing route list belongs in the config file (`[[route]]`); the dev
    /// account and its credit are never taken from an environment (no payment, created money).
    const NO_ENV: [&str; 4] = ["upgrade", "routes", "dev_account", "dev_credit_usd"];

    fn walk(cmd: &clap::Command, path: &str, out: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            if help.trim().is_empty() {
                out.push(format!("{path} --{id}: no help text"));
                continue;
            }
            let server = SERVERS.iter().any(|s| path == format!("tollgate {s}"));
            let names_env = arg.get_env().is_some() || help.contains("TOLLGATE_");
            if server && !arg.is_positional() && !NO_ENV.contains(&id) && !names_env {
                out.push(format!(
                    "{path} --{id}: no environment variable in its help"
                ));
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_has_help_and_every_server_flag_names_its_variable() {
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "tollgate", &mut missing);
        assert!(missing.is_empty(), "{missing:#?}");
    }

    #[test]
    fn help_shows_the_variables() {
        let mut cmd = super::Cli::command();
        let dev = cmd.find_subcommand_mut("dev").unwrap();
        let help = dev.render_long_help().to_string();
        for var in [
            "TOLLGATE_CONFIG",
            "TOLLGATE_PUBLIC_MCP_URL",
            "TOLLGATE_PUBLIC_BASE_DOMAIN",
            "TOLLGATE_CHAIN_RPC",
            "TOLLGATE_REDIS_URL",
        ] {
            assert!(help.contains(var), "{var} not in:\n{help}");
        }
    }
}
