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
