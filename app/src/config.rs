//! The one configuration model: a TOML file, then `TOLLGATE_*` environment variables, then
//! command-line flags, each overriding the one before. Every section denies unknown fields, and
//! every error names where it came from (file:line:column, or the variable).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tollgate_proxy::config::check_redis_url;
use tollgate_proxy::{
    AdminConfig, CertificateFiles, ProxyConfig, RedisConfig, ShutdownConfig, StaticRoute, TlsConfig,
};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub proxy: ProxyConfig,
    /// The proxy's HTTPS listener (docs/operations.md, "TLS certificates").
    pub tls: TlsConfig,
    /// One line per request (docs/operations.md, "Access log").
    pub access_log: tollgate_proxy::AccessLogConfig,
    pub admin: AdminConfig,
    pub control: ControlConfig,
    /// `tollgate runtime`: a runtime host.
    pub host: HostConfig,
    /// Absent: routes come from `[[route]]` alone (single node).
    pub redis: Option<RedisConfig>,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub metering: MeteringConfig,
    pub prices: PriceConfig,
    pub payments: PaymentsConfig,
    pub public: PublicConfig,
    pub database: DatabaseConfig,
    /// The book of record in PostgreSQL (docs/book.md); absent: none.
    pub book: Option<BookConfig>,
    /// Static routes: `[[route]] host = "…" upstreams = ["127.0.0.1:3000"]`.
    #[serde(rename = "route")]
    pub routes: Vec<StaticRoute>,
}

/// `[book]`: the control service copies the Redis ledger into PostgreSQL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BookConfig {
    /// `postgres://user:password@host:port/database` (no TLS: a private network or a local
    /// socket proxy).
    pub postgres_url: String,
    /// How long the writer waits, once caught up, before it looks for new entries.
    #[serde(default = "default_book_interval_ms")]
    pub copy_interval_ms: u64,
}

fn default_book_interval_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// MCP (`/mcp`), top-up, `/livez`, `/readyz`: what agents reach.
    pub listen: SocketAddr,
    /// `/metrics`, the operator API (`/v1/admin/…`), `/livez`, `/readyz` of `tollgate control`:
    /// keep it private. (`tollgate dev` serves these on `listen` and the proxy's admin port.)
    pub admin_listen: SocketAddr,
    /// The address workerd processes listen on and routes point proxies at. Loopback (the
    /// default) when the proxies run on this host; the host's private IP when they run
    /// elsewhere, and then only they may reach it (tenant processes behind it are not metered):
    /// docs/packaging.md.
    pub runtime_ip: std::net::IpAddr,
    /// Journals, the embedded money store, deployment folders and build dirs.
    pub data_dir: PathBuf,
    /// Bearer token of the operator API (`/v1/admin/…`); unset: the API is off.
    /// Prefer `TOLLGATE_ADMIN_TOKEN` to writing it in a file.
    pub admin_token: Option<String>,
    /// How a project's public URL is written; `{slug}` is replaced. Default:
    /// `http://{slug}.<proxy.base_domain>:<proxy port>`.
    pub public_url: Option<String>,
    /// The pinned JS toolchain (package.json + lockfile); installed there when missing.
    pub toolchain_dir: PathBuf,
    /// A project with no request and no deploy for this long expires and is collected.
    pub inactivity_ttl_seconds: u64,
    /// A deployment with no request and no CPU use for this long has its process stopped (it
    /// starts again on the next request); 0 keeps processes running.
    pub idle_stop_seconds: u64,
    /// Where tenant processes run: `local` (in this process) or `hosts` (on `tollgate runtime`
    /// hosts registered in Redis; docs/scale-out.md).
    pub runtime: RuntimePlacement,
}

/// Where the control service runs deployments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimePlacement {
    #[default]
    Local,
    Hosts,
}

/// A runtime host (`tollgate runtime`): what it offers and how it keeps its lease.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostConfig {
    /// Its name in Redis; unique per host and kept across restarts (a restarted host takes its
    /// deployments back at once). Default `runtime-<admin port>`.
    pub id: Option<String>,
    /// `/metrics`, `/livez`, `/readyz`.
    pub admin_listen: SocketAddr,
    /// Most deployments it runs at once.
    pub processes: u32,
    /// Memory given to deployments; 0: 80 % of the machine's.
    pub memory_mib: u64,
    /// Memory reserved per deployment when placing (an idle-stopped one uses none; a busy one
    /// up to the runtime's limit, 512 MiB).
    pub per_deployment_mib: u64,
    /// Lost after this long without a heartbeat: its deployments move to other hosts.
    pub lease_ms: u64,
    /// At a graceful stop, how long to wait for its deployments to run elsewhere first.
    pub handover_seconds: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            id: None,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9093)),
            processes: 1000,
            memory_mib: 0,
            per_deployment_mib: 64,
            lease_ms: 3000,
            handover_seconds: 20,
        }
    }
}

impl HostConfig {
    pub fn check(&self) -> Result<(), String> {
        if !(500..=60_000).contains(&self.lease_ms) {
            return Err(format!(
                "host.lease_ms = {}: expected 500 to 60000",
                self.lease_ms
            ));
        }
        if self.handover_seconds > 3600 {
            return Err(format!(
                "host.handover_seconds = {}: expected at most 3600",
                self.handover_seconds
            ));
        }
        if self.processes == 0 {
            return Err("host.processes = 0: a host must run at least one deployment".into());
        }
        if let Some(id) = &self.id
            && (id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'))
        {
            return Err(format!(
                "host.id {id:?}: 1-64 characters of A-Z a-z 0-9 - _"
            ));
        }
        Ok(())
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8790)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9091)),
            runtime_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            data_dir: PathBuf::from(".tollgate"),
            admin_token: None,
            public_url: None,
            toolchain_dir: PathBuf::from("runtime/npm"),
            inactivity_ttl_seconds: 7 * 24 * 3600,
            idle_stop_seconds: 600,
            runtime: RuntimePlacement::Local,
        }
    }
}

/// Per-project SQL databases (D1 API), served to the control process's workerd deployments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Off: deploys asking for `databases` are refused.
    pub enabled: bool,
    /// Where the SQLite files live. Default: `<control.data_dir>/databases`.
    pub dir: Option<PathBuf>,
    /// Writes past this size fail (D1-style error); reads keep working.
    pub max_size_mb: u64,
    /// A query (or batch) running longer is interrupted.
    pub query_timeout_ms: u64,
    /// A result larger than this fails the query.
    pub max_result_mb: u64,
    /// `full` (every commit on disk before it is acknowledged) or `normal` (the last commits
    /// may be lost on power loss, never on a crash of the process); docs/database.md.
    pub synchronous: tollgate_database::Synchronous,
    /// Below this much free space on the databases' filesystem, every database's writes fail
    /// (reads go on) until space is back.
    pub min_free_disk_mb: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            enabled: true,
            dir: None,
            max_size_mb: 500,
            query_timeout_ms: 5_000,
            max_result_mb: 16,
            synchronous: tollgate_database::Synchronous::Full,
            min_free_disk_mb: 1024,
        }
    }
}

impl DatabaseConfig {
    /// The validated limits, or what is wrong (with the config key).
    pub fn limits(&self) -> Result<tollgate_database::Limits, String> {
        if !(1..=1_000_000).contains(&self.max_size_mb) {
            return Err(format!(
                "database.max_size_mb must be 1..=1000000, got {}",
                self.max_size_mb
            ));
        }
        if !(10..=300_000).contains(&self.query_timeout_ms) {
            return Err(format!(
                "database.query_timeout_ms must be 10..=300000, got {}",
                self.query_timeout_ms
            ));
        }
        if !(1..=1024).contains(&self.max_result_mb) {
            return Err(format!(
                "database.max_result_mb must be 1..=1024, got {}",
                self.max_result_mb
            ));
        }
        Ok(tollgate_database::Limits {
            max_size_bytes: self.max_size_mb * 1_000_000,
            query_timeout: std::time::Duration::from_millis(self.query_timeout_ms),
            max_result_bytes: (self.max_result_mb as usize) << 20,
            synchronous: self.synchronous,
            ..tollgate_database::Limits::default()
        })
    }

    pub fn dir(&self, control_data_dir: &Path) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| control_data_dir.join("databases"))
    }
}

/// How the platform is reached from outside (what agents and wallets see).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublicConfig {
    /// The MCP endpoint agents connect to, e.g. `https://mcp.example.com/mcp`. Its host is the
    /// payment realm (credentials are bound to it) and an allowed `Host` of the MCP server.
    /// Default: `http://localhost:<control port>/mcp` when the control service listens on
    /// loopback; required otherwise.
    pub mcp_url: Option<String>,
    /// The domain services are published under: `https://{slug}.<base_domain>` (a wildcard DNS
    /// name and certificate). Sets `proxy.base_domain`; URLs given to agents use HTTPS unless
    /// `control.public_url` says otherwise. Unset: `proxy.base_domain` over plain HTTP (dev).
    #[serde(deserialize_with = "de_opt_host")]
    pub base_domain: Option<String>,
    /// More `Host` names the MCP endpoint answers (beside loopback and the host of `mcp_url`),
    /// e.g. a second name behind another load balancer.
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call MCP (`scheme://host:port`, `:*` for any port), e.g. a
    /// web console. A request with any other `Origin` is refused (403); agents send none.
    pub allowed_origins: Vec<String>,
}

impl PublicConfig {
    /// Every listed origin names a scheme and a host: `https://console.example.com:443`.
    pub fn check(&self) -> Result<(), String> {
        for o in &self.allowed_origins {
            let rest = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"))
                .ok_or_else(|| {
                    format!(
                        "public.allowed_origins: '{o}' must start with https:// or http:// (e.g. https://console.example.com:443)"
                    )
                })?;
            if rest.is_empty() || rest.contains('/') {
                return Err(format!(
                    "public.allowed_origins: '{o}' must be scheme://host[:port], with no path"
                ));
            }
        }
        for h in &self.allowed_hosts {
            if h.is_empty() || h.contains(['/', ' ']) {
                return Err(format!(
                    "public.allowed_hosts: '{h}' must be a host name (no scheme, no path)"
                ));
            }
        }
        Ok(())
    }
}

fn de_opt_host<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error as _;
    let s = String::deserialize(d)?;
    parse_host(&s).map(Some).map_err(D::Error::custom)
}

/// Charging requests to the routes' owning accounts (docs/money.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    /// Off: every route is free, whatever its account (a plain routing proxy).
    pub enabled: bool,
    /// This node's stable name: its journal and its leases are keyed by it, so it must be unique
    /// per node and the same across restarts. Default: `proxy-<listen port>`.
    pub node_id: Option<String>,
    /// How long a request waits for this node's first lease on an account (ms) before a 503.
    pub lease_wait_ms: u64,
    /// How settle interval and leases behave; defaults suit most deployments.
    pub settle_interval_ms: u64,
    pub lease_ttl_seconds: u64,
    /// Shown on 402 answers and the suspension page: how an owner adds credit.
    pub top_up: String,
    /// CPU (ms, at the CPU price) an account's services may keep using on a node once its
    /// balance is gone, before the runtime interrupts them (the `D` of the overspend bound).
    pub cpu_debt_limit_ms: u64,
    /// The Redis ledger stream keeps this many days of entries (0: all; export with `XRANGE`).
    pub ledger_retention_days: u64,
}

impl MeteringConfig {
    pub fn ledger_retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.ledger_retention_days.saturating_mul(86_400))
    }
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig {
            enabled: true,
            node_id: None,
            lease_wait_ms: 1000,
            settle_interval_ms: 50,
            lease_ttl_seconds: 10,
            cpu_debt_limit_ms: tollgate_balance_cache::DEFAULT_CPU_DEBT_MS,
            ledger_retention_days: 90,
            top_up:
                "the owner's agent can add credit with the `top_up` tool of the tollgate MCP server"
                    .into(),
        }
    }
}

/// MPP payments (docs/payments.md). Secrets come from files or the environment, never from
/// this file: `TOLLGATE_PAYMENTS_SECRET`, `TOLLGATE_PAYEE_KEY` (or the `*_file` keys).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    /// JSON-RPC endpoint of the Tempo chain. `tollgate dev` starts the project's local test
    /// chain (no real money) here unless `--chain-rpc` points elsewhere.
    pub rpc_url: String,
    pub chain_id: u64,
    /// The production services refuse to start against the project's test chain unless this
    /// is true (`tollgate dev` sets it).
    pub allow_test_chain: bool,
    /// Challenge realm: the public MCP host, to which credentials are bound. Default: the host
    /// of `public.mcp_url`. Never an IP address.
    pub realm: Option<String>,
    /// TIP-20 token payments are made in (default pathUSD).
    pub currency: String,
    /// File holding the HMAC secret that binds challenges (≥ 32 bytes).
    pub secret_file: Option<PathBuf>,
    /// File holding the payee's private key (hex): it receives payments and signs settlements.
    pub payee_key_file: Option<PathBuf>,
    pub suggested_deposit_usd: String,
    pub min_voucher_delta_usd: String,
    pub max_top_up_usd: u64,
    /// Spent money is settled on chain this often, when at least `settle_min_usd` is due.
    pub settle_interval_seconds: u64,
    pub settle_min_usd: String,
    /// Extra credit a deploy buys for the service's requests and CPU unless the agent says
    /// otherwise (`prepay_usd`).
    pub default_prepay_usd: String,
    /// How often the close watcher reads the escrow's close requests (it captures the
    /// vouchers of channels a payer closes on chain).
    pub close_watch_seconds: u64,
    /// A voucher not captured this long before the payer may withdraw is written off.
    pub write_off_margin_seconds: u64,
    /// How long a payment challenge may be answered.
    pub challenge_ttl_seconds: u64,
    /// A deploy's (or rollback's) charge gives itself back after this long unless the start is
    /// recorded live (the control process died mid-deploy): longer than any deploy (at least
    /// 240 s, at most a day; shorter only with `allow_test_chain`).
    pub start_refund_hold_seconds: u64,
    /// One chain JSON-RPC call (a voucher check, a settlement, a close) that takes longer has
    /// failed and is retried later: 1 to 120 s.
    pub chain_timeout_seconds: u64,
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        PaymentsConfig {
            rpc_url: "http://127.0.0.1:8545".into(),
            chain_id: 42431,
            allow_test_chain: false,
            realm: None,
            currency: "0x20c0000000000000000000000000000000000000".into(),
            secret_file: None,
            payee_key_file: None,
            suggested_deposit_usd: "5".into(),
            min_voucher_delta_usd: "0".into(),
            max_top_up_usd: 1000,
            settle_interval_seconds: 60,
            settle_min_usd: "1".into(),
            default_prepay_usd: "1".into(),
            close_watch_seconds: 10,
            write_off_margin_seconds: 60,
            challenge_ttl_seconds: 60,
            start_refund_hold_seconds: crate::paid::START_REVERSAL_HOLD.as_secs(),
            chain_timeout_seconds: tollgate_payments::chain::CALL_TIMEOUT.as_secs(),
        }
    }
}

/// Prices in dollars, as operators write them; money is integer pico-dollars inside.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PriceConfig {
    pub deploy_usd: String,
    pub requests_per_million_usd: String,
    pub cpu_ms_per_million_usd: String,
    /// Database rows read / written, dollars per million (D1's model).
    pub rows_read_per_million_usd: String,
    pub rows_written_per_million_usd: String,
}

impl Default for PriceConfig {
    fn default() -> Self {
        PriceConfig {
            deploy_usd: "0.05".into(),
            requests_per_million_usd: "0.50".into(),
            cpu_ms_per_million_usd: "12.50".into(),
            rows_read_per_million_usd: "0.25".into(),
            rows_written_per_million_usd: "1.00".into(),
        }
    }
}

impl PriceConfig {
    pub fn prices(&self) -> Result<tollgate_metering::Prices, String> {
        tollgate_metering::Prices::from_usd(
            &self.deploy_usd,
            &self.requests_per_million_usd,
            &self.cpu_ms_per_million_usd,
        )
        .and_then(|p| {
            p.with_rows_usd(
                &self.rows_read_per_million_usd,
                &self.rows_written_per_million_usd,
            )
        })
        .map_err(|e| format!("[prices]: {e}"))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter, such as `info` or `info,tollgate_routes=debug`. `TOLLGATE_LOG` wins.
    pub level: String,
    pub format: LogFormat,
    /// OpenTelemetry: spans of the control service, MCP and payments go by OTLP/HTTP (JSON) to
    /// `<otlp_endpoint>/v1/traces`, e.g. `http://collector:4318`. Unset: the standard
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` / `OTEL_EXPORTER_OTLP_ENDPOINT`, if set, turn it on;
    /// else nothing is exported.
    pub otlp_endpoint: Option<String>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            otlp_endpoint: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Where a bad value came from, and why it is bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{}:{}: {}", self.origin, l, c, self.message),
            _ => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn env(var: &str, message: String) -> Self {
        ConfigError {
            origin: format!("environment variable {var}"),
            line: None,
            column: None,
            message,
        }
    }
}

/// The environment variables read, in the order they are applied.
pub const ENV_VARS: &[&str] = &[
    "TOLLGATE_PROXY_LISTEN",
    "TOLLGATE_PROXY_THREADS",
    "TOLLGATE_PROXY_WORK_STEALING",
    "TOLLGATE_BASE_DOMAIN",
    "TOLLGATE_MAX_BODY_BYTES",
    "TOLLGATE_MAX_REQUEST_HEADER_BYTES",
    "TOLLGATE_ADMIN_LISTEN",
    "TOLLGATE_CONTROL_LISTEN",
    "TOLLGATE_DATA_DIR",
    "TOLLGATE_ADMIN_TOKEN",
    "TOLLGATE_REDIS_URL",
    "TOLLGATE_REDIS_CLUSTER",
    "TOLLGATE_REDIS_KEY_PREFIX",
    "TOLLGATE_DRAIN_TIMEOUT_SECONDS",
    "TOLLGATE_METERING_ENABLED",
    "TOLLGATE_NODE_ID",
    "TOLLGATE_PUBLIC_MCP_URL",
    "TOLLGATE_LOG_LEVEL",
    "TOLLGATE_LOG_FORMAT",
    "TOLLGATE_LOG_OTLP_ENDPOINT",
    "TOLLGATE_BOOK_POSTGRES_URL",
    "TOLLGATE_UPGRADE_SOCK",
    "TOLLGATE_ACCESS_LOG",
    "TOLLGATE_PUBLIC_BASE_DOMAIN",
    "TOLLGATE_PUBLIC_ALLOWED_HOSTS",
    "TOLLGATE_PUBLIC_ALLOWED_ORIGINS",
    "TOLLGATE_CONTROL_ADMIN_LISTEN",
    "TOLLGATE_CONTROL_RUNTIME_IP",
    "TOLLGATE_TLS_LISTEN",
    "TOLLGATE_TLS_CERT",
    "TOLLGATE_TLS_KEY",
    "TOLLGATE_TLS_REDIRECT_HTTP",
    "TOLLGATE_CONTROL_RUNTIME",
    "TOLLGATE_HOST_ID",
    "TOLLGATE_HOST_ADMIN_LISTEN",
];

impl Config {
    /// Parses a config file's text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cfg = Self::parse_toml(text, origin)?;
        cfg.prices
            .prices()
            .and_then(|_| cfg.tls.check())
            .and_then(|_| cfg.access_log.check())
            .and_then(|_| cfg.public.check())
            .and_then(|_| cfg.host.check())
            .and_then(|_| cfg.store_combination())
            .map_err(|message| ConfigError {
                origin: origin.to_owned(),
                line: None,
                column: None,
                message,
            })?;
        Ok(cfg)
    }

    fn parse_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        toml::from_str::<Config>(text).map_err(|e| {
            let (line, column) = match e.span() {
                Some(span) => {
                    let (l, c) = line_col(text, span.start);
                    (Some(l), Some(c))
                }
                None => (None, None),
            };
            ConfigError {
                origin: origin.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        })
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            origin: origin.clone(),
            line: None,
            column: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(&text, &origin)
    }

    /// File (or defaults), then the environment as given by `env`.
    pub fn load(
        path: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match path {
            Some(p) => Config::from_file(p)?,
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.store_combination().map_err(|message| ConfigError {
            origin: "the configuration with the environment".into(),
            line: None,
            column: None,
            message,
        })?;
        Ok(cfg)
    }

    /// What the parts support together: on a cluster, a key prefix that can go inside a hash
    /// tag.
    fn store_combination(&self) -> Result<(), String> {
        if let Some(r) = &self.redis
            && !r.cluster.is_empty()
        {
            tollgate_proxy::config::check_key_prefix(&r.key_prefix)
                .map_err(|e| format!("redis.{e}"))?;
        }
        Ok(())
    }

    /// Applies `TOLLGATE_*` variables over the current values.
    pub fn apply_env(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        for &var in ENV_VARS {
            let Some(val) = env(var) else { continue };
            let fail = |m: String| ConfigError::env(var, m);
            match var {
                "TOLLGATE_PROXY_LISTEN" => self.proxy.listen = parse_addr(&val).map_err(fail)?,
                "TOLLGATE_PROXY_THREADS" => {
                    self.proxy.threads = parse_threads(&val).map_err(fail)?
                }
                "TOLLGATE_PROXY_WORK_STEALING" => {
                    self.proxy.work_stealing = match val.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(fail(format!("'{val}': expected true or false"))),
                    }
                }
                "TOLLGATE_BASE_DOMAIN" => {
                    self.proxy.base_domain = parse_host(&val).map_err(fail)?;
                }
                "TOLLGATE_MAX_BODY_BYTES" => {
                    self.proxy.max_body_bytes = parse_num(&val).map_err(fail)?;
                }
                "TOLLGATE_MAX_REQUEST_HEADER_BYTES" => {
                    self.proxy.max_request_header_bytes = parse_num(&val).map_err(fail)?;
                }
                "TOLLGATE_ADMIN_LISTEN" => self.admin.listen = parse_addr(&val).map_err(fail)?,
                "TOLLGATE_CONTROL_LISTEN" => {
                    self.control.listen = parse_addr(&val).map_err(fail)?;
                }
                "TOLLGATE_DATA_DIR" => self.control.data_dir = PathBuf::from(val),
                "TOLLGATE_ADMIN_TOKEN" => self.control.admin_token = Some(val),
                "TOLLGATE_REDIS_URL" => self.set_redis_url(&val).map_err(fail)?,
                "TOLLGATE_REDIS_CLUSTER" => {
                    if env("TOLLGATE_REDIS_URL").is_some() {
                        return Err(fail(
                            "set TOLLGATE_REDIS_URL (one Redis) or TOLLGATE_REDIS_CLUSTER (a Redis Cluster), not both".into(),
                        ));
                    }
                    let members = val
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(str::to_owned)
                        .collect::<Vec<_>>();
                    if members.is_empty() {
                        return Err(fail(
                            "expected the members' URLs, comma-separated: redis://10.0.0.1:7000,redis://10.0.0.2:7000".into(),
                        ));
                    }
                    let r = self.redis.get_or_insert_with(|| RedisConfig::new(""));
                    r.set_cluster(members).map_err(fail)?;
                }
                // Only with a Redis to prefix (the URL comes first).
                "TOLLGATE_REDIS_KEY_PREFIX" => {
                    if let Some(r) = &mut self.redis {
                        r.key_prefix = val;
                    }
                }
                "TOLLGATE_DRAIN_TIMEOUT_SECONDS" => {
                    self.shutdown.drain_timeout_seconds = parse_num(&val).map_err(fail)?;
                }
                "TOLLGATE_METERING_ENABLED" => {
                    self.metering.enabled = match val.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(fail(format!("{val:?}: expected true or false"))),
                    }
                }
                "TOLLGATE_NODE_ID" => self.metering.node_id = Some(val),
                "TOLLGATE_PUBLIC_MCP_URL" => {
                    parse_public_url(&val).map_err(fail)?;
                    self.public.mcp_url = Some(val);
                }
                "TOLLGATE_CONTROL_ADMIN_LISTEN" => {
                    self.control.admin_listen = parse_addr(&val).map_err(fail)?;
                }
                "TOLLGATE_CONTROL_RUNTIME_IP" => {
                    self.control.runtime_ip = val
                        .parse()
                        .map_err(|_| fail(format!("'{val}': expected an IP address")))?;
                }
                "TOLLGATE_CONTROL_RUNTIME" => {
                    self.control.runtime = match val.as_str() {
                        "local" => RuntimePlacement::Local,
                        "hosts" => RuntimePlacement::Hosts,
                        _ => return Err(fail(format!("'{val}': expected local or hosts"))),
                    }
                }
                "TOLLGATE_HOST_ID" => {
                    self.host.id = Some(val);
                    self.host.check().map_err(fail)?;
                }
                "TOLLGATE_HOST_ADMIN_LISTEN" => {
                    self.host.admin_listen = parse_addr(&val).map_err(fail)?;
                }
                "TOLLGATE_PUBLIC_BASE_DOMAIN" => {
                    self.public.base_domain = Some(parse_host(&val).map_err(fail)?);
                }
                // Comma-separated lists.
                "TOLLGATE_PUBLIC_ALLOWED_HOSTS" | "TOLLGATE_PUBLIC_ALLOWED_ORIGINS" => {
                    let list: Vec<String> = val
                        .split(',')
                        .map(str::trim)
                        .filter(|v| !v.is_empty())
                        .map(str::to_owned)
                        .collect();
                    if var == "TOLLGATE_PUBLIC_ALLOWED_HOSTS" {
                        self.public.allowed_hosts = list;
                    } else {
                        self.public.allowed_origins = list;
                    }
                    self.public.check().map_err(fail)?;
                }
                "TOLLGATE_ACCESS_LOG" => {
                    self.access_log.mode = match val.as_str() {
                        "off" => tollgate_proxy::AccessLogMode::Off,
                        "on" => tollgate_proxy::AccessLogMode::On,
                        "sampled" => tollgate_proxy::AccessLogMode::Sampled,
                        _ => return Err(fail(format!("'{val}': expected off, on or sampled"))),
                    }
                }
                "TOLLGATE_UPGRADE_SOCK" => self.proxy.upgrade_sock = Some(PathBuf::from(val)),
                "TOLLGATE_TLS_LISTEN" => self.tls.listen = Some(parse_addr(&val).map_err(fail)?),
                // One chain and key (e.g. a wildcard for the base domain) in place of the
                // file's list; both variables go together.
                "TOLLGATE_TLS_CERT" => {
                    let key = env("TOLLGATE_TLS_KEY").ok_or_else(|| {
                        fail("set TOLLGATE_TLS_KEY too (the certificate's private key)".into())
                    })?;
                    self.tls.certificates = vec![CertificateFiles {
                        cert: PathBuf::from(val),
                        key: PathBuf::from(key),
                    }];
                }
                "TOLLGATE_TLS_KEY" if env("TOLLGATE_TLS_CERT").is_none() => {
                    return Err(fail(
                        "set TOLLGATE_TLS_CERT too (the certificate chain)".into(),
                    ));
                }
                "TOLLGATE_TLS_REDIRECT_HTTP" => {
                    self.tls.redirect_http = match val.as_str() {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        _ => return Err(fail(format!("'{val}': expected true or false"))),
                    }
                }
                "TOLLGATE_LOG_LEVEL" => self.log.level = val,
                "TOLLGATE_BOOK_POSTGRES_URL" => match &mut self.book {
                    Some(b) => b.postgres_url = val,
                    None => {
                        self.book = Some(BookConfig {
                            postgres_url: val,
                            copy_interval_ms: default_book_interval_ms(),
                        })
                    }
                },
                "TOLLGATE_LOG_OTLP_ENDPOINT" => {
                    let url = reqwest::Url::parse(&val).map_err(|e| fail(e.to_string()))?;
                    if !matches!(url.scheme(), "http" | "https") {
                        return Err(fail("must be an http:// or https:// URL".into()));
                    }
                    self.log.otlp_endpoint = Some(val);
                }
                "TOLLGATE_LOG_FORMAT" => {
                    self.log.format = match val.as_str() {
                        "text" => LogFormat::Text,
                        "json" => LogFormat::Json,
                        _ => return Err(fail(format!("'{val}': expected text or json"))),
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The public MCP URL: `public.mcp_url`, or on a loopback control listener
    /// `http://localhost:<port>/mcp`.
    pub fn public_mcp_url(&self) -> Result<String, String> {
        match &self.public.mcp_url {
            Some(u) => {
                parse_public_url(u).map_err(|e| format!("public.mcp_url: {e}"))?;
                Ok(u.clone())
            }
            None if self.control.listen.ip().is_loopback() => Ok(format!(
                "http://localhost:{}/mcp",
                self.control.listen.port()
            )),
            None => Err(format!(
                "public.mcp_url is not set: agents reach MCP (and wallets see the payment realm) at a public host name, not at control.listen {}; set [public] mcp_url = \"https://mcp.example.com/mcp\" (or TOLLGATE_PUBLIC_MCP_URL)",
                self.control.listen
            )),
        }
    }

    /// The public MCP host (`host` or `host:port` as in the URL): the payment realm, unless
    /// `payments.realm` names another, and a `Host` the MCP server accepts.
    pub fn public_mcp_host(&self) -> Result<String, String> {
        let url = self.public_mcp_url()?;
        parse_public_url(&url).map_err(|e| format!("public.mcp_url: {e}"))
    }

    /// The payment realm: `payments.realm`, else the public MCP host.
    pub fn payment_realm(&self) -> Result<String, String> {
        match &self.payments.realm {
            Some(r) => Ok(r.clone()),
            None => self.public_mcp_host(),
        }
    }

    /// Sets the Redis URL (one Redis: a cluster configured is dropped), keeping the other
    /// `[redis]` settings.
    pub fn set_redis_url(&mut self, url: &str) -> Result<(), String> {
        check_redis_url(url)?;
        match &mut self.redis {
            Some(r) => {
                r.url = url.to_owned();
                r.cluster.clear();
            }
            None => self.redis = Some(RedisConfig::new(url)),
        }
        Ok(())
    }
}

pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("'{s}': expected IP:PORT, such as 127.0.0.1:8080"))
}

/// An `http(s)://host[:port]/…` URL; returns its `host[:port]` (lowercase).
pub fn parse_public_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("'{s}': expected an http:// or https:// URL"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() || authority.contains('@') || authority.contains(char::is_whitespace) {
        return Err(format!("'{s}': expected http(s)://HOST[:PORT]/PATH"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            if !p.is_empty() && p.parse::<u16>().is_err() {
                return Err(format!("'{s}': the port is not a number"));
            }
            (h, Some(p))
        }
        _ => (authority, None),
    };
    tollgate_routes::normalize_host_owned(host).map_err(|e| format!("'{s}': {e}"))?;
    let host = host.to_ascii_lowercase();
    Ok(match port {
        Some(p) if !p.is_empty() => format!("{host}:{p}"),
        _ => host,
    })
}

pub fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!("'{s}': expected a number of threads from 1 to 256")),
    }
}

pub fn parse_host(s: &str) -> Result<String, String> {
    tollgate_routes::normalize_host_owned(s).map_err(|e| format!("'{s}': {e}"))
}

fn parse_num<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("'{s}': expected a whole number"))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("abc", 0), (1, 1));
        assert_eq!(line_col("a\nbc", 3), (2, 2));
    }
}
