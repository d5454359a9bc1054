//! The channel store shared by every node: the `mpp` crate's [`ChannelStore`] over Redis (many
//! nodes) or redb (one node, `tollgate dev`).
//!
//! Two things are added to what the crate stores (its [`ChannelState`]):
//! - each rise of a channel's accepted cumulative becomes a **pending credit** written in the
//!   same atomic commit as the new state, so a voucher is never accepted without its credit
//!   being recorded, and never credited twice (the credit key is `mpp:{channel}:{cumulative}`);
//!   [`crate::Payments::drain_credits`] moves pending credits into the money core;
//! - the descriptor, the signed vouchers (settlement needs a signature for the amount it
//!   settles), and the close and settlement history.
//!
//! Updates are linearizable per channel across nodes: Redis takes a per-channel lock
//! (`SET NX PX`), reads, runs the crate's updater (which verifies the voucher's signature) on
//! this node, and commits with one Lua script that writes only while the lock is still its own
//! (a fencing check), so a node that stalled past the lock's life writes nothing. redb write
//! transactions are serial by themselves. Records are never deleted: they are what stops a
//! replayed voucher from crediting again.

use std::sync::Arc;

use crate::chain::EventPos;
use async_trait::async_trait;
use mpp::VerificationError;
use mpp::protocol::methods::tempo::session::ChannelDescriptor;
use mpp::protocol::methods::tempo::session_method::{ChannelState, ChannelStore};
use serde::{Deserialize, Serialize};

mod embedded;
mod redis;

pub use embedded::EmbeddedChannels;
pub use redis::RedisChannels;

use tollgate_metering::units::base_to_picos;

/// How many signed vouchers a channel keeps (newest last) for settlement.
const KEEP_VOUCHERS: usize = 64;

/// A voucher the payer signed: its cumulative amount (base units) and signature bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedVoucher {
    pub cumulative: u128,
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
}

/// One settlement or close sent on chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainOp {
    /// `settle` or `close`.
    pub kind: String,
    pub cumulative: u128,
    /// What the payee received in total after this operation (base units).
    pub settled: u128,
    pub tx_hash: String,
    pub at_ms: u64,
}

/// What a close decided, recorded before the close transaction is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseRecord {
    pub cumulative: u128,
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
    /// Captured by the payee; the rest of the deposit goes back to the payer.
    pub capture: u128,
    /// Refunded to the payer on chain, in p$ (whole base units).
    pub refund_picos: i64,
    /// What the close asked the account for (p$, key `mpp-close:{channel}`): fixed at the
    /// first attempt so a retry charges the same key with the same amount.
    #[serde(default)]
    pub refund_ask_picos: Option<i64>,
    pub challenge_id: String,
    pub tx_hash: Option<String>,
}

/// A close the payer started on chain (`requestClose`) and what tollgate did about it: capture
/// the highest accepted voucher in full before the grace period ends, or else write off the
/// credit it no longer backs. One value per close request (a payer may request, cancel with a
/// top-up, and request again: each request is a new `cycle`). See docs/payments.md ("Channel
/// lifecycle").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForcedClose {
    /// Chain time (Unix seconds) from which the payer may `withdraw` the deposit.
    pub grace_end: u64,
    /// Which close request of this channel (1, 2, …): the write-off's key carries it.
    #[serde(default)]
    pub cycle: u32,
    /// Where the request is in the chain's log, once its event was read (a request first seen
    /// by reading the channel has none yet). Only a cancellation after it ends it.
    #[serde(default)]
    pub requested_at: Option<EventPos>,
    /// Where the cancellation is in the chain's log.
    #[serde(default)]
    pub cancelled_at: Option<EventPos>,
    /// The cumulative amount captured on chain once it covered every accepted voucher.
    #[serde(default)]
    pub captured: Option<u128>,
    /// The write-off asked (p$), fixed at the first attempt so a retry uses the same key and
    /// amount.
    #[serde(default)]
    pub write_off_ask: Option<i64>,
    /// What the write-off took from the account (p$).
    #[serde(default)]
    pub written_off: Option<i64>,
    /// The write-off is being given back (the voucher was captured after all, or the payer
    /// cancelled the close): a reversal of its key was queued with the record.
    #[serde(default)]
    pub restored: bool,
    /// The payer cancelled the request (a top-up on chain).
    #[serde(default)]
    pub cancelled: bool,
}

impl ForcedClose {
    /// Still to be resolved: neither cancelled nor captured.
    pub fn active(&self) -> bool {
        !self.cancelled && self.captured.is_none()
    }
}

/// The books of a channel once it is gone on chain: what the payee got decides what of the
/// credit was unbacked; a write-off made earlier is trued up to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloseBooks {
    /// Further write-off asked at the close (p$), fixed before it is sent.
    #[serde(default)]
    pub write_off_ask: Option<i64>,
    /// Over-written-off credit given back at the close (p$), queued with the record.
    #[serde(default)]
    pub given_back: Option<i64>,
}

/// Where a channel is in its life (docs/payments.md has the table of who moves each edge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Lifecycle {
    /// Opened; no voucher beyond the opening one yet.
    Open,
    /// Vouchers are accepted and credited.
    Active,
    /// The payer asked for a cooperative close: no more vouchers, capture being decided.
    Closing,
    /// The payer started a close on chain: no more vouchers; capture in progress.
    CloseRequested,
    /// Every accepted voucher is captured on chain.
    Captured,
    /// The voucher could not be captured in time: its unbacked credit was written off.
    WrittenOff,
    /// Gone on chain (closed by us, or withdrawn by the payer) and settled in our books.
    Closed,
}

/// Everything tollgate keeps about one channel.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelRecord {
    pub state: ChannelState,
    /// The money-core account the channel's vouchers credit (derived from the payer).
    pub account: String,
    #[serde(default)]
    pub descriptor: Option<ChannelDescriptor>,
    #[serde(default)]
    pub vouchers: Vec<SignedVoucher>,
    #[serde(default)]
    pub close: Option<CloseRecord>,
    #[serde(default)]
    pub chain_ops: Vec<ChainOp>,
    #[serde(default)]
    pub forced_close: Option<ForcedClose>,
    /// The channel is gone on chain; what the payee got in total (from the escrow's
    /// `ChannelClosed` event).
    #[serde(default)]
    pub closed_on_chain: Option<u128>,
    #[serde(default)]
    pub close_books: Option<CloseBooks>,
}

impl ChannelRecord {
    /// Records what the chain has settled (never lowering it) and the operation that did it.
    pub fn record_settled(&mut self, settled: u128, op: Option<ChainOp>) {
        self.state.settled_on_chain = self.state.settled_on_chain.max(settled);
        if let Some(op) = op {
            self.chain_ops.push(op);
        }
    }

    pub fn lifecycle(&self) -> Lifecycle {
        let st = &self.state;
        if st.finalized {
            return Lifecycle::Closed;
        }
        if let Some(f) = &self.forced_close
            && !f.cancelled
        {
            return if f.written_off.is_some() && !f.restored {
                Lifecycle::WrittenOff
            } else if f.captured.is_some() {
                Lifecycle::Captured
            } else {
                Lifecycle::CloseRequested
            };
        }
        if self.close.is_some() || st.closing {
            return Lifecycle::Closing;
        }
        if self.vouchers.len() > 1 || st.highest_voucher_amount > st.settled_on_chain {
            Lifecycle::Active
        } else {
            Lifecycle::Open
        }
    }

    /// What of this channel's accepted vouchers can still become (or has become) ours on
    /// chain, in base units: the captured amount once the channel is closed or written off,
    /// else the highest accepted voucher (the payee can settle it while the channel lives).
    pub fn capturable(&self) -> u128 {
        let settled = self
            .state
            .settled_on_chain
            .max(self.closed_on_chain.unwrap_or(0));
        match self.lifecycle() {
            Lifecycle::Closed => self
                .close
                .as_ref()
                .filter(|c| c.tx_hash.is_some())
                .map_or(settled, |c| c.capture.max(settled)),
            Lifecycle::WrittenOff => settled,
            _ if self.closed_on_chain.is_some() => settled,
            _ => self.state.highest_voucher_amount,
        }
    }
}

/// A pending credit that cannot be applied (refused by the money store for a reason retrying
/// will not change): set aside so it does not hold up the others, for an operator to resolve.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoisonedCredit {
    pub credit: PendingCredit,
    pub reason: String,
    pub at_ms: u64,
}

/// A credit decided with a channel update (or a reversal of a charge) and not yet applied to
/// the money core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCredit {
    /// Idempotency key in the money core: `mpp:{channel}:{cumulative}` for a voucher.
    pub key: String,
    pub account: String,
    pub picos: i64,
    /// Set for a reversal: the charge key it gives back. The drain first makes sure that charge
    /// was applied (charging the same key again is a no-op if it was), then credits `key`, so
    /// the net is zero whether or not the charge had landed.
    #[serde(default)]
    pub reverses: Option<String>,
    /// Not applied before this time (Unix ms): the reversal of a start's charge, held while the
    /// start is under way; released when it goes live, due at this deadline if nobody says
    /// (the process died, the client went away).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
}

/// The next record and the credits it implies, committed together.
pub struct Update {
    pub record: ChannelRecord,
    pub credits: Vec<PendingCredit>,
}

/// The crate's one-shot read-modify-write of a channel's state.
pub type StateUpdater =
    Box<dyn FnOnce(Option<ChannelState>) -> Result<Option<ChannelState>, VerificationError> + Send>;

pub type Updater =
    Box<dyn FnOnce(Option<ChannelRecord>) -> Result<Update, VerificationError> + Send>;

/// An updater that edits the channel's existing record (refused when the channel is gone) and
/// queues the credits `f` returns in the same atomic update.
pub fn edit(f: impl FnOnce(&mut ChannelRecord) -> Vec<PendingCredit> + Send + 'static) -> Updater {
    Box::new(move |prev| {
        let mut record = prev.ok_or_else(|| VerificationError::channel_not_found("gone"))?;
        let credits = f(&mut record);
        Ok(Update { record, credits })
    })
}

/// Storage for channel records and pending credits.
#[async_trait]
pub trait ChannelBackend: Send + Sync + 'static {
    async fn get(&self, id: &str) -> Result<Option<ChannelRecord>, VerificationError>;
    /// Atomic read-modify-write of one channel; when the updater fails nothing is written.
    async fn update(&self, id: &str, f: Updater) -> Result<ChannelRecord, VerificationError>;
    async fn pending_credits(&self) -> Result<Vec<PendingCredit>, VerificationError>;
    /// Records a credit to apply outside any channel update (a reversal); idempotent by key.
    async fn add_pending(&self, credit: &PendingCredit) -> Result<(), VerificationError>;
    /// Records a held credit (a start's reversal, due at its `not_before_ms`) apart from the
    /// pending ones (a build that does not know holds never applies it early), replacing one
    /// held under its key.
    async fn hold(&self, credit: &PendingCredit) -> Result<(), VerificationError>;
    /// Every held credit.
    async fn held_credits(&self) -> Result<Vec<PendingCredit>, VerificationError>;
    /// Atomically takes `key` out of the held credits and, when it was held and `due` is
    /// given, records `due` as pending (unless one is pending under its key). Returns whether
    /// `key` was held.
    async fn unhold(
        &self,
        key: &str,
        due: Option<&PendingCredit>,
    ) -> Result<bool, VerificationError>;
    /// Forgets a pending credit once the money core has it (idempotent).
    async fn credit_done(&self, key: &str) -> Result<(), VerificationError>;
    /// Every channel id ever stored.
    async fn channel_ids(&self) -> Result<Vec<String>, VerificationError>;
    /// Moves a pending credit aside (atomically: it is then no longer pending).
    async fn poison(&self, p: &PoisonedCredit) -> Result<(), VerificationError>;
    async fn poisoned(&self) -> Result<Vec<PoisonedCredit>, VerificationError>;
    /// Takes a credit out of the poisoned set: back to pending with `retry`, else gone.
    /// Returns it, or `None` when no such key is poisoned.
    async fn unpoison(
        &self,
        key: &str,
        retry: bool,
    ) -> Result<Option<PoisonedCredit>, VerificationError>;
    /// Small named values (the close watcher's block cursor).
    async fn meta_get(&self, key: &str) -> Result<Option<String>, VerificationError>;
    async fn meta_set(&self, key: &str, value: &str) -> Result<(), VerificationError>;
    /// Channels with a forced close not yet resolved (so the watcher visits only those).
    async fn forced_add(&self, id: &str) -> Result<(), VerificationError>;
    async fn forced_remove(&self, id: &str) -> Result<(), VerificationError>;
    async fn forced_ids(&self) -> Result<Vec<String>, VerificationError>;
}

/// The account id of a payer: a `did:pkh` (CAIP-10) identifier, lowercase.
pub fn account_of(chain_id: u64, payer: &alloy::primitives::Address) -> String {
    format!("did:pkh:eip155:{chain_id}:{payer:#x}")
}

/// Wraps the crate's updater: tracks signed vouchers and turns each rise of the accepted
/// cumulative into a pending credit.
fn wrap(id: String, chain_id: u64, updater: StateUpdater) -> Updater {
    Box::new(move |prev: Option<ChannelRecord>| {
        let prev_state = prev.as_ref().map(|r| r.state.clone());
        let prev_high = prev_state
            .as_ref()
            .map(|s| s.highest_voucher_amount)
            .unwrap_or(0);
        let next = updater(prev_state)?.ok_or_else(|| {
            // The TIP-1034 flows never delete; refusing keeps the record (and its replay
            // protection) whatever happens.
            VerificationError::internal("refusing to delete a channel record")
        })?;
        let mut record = match prev {
            Some(r) => r,
            None => ChannelRecord {
                account: account_of(chain_id, &next.payer),
                state: next.clone(),
                descriptor: None,
                vouchers: Vec::new(),
                close: None,
                chain_ops: Vec::new(),
                forced_close: None,
                closed_on_chain: None,
                close_books: None,
            },
        };
        let mut credits = Vec::new();
        if next.highest_voucher_amount > prev_high {
            let delta = next.highest_voucher_amount - prev_high;
            let picos = base_to_picos(delta).ok_or_else(|| {
                VerificationError::invalid_amount(format!(
                    "a single voucher may add at most $9,000 of credit (this one adds {delta} base units)"
                ))
            })?;
            credits.push(PendingCredit {
                key: format!("mpp:{id}:{}", next.highest_voucher_amount),
                account: record.account.clone(),
                picos,
                reverses: None,
                not_before_ms: None,
            });
            if let Some(sig) = &next.highest_voucher_signature {
                record.vouchers.push(SignedVoucher {
                    cumulative: next.highest_voucher_amount,
                    signature: sig.clone(),
                });
                let extra = record.vouchers.len().saturating_sub(KEEP_VOUCHERS);
                record.vouchers.drain(..extra);
            }
        }
        record.state = next;
        Ok(Update { record, credits })
    })
}

/// The crate-facing store: `Arc<SharedChannels>` is handed to `mpp`'s session method.
pub struct SharedChannels {
    backend: Arc<dyn ChannelBackend>,
    chain_id: u64,
}

impl SharedChannels {
    pub fn new(backend: Arc<dyn ChannelBackend>, chain_id: u64) -> Self {
        SharedChannels { backend, chain_id }
    }
}

type Fut<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

impl ChannelStore for SharedChannels {
    fn get_channel(
        &self,
        channel_id: &str,
    ) -> Fut<'_, Result<Option<ChannelState>, VerificationError>> {
        let id = channel_id.to_ascii_lowercase();
        Box::pin(async move { Ok(self.backend.get(&id).await?.map(|r| r.state)) })
    }

    fn update_channel(
        &self,
        channel_id: &str,
        updater: StateUpdater,
    ) -> Fut<'_, Result<Option<ChannelState>, VerificationError>> {
        let id = channel_id.to_ascii_lowercase();
        let f = wrap(id.clone(), self.chain_id, updater);
        Box::pin(async move { Ok(Some(self.backend.update(&id, f).await?.state)) })
    }
}

pub(super) fn unavailable(e: impl std::fmt::Display) -> VerificationError {
    VerificationError::network_error(format!("channel store unavailable: {e}")).retryable()
}

pub(super) fn corrupt(e: impl std::fmt::Display) -> VerificationError {
    VerificationError::internal(format!("channel record unreadable: {e}"))
}

mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&alloy::hex::encode_prefixed(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        alloy::hex::decode(&s).map_err(serde::de::Error::custom)
    }
}
