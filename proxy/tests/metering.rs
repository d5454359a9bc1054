//! The money gate with real Redis: requests paid from leases, 402 (or the suspension page) when
//! the balance is gone, resumption on credit, 503 (never 402) when Redis is down and the lease is
//! spent, and exact request debits across two proxy nodes. On one Redis, or a Redis Cluster
//! with `TOLLGATE_TEST_REDIS=cluster` (all but the Redis outage, which stops one Redis).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Node, eventually, gate, metric, options_on};
use tollgate_app::node::GateSpec;
use tollgate_balance_cache::AgentConfig;
use tollgate_metering::{Status, Store};
use tollgate_routes::{Route, RouteKey, RouteStore};
use tollgate_testkit::{RedisServer, TestRedis, Upstream};

const PRICE: i64 = 500_000; // one request at the default price, in p$

fn route(addr: SocketAddr, account: Option<&str>) -> Route {
    Route {
        upstreams: vec![addr],
        account_id: account.map(str::to_owned),
        project_id: Some("proj".into()),
        deployment_id: Some("dep".into()),
    }
}

use common::money_on as store;

/// A metered node `node` on `redis`, with leases of at most `max_lease`.
fn metered(
    redis: &TestRedis,
    store: Arc<dyn Store>,
    node: &str,
    dir: &tempfile::TempDir,
    max_lease: i64,
) -> Node {
    let o = options_on(redis, &[]);
    let mut agent = AgentConfig::new(node, dir.path().join(format!("{node}.journal")));
    agent.min_lease = PRICE;
    agent.max_lease = max_lease;
    let g: GateSpec = gate(
        store,
        agent,
        "call the top_up tool at http://control.test/mcp",
    );
    Node::start_metered(o, g)
}

async fn ready(node: &Node) {
    assert!(
        eventually(Duration::from_secs(5), || async {
            node.readyz().await.0 == 200
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_requests_pass_and_an_empty_balance_is_402_or_the_suspension_page_until_a_top_up() {
    let redis = TestRedis::start();
    let up = Upstream::start("paid");
    let routes = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    routes
        .put(
            &RouteKey::slug("paid").unwrap(),
            &route(up.addr, Some("acct-a")),
        )
        .await
        .unwrap();
    routes
        .put(&RouteKey::slug("free").unwrap(), &route(up.addr, None))
        .await
        .unwrap();
    let st = store(&redis).await;
    st.credit("acct-a", "deposit-1", 5 * PRICE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = metered(&redis, st.clone(), "n1", &dir, 100 * PRICE);
    ready(&node).await;
    let c = node.client(&["paid.localhost", "free.localhost"]);
    let url = node.url("paid.localhost", "/");

    for i in 0..5 {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200, "request {i} is paid for");
    }
    // The sixth has no money behind it.
    let r = c
        .get(&url)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:tollgate:problem:service-suspended");
    assert_eq!(v["service"], "paid.localhost");
    assert_eq!(v["balance_usd"], "0.00");
    assert!(v["hint"].as_str().unwrap().contains("top_up tool"), "{v}");
    // A browser gets the suspension page.
    let r = c
        .get(&url)
        .header("accept", "text/html,*/*")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 402);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = r.text().await.unwrap();
    assert!(
        page.contains("This service is paused") && page.contains("top_up tool"),
        "{page}"
    );
    assert!(
        !page.contains("http://") || page.contains("http://control.test/mcp"),
        "no external assets"
    );
    // Routes without an owning account are not metered.
    assert_eq!(
        c.get(node.url("free.localhost", "/"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // A top-up lands in Redis; the next request goes through.
    st.credit("acct-a", "deposit-2", 3 * PRICE).await.unwrap();
    // Until the credit reaches this node (the change feed, milliseconds) a request may still
    // get 402: count those, so the metric below is exact.
    let late_402 = std::sync::atomic::AtomicU32::new(0);
    assert!(
        eventually(Duration::from_secs(2), || async {
            let s = c.get(&url).send().await.unwrap().status();
            if s == 402 {
                late_402.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            s == 200
        })
        .await,
        "resumed after the credit"
    );
    let m = node.metrics().await;
    assert_eq!(
        metric(&m, "tollgate_metering_rejected_total{reason=\"suspended\"}"),
        Some(2.0 + f64::from(late_402.load(std::sync::atomic::Ordering::Relaxed)))
    );
    assert_eq!(metric(&m, "tollgate_metered_requests_total"), Some(6.0));
    node.stop(tollgate_proxy::Stop::Graceful);
    // Exactly six requests were debited, and the books balance.
    let a = st.account("acct-a").await.unwrap().unwrap();
    assert_eq!(a.debited, 6 * PRICE);
    assert_eq!(a.credited, 8 * PRICE);
    assert_eq!(a.credited - a.debited, a.available + a.leased);
    assert_eq!(a.leased, 0, "leases returned at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_serves_from_the_lease_then_answers_503_never_402_and_recovers() {
    // One Redis, stopped and started again (a cluster's failovers: balance-cache/tests/cluster.rs).
    let mut redis = TestRedis::One(RedisServer::start_durable());
    let up = Upstream::start("up");
    let routes = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    routes
        .put(
            &RouteKey::slug("svc").unwrap(),
            &route(up.addr, Some("acct-b")),
        )
        .await
        .unwrap();
    let st = store(&redis).await;
    st.credit("acct-b", "deposit", 1_000 * PRICE).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Leases of at most 20 requests, so the one held runs out quickly.
    let node = metered(&redis, st.clone(), "n1", &dir, 20 * PRICE);
    ready(&node).await;
    let c = node.client(&["svc.localhost"]);
    let url = node.url("svc.localhost", "/");
    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);

    if let TestRedis::One(r) = &mut redis {
        r.kill();
    }
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let s = c.get(&url).send().await.unwrap().status().as_u16();
        *statuses.entry(s).or_insert(0) += 1;
    }
    assert!(
        !statuses.contains_key(&402),
        "never 402 while Redis is down: {statuses:?}"
    );
    assert!(
        statuses.get(&503).copied().unwrap_or(0) > 0,
        "503 once the lease is spent: {statuses:?}"
    );
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "2");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["type"], "urn:tollgate:problem:metering-unavailable");

    if let TestRedis::One(r) = &mut redis {
        r.start_again();
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            c.get(&url)
                .send()
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        })
        .await,
        "recovers once Redis is back"
    );
    let served = 1 + statuses.get(&200).copied().unwrap_or(0) + 1;
    node.stop(tollgate_proxy::Stop::Graceful);
    let a = store(&redis)
        .await
        .account("acct-b")
        .await
        .unwrap()
        .unwrap();
    // Every 200 was paid exactly once (the journal carried the outage's usage across the
    // restart); the 503s cost nothing.
    assert!(
        a.debited >= served as i64 * PRICE,
        "debited {} for at least {served} served",
        a.debited
    );
    assert_eq!(a.debited % PRICE, 0);
    assert_eq!(a.credited - a.debited, a.available + a.leased);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_debit_exactly_what_they_served() {
    let redis = TestRedis::start();
    let up = Upstream::start("up");
    let routes = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    let accounts = ["acct-x", "acct-y", "acct-z"];
    for (i, a) in accounts.iter().enumerate() {
        routes
            .put(
                &RouteKey::slug(&format!("s{i}")).unwrap(),
                &route(up.addr, Some(a)),
            )
            .await
            .unwrap();
    }
    let st = store(&redis).await;
    for a in accounts {
        st.credit(a, &format!("deposit-{a}"), 1_000_000 * PRICE)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let n1 = metered(&redis, st.clone(), "n1", &dir, 50 * PRICE);
    let n2 = metered(&redis, st.clone(), "n2", &dir, 50 * PRICE);
    ready(&n1).await;
    ready(&n2).await;
    let hosts = ["s0.localhost", "s1.localhost", "s2.localhost"];
    let (c1, c2) = (n1.client(&hosts), n2.client(&hosts));
    let mut sent = [0i64; 3];
    let mut tasks = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        for (c, node, n) in [(&c1, &n1, 150 + 40 * i), (&c2, &n2, 90 + 25 * i)] {
            let (c, url) = (c.clone(), node.url(host, "/"));
            sent[i] += n as i64;
            tasks.push(tokio::spawn(async move {
                for _ in 0..n {
                    assert_eq!(c.get(&url).send().await.unwrap().status(), 200);
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    n1.stop(tollgate_proxy::Stop::Graceful);
    n2.stop(tollgate_proxy::Stop::Graceful);
    for (i, a) in accounts.iter().enumerate() {
        let s = st.account(a).await.unwrap().unwrap();
        assert_eq!(
            s.debited,
            sent[i] * PRICE,
            "{a}: debited for exactly {} requests",
            sent[i]
        );
        assert_eq!(s.leased, 0);
        assert_eq!(s.status, Status::Active);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_in_flight_finishes_when_the_balance_runs_out_and_new_ones_get_402() {
    let redis = TestRedis::start();
    let up = Upstream::start("slow");
    let routes = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    routes
        .put(
            &RouteKey::slug("slow").unwrap(),
            &route(up.addr, Some("acct-s")),
        )
        .await
        .unwrap();
    let st = store(&redis).await;
    st.credit("acct-s", "deposit", PRICE).await.unwrap(); // exactly one request
    let dir = tempfile::tempdir().unwrap();
    let node = metered(&redis, st.clone(), "n1", &dir, 100 * PRICE);
    ready(&node).await;
    let c = node.client(&["slow.localhost"]);
    let slow = {
        let (c, url) = (c.clone(), node.url("slow.localhost", "/sleep/1500"));
        tokio::spawn(async move { c.get(url).send().await.unwrap().status() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The money is gone (the slow request took it): new requests are refused meanwhile.
    let r = c.get(node.url("slow.localhost", "/")).send().await.unwrap();
    assert_eq!(r.status(), 402);
    assert!(!slow.is_finished(), "the paid request is still running");
    assert_eq!(
        slow.await.unwrap(),
        200,
        "the paid request finishes normally"
    );
    node.stop(tollgate_proxy::Stop::Graceful);
    assert_eq!(st.account("acct-s").await.unwrap().unwrap().debited, PRICE);
}
