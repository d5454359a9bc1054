//! Test rig: a real redis-server, the project's local test chain, and the payments service
//! behind a small HTTP server with the top-up endpoint; plus a runner for the pinned mppx
//! client.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Once};
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use serde_json::Value;
use tollgate_metering::{RedisStore, Store};
use tollgate_payments::config::{PATH_USD, Secret};
use tollgate_payments::kv::RedisKv;
use tollgate_payments::{Payments, PaymentsConfig, RedisChannels, RpcChain};
use tollgate_testchain::{ChainConfig, RunningChain, TestChain};
use tollgate_testkit::RedisServer;

/// Well-known development keys (anvil's first accounts): test money only.
pub const PAYER_KEY: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
pub const PAYER2_KEY: &str = "0x5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a";
pub const PAYEE_KEY: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";
pub const SECRET: &str = "test-secret-test-secret-test-secret-0123";

pub fn address(key: &str) -> Address {
    key.parse::<PrivateKeySigner>().unwrap().address()
}

pub fn account(key: &str) -> String {
    tollgate_payments::account_of(tollgate_testchain::DEFAULT_CHAIN_ID, &address(key))
}

/// One payments node (its own connections) over shared Redis and chain.
pub struct Node {
    pub payments: Arc<Payments>,
    pub url: String,
    _server: tokio::task::JoinHandle<()>,
}

pub struct Rig {
    pub redis: RedisServer,
    pub chain: RunningChain,
    pub money: Arc<dyn Store>,
    pub nodes: Vec<Node>,
}

impl Rig {
    pub async fn start(nodes: usize) -> Rig {
        Self::start_with(nodes, |_| {}).await
    }

    pub async fn start_with(nodes: usize, tune: impl Fn(&mut PaymentsConfig)) -> Rig {
        let redis = RedisServer::start();
        let chain = TestChain::spawn("127.0.0.1:0".parse().unwrap(), ChainConfig::default())
            .await
            .unwrap();
        let money: Arc<dyn Store> = Arc::new(
            RedisStore::connect(&redis.url(), "tollgate", Duration::from_secs(30))
                .await
                .unwrap(),
        );
        let mut rig = Rig {
            redis,
            chain,
            money,
            nodes: Vec::new(),
        };
        for _ in 0..nodes {
            let n = rig.node(&tune).await;
            rig.nodes.push(n);
        }
        rig
    }

    pub fn config(&self) -> PaymentsConfig {
        PaymentsConfig::new(
            &self.chain.url(),
            tollgate_testchain::DEFAULT_CHAIN_ID,
            Secret::new(SECRET),
            Secret::new(PAYEE_KEY),
        )
    }

    async fn node(&self, tune: &impl Fn(&mut PaymentsConfig)) -> Node {
        let mut cfg = self.config();
        tune(&mut cfg);
        let url = self.redis.url();
        let backend = Arc::new(RedisChannels::connect(&url, "tollgate").await.unwrap());
        let kv = Arc::new(
            RedisKv::connect(&url, "tollgate", Duration::from_secs(3600))
                .await
                .unwrap(),
        );
        let chain = Arc::new(
            RpcChain::new(
                &self.chain.url(),
                PAYEE_KEY.parse().unwrap(),
                cfg.chain_id,
                cfg.escrow,
            )
            .unwrap(),
        );
        let payments =
            Arc::new(Payments::new(cfg, backend, kv, self.money.clone(), chain).unwrap());
        let (server, url) = serve(payments.clone()).await;
        Node {
            payments,
            url,
            _server: server,
        }
    }

    /// Another node over the same stores, with its own (empty) proof-replay memory and the
    /// chain at `rpc` (a dead address makes every chain call fail).
    pub async fn bare_node(&self, rpc: &str) -> Payments {
        let cfg = self.config();
        Payments::new(
            cfg.clone(),
            Arc::new(
                RedisChannels::connect(&self.redis.url(), "tollgate")
                    .await
                    .unwrap(),
            ),
            Arc::new(mpp::MemoryStore::new()),
            self.money.clone(),
            Arc::new(
                RpcChain::new(rpc, PAYEE_KEY.parse().unwrap(), cfg.chain_id, cfg.escrow).unwrap(),
            ),
        )
        .unwrap()
    }

    pub fn fund(&self, key: &str) {
        self.chain.chain().fund(address(key));
    }

    pub fn token_balance(&self, key_or_addr: Address) -> u128 {
        self.chain.chain().balance(PATH_USD, key_or_addr)
    }

    pub async fn available(&self, account: &str) -> i64 {
        self.money
            .account(account)
            .await
            .unwrap()
            .map(|a| a.available)
            .unwrap_or(0)
    }
}

/// An HTTP server with the top-up endpoint (the router the control service mounts).
async fn serve(p: Arc<Payments>) -> (tokio::task::JoinHandle<()>, String) {
    let app = tollgate_payments::http::router(p);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let h = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (h, format!("http://{addr}"))
}

pub fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Installs the pinned client once (`npm ci`, from the lockfile).
pub fn ensure_client() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if js_dir().join("node_modules/mppx").exists() {
            return;
        }
        let ok = Command::new("npm")
            .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
            .current_dir(js_dir())
            .status()
            .expect("npm")
            .success();
        assert!(ok, "npm ci in payments/tests/js failed");
    });
}

/// Runs `node client.mjs ARGS…` as the payer `key`; returns its JSON lines.
pub async fn mppx(rpc: &str, key: &str, args: &[&str]) -> Vec<Value> {
    ensure_client();
    let out = tokio::process::Command::new("node")
        .arg("client.mjs")
        .args(args)
        .env("RPC", rpc)
        .env("KEY", key)
        .current_dir(js_dir())
        .output()
        .await
        .expect("node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(
        out.status.success(),
        "mppx client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

/// A client run the test talks to while it runs (reads its lines, writes to its stdin).
pub struct MppxRun {
    child: tokio::process::Child,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl MppxRun {
    pub fn start(rpc: &str, key: &str, args: &[&str]) -> MppxRun {
        use tokio::io::AsyncBufReadExt;
        ensure_client();
        let mut child = tokio::process::Command::new("node")
            .arg("client.mjs")
            .args(args)
            .env("RPC", rpc)
            .env("KEY", key)
            .current_dir(js_dir())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("node");
        let stdout = child.stdout.take().expect("stdout");
        MppxRun {
            child,
            lines: tokio::io::BufReader::new(stdout).lines(),
        }
    }

    /// Lines up to and including the first that satisfies `stop`.
    pub async fn lines_until(&mut self, stop: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(60), self.lines.next_line())
                .await
                .expect("client timed out")
                .expect("read")
                .unwrap_or_else(|| panic!("client ended early: {out:?}"));
            let v: Value = serde_json::from_str(&line).expect("json line");
            assert!(v.get("fatal").is_none(), "client failed: {v}");
            let done = stop(&v);
            out.push(v);
            if done {
                return out;
            }
        }
    }

    pub async fn proceed(&mut self) {
        use tokio::io::AsyncWriteExt;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin.write_all(b"go\n").await.expect("write");
        stdin.flush().await.expect("flush");
    }

    pub async fn finish(mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(line) = self.lines.next_line().await.expect("read") {
            let v: Value = serde_json::from_str(&line).expect("json line");
            assert!(v.get("fatal").is_none(), "client failed: {v}");
            out.push(v);
        }
        let status = self.child.wait().await.expect("wait");
        assert!(status.success(), "client exit {status}: {out:?}");
        out
    }
}
