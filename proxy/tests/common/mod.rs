//! Harness: the proxy in-process on free ports, real upstreams, real Redis.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use tollgate_proxy::{Proxy, ProxyOptions, RedisConfig, StaticRoute, Stop, StopHandle};
use tollgate_testkit::free_addr;

pub struct Node {
    pub addr: SocketAddr,
    /// The node's balance cache, when metering is on.
    pub cache: Option<std::sync::Arc<tollgate_balance_cache::BalanceCache>>,
    pub admin: SocketAddr,
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
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
    pub fn start(mut opts: ProxyOptions) -> Node {
        // A port that was free a moment ago can be taken meanwhile (outgoing connections get
        // ephemeral ports from the same range): pick new ones and try again.
        let mut tries = 0;
        let proxy = loop {
            match Proxy::prepare(opts.clone()) {
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
        let stop = proxy.stop_handle();
        let cache = proxy.balance_cache();
        let thread = std::thread::spawn(move || proxy.run());
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "proxy did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
        Node {
            addr,
            cache,
            admin,
            stop,
            thread: Some(thread),
        }
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

    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Stops and waits; returns how long the stop took.
    pub fn stop(mut self, how: Stop) -> Duration {
        let t = Instant::now();
        self.stop.stop(how);
        if let Some(th) = self.thread.take() {
            th.join().unwrap().unwrap();
        }
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
        if let Some(th) = self.thread.take() {
            self.stop.stop(Stop::Fast);
            let _ = th.join();
        }
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
