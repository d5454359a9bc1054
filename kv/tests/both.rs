//! The connection, scripts and subscriptions on one Redis and on a real 3 + 3 Redis Cluster.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use tollgate_kv::{Target, Timeouts};
use tollgate_testkit::{RedisCluster, RedisServer};

fn cluster_target(c: &RedisCluster) -> Target {
    Target::Cluster {
        seeds: c.urls(),
        replica_acks: 1,
    }
}

/// A script that writes and publishes: `PUBLISH` on one Redis, `SPUBLISH` on a cluster.
const WRITE_AND_TELL: &str = r#"
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
"#;

async fn scripts_and_subscriptions(target: Target) {
    let p = target.family_prefix("t");
    let channel = format!("{p}:events");
    let mut sub = target
        .subscribe(std::slice::from_ref(&channel), Timeouts::default())
        .await
        .unwrap();
    let mut conn = target.connect().await.unwrap();
    let n: i64 = conn
        .script(WRITE_AND_TELL)
        .key(format!("{p}:k"))
        .arg("one")
        .arg(&channel)
        .invoke_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 1);
    tollgate_kv::publish(&mut conn, &channel, "two")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), async {
        vec![sub.next().await.unwrap(), sub.next().await.unwrap()]
    })
    .await
    .expect("both messages delivered");
    assert_eq!(got, vec![b"one".to_vec(), b"two".to_vec()]);
    assert!(sub.try_next().is_none(), "nothing else was published");
    sub.ping().await.unwrap();
    let v: String = redis::cmd("GET")
        .arg(format!("{p}:k"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "one");
    // A transaction of several keys of one family answers as it does on one Redis.
    let (a, b): (i64, i64) = redis::pipe()
        .atomic()
        .incr(format!("{p}:a"), 2)
        .incr(format!("{p}:b"), 3)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((a, b), (2, 3));
}

#[tokio::test]
async fn scripts_publish_and_subscribers_receive_on_one_redis() {
    let redis = RedisServer::start();
    scripts_and_subscriptions(Target::One(redis.url())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_publish_and_subscribers_receive_on_a_cluster() {
    let cluster = RedisCluster::start();
    scripts_and_subscriptions(cluster_target(&cluster)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_write_is_acknowledged_only_once_a_replica_holds_it() {
    let cluster = RedisCluster::start();
    let target = cluster_target(&cluster);
    let p = target.family_prefix("t");
    let mut conn = target.connect().await.unwrap();
    let () = redis::cmd("SET")
        .arg(format!("{p}:k"))
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();

    cluster.pause_replicas();
    let t = Instant::now();
    let refused = redis::cmd("SET")
        .arg(format!("{p}:k"))
        .arg("2")
        .query_async::<()>(&mut conn)
        .await
        .expect_err("no replica holds the write");
    assert_eq!(refused.kind(), redis::ErrorKind::Io, "{refused}");
    assert!(
        refused.to_string().contains("not acknowledged"),
        "{refused}"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "it waited for a replica"
    );
    // So is a transaction, and a script.
    let tx = redis::pipe()
        .atomic()
        .set(format!("{p}:a"), 1)
        .set(format!("{p}:b"), 1)
        .query_async::<()>(&mut conn)
        .await
        .expect_err("no replica holds the transaction");
    assert!(tx.to_string().contains("not acknowledged"), "{tx}");
    let script = conn
        .script(WRITE_AND_TELL)
        .key(format!("{p}:k"))
        .arg("3")
        .arg(format!("{p}:events"))
        .invoke_async::<i64>(&mut conn)
        .await
        .expect_err("no replica holds the script's write");
    assert!(script.to_string().contains("not acknowledged"), "{script}");
    // Reads answer at once.
    let t = Instant::now();
    let _: Option<String> = redis::cmd("GET")
        .arg(format!("{p}:k"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "a read does not wait"
    );

    cluster.resume_replicas();
    let () = redis::cmd("SET")
        .arg(format!("{p}:k"))
        .arg("4")
        .query_async(&mut conn)
        .await
        .unwrap();
    let v: String = redis::cmd("GET")
        .arg(format!("{p}:k"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(v, "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_ends_a_cluster_subscription() {
    let cluster = RedisCluster::start();
    let target = cluster_target(&cluster);
    let channel = format!("{}:events", target.family_prefix("t"));
    let mut sub = target
        .subscribe(std::slice::from_ref(&channel), Timeouts::default())
        .await
        .unwrap();
    let counter = format!("{}:n", target.family_prefix("t"));
    let mut conn = target.connect().await.unwrap();
    let one: i64 = redis::cmd("INCR")
        .arg(&counter)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(one, 1);
    // Every master hands over to its replica: the channel's slot moves, wherever it is.
    for m in cluster.masters() {
        cluster.failover(m);
    }
    // The old connection's next write is redirected (it ran nothing), sent again to the new
    // master, and applied once.
    let two: i64 = redis::cmd("INCR")
        .arg(&counter)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(two, 2);
    let lost = tokio::time::timeout(Duration::from_secs(15), sub.next())
        .await
        .expect("the subscriber learns that it may have missed messages")
        .expect_err("no message was published");
    drop(lost);
    // A new subscription works on the new masters.
    let mut sub = target
        .subscribe(std::slice::from_ref(&channel), Timeouts::default())
        .await
        .unwrap();
    tollgate_kv::publish(&mut conn, &channel, "after")
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"after");
}

#[test]
fn one_redis_keeps_its_key_names_and_a_cluster_tags_them() {
    let one = Target::from("redis://127.0.0.1:6379/");
    assert_eq!(one.family_prefix("tollgate"), "tollgate");
    let cluster = Target::Cluster {
        seeds: vec!["redis://127.0.0.1:7000/".into()],
        replica_acks: 1,
    };
    assert_eq!(cluster.family_prefix("tollgate"), "{tollgate}");
    assert!(cluster.describe().contains("127.0.0.1:7000"));
}

/// What a failover could take back is neither acknowledged nor acted on: with every replica
/// frozen, a write that changed nothing (the field was there, written while no replica held
/// it) and a confirmed read of it are refused too, so a credit listed from a commit that was
/// never acknowledged is not applied. The master's word alone (`without_acks`, for liveness
/// leases) still goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_no_replica_holds_is_neither_acknowledged_nor_confirmed() {
    let cluster = RedisCluster::start();
    let target = cluster_target(&cluster);
    let p = target.family_prefix("t");
    let pending = format!("{p}:credits:pending");
    let mut conn = target.connect().await.unwrap();

    cluster.pause_replicas();
    let refused = redis::cmd("HSETNX")
        .arg(&pending)
        .arg("k1")
        .arg("credit")
        .query_async::<i64>(&mut conn)
        .await
        .expect_err("no replica holds it");
    assert!(
        refused.to_string().contains("not acknowledged"),
        "{refused}"
    );
    // The field is on the master now. Another process asking again (a connection that never
    // wrote: only the marker write makes the `WAIT` cover what it found, whatever the server
    // counts for a connection without writes) changes nothing, and is still refused.
    let mut other = target.connect().await.unwrap();
    let again = redis::cmd("HSETNX")
        .arg(&pending)
        .arg("k1")
        .arg("credit")
        .query_async::<i64>(&mut other)
        .await
        .expect_err("what it found is not held by a replica either");
    assert!(again.to_string().contains("not acknowledged"), "{again}");
    // A plain read sees it; a confirmed one (what credits are applied from) refuses.
    let seen: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(&pending)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(seen.len(), 1);
    let mut other = target.connect().await.unwrap();
    let confirmed = other
        .query_confirmed::<std::collections::HashMap<String, String>>(
            redis::cmd("HGETALL").arg(&pending),
        )
        .await
        .expect_err("not confirmed while no replica holds it");
    assert!(
        confirmed.to_string().contains("not acknowledged"),
        "{confirmed}"
    );
    // A liveness lease goes through on the master's word, a script's first run included
    // (its source is not loaded on every node first: those replicas would never answer).
    let () = redis::cmd("SET")
        .arg(format!("{p}:lease"))
        .arg("me")
        .arg("PX")
        .arg(5000)
        .query_async(&mut conn.without_acks())
        .await
        .unwrap();
    let renewed: i64 = tokio::time::timeout(
        Duration::from_secs(3),
        conn.script("return redis.call('PEXPIRE', KEYS[1], ARGV[1])")
            .key(format!("{p}:lease"))
            .arg(5000)
            .invoke_async(&mut conn.without_acks()),
    )
    .await
    .expect("a first run does not wait for frozen members")
    .unwrap();
    assert_eq!(renewed, 1);

    cluster.resume_replicas();
    let listed: std::collections::HashMap<String, String> = conn
        .query_confirmed(redis::cmd("HGETALL").arg(&pending))
        .await
        .unwrap();
    assert_eq!(listed.get("k1").map(String::as_str), Some("credit"));
    let n: i64 = redis::cmd("HSETNX")
        .arg(&pending)
        .arg("k1")
        .arg("credit")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(n, 0, "written once");
}

/// A transaction refused while queued (a wrong type here) answers its error, acknowledged or
/// not; one that runs answers its replies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_transaction_answers_its_errors_and_its_replies() {
    let cluster = RedisCluster::start();
    let target = cluster_target(&cluster);
    let p = target.family_prefix("t");
    let mut conn = target.connect().await.unwrap();
    let err = redis::pipe()
        .atomic()
        .set(format!("{p}:a"), 1)
        .cmd("NOSUCHCOMMAND")
        .arg(format!("{p}:a"))
        .query_async::<()>(&mut conn)
        .await
        .expect_err("an unknown command aborts the transaction");
    assert!(!err.to_string().is_empty());
    let none: Option<String> = redis::cmd("GET")
        .arg(format!("{p}:a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(none, None, "nothing of an aborted transaction was written");
    let (a, b): (String, i64) = redis::pipe()
        .atomic()
        .set(format!("{p}:a"), "x")
        .ignore()
        .get(format!("{p}:a"))
        .incr(format!("{p}:n"), 5)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((a.as_str(), b), ("x", 5));
}
