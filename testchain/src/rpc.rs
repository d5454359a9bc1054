//! JSON-RPC 2.0 over HTTP: request parsing, method dispatch and the response shapes.
//!
//! Blocks, receipts and transactions are rendered through tempo-alloy's own RPC types, so
//! alloy's `TempoNetwork` provider (and viem) parse them exactly as they would Tempo's.
//!
//! (Over 600 lines on purpose: the JSON-RPC method table and the rendering of blocks,
//! receipts and logs read best next to each other; it is a test tool.)

use alloy::consensus::EthereumReceipt;
use alloy::consensus::ReceiptWithBloom;
use alloy::consensus::transaction::Recovered;
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::rpc::types::{Header as RpcHeader, Log as RpcLog, Transaction, TransactionReceipt};
use axum::Router;
use axum::body::Bytes as BodyBytes;
use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tempo_alloy::primitives::transaction::TEMPO_TX_TYPE_ID;
use tempo_alloy::primitives::{AASigned, TempoTxEnvelope, TempoTxType};
use tempo_alloy::rpc::{TempoHeaderResponse, TempoTransactionReceipt};

use crate::chain::{GAS_ESTIMATE, logs_bloom, tempo_header};
use crate::exec::Revert;
use crate::state::{BlockRecord, State, TxRecord};
use crate::{BASE_FEE_PER_GAS, TestChain};

/// A JSON-RPC error object.
#[derive(Debug, Clone)]
pub(crate) struct RpcError {
    pub code: i64,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(-32602, message)
    }

    pub fn server(message: impl Into<String>) -> Self {
        Self::new(-32000, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(-32603, message)
    }

    fn method_not_found(method: &str) -> Self {
        Self::new(
            -32601,
            format!("the method {method} does not exist/is not available"),
        )
    }

    /// The geth shape of a reverted call, which alloy and viem decode custom errors from.
    pub fn reverted(r: Revert) -> Self {
        Self {
            code: 3,
            message: format!("execution reverted: {}", r.reason),
            data: Some(Value::String(r.data.to_string())),
        }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({ "code": self.code, "message": self.message });
        if let (Some(data), Some(obj)) = (&self.data, e.as_object_mut()) {
            obj.insert("data".into(), data.clone());
        }
        e
    }
}

pub(crate) fn router(chain: TestChain) -> Router {
    Router::new()
        .route("/", post(handle).get(banner))
        .with_state(chain)
}

async fn banner() -> &'static str {
    "tollgate-testchain: a local TEST chain, NO REAL MONEY. JSON-RPC 2.0 at POST /\n"
}

async fn handle(AxumState(chain): AxumState<TestChain>, body: BodyBytes) -> Response {
    // Signature recovery and the fsync of the state file are blocking work.
    let answer = tokio::task::spawn_blocking(move || handle_body(&chain, &body)).await;
    match answer {
        Ok(Some(v)) => (
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            v.to_string(),
        )
            .into_response(),
        // Only notifications: JSON-RPC says to answer nothing.
        Ok(None) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            tracing::error!(error = %e, "tollgate-testchain: request handler failed");
            let err = RpcError::internal("internal error");
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                error_response(Value::Null, &err).to_string(),
            )
                .into_response()
        }
    }
}

fn error_response(id: Value, e: &RpcError) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": e.to_json() })
}

fn handle_body(chain: &TestChain, body: &[u8]) -> Option<Value> {
    let request: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return Some(error_response(
                Value::Null,
                &RpcError::new(-32700, format!("parse error: {e}")),
            ));
        }
    };
    match request {
        Value::Array(items) if items.is_empty() => Some(error_response(
            Value::Null,
            &RpcError::new(-32600, "invalid request: empty batch"),
        )),
        Value::Array(items) => {
            let out: Vec<Value> = items
                .into_iter()
                .filter_map(|item| handle_one(chain, item))
                .collect();
            (!out.is_empty()).then_some(Value::Array(out))
        }
        other => handle_one(chain, other),
    }
}

fn handle_one(chain: &TestChain, request: Value) -> Option<Value> {
    let Value::Object(obj) = request else {
        return Some(error_response(
            Value::Null,
            &RpcError::new(-32600, "invalid request: not an object"),
        ));
    };
    let id = obj.get("id").cloned();
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return Some(error_response(
            id.unwrap_or(Value::Null),
            &RpcError::new(-32600, "invalid request: no method"),
        ));
    };
    let params = match obj.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(other) => vec![other.clone()],
    };
    let result = dispatch(chain, method, &params);
    if let Err(e) = &result {
        tracing::debug!(method, code = e.code, message = %e.message, "testchain: rpc error");
    }
    let id = id?;
    Some(match result {
        Ok(v) => json!({ "jsonrpc": "2.0", "id": id, "result": v }),
        Err(e) => error_response(id, &e),
    })
}

fn quantity(v: u64) -> Value {
    Value::String(format!("{v:#x}"))
}

fn param<T: DeserializeOwned>(params: &[Value], i: usize, name: &str) -> Result<T, RpcError> {
    let v = params
        .get(i)
        .ok_or_else(|| RpcError::invalid_params(format!("missing parameter {i}: {name}")))?;
    serde_json::from_value(v.clone())
        .map_err(|e| RpcError::invalid_params(format!("invalid {name}: {e}")))
}

/// A non-negative integer given as a JSON number, a hex quantity or a decimal string.
fn param_u64(params: &[Value], i: usize, name: &str) -> Result<u64, RpcError> {
    let bad = || RpcError::invalid_params(format!("invalid {name}: expected an integer"));
    match params.get(i) {
        Some(Value::Number(n)) => n.as_u64().ok_or_else(bad),
        Some(Value::String(s)) => match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).map_err(|_| bad()),
            None => s.parse().map_err(|_| bad()),
        },
        Some(_) => Err(bad()),
        None => Err(RpcError::invalid_params(format!(
            "missing parameter {i}: {name}"
        ))),
    }
}

/// The call fields of an `eth_call` / `eth_estimateGas` request; unknown fields are ignored.
#[derive(Deserialize)]
struct CallRequest {
    from: Option<Address>,
    to: Option<Address>,
    input: Option<Bytes>,
    data: Option<Bytes>,
    /// Tempo batch form: `calls: [{to, data|input, value}]`.
    calls: Option<Vec<CallItem>>,
}

#[derive(Deserialize)]
struct CallItem {
    to: Option<Address>,
    input: Option<Bytes>,
    data: Option<Bytes>,
}

impl CallRequest {
    fn calls(&self) -> Result<Vec<(Address, Bytes)>, RpcError> {
        let no_to = || RpcError::invalid_params("call without a `to` address");
        match &self.calls {
            Some(calls) if !calls.is_empty() => calls
                .iter()
                .map(|c| {
                    let input = c
                        .input
                        .clone()
                        .or_else(|| c.data.clone())
                        .unwrap_or_default();
                    Ok((c.to.ok_or_else(no_to)?, input))
                })
                .collect(),
            _ => {
                let input = self
                    .input
                    .clone()
                    .or_else(|| self.data.clone())
                    .unwrap_or_default();
                Ok(vec![(self.to.ok_or_else(no_to)?, input)])
            }
        }
    }
}

fn dispatch(chain: &TestChain, method: &str, params: &[Value]) -> Result<Value, RpcError> {
    match method {
        "eth_chainId" => Ok(quantity(chain.chain_id())),
        "net_version" => Ok(Value::String(chain.chain_id().to_string())),
        "web3_clientVersion" => Ok(Value::String(format!(
            "tollgate-testchain/{} (local test chain, NO REAL MONEY)",
            env!("CARGO_PKG_VERSION")
        ))),
        "eth_blockNumber" => Ok(chain.read(|s| quantity(s.blocks.len().saturating_sub(1) as u64))),
        "eth_getBlockByNumber" => {
            let tag: Value = param(params, 0, "block")?;
            let full = params.get(1).and_then(Value::as_bool).unwrap_or(false);
            chain.read(|s| {
                let number = match &tag {
                    Value::String(t) => match t.as_str() {
                        "latest" | "pending" | "safe" | "finalized" => {
                            s.blocks.len().saturating_sub(1) as u64
                        }
                        "earliest" => 0,
                        hex => parse_hex_u64(hex)
                            .ok_or_else(|| RpcError::invalid_params("invalid block number"))?,
                    },
                    Value::Number(n) => n
                        .as_u64()
                        .ok_or_else(|| RpcError::invalid_params("invalid block number"))?,
                    _ => return Err(RpcError::invalid_params("invalid block number")),
                };
                let block = usize::try_from(number).ok().and_then(|n| s.blocks.get(n));
                block.map_or(Ok(Value::Null), |b| render_block(s, b, full))
            })
        }
        "eth_maxPriorityFeePerGas" => Ok(quantity(0u64)),
        "eth_gasPrice" => Ok(quantity(BASE_FEE_PER_GAS)),
        "eth_estimateGas" => {
            let req: CallRequest = param(params, 0, "transaction request")?;
            match req.calls() {
                Ok(calls) => {
                    chain.simulate(req.from.unwrap_or_default(), &calls, true)?;
                    Ok(quantity(GAS_ESTIMATE))
                }
                // Nothing to dry-run (no target): the constant is what clients need.
                Err(_) => Ok(quantity(GAS_ESTIMATE)),
            }
        }
        "eth_fillTransaction" => Err(RpcError::method_not_found(method)),
        "eth_getTransactionCount" => {
            let addr: Address = param(params, 0, "address")?;
            Ok(chain.read(|s| quantity(s.nonce(addr, U256::ZERO))))
        }
        "eth_sendRawTransaction" => {
            let raw: Bytes = param(params, 0, "raw transaction")?;
            let hash = chain.send_raw(&raw)?;
            Ok(Value::String(hash.to_string()))
        }
        "eth_sendRawTransactionSync" => {
            let raw: Bytes = param(params, 0, "raw transaction")?;
            let hash = chain.send_raw(&raw)?;
            chain.read(|s| receipt_json(s, hash))
        }
        "eth_getTransactionReceipt" => {
            let hash: B256 = param(params, 0, "transaction hash")?;
            chain.read(|s| receipt_json(s, hash))
        }
        "eth_getLogs" => {
            let filter: LogFilter = param(params, 0, "filter")?;
            chain.read(|s| get_logs(s, &filter))
        }
        "eth_getTransactionByHash" => {
            let hash: B256 = param(params, 0, "transaction hash")?;
            chain.read(|s| match s.txs.get(&hash) {
                Some(rec) => render_tx(s, rec),
                None => Ok(Value::Null),
            })
        }
        "eth_call" => {
            let req: CallRequest = param(params, 0, "call request")?;
            let calls = req.calls()?;
            let out = chain.simulate(req.from.unwrap_or_default(), &calls, false)?;
            Ok(Value::String(out.to_string()))
        }
        // Tempo has no native token: every balance is a TIP-20 balance.
        "eth_getBalance" => Ok(quantity(0u64)),
        "tempo_fundAddress" => {
            let addr: Address = param(params, 0, "address")?;
            let hashes = chain.fund_address(addr)?;
            Ok(Value::Array(
                hashes
                    .into_iter()
                    .map(|h| Value::String(h.to_string()))
                    .collect(),
            ))
        }
        "testchain_increaseTime" => {
            let secs = param_u64(params, 0, "seconds")?;
            Ok(Value::from(chain.increase_time(secs)?))
        }
        "testchain_channel" => {
            let id: B256 = param(params, 0, "channel id")?;
            Ok(match chain.channel(id) {
                None => Value::Null,
                Some(c) => json!({
                    "id": c.id,
                    "payer": c.descriptor.payer,
                    "payee": c.descriptor.payee,
                    "operator": c.descriptor.operator,
                    "token": c.descriptor.token,
                    "salt": c.descriptor.salt,
                    "authorizedSigner": c.descriptor.authorizedSigner,
                    "expiringNonceHash": c.descriptor.expiringNonceHash,
                    // Decimal strings: amounts may exceed what a JSON number holds exactly.
                    "settled": c.settled.to_string(),
                    "deposit": c.deposit.to_string(),
                    "closeRequestedAt": c.close_requested_at,
                }),
            })
        }
        "testchain_balance" => {
            let token: Address = param(params, 0, "token")?;
            let owner: Address = param(params, 1, "owner")?;
            Ok(Value::String(chain.balance(token, owner).to_string()))
        }
        _ => Err(RpcError::method_not_found(method)),
    }
}

/// Most blocks one `eth_getLogs` may span (real nodes cap the range too).
pub(crate) const MAX_LOG_RANGE: u64 = 10_000;

/// `eth_getLogs`'s filter: a block range (or one block hash), addresses, and topics by position
/// (each `null`, one topic, or a list of alternatives).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogFilter {
    from_block: Option<Value>,
    to_block: Option<Value>,
    block_hash: Option<B256>,
    #[serde(default)]
    address: Option<OneOrMany<Address>>,
    #[serde(default)]
    topics: Vec<Option<OneOrMany<B256>>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: PartialEq> OneOrMany<T> {
    fn matches(&self, v: &T) -> bool {
        match self {
            OneOrMany::One(x) => x == v,
            // An empty list matches anything, as on geth.
            OneOrMany::Many(xs) => xs.is_empty() || xs.contains(v),
        }
    }
}

fn block_tag(s: &State, tag: Option<&Value>, default_latest: bool) -> Result<u64, RpcError> {
    let latest = s.blocks.len().saturating_sub(1) as u64;
    let bad = || RpcError::invalid_params("invalid block number in the log filter");
    match tag {
        None => Ok(if default_latest { latest } else { 0 }),
        Some(Value::String(t)) => match t.as_str() {
            "latest" | "pending" | "safe" | "finalized" => Ok(latest),
            "earliest" => Ok(0),
            hex => parse_hex_u64(hex).ok_or_else(bad),
        },
        Some(Value::Number(n)) => n.as_u64().ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

fn get_logs(s: &State, f: &LogFilter) -> Result<Value, RpcError> {
    let latest = s.blocks.len().saturating_sub(1) as u64;
    let (from, to) = match f.block_hash {
        Some(h) => match s.blocks.iter().find(|b| b.hash == h) {
            Some(b) => (b.number, b.number),
            None => return Err(RpcError::invalid_params("unknown block hash")),
        },
        None => (
            // Defaults as on geth: both ends "latest".
            block_tag(s, f.from_block.as_ref(), true)?,
            block_tag(s, f.to_block.as_ref(), true)?,
        ),
    };
    if from > to {
        return Err(RpcError::invalid_params("fromBlock is after toBlock"));
    }
    if to - from >= MAX_LOG_RANGE {
        return Err(RpcError::invalid_params(format!(
            "block range too large: at most {MAX_LOG_RANGE} blocks per query"
        )));
    }
    let mut out = Vec::new();
    for n in from..=to.min(latest) {
        let Some(block) = usize::try_from(n).ok().and_then(|n| s.blocks.get(n)) else {
            break;
        };
        let mut log_index = 0u64;
        for (tx_index, hash) in block.transactions.iter().enumerate() {
            let Some(rec) = s.txs.get(hash) else { continue };
            for log in &rec.logs {
                let index = log_index;
                log_index += 1;
                if let Some(a) = &f.address
                    && !a.matches(&log.address)
                {
                    continue;
                }
                let topics = log.data.topics();
                let topic_ok = f.topics.iter().enumerate().all(|(i, want)| match want {
                    None => true,
                    Some(w) => topics.get(i).is_some_and(|t| w.matches(t)),
                });
                if !topic_ok {
                    continue;
                }
                out.push(RpcLog {
                    inner: log.clone(),
                    block_hash: Some(block.hash),
                    block_number: Some(block.number),
                    block_timestamp: Some(block.timestamp),
                    transaction_hash: Some(rec.hash),
                    transaction_index: Some(tx_index as u64),
                    log_index: Some(index),
                    removed: false,
                });
            }
        }
    }
    to_json(&out)
}

fn parse_hex_u64(s: &str) -> Option<u64> {
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::internal(format!("serializing response: {e}")))
}

fn render_block(state: &State, b: &BlockRecord, full: bool) -> Result<Value, RpcError> {
    let raw_len: usize = b
        .transactions
        .iter()
        .filter_map(|h| {
            state
                .txs
                .get(h)
                .and_then(|t| t.raw.as_ref())
                .map(|raw| raw.len())
        })
        .sum();
    let header = TempoHeaderResponse {
        inner: RpcHeader {
            hash: b.hash,
            inner: tempo_header(b),
            total_difficulty: Some(U256::ZERO),
            size: Some(U256::from(600 + raw_len)),
        },
        timestamp_millis: b
            .timestamp
            .saturating_mul(1000)
            .saturating_add(b.timestamp_millis_part),
    };
    let mut v = to_json(&header)?;
    let transactions = if full {
        // Faucet mints have no signed transaction to show; they are listed by hash only.
        let mut out = Vec::new();
        for h in &b.transactions {
            match state.txs.get(h) {
                Some(rec) if rec.raw.is_some() => out.push(render_tx(state, rec)?),
                _ => out.push(Value::String(h.to_string())),
            }
        }
        out
    } else {
        b.transactions
            .iter()
            .map(|h| Value::String(h.to_string()))
            .collect()
    };
    if let Some(obj) = v.as_object_mut() {
        obj.insert("transactions".into(), Value::Array(transactions));
        obj.insert("uncles".into(), Value::Array(Vec::new()));
    }
    Ok(v)
}

fn block_of<'a>(state: &'a State, rec: &TxRecord) -> Result<&'a BlockRecord, RpcError> {
    usize::try_from(rec.block_number)
        .ok()
        .and_then(|n| state.blocks.get(n))
        .ok_or_else(|| RpcError::internal("transaction without its block"))
}

fn receipt_json(state: &State, hash: B256) -> Result<Value, RpcError> {
    let Some(rec) = state.txs.get(&hash) else {
        return Ok(Value::Null);
    };
    let block = block_of(state, rec)?;
    let logs: Vec<RpcLog> = rec
        .logs
        .iter()
        .enumerate()
        .map(|(i, log)| RpcLog {
            inner: log.clone(),
            block_hash: Some(block.hash),
            block_number: Some(block.number),
            block_timestamp: Some(block.timestamp),
            transaction_hash: Some(rec.hash),
            transaction_index: Some(0),
            log_index: Some(i as u64),
            removed: false,
        })
        .collect();
    let receipt = TempoTransactionReceipt {
        inner: TransactionReceipt {
            inner: ReceiptWithBloom {
                receipt: EthereumReceipt {
                    tx_type: TempoTxType::AA,
                    success: rec.success,
                    cumulative_gas_used: rec.gas_used,
                    logs,
                },
                logs_bloom: logs_bloom(&rec.logs),
            },
            transaction_hash: rec.hash,
            transaction_index: Some(0),
            block_hash: Some(block.hash),
            block_number: Some(block.number),
            gas_used: rec.gas_used,
            effective_gas_price: u128::from(BASE_FEE_PER_GAS),
            blob_gas_used: None,
            blob_gas_price: None,
            from: rec.from,
            to: rec.to,
            contract_address: None,
        },
        fee_token: rec.fee_token,
        fee_payer: rec.fee_payer,
    };
    let mut v = to_json(&receipt)?;
    // Not a standard field: why the transaction reverted, for whoever debugs a test.
    if let (Some(reason), Some(obj)) = (&rec.revert_reason, v.as_object_mut()) {
        obj.insert("revertReason".into(), Value::String(reason.clone()));
        if let Some(data) = &rec.revert_data {
            obj.insert("revertData".into(), Value::String(data.to_string()));
        }
    }
    Ok(v)
}

fn render_tx(state: &State, rec: &TxRecord) -> Result<Value, RpcError> {
    let Some(raw) = &rec.raw else {
        return Ok(Value::Null);
    };
    let block = block_of(state, rec)?;
    let body = match raw.split_first() {
        Some((&TEMPO_TX_TYPE_ID, body)) => body,
        _ => return Err(RpcError::internal("stored transaction is not 0x76")),
    };
    let signed = AASigned::rlp_decode(&mut &body[..])
        .map_err(|e| RpcError::internal(format!("stored transaction does not decode: {e}")))?;
    let tx = Transaction {
        inner: Recovered::new_unchecked(TempoTxEnvelope::AA(signed), rec.from),
        block_hash: Some(block.hash),
        block_number: Some(block.number),
        transaction_index: Some(0),
        effective_gas_price: Some(u128::from(BASE_FEE_PER_GAS)),
        block_timestamp: Some(block.timestamp),
    };
    to_json(&tx)
}
