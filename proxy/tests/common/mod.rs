//! Harness: the proxy in-process on free ports, real upstreams, real Redis.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tollgate_app::node::{GateSpec, PreparedNode, ProxyNode};
use tollgate_proxy::{ProxyOptions, RedisConfig, StaticRoute, Stop};
use tollgate_testkit::free_addr;

/// A proxy node as the application builds it (`tollgate_app::node`), on a runtime of its own.
pub struct Node {
    pub addr: SocketAddr,
    /// The node's balance cache, when metering is on.
    pub cache: Option<std::sync::Arc<tollgate_balance_cache::BalanceCache>>,
    pub admin: SocketAddr,
    node: Option<ProxyNode>,
    rt: Option<tokio::runtime::Runtime>,
    stopping: Option<tokio::task::JoinHandle<()>>,
}

/// [`options`] on the suite's Redis: one, or a cluster (`TOLLGATE_TEST_REDIS=cluster`).
/// The money store on `redis`: one Redis's, or a cluster's (as the processes open it).
pub async fn money_on(
    redis: &tollgate_testkit::TestRedis,
) -> std::sync::Arc<dyn tollgate_metering::Store> {
    tollgate_metering::connect_shared(
        &redis.target(),
        "tollgate",
        Duration::from_secs(10),
        tollgate_metering::DEFAULT_SHARDS,
    )
    .await
    .unwrap()
}

pub fn options_on(
    redis: &tollgate_testkit::TestRedis,
    routes: &[(&str, SocketAddr)],
) -> ProxyOptions {
    let mut o = options(None, routes);
    let mut r = match redis {
        tollgate_testkit::TestRedis::One(one) => RedisConfig::new(&one.url()),
        tollgate_testkit::TestRedis::Cluster(c) => {
            let mut r = RedisConfig::new("");
            r.set_cluster(c.urls()).unwrap();
            r
        }
    };
    r.ping_interval_ms = 100;
    r.ping_timeout_ms = 200;
    o.redis = Some(r);
    o
}

pub fn options(redis_url: Option<&str>, routes: &[(&str, SocketAddr)]) -> ProxyOptions {
    let mut o = ProxyOptions::default();
    o.proxy.listen = free_addr();
    o.admin.listen = free_addr();
    o.proxy.upstream_read_timeout_seconds = 5.0;
    // Many proxies start and stop in one test process. Pingora's no-steal runtime finds its
    // threads' runtimes through a thread-local keyed by thread id, which a later runtime's
    // thread can inherit once the first is gone; one proxy per process (production, and the
    // binary tests in tests/cli.rs) is unaffected. The work-stealing runtime has no such state.
    o.proxy.work_stealing = true;
    o.shutdown.drain_timeout_seconds = 3;
    o.redis = redis_url.map(|u| {
        let mut r = RedisConfig::new(u);
        r.ping_interval_ms = 100;
        r.ping_timeout_ms = 200;
        r
    });
    o.routes = routes
        .iter()
        .map(|(h, a)| StaticRoute {
            host: (*h).to_owned(),
            upstreams: vec![*a],
        })
        .collect();
    o
}

impl Node {
    /// A node without metering.
    pub fn start(opts: ProxyOptions) -> Node {
        Node::start_with(opts, None, |_| Ok(None))
    }

    /// A node whose money gate runs a metering node of its own.
    pub fn start_metered(opts: ProxyOptions, gate: GateSpec) -> Node {
        Node::start_with(opts, Some(gate), |_| Ok(None))
    }

    /// The general case: `hooks` made from the metering node's cache (a runtime charged there).
    pub fn start_with(
        mut opts: ProxyOptions,
        gate: Option<GateSpec>,
        hooks: impl Fn(
            &std::sync::Arc<tollgate_balance_cache::BalanceCache>,
        )
            -> anyhow::Result<Option<std::sync::Arc<dyn tollgate_proxy::RequestHooks>>>,
    ) -> Node {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // A port that was free a moment ago can be taken meanwhile (outgoing connections get
        // ephemeral ports from the same range): pick new ones and try again.
        let mut tries = 0;
        let prepared = loop {
            match PreparedNode::prepare_with(opts.clone(), gate.clone(), rt.handle(), &hooks) {
                Ok(p) => break p,
                Err(e) if tries < 5 && format!("{e:#}").contains("in use") => {
                    tries += 1;
                    opts.proxy.listen = free_addr();
                    opts.admin.listen = free_addr();
                }
                Err(e) => panic!("prepare: {e:#}"),
            }
        };
        let addr = opts.proxy.listen;
        let admin = opts.admin.listen;
        let cache = prepared.cache().cloned();
        let node = prepared.start(rt.handle()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "proxy did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        Node {
            addr,
            cache,
            admin,
            node: Some(node),
            rt: Some(rt),
            stopping: None,
        }
    }

    /// The node's TLS certificates (to reload them as SIGHUP does).
    pub fn certificates(&self) -> Option<std::sync::Arc<tollgate_proxy::Certificates>> {
        self.node.as_ref().and_then(|n| n.proxy.certificates())
    }

    pub fn url(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.addr.port())
    }

    /// A client that sends `*.localhost` / any listed name to this node.
    pub fn client(&self, hosts: &[&str]) -> reqwest::Client {
        let mut b = reqwest::Client::builder().no_proxy();
        for h in hosts {
            b = b.resolve(h, self.addr);
        }
        b.build().unwrap()
    }

    /// Starts stopping in the application's order (intake, drain, final settle, flush) and
    /// returns at once; [`Node::stop`] waits for it.
    pub fn begin_stop(&mut self, how: Stop) {
        if let (Some(node), Some(rt)) = (self.node.take(), self.rt.as_ref()) {
            self.stopping = Some(rt.spawn(node.shutdown(how)));
        }
    }

    /// Stops (or finishes a stop begun earlier) and waits; returns how long it took.
    pub fn stop(mut self, how: Stop) -> Duration {
        let t = Instant::now();
        self.begin_stop(how);
        let (stopping, rt) = (self.stopping.take(), self.rt.take());
        // On a thread of its own: the caller may be on another runtime's worker.
        std::thread::spawn(move || {
            if let (Some(h), Some(rt)) = (stopping, rt) {
                let _ = rt.block_on(h);
                rt.shutdown_timeout(Duration::from_secs(1));
            }
        })
        .join()
        .unwrap();
        t.elapsed()
    }

    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let r = reqwest::get(format!("http://{}/readyz", self.admin))
            .await
            .unwrap();
        let code = r.status().as_u16();
        (code, r.json().await.unwrap())
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.admin))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            node.abort();
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A money gate over `store` (a metering node with `agent`'s settings; requests wait up to 2 s
/// for a node's first lease).
pub fn gate(
    store: std::sync::Arc<dyn tollgate_metering::Store>,
    agent: tollgate_balance_cache::AgentConfig,
    top_up: &str,
) -> GateSpec {
    GateSpec {
        metering: tollgate_app::metering::MeteringSpec {
            store: tollgate_app::metering::StoreSource::Ready(store),
            prices: tollgate_metering::Prices::default(),
            agent,
        },
        lease_wait: Duration::from_secs(2),
        top_up: top_up.to_owned(),
        hooks: None,
        desk: None,
    }
}

/// Sends raw bytes and reads the whole answer (the proxy closes after its own answers).
pub fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Polls `f` until it is true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// The value of an unlabelled (or fully labelled) series in exposition text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
