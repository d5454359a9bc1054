//! Route lookup on a table of 100,000 routes: the per-request cost of routing.
//! Compared with the obvious alternative (a `RwLock<HashMap<String, _>>`), as Pingora's own
//! benches compare with naive versions.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use criterion::{Criterion, criterion_group, criterion_main};
use tollgate_routes::{Change, MAX_HOST_LEN, Route, RouteKey, RouteTable, normalize_host};

const N: usize = 100_000;

fn route(i: usize) -> Route {
    Route {
        upstreams: vec![SocketAddr::from((
            [127, 0, 0, 1],
            1024 + (i % 60_000) as u16,
        ))],
        account_id: Some(format!("acct-{i}")),
        project_id: None,
        deployment_id: None,
    }
}

fn table() -> RouteTable {
    let t = RouteTable::new("localhost", vec![]);
    // Through `apply`, as a live node would receive them; compaction folds them into the base.
    let changes: Vec<Change> = (0..N)
        .map(|i| Change {
            key: RouteKey::slug(&format!("svc-{i}")).unwrap_or(RouteKey::Slug(String::new())),
            version: i as u64 + 1,
            route: Some(route(i)),
        })
        .collect();
    t.apply(changes);
    t
}

fn bench(c: &mut Criterion) {
    let t = table();
    assert_eq!(t.snapshot().len(), N);
    let hosts: Vec<String> = (0..1024)
        .map(|i| format!("svc-{}.localhost", (i * 7919) % N))
        .collect();
    let raw_hosts: Vec<String> = (0..1024)
        .map(|i| format!("SVC-{}.localhost:8080", (i * 7919) % N))
        .collect();

    let mut g = c.benchmark_group("route_lookup_100k");
    let mut i = 0usize;
    g.bench_function("arcswap_table", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(t.lookup(black_box(&hosts[i])))
        })
    });
    let mut i = 0usize;
    g.bench_function("normalize_host+arcswap_table", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let mut buf = [0u8; MAX_HOST_LEN];
            let h = normalize_host(black_box(raw_hosts[i].as_bytes()), &mut buf);
            black_box(h.ok().and_then(|h| t.lookup(h)))
        })
    });
    let naive: RwLock<HashMap<String, Arc<Route>>> = RwLock::new(
        (0..N)
            .map(|i| (format!("svc-{i}.localhost"), Arc::new(route(i))))
            .collect(),
    );
    let mut i = 0usize;
    g.bench_function("rwlock_std_hashmap", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            let m = naive.read().unwrap_or_else(|e| e.into_inner());
            black_box(m.get(black_box(hosts[i].as_str())).cloned())
        })
    });
    g.finish();

    // Applying one change to a 100k table (what the sync task does per event).
    let mut v = N as u64 + 10;
    c.bench_function("apply_one_change_100k", |b| {
        b.iter(|| {
            v += 1;
            t.apply([Change {
                key: RouteKey::Slug(format!("svc-{}", v % N as u64)),
                version: v,
                route: Some(route(v as usize)),
            }])
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
