//! The shared store of a suite that holds money or control state: one `redis-server`, or with
//! `TOLLGATE_TEST_REDIS=cluster` a 3 + 3 Redis Cluster, so the same tests run on both
//! (`scripts/test-cluster`; docs/scale-out.md).

use tollgate_kv::Target;

use crate::{RedisCluster, RedisServer};

/// One Redis or a Redis Cluster, chosen by `TOLLGATE_TEST_REDIS` (`cluster`; else one).
pub enum TestRedis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl TestRedis {
    pub fn start() -> TestRedis {
        match std::env::var("TOLLGATE_TEST_REDIS").as_deref() {
            Ok("cluster") => TestRedis::Cluster(RedisCluster::start()),
            Ok("one") | Ok("") | Err(_) => TestRedis::One(RedisServer::start()),
            Ok(other) => panic!("TOLLGATE_TEST_REDIS={other}: expected cluster or one"),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, TestRedis::Cluster(_))
    }

    /// Where the stores connect (a cluster: every write acknowledged by a replica).
    pub fn target(&self) -> Target {
        match self {
            TestRedis::One(r) => Target::One(r.url()),
            TestRedis::Cluster(c) => Target::Cluster {
                seeds: c.urls(),
                replica_acks: 1,
            },
        }
    }

    /// What a node's environment names it by: `TOLLGATE_REDIS_URL` or `TOLLGATE_REDIS_CLUSTER`.
    pub fn env(&self) -> (&'static str, String) {
        match self {
            TestRedis::One(r) => ("TOLLGATE_REDIS_URL", r.url()),
            TestRedis::Cluster(c) => ("TOLLGATE_REDIS_CLUSTER", c.urls().join(",")),
        }
    }

    /// The `[redis]` line of a config file that names it.
    pub fn toml(&self) -> String {
        match self {
            TestRedis::One(r) => format!("url = {:?}", r.url()),
            TestRedis::Cluster(c) => format!("cluster = {:?}", c.urls()),
        }
    }

    /// A connection for the test's own reads and writes (key names: [`TestRedis::prefix`]).
    pub async fn conn(&self) -> tollgate_kv::Conn {
        self.target().connect().await.expect("test redis")
    }

    /// The prefix the stores put before their keys (`prefix` tagged on a cluster).
    pub fn prefix(&self, prefix: &str) -> String {
        self.target().family_prefix(prefix)
    }
}

impl TestRedis {
    /// Every key gone (a data loss): `FLUSHALL` on one Redis, on every master of a cluster
    /// (their replicas follow).
    pub fn flush_all(&self) {
        match self {
            TestRedis::One(r) => redis::cmd("FLUSHALL")
                .query::<()>(&mut r.conn())
                .expect("test redis"),
            TestRedis::Cluster(c) => {
                for port in c.masters() {
                    redis::cmd("FLUSHALL")
                        .query::<()>(&mut c.conn(port))
                        .expect("test redis cluster");
                }
            }
        }
    }

    /// Runs `cmd` on a blocking connection (sync tests' own reads and writes).
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        match self {
            TestRedis::One(r) => cmd.query(&mut r.conn()).expect("test redis"),
            TestRedis::Cluster(c) => {
                let mut conn = redis::cluster::ClusterClient::new(c.urls())
                    .and_then(|client| client.get_connection())
                    .expect("test redis cluster");
                cmd.query(&mut conn).expect("test redis cluster")
            }
        }
    }

    /// `GET key`.
    pub fn get(&self, key: &str) -> Option<String> {
        self.query(redis::cmd("GET").arg(key))
    }

    /// `HGETALL key`.
    pub fn hgetall(&self, key: &str) -> std::collections::HashMap<String, String> {
        self.query(redis::cmd("HGETALL").arg(key))
    }
}

impl TestRedis {
    /// The URL of one Redis (a suite that cuts or restarts it runs on one only).
    pub fn url(&self) -> String {
        match self {
            TestRedis::One(r) => r.url(),
            TestRedis::Cluster(_) => panic!("this test needs one Redis, not a cluster"),
        }
    }
}
