//! The first end-to-end path without the MCP/MPP front (issues #5, #6): an account with credit
//! deploys through the control service; its URL answers through the metered proxy; requests and
//! CPU are charged; the service answers 402 when the money is gone and comes back on a top-up.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Node, eventually, gate, options_on};
use tollgate_app::adapters::{ChargeCpu, InflightHooks};
use tollgate_balance_cache::AgentConfig;
use tollgate_control::{Control, ControlConfig, ControlStore, DeployRequest, RedisControlStore};
use tollgate_metering::Store;
use tollgate_routes::RouteStore;
use tollgate_runtime::{RuntimeConfig, Supervisor, Toolchain};
use tollgate_testkit::TestRedis;

const PRICE: i64 = 500_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_serve_meter_suspend_and_resume() {
    // One Redis, or a cluster (TOLLGATE_TEST_REDIS=cluster).
    let redis = TestRedis::start();
    let dir = tempfile::tempdir().unwrap();
    let money: Arc<dyn Store> = common::money_on(&redis).await;
    // The agent paid: $0.01 of credit (what payments will do on a voucher).
    money
        .credit("agent-1", "voucher-1", 10_000_000_000)
        .await
        .unwrap();

    let t = Toolchain::ensure(&Toolchain::source_tree_dir()).unwrap();
    let o = options_on(&redis, &[]);
    let mut agent = AgentConfig::new("edge-1", dir.path().join("edge-1.journal"));
    agent.min_lease = PRICE;
    agent.max_lease = 20 * PRICE;
    // As `tollgate dev` wires it: the runtime charges its CPU to the node's cache, and the
    // proxy holds its in-flight guard per request.
    let runtime = std::sync::Mutex::new(None);
    let node = Node::start_with(
        o,
        Some(gate(money.clone(), agent, "call top_up")),
        |cache| {
            let (sup, events) = Supervisor::new(
                RuntimeConfig {
                    data_dir: dir.path().join("runtime"),
                    sample_interval: Duration::from_millis(20),
                    ..RuntimeConfig::default()
                },
                t.clone(),
                Arc::new(ChargeCpu(cache.clone())),
            )?;
            let hooks = Arc::new(InflightHooks(sup.clone()));
            *runtime.lock().unwrap() = Some((sup, events));
            Ok(Some(hooks as Arc<dyn tollgate_proxy::RequestHooks>))
        },
    );
    let (sup, events) = runtime.lock().unwrap().take().unwrap();

    let store: Arc<dyn ControlStore> = Arc::new(
        RedisControlStore::connect(redis.target(), "tollgate")
            .await
            .unwrap(),
    );
    let control = Control::new(
        store,
        tollgate_control::bundler_for(&t, dir.path().join("builds")).unwrap(),
        sup.clone(),
        Arc::new(
            RouteStore::connect(redis.target(), "tollgate")
                .await
                .unwrap(),
        ),
        ControlConfig {
            url_template: format!("http://{{slug}}.localhost:{}", node.addr.port()),
            ..ControlConfig::default()
        },
    );
    tokio::spawn(control.clone().follow_runtime(events));

    let out = control
        .deploy(
            "agent-1",
            DeployRequest {
                files: Some(BTreeMap::from([(
                    "src/index.ts".to_owned(),
                    "import { Hono } from 'hono'\nconst app = new Hono()\napp.get('/', (c) => c.text('paid for by an agent'))\napp.get('/work', (c) => { let x = 0; for (let i = 0; i < 3e7; i++) x += i; return c.text(String(x)) })\nexport default app\n".to_owned(),
                )])),
                project_name: Some("agent-app".into()),
                ..DeployRequest::default()
            },
        )
        .await
        .unwrap();
    let host = format!("{}.localhost", out.slug);
    assert_eq!(out.url, format!("http://{host}:{}", node.addr.port()));
    let c = node.client(&[&host]);
    assert!(
        eventually(Duration::from_secs(5), || async {
            matches!(c.get(&out.url).send().await, Ok(r) if r.status() == 200)
        })
        .await
    );
    assert_eq!(
        c.get(&out.url).send().await.unwrap().text().await.unwrap(),
        "paid for by an agent"
    );

    // CPU-heavy requests drain the $0.01 quickly (12.5 µ$ per CPU-ms); then 402.
    let mut served = 0;
    let mut suspended = false;
    for _ in 0..400 {
        let r = c
            .get(format!("{}/work", out.url))
            .header("accept", "application/json")
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => served += 1,
            402 => {
                let v: serde_json::Value = r.json().await.unwrap();
                assert_eq!(v["type"], "urn:tollgate:problem:service-suspended");
                suspended = true;
                break;
            }
            s => panic!("unexpected {s}"),
        }
    }
    assert!(
        suspended,
        "never suspended after {served} CPU-heavy requests"
    );
    assert!(served > 0);

    // The proxies' counts reach the project's usage (flushed every second), with its CPU.
    let admitted = served as u64 + 2; // the two `/` requests above
    let mut view = None;
    for _ in 0..50 {
        let v = control
            .get_project("agent-1", &out.project_id)
            .await
            .unwrap();
        if v.usage.hour.requests >= admitted {
            view = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = view.expect("usage counted");
    assert_eq!(view.usage.day.requests, view.usage.hour.requests);
    assert!(view.usage.hour.bytes_out > 0);
    assert!(view.usage.last_request_ms.is_some());
    assert!(view.usage.cpu_ms_live > 0, "{:?}", view.usage);

    // A top-up brings it back.
    money
        .credit("agent-1", "voucher-2", 10_000_000_000)
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(3), || async {
            matches!(c.get(&out.url).send().await, Ok(r) if r.status() == 200)
        })
        .await,
        "resumed after the top-up"
    );

    node.stop(tollgate_proxy::Stop::Graceful);
    let a = money.account("agent-1").await.unwrap().unwrap();
    // Requests alone cost (served + a few) × 0.5 µ$; the rest of the first $0.01 was CPU.
    assert!(
        a.debited > 10_000_000_000 - 20 * PRICE,
        "debited {} p$",
        a.debited
    );
    assert_eq!(a.credited - a.debited, a.available + a.leased);
    sup.shutdown().await;
}
