//! Real parts for tests: a `redis-server` and a PostgreSQL cluster on free loopback ports (stopped
//! on drop) and upstream HTTP servers. Nothing here is mocked; everything speaks the real
//! protocol over loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{any, get};

mod cluster;
mod cut;
mod postgres;
mod shared;
pub use cluster::RedisCluster;
pub use cut::TcpCut;
pub use postgres::{PostgresServer, pg_bin_dir};
pub use shared::TestRedis;

/// A port that was free a moment ago (bind to :0, read, release), and never handed out before
/// in this process, so that two free ports asked for in a row cannot collide.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free port");
        if reserve(port) {
            return port;
        }
    }
}

static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Marks `port` as handed out (false: it already was), so [`free_port`] never returns it: a
/// cluster member's bus port (its port + 10000) must not become another process's port.
pub(crate) fn reserve(port: u16) -> bool {
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    given.get_or_insert_with(HashSet::new).insert(port)
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// A private `redis-server`, killed when dropped.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
    aof: bool,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            if let Some(s) = RedisServer::try_start_on(free_port()) {
                return s;
            }
        }
        panic!("redis-server did not start");
    }

    /// Starts on a given port (a test that needs Redis to appear later at a known address).
    pub fn start_on(port: u16) -> RedisServer {
        RedisServer::try_start_on(port)
            .unwrap_or_else(|| panic!("redis-server did not start on {port}"))
    }

    /// Started with `appendonly yes` and `appendfsync always`, as production money needs;
    /// [`RedisServer::restart`] then brings back every acknowledged write.
    pub fn start_durable() -> RedisServer {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            if let Some(s) = RedisServer::spawn(free_port(), dir, true) {
                return s;
            }
        }
        panic!("redis-server did not start");
    }

    fn try_start_on(port: u16) -> Option<RedisServer> {
        RedisServer::spawn(port, tempfile::tempdir().expect("tempdir"), false)
    }

    fn command(port: u16, dir: &std::path::Path, aof: bool) -> Command {
        let bin = std::env::var("TOLLGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let mut c = Command::new(bin);
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if aof {
            c.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            c.args(["--appendonly", "no"]);
        }
        c
    }

    fn spawn(port: u16, dir: tempfile::TempDir, aof: bool) -> Option<RedisServer> {
        let child = RedisServer::command(port, dir.path(), aof)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server: {e} (install redis-server)"));
        let mut server = RedisServer {
            child,
            port,
            dir,
            aof,
        };
        // A port picked by `free_port` can be taken before redis binds it: report and retry.
        server.wait_ready(Duration::from_secs(5)).then_some(server)
    }

    /// Kills the server (SIGKILL) and leaves it down until [`RedisServer::start_again`].
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server the way an operator or a supervisor does (SIGTERM: it finishes its
    /// AOF and exits) and leaves it down until [`RedisServer::start_again`].
    pub fn terminate(&mut self) {
        signal(self.child.id(), "TERM");
        let _ = self.child.wait();
    }

    /// Starts it again on the same port and data directory.
    pub fn start_again(&mut self) {
        self.child = RedisServer::command(self.port, self.dir.path(), self.aof)
            .spawn()
            .expect("restart redis-server");
        assert!(
            self.wait_ready(Duration::from_secs(10)),
            "redis-server did not come back"
        );
    }

    /// A data loss: kill -9, delete everything it had written (AOF, snapshots), start an
    /// empty server on the same port.
    pub fn lose_data_and_start_again(&mut self) {
        self.kill();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        self.start_again();
    }

    /// Freezes the server (SIGSTOP): connections stay open and every call hangs, as behind a
    /// network partition that drops packets, until [`RedisServer::resume`].
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Thaws a [`RedisServer::pause`]d server (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }

    fn resume_quietly(&self) {
        let _ = Command::new("kill")
            .arg("-CONT")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Kill -9 and start again on the same port and data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.start_again();
    }

    fn wait_ready(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut c) = client.get_connection()
                && redis::cmd("PING").query::<String>(&mut c).is_ok()
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The server's process id (CPU accounting in benchmarks).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A blocking connection for test set-up and fault injection.
    pub fn conn(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Kills every pub/sub client connection, as an operator or a network cut would.
    pub fn kill_pubsub_clients(&self) -> u64 {
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut self.conn())
            .unwrap()
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -{sig} {pid} failed");
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.resume_quietly();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an upstream saw, for assertions.
#[derive(Default)]
pub struct Seen {
    pub peers: Mutex<HashSet<SocketAddr>>,
    pub requests: Mutex<u64>,
}

/// A real HTTP/1.1 upstream on a free port, on its own runtime thread.
///
/// Routes: `/` (its name), `/headers` (request headers as JSON), `/sleep/{ms}`, `/ws` (WebSocket
/// echo), `/body` (length of the request body), `/peer` (the connecting address).
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Clone)]
struct AppState {
    name: Arc<str>,
    seen: Arc<Seen>,
}

impl Upstream {
    pub fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let state = AppState {
            name: Arc::from(name),
            seen: seen.clone(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = Router::new()
                    .route("/", any(root))
                    .route("/headers", any(headers))
                    .route("/sleep/{ms}", get(sleep))
                    .route("/ws", get(ws))
                    .route("/body", any(body_len))
                    .route("/peer", get(peer))
                    .fallback(any(root))
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
            });
        });
        Upstream {
            addr,
            seen,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    /// Distinct client connections seen so far (keepalive reuse keeps this small).
    pub fn distinct_peers(&self) -> usize {
        self.seen.peers.lock().unwrap().len()
    }

    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn record(state: &AppState, peer: SocketAddr) {
    state.seen.peers.lock().unwrap().insert(peer);
    *state.seen.requests.lock().unwrap() += 1;
}

async fn root(State(s): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    record(&s, peer);
    s.name.to_string()
}

async fn headers(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> axum::Json<serde_json::Value> {
    record(&s, peer);
    let mut map = serde_json::Map::new();
    for (k, v) in &h {
        let entry = map
            .entry(k.as_str().to_owned())
            .or_insert_with(|| serde_json::Value::Array(vec![]));
        if let serde_json::Value::Array(a) = entry {
            a.push(serde_json::Value::String(
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            ));
        }
    }
    axum::Json(serde_json::Value::Object(map))
}

async fn sleep(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(ms): Path<u64>,
) -> String {
    record(&s, peer);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    s.name.to_string()
}

async fn body_len(
    State(s): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: axum::body::Bytes,
) -> String {
    record(&s, peer);
    body.len().to_string()
}

async fn peer(State(s): State<AppState>, ConnectInfo(peer): ConnectInfo<SocketAddr>) -> String {
    record(&s, peer);
    peer.to_string()
}

async fn ws(ws: WebSocketUpgrade) -> impl IntoResponse {
    ws.on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => Message::Text(format!("echo:{t}").into()),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            break;
        }
    }
}
