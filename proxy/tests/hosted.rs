//! Agents' code behind the proxy: files → esbuild bundle → workerd process → route in Redis →
//! the proxy serves it; redeploys drop nothing; a process killed mid-request is a clear 503.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Node, eventually, gate, options_on};
use tollgate_app::adapters::{ChargeCpu, InflightHooks};
use tollgate_routes::{Route, RouteKey, RouteStore};
use tollgate_runtime::{
    DeploymentSpec, NoCpuSink, RuntimeConfig, RuntimeEvent, Supervisor, Toolchain,
};
use tollgate_testkit::TestRedis;

const APP: &str = r#"import { Hono } from 'hono'
const app = new Hono<{ Bindings: { VERSION: string } }>()
app.get('/', (c) => c.text('version ' + c.env.VERSION))
app.get('/spin', () => { let x = 0; for (;;) { x += 1 } })
app.get('/burn', (c) => {
  const ms = Number(c.req.query('ms') ?? '100'); const t = performance.now(); let x = 0
  while (performance.now() - t < ms) { x += Math.sqrt(x + 1) }
  return c.text('burned ' + (x > 0))
})
export default app
"#;

fn route(addr: SocketAddr, deployment: &str) -> Route {
    Route {
        upstreams: vec![addr],
        account_id: Some("acct1".into()),
        project_id: Some("proj1".into()),
        deployment_id: Some(deployment.into()),
    }
}

struct Rig {
    sup: Supervisor,
    events: tokio::sync::mpsc::UnboundedReceiver<RuntimeEvent>,
    code: String,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundler = tollgate_control::bundler_for(&t, dir.path().join("builds")).unwrap();
    let code = bundler
        .bundle_raw([("src/index.ts", APP)])
        .await
        .unwrap()
        .code;
    let cfg = RuntimeConfig {
        data_dir: dir.path().join("runtime"),
        min_drain: Duration::from_millis(100),
        sample_interval: Duration::from_millis(20),
        cpu_limit_per_request: Duration::from_millis(800),
        ..RuntimeConfig::default()
    };
    let (sup, events) = Supervisor::new(cfg, t, Arc::new(NoCpuSink)).unwrap();
    Rig {
        sup,
        events,
        code,
        _dir: dir,
    }
}

fn spec(rig: &Rig, id: &str, version: &str) -> DeploymentSpec {
    DeploymentSpec {
        deployment_id: id.into(),
        project_id: "proj1".into(),
        account_id: "acct1".into(),
        code: rig.code.clone(),
        compatibility_date: "2025-01-01".into(),
        env: BTreeMap::from([("VERSION".to_owned(), version.to_owned())]),
        databases: Vec::new(),
        d1: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployed_code_is_served_and_redeploys_drop_nothing() {
    let redis = TestRedis::start();
    let store = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    let key = RouteKey::slug("app").unwrap();
    let rig = rig().await;
    let first = rig.sup.start(spec(&rig, "dep1", "1")).await.unwrap();
    store.put(&key, &route(first.addr, "dep1")).await.unwrap();

    let node = Node::start(options_on(&redis, &[]));
    let c = node.client(&["app.localhost"]);
    let url = node.url("app.localhost", "/");
    assert!(
        eventually(Duration::from_secs(5), || async {
            matches!(c.get(&url).send().await, Ok(r) if r.status() == 200)
        })
        .await
    );
    assert_eq!(
        c.get(&url).send().await.unwrap().text().await.unwrap(),
        "version 1"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (c, url, stop) = (c.clone(), url.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let (mut ok, mut failures, mut seen) =
                (0u32, Vec::new(), std::collections::BTreeSet::new());
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok += 1;
                        seen.insert(r.text().await.unwrap());
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (ok, failures, seen)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut old = "dep1".to_owned();
    for v in 2..=3 {
        let id = format!("dep{v}");
        // The control service's switch: start, publish the route, drain and stop the old one.
        let started = rig
            .sup
            .start(spec(&rig, &id, &v.to_string()))
            .await
            .unwrap();
        store.put(&key, &route(started.addr, &id)).await.unwrap();
        rig.sup.stop(&old, true).await.unwrap();
        old = id;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (mut total, mut seen) = (0, std::collections::BTreeSet::new());
    for w in workers {
        let (ok, failures, s) = w.await.unwrap();
        assert!(
            failures.is_empty(),
            "failed requests during redeploys: {failures:?}"
        );
        total += ok;
        seen.extend(s);
    }
    assert!(total > 50, "only {total} requests");
    assert!(
        seen.contains("version 1") && seen.contains("version 3"),
        "{seen:?}"
    );
    rig.sup.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_mid_request_is_a_503_and_the_route_follows_its_restart() {
    let redis = TestRedis::start();
    let store = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    let key = RouteKey::slug("spin").unwrap();
    let mut rig = rig().await;
    let started = rig.sup.start(spec(&rig, "spin1", "1")).await.unwrap();
    store
        .put(&key, &route(started.addr, "spin1"))
        .await
        .unwrap();
    // Metered, with the proxy holding the runtime's in-flight guard for each request (what
    // `tollgate dev` wires): the CPU cap sees the request through the real proxy.
    let st: Arc<dyn tollgate_metering::Store> = common::money_on(&redis).await;
    st.credit("acct1", "deposit", 1_000_000_000_000)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = options_on(&redis, &[]);
    let mut g = gate(
        st,
        tollgate_balance_cache::AgentConfig::new("n1", dir.path().join("n1.journal")),
        "top up",
    );
    g.hooks = Some(Arc::new(InflightHooks(rig.sup.clone())));
    let node = Node::start_metered(o, g);
    let c = node.client(&["spin.localhost"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            matches!(c.get(node.url("spin.localhost", "/")).send().await, Ok(r) if r.status() == 200)
        })
        .await
    );

    let r = c
        .get(node.url("spin.localhost", "/spin"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:tollgate:problem:service-interrupted");
    assert!(v["hint"].as_str().unwrap().contains("CPU limit"), "{v}");

    // The control plane's job, done here: follow the restarted process.
    let ev = tokio::time::timeout(Duration::from_secs(10), rig.events.recv())
        .await
        .unwrap()
        .unwrap();
    let RuntimeEvent::Upstream { addr, .. } = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(
        rig.sup.status("spin1").unwrap().cpu_limit_kills,
        1,
        "killed at the cap"
    );
    store.put(&key, &route(addr, "spin1")).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            matches!(c.get(node.url("spin.localhost", "/")).send().await, Ok(r) if r.status() == 200)
        })
        .await
    );
    rig.sup.shutdown().await;
}

/// A metered proxy node and a runtime charging CPU through it; the `APP` deployed as
/// `burner` for `acct1` (credited `credit` p$) at `burn.localhost`, answering.
struct Burner {
    node: Node,
    st: Arc<dyn tollgate_metering::Store>,
    sup: Supervisor,
    c: reqwest::Client,
    _redis: TestRedis,
    _dir: tempfile::TempDir,
}

async fn burner(credit: i64, cpu_debt_limit_ms: u64) -> Burner {
    use tollgate_metering::Store;
    let redis = TestRedis::start();
    let routes = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    let st: Arc<dyn Store> = common::money_on(&redis).await;
    st.credit("acct1", "deposit", credit).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = options_on(&redis, &[]);
    let mut agent = tollgate_balance_cache::AgentConfig::new("n1", dir.path().join("n1.journal"));
    agent.cpu_debt_limit_ms = cpu_debt_limit_ms;
    let node = Node::start_metered(o, gate(st.clone(), agent, "top up"));
    let cache = node.cache.clone().unwrap();

    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let bundle = tollgate_control::bundler_for(&t, dir.path().join("builds"))
        .unwrap()
        .bundle_raw([("src/index.ts", APP)])
        .await
        .unwrap();
    let cfg = RuntimeConfig {
        data_dir: dir.path().join("runtime"),
        sample_interval: Duration::from_millis(20),
        ..RuntimeConfig::default()
    };
    let (sup, _events) = Supervisor::new(cfg, t, Arc::new(ChargeCpu(cache))).unwrap();
    let started = sup
        .start(DeploymentSpec {
            deployment_id: "burner".into(),
            project_id: "proj1".into(),
            account_id: "acct1".into(),
            code: bundle.code,
            compatibility_date: "2025-01-01".into(),
            env: BTreeMap::from([("VERSION".to_owned(), "1".to_owned())]),
            databases: Vec::new(),
            d1: None,
        })
        .await
        .unwrap();
    routes
        .put(
            &RouteKey::slug("burn").unwrap(),
            &route(started.addr, "burner"),
        )
        .await
        .unwrap();
    let c = node.client(&["burn.localhost"]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            matches!(c.get(node.url("burn.localhost", "/")).send().await, Ok(r) if r.status() == 200)
        })
        .await
    );
    Burner {
        node,
        st,
        sup,
        c,
        _redis: redis,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_is_charged_while_a_long_request_is_still_running() {
    let b = burner(5_000_000_000_000, 250).await; // $5
    let before = b.st.account("acct1").await.unwrap().unwrap().debited;
    let url = b.node.url("burn.localhost", "/burn?ms=2000");
    let c = b.c.clone();
    let long = tokio::spawn(async move { c.get(url).send().await.unwrap().status() });
    // While it burns, its CPU reaches the ledger: well over one request's price.
    let mut charged_mid_request = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        charged_mid_request = b.st.account("acct1").await.unwrap().unwrap().debited - before;
        if charged_mid_request > 100 * 12_500_000 {
            break; // > 100 ms of CPU at 12,500 p$/µs
        }
    }
    assert!(!long.is_finished(), "the request was still running");
    assert!(
        charged_mid_request > 100 * 12_500_000,
        "only {charged_mid_request} p$ charged while the request ran"
    );
    assert_eq!(long.await.unwrap(), 200);
    b.sup.shutdown().await;
}

/// A CPU-heavy request that outlives its owner's money is interrupted once the CPU debt passes
/// the limit: the account ends within the overspend bound, not 10 s of CPU later, and the
/// service answers 402 afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_heavy_request_past_an_empty_balance_is_interrupted_within_the_bound() {
    let credit = 10_000_000_000; // $0.01: 0.8 s of CPU
    let b = burner(credit, 100).await;
    let t0 = std::time::Instant::now();
    let status =
        b.c.get(b.node.url("burn.localhost", "/burn?ms=10000"))
            .send()
            .await
            .unwrap()
            .status();
    let took = t0.elapsed();
    assert_ne!(status, 200, "the request ran to the end");
    assert!(
        took < Duration::from_secs(5),
        "interrupted only after {took:?}"
    );
    // Once the settle that carries the last CPU lands, the account is where the bound says.
    let t = std::time::Instant::now();
    let st = loop {
        let st = b.st.account("acct1").await.unwrap().unwrap();
        if st.status == tollgate_metering::Status::Suspended || t.elapsed() > Duration::from_secs(2)
        {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // the last samples settle
    let st2 = b.st.account("acct1").await.unwrap().unwrap();
    assert!(st2.holds_invariant(), "{st2:?}");
    // D + p·K·(T_settle + T_s + R): 100 ms of debt, then 2 cores × (50 + 20 + 100 ms).
    let bound = 100_000 * 12_500 + 12_500 * 2 * 170_000;
    let overspend = st2.debited - st2.credited;
    println!(
        "interrupted after {took:?} ({status}); overspend {overspend} p$, bound {bound} p$; {st:?}"
    );
    assert!(
        overspend > 0,
        "the request used the whole balance and some debt"
    );
    assert!(
        overspend <= bound,
        "overspent {overspend} p$, bound {bound} p$"
    );
    // New requests: 402, not the service.
    let r =
        b.c.get(b.node.url("burn.localhost", "/"))
            .send()
            .await
            .unwrap();
    assert_eq!(r.status(), 402);
    let (logs, _) = b.sup.logs("burner", 0, 100).unwrap();
    assert!(
        logs.iter()
            .any(|l| l.message.contains("prepaid balance is used up")),
        "{logs:?}"
    );
    b.sup.shutdown().await;
}
