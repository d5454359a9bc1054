//! A real Redis Cluster for tests: six `redis-server --cluster-enabled yes` processes (three
//! masters, three replicas) on free loopback ports, joined with `redis-cli --cluster create`,
//! killed when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One member process of a [`RedisCluster`].
struct Member {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

/// A private Redis Cluster of 3 masters and 3 replicas.
pub struct RedisCluster {
    members: Vec<Member>,
}

/// A port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    for _ in 0..200 {
        let p = crate::free_port();
        if p < 55_000
            && TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()
            && TcpListener::bind(("127.0.0.1", p)).is_ok()
            && crate::reserve(p + 10_000)
        {
            return p;
        }
    }
    panic!("no free port pair for a cluster member");
}

fn spawn(port: u16, dir: &std::path::Path) -> Child {
    let bin = std::env::var("TOLLGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    Command::new(bin)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        // A lost master is replaced by its replica about two seconds after it stops answering.
        .args(["--cluster-node-timeout", "2000"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start redis-server: {e} (install redis-server)"))
}

fn conn(port: u16) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_connection_with_timeout(Duration::from_secs(1))
}

impl RedisCluster {
    /// Starts six members and creates the cluster; returns once every slot is served and every
    /// member agrees the cluster is ok.
    pub fn start() -> RedisCluster {
        let mut members = Vec::new();
        for _ in 0..6 {
            let port = free_cluster_port();
            let dir = tempfile::tempdir().expect("tempdir");
            let child = spawn(port, dir.path());
            members.push(Member {
                child: Some(child),
                port,
                dir,
            });
        }
        let cluster = RedisCluster { members };
        for m in &cluster.members {
            wait(Duration::from_secs(10), || {
                conn(m.port)
                    .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                    .is_ok()
            });
        }
        let cli = std::env::var("TOLLGATE_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into());
        let out = Command::new(cli)
            .arg("--cluster")
            .arg("create")
            .args(
                cluster
                    .members
                    .iter()
                    .map(|m| format!("127.0.0.1:{}", m.port)),
            )
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(Duration::from_secs(30));
        cluster.wait_replicas(Duration::from_secs(30));
        cluster.wait_acks(Duration::from_secs(30));
        cluster
    }

    /// Every master's replica acknowledges a write at once. A replica whose link just came up
    /// may answer `WAIT` only with its periodic (once a second) acknowledgement for a while;
    /// tests that time leases shorter than that would otherwise see a write acknowledged late.
    fn wait_acks(&self, within: Duration) {
        for m in self.masters() {
            let mut c = conn(m).expect("cluster master");
            // A key this master serves (any other answers MOVED).
            let key = (0..10_000)
                .map(|n| format!("warm:{n}"))
                .find(|k| redis::cmd("SET").arg(k).arg(1).query::<()>(&mut c).is_ok())
                .expect("a key of this master's slots");
            wait(within, || {
                let started = Instant::now();
                let mut pipe = redis::pipe();
                pipe.cmd("SET").arg(&key).arg(1).ignore();
                pipe.cmd("WAIT").arg(1).arg(100);
                pipe.query::<(i64,)>(&mut c).is_ok_and(|(acked,)| {
                    acked >= 1 && started.elapsed() < Duration::from_millis(50)
                })
            });
        }
    }

    /// Every live replica has its replication link up (money writes wait for one).
    fn wait_replicas(&self, within: Duration) {
        wait(within, || {
            let live: Vec<u16> = self
                .members
                .iter()
                .filter(|m| m.child.is_some())
                .map(|m| m.port)
                .collect();
            let replicas = live
                .iter()
                .filter(|p| role(**p).as_deref() == Some("slave"))
                .count();
            replicas + self.masters().len() == live.len()
                && live.iter().all(|p| {
                    conn(*p)
                        .and_then(|mut c| {
                            redis::cmd("INFO")
                                .arg("replication")
                                .query::<String>(&mut c)
                        })
                        .is_ok_and(|i| {
                            i.contains("role:master") || i.contains("master_link_status:up")
                        })
                })
        });
    }

    /// The members' URLs (what `redis.cluster` lists).
    pub fn urls(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("redis://127.0.0.1:{}/", m.port))
            .collect()
    }

    /// Process ids of the live members, each with whether it is a master now (CPU accounting
    /// in benchmarks).
    pub fn pids(&self) -> Vec<(u32, bool)> {
        self.members
            .iter()
            .filter_map(|m| {
                let c = m.child.as_ref()?;
                Some((c.id(), role(m.port).as_deref() == Some("master")))
            })
            .collect()
    }

    /// Ports of the members that are masters now (live ones only).
    pub fn masters(&self) -> Vec<u16> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .filter(|m| role(m.port).as_deref() == Some("master"))
            .map(|m| m.port)
            .collect()
    }

    /// The live replica of the master on `port`.
    pub fn replica_of(&self, port: u16) -> u16 {
        let id = node_id(port);
        self.members
            .iter()
            .filter(|m| m.child.is_some() && m.port != port)
            .find(|m| {
                conn(m.port)
                    .and_then(|mut c| {
                        redis::cmd("INFO")
                            .arg("replication")
                            .query::<String>(&mut c)
                    })
                    .is_ok_and(|info| info.contains(&format!("master_port:{port}")))
            })
            .map(|m| m.port)
            .unwrap_or_else(|| panic!("no replica of {port} ({id})"))
    }

    /// A manual failover, as an operator does for maintenance: the replica of `master` takes
    /// over (`CLUSTER FAILOVER`, no write lost). Returns the new master's port.
    pub fn failover(&self, master: u16) -> u16 {
        let replica = self.replica_of(master);
        let mut c = conn(replica).expect("replica");
        let _: String = redis::cmd("CLUSTER")
            .arg("FAILOVER")
            .query(&mut c)
            .expect("CLUSTER FAILOVER");
        wait(Duration::from_secs(20), || {
            role(replica).as_deref() == Some("master")
        });
        self.wait_ok(Duration::from_secs(20));
        replica
    }

    /// Kills a master with SIGKILL and waits until its replica took over (the cluster's own
    /// failure detection: about the node timeout, 2 s). Returns the new master's port. The
    /// killed member stays down until [`RedisCluster::start_again`].
    pub fn kill(&mut self, master: u16) -> u16 {
        let replica = self.replica_of(master);
        let m = self
            .members
            .iter_mut()
            .find(|m| m.port == master)
            .expect("member");
        if let Some(mut c) = m.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        wait(Duration::from_secs(30), || {
            role(replica).as_deref() == Some("master")
        });
        self.wait_ok(Duration::from_secs(30));
        replica
    }

    /// Starts a killed member again, empty (it rejoins as a replica of whoever took its slots
    /// and copies their data; until it learns it was replaced, it may answer as their master).
    pub fn start_again(&mut self, port: u16) {
        let m = self
            .members
            .iter_mut()
            .find(|m| m.port == port)
            .expect("member");
        if m.child.is_none() {
            m.child = Some(spawn(port, m.dir.path()));
        }
        wait(Duration::from_secs(10), || {
            conn(port)
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
                .is_ok()
        });
        self.wait_ok(Duration::from_secs(30));
        self.wait_replicas(Duration::from_secs(30));
        // A replica just linked may acknowledge only once a second for a while.
        self.wait_acks(Duration::from_secs(30));
    }

    /// Freezes every replica (SIGSTOP): masters keep answering, but no write reaches a
    /// replica until [`RedisCluster::resume_replicas`].
    pub fn pause_replicas(&self) {
        self.signal_replicas("STOP");
    }

    /// Thaws the replicas [`RedisCluster::pause_replicas`] froze.
    pub fn resume_replicas(&self) {
        self.signal_replicas("CONT");
    }

    fn signal_replicas(&self, sig: &str) {
        for m in &self.members {
            if let Some(c) = &m.child
                && (sig == "CONT" || role(m.port).as_deref() == Some("slave"))
            {
                let _ = Command::new("kill")
                    .arg(format!("-{sig}"))
                    .arg(c.id().to_string())
                    .status();
            }
        }
    }

    /// A blocking connection to one member (fault injection, `INFO`).
    pub fn conn(&self, port: u16) -> redis::Connection {
        conn(port).expect("cluster member")
    }

    /// Every live member reports `cluster_state:ok`.
    fn wait_ok(&self, within: Duration) {
        wait(within, || {
            self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                conn(m.port)
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .is_ok_and(|i| i.contains("cluster_state:ok"))
            })
        });
    }
}

fn role(port: u16) -> Option<String> {
    let mut c = conn(port).ok()?;
    let v: Vec<redis::Value> = redis::cmd("ROLE").query(&mut c).ok()?;
    match v.first()? {
        redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        redis::Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn node_id(port: u16) -> String {
    conn(port)
        .and_then(|mut c| redis::cmd("CLUSTER").arg("MYID").query::<String>(&mut c))
        .unwrap_or_default()
}

fn wait(within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("redis cluster: condition not reached within {within:?}");
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = Command::new("kill")
                    .arg("-CONT")
                    .arg(c.id().to_string())
                    .status();
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}
