//! The configuration, checked once and turned into what the components take. Everything
//! `tollgate check-config` can know without starting anything is checked here, and every error
//! names its config key.

use std::time::Duration;

use tollgate_balance_cache::AgentConfig;
use tollgate_metering::Prices;
use tollgate_metering::units::parse_usd_base;

use crate::config::Config;

/// A value that cannot work, and the key it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingsError {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for SettingsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for SettingsError {}

/// The shortest `payments.start_refund_hold_seconds` outside development: a start may wait
/// `START_LOCK_WAIT` for the project's lock, then bundle and start (well under a minute).
pub const MIN_START_REFUND_HOLD_SECONDS: u64 = 240;

/// `payments.start_refund_hold_seconds`, checked (also by `tollgate book rebuild`, which holds
/// reversals again with it): longer than any start can take, so a start that goes live is not
/// given for free (shorter only with `allow_test_chain`, for tests), at most a day, so a
/// charge for a start that died is given back the same day.
pub fn start_refund_hold(
    p: &crate::config::PaymentsConfig,
) -> Result<std::time::Duration, SettingsError> {
    let s = p.start_refund_hold_seconds;
    let min = if p.allow_test_chain {
        1
    } else {
        MIN_START_REFUND_HOLD_SECONDS
    };
    if s < min || s > 86_400 {
        return Err(bad(
            "payments.start_refund_hold_seconds",
            format!(
                "must be from {min} to 86400: longer than a deploy can take (a start may wait {} s for another start of its project, then bundle and start), and short enough that a dead start's charge comes back the same day",
                tollgate_control::START_LOCK_WAIT.as_secs()
            ),
        ));
    }
    Ok(std::time::Duration::from_secs(s))
}

fn bad(key: &str, message: impl Into<String>) -> SettingsError {
    SettingsError {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Payment amounts in token base units ($0.000001).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaymentAmounts {
    pub suggested_deposit: u128,
    pub min_voucher_delta: u128,
    pub settle_min: u128,
    /// Credit a deploy buys unless the agent says otherwise; also what a hosted service's 402
    /// asks its owner for.
    pub default_prepay: u128,
    /// How long a start's charge waits for its outcome before it gives itself back.
    pub start_refund_hold: std::time::Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub prices: Prices,
    pub lease_ttl: Duration,
    pub lease_wait: Duration,
    /// How long the shutdown waits for in-flight requests (`shutdown.drain_timeout_seconds`).
    pub drain_timeout: Duration,
    pub payments: PaymentAmounts,
    /// The `tracing` filter (`TOLLGATE_LOG` wins over `log.level`).
    pub log_filter: String,
    /// Written with this process's id once it serves (`--pid-file`).
    pub pid_file: Option<std::path::PathBuf>,
}

impl Settings {
    pub fn from_config(mut config: Config) -> Result<Settings, SettingsError> {
        if let Some(d) = &config.public.base_domain {
            // One name for the services' domain; `proxy.base_domain` is its older spelling.
            let p = &config.proxy.base_domain;
            if p != d && p != &tollgate_proxy::ProxyConfig::default().base_domain {
                return Err(bad(
                    "public.base_domain",
                    format!("'{d}' differs from proxy.base_domain '{p}': set one of them"),
                ));
            }
            config.proxy.base_domain = d.clone();
        }
        let prices = config
            .prices
            .prices()
            .map_err(|e| bad("prices", e.trim_start_matches("[prices]: ")))?;
        let m = &config.metering;
        let lease_ttl = Duration::from_secs(m.lease_ttl_seconds);
        let p = &config.payments;
        let usd = |key: &str, text: &str| {
            parse_usd_base(text, 9_000).map_err(|e| bad(&format!("payments.{key}"), e))
        };
        let payments = PaymentAmounts {
            suggested_deposit: usd("suggested_deposit_usd", &p.suggested_deposit_usd)?,
            min_voucher_delta: usd("min_voucher_delta_usd", &p.min_voucher_delta_usd)?,
            settle_min: usd("settle_min_usd", &p.settle_min_usd)?,
            default_prepay: usd("default_prepay_usd", &p.default_prepay_usd)?,
            start_refund_hold: start_refund_hold(p)?,
        };
        if config.control.runtime_ip.is_unspecified() {
            return Err(bad(
                "control.runtime_ip",
                "must be the one address proxies reach workerd on (routes point at it), not 0.0.0.0 or ::",
            ));
        }
        if payments.suggested_deposit == 0 {
            return Err(bad("payments.suggested_deposit_usd", "must be more than 0"));
        }
        if p.max_top_up_usd == 0 || p.max_top_up_usd > 9_000 {
            return Err(bad("payments.max_top_up_usd", "must be 1..=9000"));
        }
        if !(1..=120).contains(&p.chain_timeout_seconds) {
            return Err(bad("payments.chain_timeout_seconds", "must be 1..=120"));
        }
        if p.settle_interval_seconds == 0 {
            return Err(bad(
                "payments.settle_interval_seconds",
                "must be at least 1",
            ));
        }
        if !(1..=300).contains(&p.close_watch_seconds) {
            return Err(bad(
                "payments.close_watch_seconds",
                "must be 1..=300 (a close request must be captured well inside Tempo's 900 s grace period)",
            ));
        }
        if !(30..600).contains(&p.write_off_margin_seconds) {
            return Err(bad(
                "payments.write_off_margin_seconds",
                "must be 30..600 (time left to write unbacked credit off before the payer can withdraw)",
            ));
        }
        if p.close_watch_seconds * 2 > p.write_off_margin_seconds {
            return Err(bad(
                "payments.close_watch_seconds",
                format!(
                    "must be at most half of payments.write_off_margin_seconds ({}), so two watcher rounds fit before the payer can withdraw",
                    p.write_off_margin_seconds
                ),
            ));
        }
        start_refund_hold(p)?;
        if p.challenge_ttl_seconds < 10 {
            return Err(bad("payments.challenge_ttl_seconds", "must be at least 10"));
        }
        p.currency
            .parse::<alloy::primitives::Address>()
            .map_err(|_| {
                bad(
                    "payments.currency",
                    format!("'{}' is not an address", p.currency),
                )
            })?;
        if let Some(url) = &config.public.mcp_url {
            crate::config::parse_public_url(url).map_err(|e| bad("public.mcp_url", e))?;
        }
        config.database.limits().map_err(|e| {
            let key = e.split(' ').next().unwrap_or("database").to_owned();
            bad(&key, e.trim_start_matches(&format!("{key} ")))
        })?;
        // The realm as the services will use it, named or derived from the public MCP URL (an
        // IP address is refused either way: challenges must name the platform).
        if p.realm.is_some() || config.public.mcp_url.is_some() {
            let key = if p.realm.is_some() {
                "payments.realm"
            } else {
                "public.mcp_url"
            };
            let realm = config.payment_realm().map_err(|e| bad(key, e))?;
            let mut check = tollgate_payments::PaymentsConfig::new(
                "http://127.0.0.1:1",
                p.chain_id,
                tollgate_payments::config::Secret::new("x".repeat(32)),
                tollgate_payments::config::Secret::new("x".repeat(64)),
            );
            check.realm = realm;
            check.validate().map_err(|e| bad(key, e))?;
        }
        if let Some(b) = &config.book {
            if config.redis.is_none() {
                return Err(bad(
                    "book.postgres_url",
                    "the book of record copies the Redis ledger: it needs [redis] (a node on the embedded store keeps its ledger in its own file)",
                ));
            }
            if b.postgres_url.parse::<tokio_postgres::Config>().is_err() {
                return Err(bad(
                    "book.postgres_url",
                    "is not a PostgreSQL URL (postgres://user@host:port/database)",
                ));
            }
            if !(10..=60_000).contains(&b.copy_interval_ms) {
                return Err(bad("book.copy_interval_ms", "must be 10..=60000"));
            }
        }
        if let Some(e) = &config.log.otlp_endpoint
            && !reqwest::Url::parse(e).is_ok_and(|u| matches!(u.scheme(), "http" | "https"))
        {
            return Err(bad(
                "log.otlp_endpoint",
                format!(
                    "'{e}' is not an http:// or https:// URL (an OTLP/HTTP collector, e.g. http://localhost:4318)"
                ),
            ));
        }
        if m.lease_wait_ms > 60_000 {
            return Err(bad(
                "metering.lease_wait_ms",
                "must be at most 60000 (a request waits this long for a first lease)",
            ));
        }
        if let Some(id) = &m.node_id {
            let ok = !id.is_empty()
                && id.len() <= 64
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(bad(
                    "metering.node_id",
                    format!(
                        "'{id}' must be 1..=64 letters, digits, '-' or '_' (it names the node's journal file and leases; '.' is kept for stand-ins)"
                    ),
                ));
            }
        }
        let sd = &config.shutdown;
        if sd.drain_timeout_seconds > 3_600 {
            return Err(bad(
                "shutdown.drain_timeout_seconds",
                "must be at most 3600",
            ));
        }
        if config.control.inactivity_ttl_seconds < 60 {
            return Err(bad(
                "control.inactivity_ttl_seconds",
                "must be at least 60 (unused projects are torn down after it)",
            ));
        }
        for r in &config.proxy.payment_realms {
            let host = r.strip_suffix("/services").unwrap_or(r);
            let ok = !host.is_empty()
                && host.len() <= 255
                && !host.contains("://")
                && !host.contains('/')
                && !host.chars().any(char::is_whitespace);
            if !ok {
                return Err(bad(
                    "proxy.payment_realms",
                    format!(
                        "'{r}' is not a realm: a host[:port] as in the challenges (e.g. mcp.example.com), optionally with /services"
                    ),
                ));
            }
        }
        let log_filter = std::env::var("TOLLGATE_LOG").unwrap_or_else(|_| config.log.level.clone());
        tracing_subscriber::EnvFilter::try_new(&log_filter).map_err(|e| {
            bad(
                "log.level",
                format!("'{log_filter}' is not a tracing filter: {e}"),
            )
        })?;
        let settings = Settings {
            prices,
            lease_ttl,
            lease_wait: Duration::from_millis(m.lease_wait_ms),
            drain_timeout: Duration::from_secs(config.shutdown.drain_timeout_seconds),
            payments,
            log_filter,
            config,
            pid_file: None,
        };
        // The agent's rules (settle interval against the lease margin, lease sizes).
        settings.agent("check")?;
        Ok(settings)
    }

    /// The metering agent of node `node_id`, journaling in the data dir.
    pub fn agent(&self, node_id: &str) -> Result<AgentConfig, SettingsError> {
        let m = &self.config.metering;
        let mut agent = AgentConfig::new(
            node_id,
            self.config
                .control
                .data_dir
                .join(format!("{node_id}.journal")),
        );
        agent.settle_interval = Duration::from_millis(m.settle_interval_ms);
        agent.lease_ttl = self.lease_ttl;
        agent.lease_margin = self.lease_ttl / 5;
        agent.cpu_debt_limit_ms = m.cpu_debt_limit_ms;
        agent.validate().map_err(|e| {
            bad(
                "metering",
                format!(
                    "{e} (settle_interval_ms = {}, lease_ttl_seconds = {}; the margin is a fifth of the ttl)",
                    m.settle_interval_ms, m.lease_ttl_seconds
                ),
            )
        })?;
        Ok(agent)
    }

    /// The control service's metering node (it charges the runtime's CPU): `<node_id>-control`
    /// when the node is named, else `control-<port>`.
    pub fn control_node_id(&self) -> String {
        match &self.config.metering.node_id {
            Some(id) => format!("{id}-control"),
            None => format!("control-{}", self.config.control.listen.port()),
        }
    }

    /// A runtime host's name (`host.id`, else `<machine's host name>-<admin port>`: unique per
    /// machine and kept across restarts); its CPU metering node has the same name.
    pub fn host_id(&self) -> String {
        self.config.host.id.clone().unwrap_or_else(|| {
            let name: String = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .unwrap_or_default()
                .trim()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(48)
                .collect();
            let name = if name.is_empty() {
                "runtime".to_owned()
            } else {
                name
            };
            format!("{name}-{}", self.config.host.admin_listen.port())
        })
    }

    /// This proxy node's name (its journal and leases are keyed by it).
    pub fn proxy_node_id(&self) -> String {
        self.config
            .metering
            .node_id
            .clone()
            .unwrap_or_else(|| format!("proxy-{}", self.config.proxy.listen.port()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_key() {
        let check = |toml: &str| {
            let cfg = Config::parse(toml, "t.toml").unwrap();
            Settings::from_config(cfg).unwrap_err()
        };
        let e = check("[metering]\nsettle_interval_ms = 5000\n");
        assert_eq!(e.key, "metering", "{e}");
        assert!(e.message.contains("settle_interval"), "{e}");
        let e = check("[payments]\nsuggested_deposit_usd = \"five\"\n");
        assert_eq!(e.key, "payments.suggested_deposit_usd", "{e}");
        let e = check("[payments]\nrealm = \"10.0.0.1\"\n");
        assert_eq!(e.key, "payments.realm", "{e}");
        for hold in ["0", "60", "86401"] {
            let e = check(&format!("[payments]\nstart_refund_hold_seconds = {hold}\n"));
            assert_eq!(e.key, "payments.start_refund_hold_seconds", "{e}");
        }
        let e = check("[payments]\nclose_watch_seconds = 0\n");
        assert_eq!(e.key, "payments.close_watch_seconds", "{e}");
        let e = check("[payments]\nwrite_off_margin_seconds = 5\n");
        assert_eq!(e.key, "payments.write_off_margin_seconds", "{e}");
        let e = check("[payments]\nclose_watch_seconds = 40\nwrite_off_margin_seconds = 60\n");
        assert_eq!(e.key, "payments.close_watch_seconds", "{e}");
        assert!(e.message.contains("half"), "{e}");
        let e = check("[public]\nmcp_url = \"http://10.0.0.7:8080/mcp\"\n");
        assert_eq!(e.key, "public.mcp_url", "{e}");
        let e = check("[metering]\nnode_id = \"../x\"\n");
        assert_eq!(e.key, "metering.node_id", "{e}");
        let e = check("[metering]\nlease_wait_ms = 100000000000\n");
        assert_eq!(e.key, "metering.lease_wait_ms", "{e}");
        let e = check("[shutdown]\ndrain_timeout_seconds = 99999999999\n");
        assert_eq!(e.key, "shutdown.drain_timeout_seconds", "{e}");
        let e = check("[control]\ninactivity_ttl_seconds = 0\n");
        assert_eq!(e.key, "control.inactivity_ttl_seconds", "{e}");
        let e = check("[proxy]\npayment_realms = [\"https://mcp.example.com\"]\n");
        assert_eq!(e.key, "proxy.payment_realms", "{e}");
        let e = check("[log]\nlevel = \"info,,==\"\n");
        assert_eq!(e.key, "log.level", "{e}");
        let e = check("[book]\npostgres_url = \"postgres://u@db/x\"\n");
        assert_eq!(e.key, "book.postgres_url", "{e}");
        assert!(e.message.contains("[redis]"), "{e}");
        let e = check(
            "[redis]\nurl = \"redis://127.0.0.1:1\"\n[book]\npostgres_url = \"postgres://u@db/x?sslmode=nonsense\"\n",
        );
        assert_eq!(e.key, "book.postgres_url", "{e}");
        let e = check("[log]\notlp_endpoint = \"collector:4318\"\n");
        assert_eq!(e.key, "log.otlp_endpoint", "{e}");
        assert!(e.message.contains("http://"), "{e}");
        assert!(Settings::from_config(Config::default()).is_ok());
    }
}
