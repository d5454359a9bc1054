//! Project leases shared by control instances (docs/scale-out.md): one holder at a time, kept
//! while held, freed when dropped, and writes made under a lease that another instance has
//! taken since are refused inside Redis (the project record and its route stay as the new
//! holder wrote them). On one Redis, or a Redis Cluster with `TOLLGATE_TEST_REDIS=cluster`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tollgate_control::locks::ProjectLease;
use tollgate_control::{ControlStore, Project, ProjectStatus, RedisControlStore};
use tollgate_routes::{HeldLock, Route, RouteKey, RouteStore, StoreError};
use tollgate_testkit::TestRedis;

fn project(live: &str) -> Project {
    Project {
        id: "p_locks".into(),
        slug: "locks".into(),
        owner: "acct".into(),
        created_ms: 1,
        status: ProjectStatus::Active,
        live_deployment: Some(live.into()),
        deployments: vec![live.into()],
        last_activity_ms: 1,
        ended_ms: None,
    }
}

fn route(port: u16) -> Route {
    Route {
        upstreams: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))],
        account_id: Some("acct".into()),
        project_id: Some("p_locks".into()),
        deployment_id: None,
    }
}

fn held(lease: &ProjectLease) -> Option<HeldLock<'_>> {
    lease.fence().map(|f| HeldLock {
        key: &f.key,
        token: &f.token,
    })
}

#[tokio::test]
async fn a_lease_has_one_holder_is_kept_while_held_and_fences_out_a_late_writer() {
    let redis = TestRedis::start();
    let ttl = Duration::from_millis(400);
    let a = RedisControlStore::connect(redis.target(), "tollgate")
        .await
        .unwrap()
        .with_lease_ttl(ttl);
    let b = RedisControlStore::connect(redis.target(), "tollgate")
        .await
        .unwrap()
        .with_lease_ttl(ttl);
    let routes = RouteStore::connect(redis.target(), "tollgate")
        .await
        .unwrap();
    let key = RouteKey::slug("locks").unwrap();

    let first = a.try_lock_project("p_locks").await.unwrap().unwrap();
    assert!(b.try_lock_project("p_locks").await.unwrap().is_none());
    // Renewed while held: several lifetimes later it is still the first holder's.
    tokio::time::sleep(ttl * 4).await;
    assert!(b.try_lock_project("p_locks").await.unwrap().is_none());
    assert!(!first.lost());
    a.put_project_fenced(&project("d_1"), first.fence())
        .await
        .unwrap();
    routes
        .put_held(&key, &route(1001), held(&first))
        .await
        .unwrap();

    // The first holder stalls past its lease (simulated: the key expires) and another instance
    // takes the project and writes.
    let mut conn = redis.conn().await;
    let _: () = redis::cmd("DEL")
        .arg(a.lock_key("p_locks"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let second = b.try_lock_project("p_locks").await.unwrap().unwrap();
    b.put_project_fenced(&project("d_2"), second.fence())
        .await
        .unwrap();
    routes
        .put_held(&key, &route(1002), held(&second))
        .await
        .unwrap();

    // The first holder's late writes change nothing.
    let late = a
        .put_project_fenced(&project("d_late"), first.fence())
        .await
        .unwrap_err();
    assert_eq!(late.code, "PROJECT_BUSY", "{late:?}");
    let err = routes
        .put_held(&key, &route(1003), held(&first))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    let err = routes.delete_held(&key, held(&first)).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced(_)), "{err}");
    let stored = a.project("p_locks").await.unwrap().unwrap();
    assert_eq!(stored.live_deployment.as_deref(), Some("d_2"));
    let (_, record) = routes
        .load_all()
        .await
        .unwrap()
        .into_iter()
        .find(|(k, _)| *k == key)
        .unwrap();
    assert_eq!(record.route.unwrap().upstreams[0].port(), 1002);
    // Its renewal notices too.
    tokio::time::sleep(ttl).await;
    assert!(first.lost());

    // Dropped, a lease is free again at once (not after its lifetime).
    drop(first);
    drop(second);
    let deadline = tokio::time::Instant::now() + Duration::from_millis(150);
    loop {
        if a.try_lock_project("p_locks").await.unwrap().is_some() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped lease was not freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Writes without a lease (one control instance, no lock) still go through.
    a.put_project(&project("d_3")).await.unwrap();
}
