//! Chain access for what tollgate itself sends: settlements and closes (the `mpp` crate sends
//! the client's open and top-up transactions through its own provider). Behind a trait so the
//! schedule and close logic do not care whether the JSON-RPC endpoint is a Tempo node or the
//! project's local test chain; [`RpcChain`] speaks to either.

use alloy::eips::Encodable2718;
use alloy::network::ReceiptResponse;
use alloy::primitives::{Address, B256, Bytes, TxKind, U256, Uint};
use alloy::providers::Provider;
use alloy::signers::Signer;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use async_trait::async_trait;
use mpp::protocol::methods::tempo::session::ChannelDescriptor;
use tempo_alloy::contracts::precompiles::ITIP20ChannelReserve;
use tempo_alloy::primitives::TempoTransaction;
use tempo_alloy::primitives::transaction::{Call, TEMPO_EXPIRING_NONCE_KEY};

/// A channel as the escrow holds it (base units).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OnChain {
    pub settled: u128,
    pub deposit: u128,
    pub close_requested_at: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The transaction was included and reverted: nothing changed on chain.
    #[error("transaction reverted: {0}")]
    Reverted(String),
    /// The node refused the transaction: nothing was broadcast.
    #[error("transaction refused: {0}")]
    Refused(String),
    /// The outcome is unknown (timeout, connection lost after sending): check before retrying.
    #[error("chain unavailable: {0}")]
    Unavailable(String),
    #[error("invalid: {0}")]
    Invalid(String),
}

/// Where an event sits in the chain's log: events are applied in this order, so a cancellation
/// only ends a close request that came before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct EventPos {
    pub block: u64,
    pub index: u64,
}

/// What a payer did to one of our channels on chain, read from the escrow's event log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelEvent {
    /// `requestClose`: after `grace_end` (chain time, Unix seconds) the payer may withdraw.
    CloseRequested {
        channel: B256,
        grace_end: u64,
        pos: EventPos,
    },
    /// A top-up cleared the close request.
    CloseCancelled { channel: B256, pos: EventPos },
    /// The channel is gone (closed by the payee, or withdrawn by the payer), and what the
    /// payee got in total.
    Closed {
        channel: B256,
        settled_to_payee: u128,
        pos: EventPos,
    },
}

impl ChannelEvent {
    pub fn channel(&self) -> B256 {
        match self {
            ChannelEvent::CloseRequested { channel, .. }
            | ChannelEvent::CloseCancelled { channel, .. }
            | ChannelEvent::Closed { channel, .. } => *channel,
        }
    }

    pub fn pos(&self) -> EventPos {
        match self {
            ChannelEvent::CloseRequested { pos, .. }
            | ChannelEvent::CloseCancelled { pos, .. }
            | ChannelEvent::Closed { pos, .. } => *pos,
        }
    }
}

#[async_trait]
pub trait Chain: Send + Sync + 'static {
    async fn channel(&self, id: B256) -> Result<OnChain, ChainError>;
    /// The chain's clock: the latest block's timestamp (Unix seconds).
    async fn now(&self) -> Result<u64, ChainError>;
    /// The latest block number.
    async fn latest_block(&self) -> Result<u64, ChainError>;
    /// The escrow's close requests, cancellations and closes of channels paying us in blocks
    /// `from..=to` (one `eth_getLogs`, however many channels), in log order; only `channel`'s
    /// when given. A node that refuses the range (too many blocks or results) answers
    /// [`ChainError::Refused`]: the caller asks again with a smaller one.
    async fn channel_events(
        &self,
        from: u64,
        to: u64,
        channel: Option<B256>,
    ) -> Result<Vec<ChannelEvent>, ChainError>;
    /// `settle(descriptor, cumulative, signature)`: pays the payee up to `cumulative`.
    async fn settle(
        &self,
        descriptor: &ChannelDescriptor,
        cumulative: u128,
        signature: &[u8],
    ) -> Result<B256, ChainError>;
    /// `close(descriptor, cumulative, capture, signature)`: pays `capture` to the payee and
    /// refunds the rest of the deposit.
    async fn close(
        &self,
        descriptor: &ChannelDescriptor,
        cumulative: u128,
        capture: u128,
        signature: &[u8],
    ) -> Result<B256, ChainError>;
}

/// Blocks one `channel_events` call asks for at first (nodes cap `eth_getLogs` ranges; the
/// watcher halves the range while a node refuses it).
pub const EVENT_RANGE: u64 = 5_000;

/// JSON-RPC chain access with the payee's key (the payee, or its operator, is the only party
/// the escrow lets settle and close).
pub struct RpcChain {
    provider: mpp::server::TempoProvider,
    signer: PrivateKeySigner,
    chain_id: u64,
    escrow: Address,
    /// Reads only (audits): sending is refused.
    read_only: bool,
}

/// How long one JSON-RPC call may take before it counts as failed (a chain that accepts the
/// connection and never answers — a stalled load balancer, a partition without a reset —
/// must fail a settlement or a close, not hang it).
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// A Tempo provider (the `mpp` crate's network and fillers) whose every HTTP call is bounded:
/// `mpp::server::tempo_provider` builds one on a client with no timeout at all.
pub fn tempo_provider(
    rpc_url: &str,
    call_timeout: std::time::Duration,
) -> Result<mpp::server::TempoProvider, String> {
    use alloy::providers::ProviderBuilder;
    use alloy::transports::http::reqwest;
    let url: reqwest::Url = rpc_url
        .parse()
        .map_err(|e| format!("rpc url {rpc_url}: {e}"))?;
    let client = reqwest::Client::builder()
        .connect_timeout(call_timeout.min(std::time::Duration::from_secs(5)))
        .timeout(call_timeout)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    Ok(
        ProviderBuilder::new_with_network::<tempo_alloy::TempoNetwork>()
            .connect_reqwest(client, url),
    )
}

impl RpcChain {
    pub fn new(
        rpc_url: &str,
        signer: PrivateKeySigner,
        chain_id: u64,
        escrow: Address,
    ) -> Result<Self, ChainError> {
        RpcChain::with_timeout(rpc_url, signer, chain_id, escrow, CALL_TIMEOUT)
    }

    /// As [`RpcChain::new`], each JSON-RPC call bounded by `call_timeout`.
    pub fn with_timeout(
        rpc_url: &str,
        signer: PrivateKeySigner,
        chain_id: u64,
        escrow: Address,
        call_timeout: std::time::Duration,
    ) -> Result<Self, ChainError> {
        let provider = tempo_provider(rpc_url, call_timeout).map_err(ChainError::Invalid)?;
        Ok(RpcChain {
            provider,
            signer,
            chain_id,
            escrow,
            read_only: false,
        })
    }

    /// Chain reads without the payee's key (operator audits); settlements and closes are
    /// refused.
    pub fn read_only(rpc_url: &str, chain_id: u64, escrow: Address) -> Result<Self, ChainError> {
        let mut c = RpcChain::new(rpc_url, PrivateKeySigner::random(), chain_id, escrow)?;
        c.read_only = true;
        Ok(c)
    }

    async fn send(&self, input: Vec<u8>) -> Result<B256, ChainError> {
        if self.read_only {
            return Err(ChainError::Invalid(
                "this chain access is read-only (no payee key)".into(),
            ));
        }
        let gas_price = self
            .provider
            .get_gas_price()
            .await
            .map_err(|e| ChainError::Unavailable(e.to_string()))?;
        // The validity window is counted on the chain's clock, not ours: a node whose clock
        // drifted would otherwise send transactions the chain refuses as expired.
        let now = self.now().await?;
        // An expiring nonce: nodes sharing the payee key never race for a sequential nonce,
        // and a lost transaction stops being valid after 25 s (so a retry cannot double-send).
        let tx = TempoTransaction {
            chain_id: self.chain_id,
            nonce: 0,
            nonce_key: TEMPO_EXPIRING_NONCE_KEY,
            valid_before: std::num::NonZeroU64::new(now + 25),
            gas_limit: 2_000_000,
            max_fee_per_gas: gas_price,
            max_priority_fee_per_gas: gas_price,
            calls: vec![Call {
                to: TxKind::Call(self.escrow),
                value: U256::ZERO,
                input: Bytes::from(input),
            }],
            ..Default::default()
        };
        let sig = self
            .signer
            .sign_hash(&tx.signature_hash())
            .await
            .map_err(|e| ChainError::Invalid(format!("signing: {e}")))?;
        let raw = tx.into_signed(sig.into()).encoded_2718();
        let pending = self
            .provider
            .send_raw_transaction(&raw)
            .await
            .map_err(|e| {
                if e.as_error_resp().is_some() {
                    ChainError::Refused(e.to_string())
                } else {
                    ChainError::Unavailable(e.to_string())
                }
            })?;
        let receipt = pending
            .with_timeout(Some(std::time::Duration::from_secs(30)))
            .get_receipt()
            .await
            .map_err(|e| ChainError::Unavailable(e.to_string()))?;
        let hash = receipt.transaction_hash();
        if !receipt.status() {
            return Err(ChainError::Reverted(format!("{hash}")));
        }
        Ok(hash)
    }
}

fn u96(v: u128, what: &str) -> Result<Uint<96, 2>, ChainError> {
    Uint::<96, 2>::try_from(v).map_err(|_| ChainError::Invalid(format!("{what} exceeds uint96")))
}

/// The descriptor in the precompile's ABI form.
pub fn wire_descriptor(
    d: &ChannelDescriptor,
) -> Result<ITIP20ChannelReserve::ChannelDescriptor, ChainError> {
    let addr = |s: &str, f: &str| -> Result<Address, ChainError> {
        s.parse()
            .map_err(|_| ChainError::Invalid(format!("descriptor {f}")))
    };
    let word = |s: &str, f: &str| -> Result<B256, ChainError> {
        s.parse()
            .map_err(|_| ChainError::Invalid(format!("descriptor {f}")))
    };
    Ok(ITIP20ChannelReserve::ChannelDescriptor {
        payer: addr(&d.payer, "payer")?,
        payee: addr(&d.payee, "payee")?,
        operator: addr(&d.operator, "operator")?,
        token: addr(&d.token, "token")?,
        salt: word(&d.salt, "salt")?,
        authorizedSigner: addr(&d.authorized_signer, "authorizedSigner")?,
        expiringNonceHash: word(&d.expiring_nonce_hash, "expiringNonceHash")?,
    })
}

fn quantity(v: &serde_json::Value, what: &str) -> Result<u64, ChainError> {
    v.as_str()
        .and_then(|s| s.strip_prefix("0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .ok_or_else(|| ChainError::Invalid(format!("{what} is not a hex quantity: {v}")))
}

fn unavailable(e: impl std::fmt::Display) -> ChainError {
    ChainError::Unavailable(e.to_string())
}

#[async_trait]
impl Chain for RpcChain {
    async fn now(&self) -> Result<u64, ChainError> {
        let block: serde_json::Value = self
            .provider
            .raw_request("eth_getBlockByNumber".into(), ("latest", false))
            .await
            .map_err(unavailable)?;
        quantity(&block["timestamp"], "block timestamp")
    }

    async fn latest_block(&self) -> Result<u64, ChainError> {
        let n: serde_json::Value = self
            .provider
            .raw_request("eth_blockNumber".into(), ())
            .await
            .map_err(unavailable)?;
        quantity(&n, "block number")
    }

    async fn channel_events(
        &self,
        from: u64,
        to: u64,
        channel: Option<B256>,
    ) -> Result<Vec<ChannelEvent>, ChainError> {
        use ITIP20ChannelReserve::{ChannelClosed, CloseRequestCancelled, CloseRequested};
        use alloy::sol_types::SolEvent;
        if from > to {
            return Ok(Vec::new());
        }
        let payee = B256::left_padding_from(self.signer.address().as_slice());
        let filter = serde_json::json!({
            "fromBlock": format!("{from:#x}"),
            "toBlock": format!("{to:#x}"),
            "address": self.escrow,
            "topics": [
                [CloseRequested::SIGNATURE_HASH, CloseRequestCancelled::SIGNATURE_HASH, ChannelClosed::SIGNATURE_HASH],
                channel,
                null,
                payee,
            ],
        });
        let logs: Vec<alloy::rpc::types::Log> = self
            .provider
            .raw_request("eth_getLogs".into(), (filter,))
            .await
            .map_err(|e| {
                // An error answer (range or result count over the node's cap) is the node
                // refusing this query; anything else is the node being away.
                if e.as_error_resp().is_some() {
                    ChainError::Refused(e.to_string())
                } else {
                    ChainError::Unavailable(e.to_string())
                }
            })?;
        let mut events = Vec::new();
        for log in logs {
            let Some(topic) = log.topic0().copied() else {
                continue;
            };
            let (Some(block), Some(index)) = (log.block_number, log.log_index) else {
                // Pending logs carry no position; they come again once mined.
                continue;
            };
            let pos = EventPos { block, index };
            let ev = if topic == CloseRequested::SIGNATURE_HASH {
                let e = CloseRequested::decode_log_data(log.data())
                    .map_err(|e| ChainError::Invalid(format!("CloseRequested log: {e}")))?;
                ChannelEvent::CloseRequested {
                    channel: e.channelId,
                    grace_end: u64::try_from(e.closeGraceEnd).unwrap_or(u64::MAX),
                    pos,
                }
            } else if topic == CloseRequestCancelled::SIGNATURE_HASH {
                let e = CloseRequestCancelled::decode_log_data(log.data())
                    .map_err(|e| ChainError::Invalid(format!("CloseRequestCancelled log: {e}")))?;
                ChannelEvent::CloseCancelled {
                    channel: e.channelId,
                    pos,
                }
            } else if topic == ChannelClosed::SIGNATURE_HASH {
                let e = ChannelClosed::decode_log_data(log.data())
                    .map_err(|e| ChainError::Invalid(format!("ChannelClosed log: {e}")))?;
                ChannelEvent::Closed {
                    channel: e.channelId,
                    settled_to_payee: e.settledToPayee.to::<u128>(),
                    pos,
                }
            } else {
                continue;
            };
            events.push(ev);
        }
        events.sort_by_key(ChannelEvent::pos);
        Ok(events)
    }

    async fn channel(&self, id: B256) -> Result<OnChain, ChainError> {
        let data = ITIP20ChannelReserve::getChannelStateCall { channelId: id }.abi_encode();
        let out: Bytes = self
            .provider
            .raw_request(
                "eth_call".into(),
                (
                    serde_json::json!({"to": self.escrow, "input": Bytes::from(data)}),
                    "latest",
                ),
            )
            .await
            .map_err(|e| ChainError::Unavailable(e.to_string()))?;
        let s = ITIP20ChannelReserve::getChannelStateCall::abi_decode_returns(&out)
            .map_err(|e| ChainError::Invalid(format!("getChannelState reply: {e}")))?;
        Ok(OnChain {
            settled: s.settled.to::<u128>(),
            deposit: s.deposit.to::<u128>(),
            close_requested_at: u64::from(s.closeRequestedAt),
        })
    }

    async fn settle(
        &self,
        descriptor: &ChannelDescriptor,
        cumulative: u128,
        signature: &[u8],
    ) -> Result<B256, ChainError> {
        let call = ITIP20ChannelReserve::settleCall {
            descriptor: wire_descriptor(descriptor)?,
            cumulativeAmount: u96(cumulative, "cumulative")?,
            signature: Bytes::copy_from_slice(signature),
        };
        self.send(call.abi_encode()).await
    }

    async fn close(
        &self,
        descriptor: &ChannelDescriptor,
        cumulative: u128,
        capture: u128,
        signature: &[u8],
    ) -> Result<B256, ChainError> {
        let call = ITIP20ChannelReserve::closeCall {
            descriptor: wire_descriptor(descriptor)?,
            cumulativeAmount: u96(cumulative, "cumulative")?,
            captureAmount: u96(capture, "capture")?,
            signature: Bytes::copy_from_slice(signature),
        };
        self.send(call.abi_encode()).await
    }
}
