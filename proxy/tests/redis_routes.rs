//! Routes written to Redis while traffic flows, readiness before the first sync, and recovery
//! after the subscription is killed — with the proxy in the middle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Node, eventually, metric, options, options_on};
use tollgate_routes::{Route, RouteKey, RouteStore};
use tollgate_testkit::{RedisServer, TestRedis, Upstream, free_port};

fn route(addr: SocketAddr) -> Route {
    Route {
        upstreams: vec![addr],
        account_id: None,
        project_id: None,
        deployment_id: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_switches_under_traffic_without_a_failed_request() {
    // One Redis, or a cluster (TOLLGATE_TEST_REDIS=cluster).
    let redis = TestRedis::start();
    let blue = Upstream::start("blue");
    let green = Upstream::start("green");
    let store = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    let key = RouteKey::slug("app").unwrap();
    store.put(&key, &route(blue.addr)).await.unwrap();

    let node = Node::start(options_on(&redis, &[]));
    assert!(
        eventually(Duration::from_secs(5), || async {
            node.readyz().await.0 == 200
        })
        .await
    );
    let c = node.client(&["app.localhost"]);
    let url = node.url("app.localhost", "/");

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (c, url, stop, ok) = (c.clone(), url.clone(), stop.clone(), ok.clone());
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut seen = std::collections::HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        seen.insert(r.text().await.unwrap());
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            (failures, seen)
        }));
    }
    for i in 0..20 {
        let to = if i % 2 == 0 { green.addr } else { blue.addr };
        store.put(&key, &route(to)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen_all = std::collections::HashSet::new();
    for w in workers {
        let (failures, seen) = w.await.unwrap();
        assert!(
            failures.is_empty(),
            "failed requests during switches: {failures:?}"
        );
        seen_all.extend(seen);
    }
    assert!(
        ok.load(Ordering::Relaxed) > 100,
        "too little traffic to mean anything"
    );
    assert!(seen_all.contains("blue") && seen_all.contains("green"));

    // Removal: the next requests get 404.
    store.delete(&key).await.unwrap();
    assert!(
        eventually(Duration::from_secs(1), || async {
            c.get(&url).send().await.unwrap().status() == 404
        })
        .await
    );
    // Metrics follow the swap by microseconds.
    assert!(
        eventually(Duration::from_secs(1), || async {
            let m = node.metrics().await;
            metric(&m, "tollgate_route_changes_applied_total") == Some(21.0)
                && metric(&m, "tollgate_routes") == Some(0.0)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_first_full_sync() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let up = Upstream::start("late");
    let node = Node::start(options(Some(&url), &[]));
    let (code, v) = node.readyz().await;
    assert_eq!(code, 503);
    assert_eq!(v["routes_synced"], false);
    // Traffic gets a clear, retryable answer instead of a wrong 404.
    let c = node.client(&["late.localhost"]);
    let r = c.get(node.url("late.localhost", "/")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");

    let redis = RedisServer::start_on(port);
    let store = RouteStore::connect(&redis.url(), "tollgate").await.unwrap();
    store
        .put(&RouteKey::slug("late").unwrap(), &route(up.addr))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            node.readyz().await.0 == 200
        })
        .await
    );
    assert!(
        eventually(Duration::from_secs(2), || async {
            let r = c.get(node.url("late.localhost", "/")).send().await.unwrap();
            r.status() == 200
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_after_the_subscription_is_killed() {
    let redis = RedisServer::start();
    let up = Upstream::start("back");
    let store = RouteStore::connect(&redis.url(), "tollgate").await.unwrap();
    let node = Node::start(options(Some(&redis.url()), &[]));
    assert!(
        eventually(Duration::from_secs(5), || async {
            node.readyz().await.0 == 200
        })
        .await
    );
    assert!(redis.kill_pubsub_clients() >= 1);
    store
        .put(&RouteKey::slug("back").unwrap(), &route(up.addr))
        .await
        .unwrap();
    let c = node.client(&["back.localhost"]);
    assert!(
        eventually(Duration::from_secs(3), || async {
            c.get(node.url("back.localhost", "/"))
                .send()
                .await
                .unwrap()
                .status()
                == 200
        })
        .await
    );
    let m = node.metrics().await;
    assert!(metric(&m, "tollgate_route_resubscribes_total").unwrap() >= 1.0);
    // Still ready throughout: the last good table kept serving.
    assert_eq!(node.readyz().await.0, 200);
}
