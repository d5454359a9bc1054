//! Configuration sections the proxy owns. The binary composes them into one TOML file model;
//! every section denies unknown fields, and every value is checked while it is parsed, so that
//! `tollgate check-config` can point at the file, line and column of the first bad value.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, de::Error as _};
use tollgate_routes::{Route, normalize_host_owned};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address the public HTTP listener binds.
    pub listen: SocketAddr,
    /// Worker threads of the proxy runtime.
    #[serde(deserialize_with = "de_threads")]
    pub threads: usize,
    /// Tokio work stealing between proxy threads. Off (the default): each thread runs its own
    /// single-threaded runtime, like nginx workers: less synchronisation, +7 % requests/s on
    /// one core (docs/benchmarks.md).
    pub work_stealing: bool,
    /// Platform services answer at `<slug>.<base_domain>`.
    #[serde(deserialize_with = "de_hostname")]
    pub base_domain: String,
    /// Request line plus headers, in bytes; larger requests get 431.
    #[serde(deserialize_with = "de_nonzero_usize")]
    pub max_request_header_bytes: usize,
    /// A request header (HTTP/1) must arrive whole within this from the connection's opening or
    /// the request's first byte; else the connection is closed (slowloris, idle connections).
    #[serde(deserialize_with = "de_seconds")]
    pub header_timeout_seconds: f64,
    /// Request body, in bytes; larger bodies get 413.
    pub max_body_bytes: u64,
    #[serde(deserialize_with = "de_seconds")]
    pub upstream_connect_timeout_seconds: f64,
    /// Longest wait for the upstream to send anything (headers or the next body chunk).
    #[serde(deserialize_with = "de_seconds")]
    pub upstream_read_timeout_seconds: f64,
    #[serde(deserialize_with = "de_seconds")]
    pub upstream_write_timeout_seconds: f64,
    /// Idle upstream connections are kept this long for reuse.
    #[serde(deserialize_with = "de_seconds")]
    pub upstream_idle_timeout_seconds: f64,
    /// Keep a client's `X-Forwarded-For` (and append to it) instead of replacing it. Only safe
    /// behind a trusted load balancer that sets it itself.
    pub trust_forwarded_headers: bool,
    /// Socket used to hand listeners to a new process on SIGQUIT (zero-downtime upgrade).
    pub upgrade_sock: Option<PathBuf>,
    /// MPP realms of the platform itself. An `Authorization: Payment` (or
    /// `Payment-Authorization`) credential issued for one of them is never forwarded to a
    /// hosted service: a tenant could replay it as the visitor's identity. Credentials of any
    /// other realm (tenants running MPP themselves) pass through. The binary adds the payment
    /// realm and its services realm.
    pub payment_realms: Vec<String>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            threads: 1,
            work_stealing: false,
            base_domain: "localhost".into(),
            max_request_header_bytes: 32 * 1024,
            header_timeout_seconds: 10.0,
            max_body_bytes: 10 * 1024 * 1024,
            upstream_connect_timeout_seconds: 5.0,
            upstream_read_timeout_seconds: 60.0,
            upstream_write_timeout_seconds: 60.0,
            upstream_idle_timeout_seconds: 60.0,
            trust_forwarded_headers: false,
            upgrade_sock: None,
            payment_realms: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/metrics`, `/livez`, `/readyz`. Keep it off the public interface.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// Where the shared state lives: one Redis (`url`) or a Redis Cluster (`cluster`).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "RawRedisConfig")]
pub struct RedisConfig {
    /// `redis://host:port/db`, `rediss://…` or `unix://…`; empty with `cluster`.
    pub url: String,
    /// A Redis Cluster: URLs of some of its members (any one that answers finds the rest).
    pub cluster: Vec<String>,
    /// Cluster only: how many replicas must hold a write before it is acknowledged (1: a
    /// master's failover loses nothing acknowledged; 0: it may lose its last writes).
    pub replica_acks: u32,
    /// Cluster only: how many shards money is laid out in. Fixed by the first process that
    /// stores money in the cluster; every process must name the same.
    pub money_shards: u32,
    pub key_prefix: String,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedisConfig {
    #[serde(default, deserialize_with = "de_redis_url")]
    url: Option<String>,
    #[serde(default, deserialize_with = "de_cluster_members")]
    cluster: Vec<String>,
    #[serde(default = "default_replica_acks")]
    replica_acks: u32,
    #[serde(default = "default_money_shards", deserialize_with = "de_money_shards")]
    money_shards: u32,
    #[serde(default = "default_prefix")]
    key_prefix: String,
    #[serde(default = "default_ping_interval_ms")]
    ping_interval_ms: u64,
    #[serde(default = "default_ping_timeout_ms")]
    ping_timeout_ms: u64,
}

impl TryFrom<RawRedisConfig> for RedisConfig {
    type Error = String;
    fn try_from(r: RawRedisConfig) -> Result<Self, String> {
        let url = match (r.url, r.cluster.is_empty()) {
            (Some(_), false) => {
                return Err(
                    "set either url (one Redis) or cluster (a Redis Cluster), not both".into(),
                );
            }
            (None, true) => {
                return Err(
                    "missing field `url` (one Redis) or `cluster` (a Redis Cluster's members)"
                        .into(),
                );
            }
            (Some(u), true) => u,
            (None, false) => String::new(),
        };
        let mut cfg = RedisConfig::new(&url);
        cfg.set_cluster(r.cluster)?;
        cfg.replica_acks = r.replica_acks;
        cfg.money_shards = r.money_shards;
        if !cfg.cluster.is_empty() {
            check_key_prefix(&r.key_prefix)?;
        }
        cfg.key_prefix = r.key_prefix;
        cfg.ping_interval_ms = r.ping_interval_ms;
        cfg.ping_timeout_ms = r.ping_timeout_ms;
        Ok(cfg)
    }
}

fn de_redis_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    check_redis_url(&s).map_err(D::Error::custom)?;
    Ok(Some(s))
}

fn de_cluster_members<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let members = Vec::<String>::deserialize(d)?;
    RedisConfig::new("")
        .set_cluster(members.clone())
        .map_err(D::Error::custom)?;
    Ok(members)
}

fn de_money_shards<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = u32::deserialize(d)?;
    check_cluster_layout(n).map_err(D::Error::custom)?;
    Ok(n)
}

/// A key prefix on a Redis Cluster: it becomes hash tags (`{prefix}`, `{prefix:m3}`), so
/// braces would move keys into other slots. (One Redis takes any prefix, as it always did.)
pub fn check_key_prefix(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 64 || p.chars().any(|c| c.is_whitespace() || c == '{' || c == '}')
    {
        return Err(format!(
            "key_prefix {p:?}: expected 1 to 64 characters without spaces or braces, such as \"tollgate\""
        ));
    }
    Ok(())
}

/// Money is laid out in 1..=1024 shards.
pub fn check_cluster_layout(money_shards: u32) -> Result<(), String> {
    if (1..=1024).contains(&money_shards) {
        Ok(())
    } else {
        Err(format!(
            "money_shards must be 1..=1024, got {money_shards} (the default, 32, suits up to about 32 masters)"
        ))
    }
}

impl RedisConfig {
    pub fn new(url: &str) -> Self {
        RedisConfig {
            url: url.to_owned(),
            cluster: Vec::new(),
            replica_acks: default_replica_acks(),
            money_shards: default_money_shards(),
            key_prefix: default_prefix(),
            ping_interval_ms: default_ping_interval_ms(),
            ping_timeout_ms: default_ping_timeout_ms(),
        }
    }

    /// A Redis Cluster instead of one Redis (`url` is cleared); members are checked like
    /// `url`.
    pub fn set_cluster(&mut self, members: Vec<String>) -> Result<(), String> {
        if members.is_empty() {
            return Ok(());
        }
        for m in &members {
            check_redis_url(m).map_err(|e| format!("cluster: {e}"))?;
            if m.starts_with("unix:") || m.starts_with("redis+unix:") {
                return Err(format!(
                    "cluster: '{m}': a cluster's members are reached over TCP (redis:// or rediss://)"
                ));
            }
        }
        self.url.clear();
        self.cluster = members;
        Ok(())
    }

    /// Where every key family but money connects.
    pub fn target(&self) -> tollgate_kv::Target {
        if self.cluster.is_empty() {
            tollgate_kv::Target::One(self.url.clone())
        } else {
            tollgate_kv::Target::Cluster {
                seeds: self.cluster.clone(),
                replica_acks: self.replica_acks,
            }
        }
    }

    /// For messages: `redis.url …` or `redis.cluster […]`.
    pub fn describe(&self) -> String {
        if self.cluster.is_empty() {
            format!("redis.url {}", self.url)
        } else {
            format!("redis.cluster [{}]", self.cluster.join(", "))
        }
    }
}

fn default_replica_acks() -> u32 {
    1
}
fn default_money_shards() -> u32 {
    32
}
fn default_prefix() -> String {
    "tollgate".into()
}
fn default_ping_interval_ms() -> u64 {
    1000
}
fn default_ping_timeout_ms() -> u64 {
    1000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// After SIGTERM, keep accepting (with `/readyz` failing) this long so load balancers stop
    /// sending new traffic first.
    #[serde(deserialize_with = "de_nonneg_seconds")]
    pub drain_delay_seconds: f64,
    /// Then stop accepting and wait at most this long for in-flight requests.
    pub drain_timeout_seconds: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_delay_seconds: 0.0,
            drain_timeout_seconds: 30,
        }
    }
}

/// A route from the config file or `--route`: the proxy fronts any HTTP upstream with it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticRoute {
    #[serde(deserialize_with = "de_hostname")]
    pub host: String,
    #[serde(deserialize_with = "de_upstreams")]
    pub upstreams: Vec<SocketAddr>,
}

impl StaticRoute {
    /// Parses `HOST=ADDR[,ADDR…]` as given to `--route`.
    pub fn parse_flag(s: &str) -> Result<Self, String> {
        let (host, addrs) = s
            .split_once('=')
            .ok_or_else(|| format!("'{s}': expected HOST=ADDR[,ADDR...]"))?;
        let host = normalize_host_owned(host).map_err(|e| format!("'{host}': {e}"))?;
        let upstreams = addrs
            .split(',')
            .map(|a| {
                a.trim()
                    .parse::<SocketAddr>()
                    .map_err(|_| format!("'{a}': expected IP:PORT, such as 127.0.0.1:3000"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let route = StaticRoute { host, upstreams };
        route.to_route().validate().map_err(|e| e.to_string())?;
        Ok(route)
    }

    pub fn to_route(&self) -> Route {
        Route {
            upstreams: self.upstreams.clone(),
            account_id: None,
            project_id: None,
            deployment_id: None,
        }
    }
}

fn de_hostname<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    normalize_host_owned(&s).map_err(|e| D::Error::custom(format!("invalid host name '{s}': {e}")))
}

fn de_threads<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 || n > 256 {
        return Err(D::Error::custom("threads must be between 1 and 256"));
    }
    Ok(n)
}

fn de_nonzero_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = usize::deserialize(d)?;
    if n == 0 {
        return Err(D::Error::custom("must be greater than 0"));
    }
    Ok(n)
}

fn de_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let s = f64::deserialize(d)?;
    if !s.is_finite() || s <= 0.0 || s > 86_400.0 {
        return Err(D::Error::custom(
            "must be a number of seconds greater than 0 and at most 86400",
        ));
    }
    Ok(s)
}

fn de_nonneg_seconds<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let s = f64::deserialize(d)?;
    if !s.is_finite() || !(0.0..=3600.0).contains(&s) {
        return Err(D::Error::custom(
            "must be a number of seconds from 0 to 3600",
        ));
    }
    Ok(s)
}

fn de_upstreams<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    let v = Vec::<SocketAddr>::deserialize(d)?;
    if v.is_empty() {
        return Err(D::Error::custom("a route needs at least one upstream"));
    }
    if v.len() > Route::MAX_UPSTREAMS {
        return Err(D::Error::custom(format!(
            "a route may have at most {} upstreams",
            Route::MAX_UPSTREAMS
        )));
    }
    Ok(v)
}

/// Also used for values from the environment and the command line.
pub fn check_redis_url(s: &str) -> Result<(), String> {
    if ["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|p| s.starts_with(p))
    {
        Ok(())
    } else {
        Err(format!(
            "invalid Redis URL '{s}': expected redis://HOST:PORT/ (or rediss://, unix://)"
        ))
    }
}
