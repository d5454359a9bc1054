//! Runtime hosts for the suites (tests/hosts.rs, tests/faults.rs): `tollgate runtime`
//! processes and a control service (as a library) placing deployments on them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate_control::hosts::{HostKeys, HostsRuntime, HostsRuntimeConfig};
use tollgate_control::{Control, ControlConfig, ControlStore, RedisControlStore};
use tollgate_routes::RouteStore;
use tollgate_runtime::Toolchain;
use tollgate_testkit::{TestRedis, free_addr};

use super::{Proc, RedisAt, bin, start_listening};

pub struct Host {
    pub proc: Proc,
    pub id: String,
    pub log: PathBuf,
}

pub fn start_host(dir: &Path, redis: &(impl RedisAt + ?Sized), id: &str) -> Host {
    let admin = free_addr();
    let cfg = dir.join(format!("{id}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[redis]\n{}\n[host]\nid = \"{id}\"\nadmin_listen = \"{admin}\"\nlease_ms = 2000\nhandover_seconds = 15\n",
            redis.toml()
        ),
    )
    .unwrap();
    let log = dir.join(format!("{id}.log"));
    // Appended to: a host started again under the same id keeps its earlier log.
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .unwrap();
    let mut c = bin();
    // Its own data dir, kept across restarts of the same id (its CPU journal replays).
    c.env("TOLLGATE_DATA_DIR", dir.join(format!("{id}-data")))
        .env("TOLLGATE_LOG_LEVEL", "info")
        .stderr(log_file)
        .args(["runtime", "--config"])
        .arg(&cfg);
    let mut proc = Proc(c.spawn().unwrap());
    let http = reqwest::blocking::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if matches!(http.get(format!("http://{admin}/readyz")).send(), Ok(r) if r.status() == 200) {
            break;
        }
        assert!(
            proc.0.try_wait().unwrap().is_none(),
            "host {id} exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "host {id} never became ready");
        std::thread::sleep(Duration::from_millis(50));
    }
    Host {
        proc,
        id: id.to_owned(),
        log,
    }
}

pub fn files(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(
        "src/index.js".to_owned(),
        format!(
            "export default {{ async fetch() {{ console.log('served by {name}'); return new Response('hello from {name}') }} }}\n"
        ),
    )])
}

/// A control service over the suite's Redis, its deployments on runtime hosts.
pub async fn control(
    redis: impl Into<tollgate_kv::Target>,
    proxy: SocketAddr,
    dir: &Path,
) -> (
    Arc<Control>,
    Arc<HostsRuntime>,
    tokio::sync::watch::Sender<bool>,
    prometheus::Registry,
) {
    let redis = &redis.into();
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let bundler = tollgate_control::bundler_for(&t, dir.join("builds")).unwrap();
    let store: Arc<dyn ControlStore> =
        Arc::new(RedisControlStore::connect(redis, "tollgate").await.unwrap());
    let routes = RouteStore::connect(redis, "tollgate").await.unwrap();
    let (hosts, events) = HostsRuntime::connect(
        redis,
        "tollgate",
        HostsRuntimeConfig {
            round: Duration::from_millis(100),
            ..HostsRuntimeConfig::default()
        },
    )
    .await
    .unwrap();
    let registry = prometheus::Registry::new();
    hosts.register_metrics(&registry).unwrap();
    let control = Control::new(
        store,
        bundler,
        hosts.clone(),
        Arc::new(routes),
        ControlConfig {
            url_template: format!("http://{{slug}}.localhost:{}", proxy.port()),
            ..ControlConfig::default()
        },
    );
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    tokio::spawn(control.clone().follow_runtime(events));
    tokio::spawn(hosts.clone().run(stop.clone()));
    // The route repair, as `tollgate control` runs it (faster here), under the suites' load.
    tokio::spawn({
        let (control, mut stop) = (control.clone(), stop);
        async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let _ = control.repair_routes().await;
            }
        }
    });
    (control, hosts, stop_tx, registry)
}

/// One sample of `registry`'s text exposition.
pub fn sample(registry: &prometheus::Registry, series: &str) -> f64 {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}

/// Where each deployment is placed (deployment → host).
pub fn placed(redis: &impl Hashes) -> HashMap<String, String> {
    redis.hash(&redis.host_keys("tollgate").placed())
}

/// Reads a hash of the suite's Redis (one, or a cluster).
pub trait Hashes {
    fn hash(&self, key: &str) -> HashMap<String, String>;
    /// The runtime hosts' keys there.
    fn host_keys(&self, prefix: &str) -> HostKeys;
}
impl Hashes for TestRedis {
    fn hash(&self, key: &str) -> HashMap<String, String> {
        self.hgetall(key)
    }
    fn host_keys(&self, prefix: &str) -> HostKeys {
        HostKeys::for_target(&self.target(), prefix)
    }
}
impl Hashes for tollgate_testkit::RedisServer {
    fn hash(&self, key: &str) -> HashMap<String, String> {
        redis::Commands::hgetall(&mut self.conn(), key).unwrap()
    }
    fn host_keys(&self, prefix: &str) -> HostKeys {
        HostKeys::new(prefix)
    }
}

/// The ledger of the money store on `redis` (one Redis's stream, or a cluster's shards').
pub async fn ledger(redis: &TestRedis) -> Vec<tollgate_metering::LedgerEntry> {
    let ttl = Duration::from_secs(30);
    let shards = tollgate_metering::DEFAULT_SHARDS;
    tollgate_metering::connect_shared(&redis.target(), "tollgate", ttl, shards)
        .await
        .unwrap()
        .ledger()
        .await
        .unwrap()
}

/// A `tollgate proxy` following the routes in `redis`.
pub fn start_proxy(redis: &(impl RedisAt + ?Sized)) -> (Proc, SocketAddr) {
    start_listening(|listen| {
        let mut c = bin();
        c.env("TOLLGATE_PUBLIC_MCP_URL", "http://mcp.localhost")
            .args(["proxy", "--listen", &listen.to_string()])
            .args(["--admin-listen", &free_addr().to_string()]);
        redis.name(&mut c);
        c
    })
}
