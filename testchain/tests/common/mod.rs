//! Client-side helpers: JSON-RPC over HTTP, signed 0x76 transactions, vouchers.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub
)]

use alloy::primitives::aliases::U96;
use alloy::primitives::{Address, B256, Bytes};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use mpp::protocol::methods::tempo::precompile_voucher::{
    compute_precompile_channel_id_with_escrow, sign_precompile_voucher_with_escrow,
};
use serde_json::{Value, json};
use tempo_alloy::contracts::precompiles::ITIP20ChannelReserve as Escrow;
use tempo_alloy::primitives::transaction::Call;
use tollgate_testchain::{ChainConfig, ESCROW, PATH_USD, RunningChain, TestChain};

pub struct Client {
    pub url: String,
    http: reqwest::Client,
}

impl Client {
    pub fn new(url: String) -> Self {
        Self {
            url,
            http: reqwest::Client::new(),
        }
    }

    /// The raw JSON-RPC response object.
    pub async fn raw(&self, body: Value) -> Value {
        self.http
            .post(&self.url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn call(&self, method: &str, params: Value) -> Result<Value, Value> {
        let v = self
            .raw(json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
            .await;
        match v.get("error") {
            Some(e) => Err(e.clone()),
            None => Ok(v["result"].clone()),
        }
    }

    pub async fn ok(&self, method: &str, params: Value) -> Value {
        match self.call(method, params).await {
            Ok(v) => v,
            Err(e) => panic!("{method} failed: {e}"),
        }
    }

    pub async fn chain_time(&self) -> u64 {
        let b = self
            .ok("eth_getBlockByNumber", json!(["latest", false]))
            .await;
        u64::from_str_radix(
            b["timestamp"].as_str().unwrap().trim_start_matches("0x"),
            16,
        )
        .unwrap()
    }

    pub async fn send(&self, raw: &[u8]) -> Result<B256, Value> {
        self.call(
            "eth_sendRawTransaction",
            json!([Bytes::copy_from_slice(raw)]),
        )
        .await
        .map(|v| v.as_str().unwrap().parse().unwrap())
    }

    pub async fn receipt(&self, hash: B256) -> Value {
        self.ok("eth_getTransactionReceipt", json!([hash])).await
    }

    /// Sends and returns (hash, success).
    pub async fn send_ok(&self, raw: &[u8]) -> (B256, bool, Value) {
        let hash = self.send(raw).await.expect("transaction refused");
        let r = self.receipt(hash).await;
        assert_eq!(r["type"], "0x76");
        let ok = match r["status"].as_str().unwrap() {
            "0x1" => true,
            "0x0" => false,
            s => panic!("status {s}"),
        };
        (hash, ok, r)
    }

    pub async fn balance(&self, owner: Address) -> u128 {
        self.ok("testchain_balance", json!([PATH_USD, owner]))
            .await
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub async fn channel(&self, id: B256) -> Value {
        self.ok("testchain_channel", json!([id])).await
    }

    pub async fn eth_call(&self, to: Address, data: Vec<u8>) -> Result<Bytes, Value> {
        self.call(
            "eth_call",
            json!([{"to": to, "data": Bytes::from(data)}, "latest"]),
        )
        .await
        .map(|v| v.as_str().unwrap().parse().unwrap())
    }
}

pub async fn spawn(cfg: ChainConfig) -> (RunningChain, Client) {
    let running = TestChain::spawn("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let client = Client::new(running.url());
    (running, client)
}

pub use tollgate_testchain::client::{TxOpts, escrow_call};

pub fn build_tx(signer: &PrivateKeySigner, calls: Vec<Call>, o: TxOpts) -> (Vec<u8>, B256) {
    tollgate_testchain::client::build_tx(signer, calls, o).unwrap()
}

/// A channel opened by `payer` to `payee` in PATH_USD, as mppx opens it.
pub struct Opened {
    pub raw: Vec<u8>,
    pub descriptor: Escrow::ChannelDescriptor,
    pub id: B256,
}

pub fn open_tx(payer: &PrivateKeySigner, payee: Address, deposit: u128, o: TxOpts) -> Opened {
    let salt = B256::random();
    let call = Escrow::openCall {
        payee,
        operator: Address::ZERO,
        token: PATH_USD,
        deposit: U96::from(deposit),
        salt,
        authorizedSigner: Address::ZERO,
    };
    let (raw, nonce_hash) = build_tx(payer, vec![escrow_call(call.abi_encode())], o);
    let descriptor = Escrow::ChannelDescriptor {
        payer: payer.address(),
        payee,
        operator: Address::ZERO,
        token: PATH_USD,
        salt,
        authorizedSigner: Address::ZERO,
        expiringNonceHash: nonce_hash,
    };
    let id = compute_precompile_channel_id_with_escrow(
        payer.address(),
        payee,
        Address::ZERO,
        PATH_USD,
        salt,
        Address::ZERO,
        nonce_hash,
        ESCROW,
        o.chain_id,
    );
    Opened {
        raw,
        descriptor,
        id,
    }
}

pub async fn voucher(signer: &PrivateKeySigner, id: B256, cum: u128, chain_id: u64) -> Bytes {
    sign_precompile_voucher_with_escrow(signer, id, cum, ESCROW, chain_id)
        .await
        .unwrap()
}

pub fn settle_call(d: &Escrow::ChannelDescriptor, cum: u128, sig: Bytes) -> Call {
    escrow_call(
        Escrow::settleCall {
            descriptor: d.clone(),
            cumulativeAmount: U96::from(cum),
            signature: sig,
        }
        .abi_encode(),
    )
}

pub fn close_call(d: &Escrow::ChannelDescriptor, cum: u128, capture: u128, sig: Bytes) -> Call {
    escrow_call(
        Escrow::closeCall {
            descriptor: d.clone(),
            cumulativeAmount: U96::from(cum),
            captureAmount: U96::from(capture),
            signature: sig,
        }
        .abi_encode(),
    )
}

pub fn top_up_call(d: &Escrow::ChannelDescriptor, add: u128) -> Call {
    escrow_call(
        Escrow::topUpCall {
            descriptor: d.clone(),
            additionalDeposit: U96::from(add),
        }
        .abi_encode(),
    )
}

pub fn parse_amount(v: &Value) -> u128 {
    v.as_str().unwrap().parse().unwrap()
}
