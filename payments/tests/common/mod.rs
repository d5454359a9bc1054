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
use tollgate_metering::{DEFAULT_SHARDS, Store};
use tollgate_payments::config::{PATH_USD, Secret};
use tollgate_payments::kv::RedisKv;
use tollgate_payments::{Payments, PaymentsConfig, RedisChannels, RpcChain};
use tollgate_testchain::{ChainConfig, RunningChain, TestChain};
use tollgate_testkit::TestRedis;

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
    pub redis: TestRedis,
    pub chain: RunningChain,
    pub money: Arc<dyn Store>,
    pub nodes: Vec<Node>,
}

impl Rig {
    pub async fn start(nodes: usize) -> Rig {
        Self::start_with(nodes, |_| {}).await
    }

    pub async fn start_with(nodes: usize, tune: impl Fn(&mut PaymentsConfig)) -> Rig {
        let redis = TestRedis::start();
        let chain = TestChain::spawn("127.0.0.1:0".parse().unwrap(), ChainConfig::default())
            .await
            .unwrap();
        let ttl = Duration::from_secs(30);
        let money: Arc<dyn Store> =
            tollgate_metering::connect_shared(&redis.target(), "tollgate", ttl, DEFAULT_SHARDS)
                .await
                .unwrap();
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
        let url = self.redis.target();
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
                RedisChannels::connect(self.redis.target(), "tollgate")
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

/// One JSON-RPC call to the test chain; the result, or the error object.
pub async fn rpc(url: &str, method: &str, params: Value) -> Result<Value, Value> {
    let v: Value = reqwest::Client::new()
        .post(url)
        .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    match v.get("error") {
        Some(e) => Err(e.clone()),
        None => Ok(v["result"].clone()),
    }
}

impl Rig {
    /// The chain's clock (latest block's timestamp).
    pub async fn chain_time(&self) -> u64 {
        let b = rpc(
            &self.chain.url(),
            "eth_getBlockByNumber",
            serde_json::json!(["latest", false]),
        )
        .await
        .unwrap();
        u64::from_str_radix(
            b["timestamp"].as_str().unwrap().trim_start_matches("0x"),
            16,
        )
        .unwrap()
    }

    /// Moves the chain's clock forward (the test chain's `testchain_increaseTime`).
    pub async fn increase_time(&self, secs: u64) {
        rpc(
            &self.chain.url(),
            "testchain_increaseTime",
            serde_json::json!([secs]),
        )
        .await
        .unwrap();
    }

    /// The payer `key` sends one escrow call in a signed 0x76 transaction; true if it
    /// succeeded (false: it reverted).
    pub async fn payer_call(&self, key: &str, input: Vec<u8>) -> bool {
        use tollgate_testchain::client::{TxOpts, build_tx, escrow_call};
        let signer: PrivateKeySigner = key.parse().unwrap();
        let opts = TxOpts::client(
            tollgate_testchain::DEFAULT_CHAIN_ID,
            self.chain_time().await,
        );
        let (raw, _) = build_tx(&signer, vec![escrow_call(input)], opts).unwrap();
        let hash = rpc(
            &self.chain.url(),
            "eth_sendRawTransaction",
            serde_json::json!([alloy::primitives::Bytes::from(raw)]),
        )
        .await
        .expect("transaction refused");
        let r = rpc(
            &self.chain.url(),
            "eth_getTransactionReceipt",
            serde_json::json!([hash]),
        )
        .await
        .unwrap();
        r["status"] == "0x1"
    }

    /// The payer starts a unilateral close of `channel` (`requestClose`).
    pub async fn request_close(&self, key: &str, channel: &str) -> bool {
        use alloy::sol_types::SolCall;
        let d = self.descriptor(channel).await;
        let call = tempo_alloy::contracts::precompiles::ITIP20ChannelReserve::requestCloseCall {
            descriptor: d,
        };
        self.payer_call(key, call.abi_encode()).await
    }

    /// The payer cancels a close request with a zero top-up (`topUp(descriptor, 0)`).
    pub async fn cancel_close(&self, key: &str, channel: &str) -> bool {
        use alloy::sol_types::SolCall;
        let d = self.descriptor(channel).await;
        let call = tempo_alloy::contracts::precompiles::ITIP20ChannelReserve::topUpCall {
            descriptor: d,
            additionalDeposit: alloy::primitives::Uint::<96, 2>::ZERO,
        };
        self.payer_call(key, call.abi_encode()).await
    }

    /// The payer takes back what is not settled, after the grace period (`withdraw`).
    pub async fn withdraw(&self, key: &str, channel: &str) -> bool {
        use alloy::sol_types::SolCall;
        let d = self.descriptor(channel).await;
        let call = tempo_alloy::contracts::precompiles::ITIP20ChannelReserve::withdrawCall {
            descriptor: d,
        };
        self.payer_call(key, call.abi_encode()).await
    }

    async fn descriptor(
        &self,
        channel: &str,
    ) -> tempo_alloy::contracts::precompiles::ITIP20ChannelReserve::ChannelDescriptor {
        let rec = self.nodes[0]
            .payments
            .backend()
            .get(channel)
            .await
            .unwrap()
            .expect("channel recorded");
        tollgate_payments::chain::wire_descriptor(&rec.descriptor.expect("descriptor kept"))
            .unwrap()
    }

    /// `tollgate accounts audit` over the rig's stores and chain: every difference.
    pub async fn audit(&self) -> Vec<tollgate_payments::audit::Difference> {
        let p = &self.nodes[0].payments;
        tollgate_payments::audit::audit(&**p.backend(), &*self.money, Some(&**p.chain()))
            .await
            .unwrap()
            .differences
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

// ---------------------------------------------------------------------------------------------
// Vouchers signed here with the payer's key, as a hostile or buggy client would.

use alloy::primitives::B256;
use alloy::signers::SignerSync;
use mpp::PaymentCredential;
use mpp::protocol::methods::tempo::precompile_voucher::precompile_voucher_signing_hash_with_escrow;
use serde_json::json;
use tollgate_metering::PICOS_PER_USD;
use tollgate_payments::Rejection;

pub const USD: i64 = PICOS_PER_USD;

pub fn sign(key: &str, channel: B256, cumulative: u128, escrow: Address) -> String {
    let signer: PrivateKeySigner = key.parse().unwrap();
    let hash = precompile_voucher_signing_hash_with_escrow(
        channel,
        cumulative,
        escrow,
        tollgate_testchain::DEFAULT_CHAIN_ID,
    )
    .unwrap();
    let sig = signer.sign_hash_sync(&hash).unwrap();
    alloy::hex::encode_prefixed(sig.as_bytes())
}

pub fn voucher(
    p: &Payments,
    channel: &str,
    cumulative: u128,
    signature: String,
) -> PaymentCredential {
    let challenge = p.session_challenge(1_000_000, None).unwrap();
    let descriptor = DESCRIPTORS
        .lock()
        .unwrap()
        .get(channel)
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    PaymentCredential {
        challenge: challenge.to_echo(),
        source: Some(account(PAYER_KEY)),
        payload: json!({
            "action": "voucher",
            "channelId": channel,
            "cumulativeAmount": cumulative.to_string(),
            "signature": signature,
            "descriptor": descriptor,
        }),
    }
}

/// Each channel's descriptor, as the client sends it with every voucher.
pub static DESCRIPTORS: std::sync::Mutex<std::collections::BTreeMap<String, serde_json::Value>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

pub fn remember(
    channel: &str,
    d: Option<mpp::protocol::methods::tempo::session::ChannelDescriptor>,
) {
    DESCRIPTORS.lock().unwrap().insert(
        channel.to_owned(),
        serde_json::to_value(d.expect("descriptor kept")).unwrap(),
    );
}

pub async fn credits(rig: &Rig) -> usize {
    rig.money
        .ledger()
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "credit")
        .count()
}

/// Refused (not retryable) with a problem type ending in `kind`.
pub fn refused(r: Result<tollgate_payments::Accepted, Rejection>, kind: &str) {
    let e = r.expect_err("refused");
    assert!(!e.retryable, "{e:?}");
    assert!(
        e.problem.problem_type.ends_with(kind),
        "expected {kind}: {e:?}"
    );
}

/// The real mppx client opens a channel with one $1 payment; its id.
pub async fn open_channel(rig: &Rig) -> (String, B256) {
    let url = format!("{}/v1/top-up?amount_usd=1", rig.nodes[0].url);
    let opened = mppx(&rig.chain.url(), PAYER_KEY, &["http", &url, "1"]).await;
    let ch_str = opened[0]["receipt"]["channelId"]
        .as_str()
        .unwrap()
        .to_owned();
    let ch = ch_str.parse().unwrap();
    (ch_str, ch)
}

pub fn close_cred(
    p: &Payments,
    channel: &str,
    cumulative: u128,
    ch: B256,
    escrow: Address,
) -> PaymentCredential {
    let mut c = voucher(
        p,
        channel,
        cumulative,
        sign(PAYER_KEY, ch, cumulative, escrow),
    );
    c.payload["action"] = json!("close");
    c
}
