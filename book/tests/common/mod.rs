//! What the book's tests share: a PostgreSQL cluster and a redis-server of their own, a money
//! store on that Redis with the book declared, and a SQL client to look into (or tamper with)
//! the book.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use tollgate_metering::RedisStore;
use tollgate_testkit::{PostgresServer, RedisServer};

/// PostgreSQL, Redis, and the money store on it (lease ttl `lease_ttl`) with the book declared.
pub async fn booked_store(lease_ttl: Duration) -> (PostgresServer, RedisServer, RedisStore) {
    let pg = PostgresServer::start();
    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url(), "tollgate", lease_ttl)
        .await
        .unwrap();
    store.enable_book().await.unwrap();
    (pg, redis, store)
}

/// A SQL client on the test's cluster.
pub async fn sql(pg: &PostgresServer) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
}

/// PostgreSQL, one Redis or a Redis Cluster (`TOLLGATE_TEST_REDIS=cluster`), the money store on
/// it (lease ttl `lease_ttl`; a cluster in the default shards) and its ledgers, the book
/// declared on every stream.
pub async fn booked_any(
    lease_ttl: Duration,
) -> (
    PostgresServer,
    tollgate_testkit::TestRedis,
    std::sync::Arc<dyn tollgate_metering::Store>,
    tollgate_book::Ledgers,
) {
    let pg = PostgresServer::start();
    let redis = tollgate_testkit::TestRedis::start();
    let store = tollgate_metering::connect_shared(
        &redis.target(),
        "tollgate",
        lease_ttl,
        tollgate_metering::DEFAULT_SHARDS,
    )
    .await
    .unwrap();
    let l = tollgate_book::Ledgers::connect(
        &redis.target(),
        "tollgate",
        tollgate_metering::DEFAULT_SHARDS,
    )
    .await
    .unwrap();
    l.enable_book().await.unwrap();
    (pg, redis, store, l)
}

/// The book's stream (its rows' prefix) that holds `account`'s lines.
pub fn stream_of(l: &tollgate_book::Ledgers, account: &str) -> String {
    if l.is_cluster() {
        let n = l.streams().len() as u32;
        l.streams()[tollgate_metering::shard_of(account, n) as usize].clone()
    } else {
        l.streams()[0].clone()
    }
}
