//! MPP payments for tollgate: Tempo payment-channel sessions through the official `mpp` crate.
//!
//! Money arrives as cumulative vouchers on a payment channel. Each rise of a channel's accepted
//! cumulative becomes prepaid credit on the payer's account in the money core, exactly once
//! (credit key `mpp:{channel}:{cumulative}`). Spent money is settled on chain on a schedule; a
//! close captures what was spent and refunds the rest of the deposit (the account's unused credit
//! is withdrawn first). See docs/payments.md.
//!
//! Where this departs from the crate (each written down in docs/payments.md):
//! - session challenges are built here: the crate omits `sessionProtocol: "v2"`, which the
//!   mppx client requires;
//! - the echoed escrow and chain id are pinned here (the crate checks only currency and
//!   recipient);
//! - the channel store is shared across nodes and also records credits ([`channels`]);
//! - `close` is handled here: mppx 0.11 sends no `closeSignature`, and the capture must follow
//!   the account's unused credit, which only tollgate knows;
//! - settlement is ours: the crate has no settle API.

pub mod audit;
pub mod chain;
pub mod channels;
pub mod config;
pub mod forced;
pub mod http;
pub mod kv;
pub mod mcp;
pub mod metrics;

mod close;
mod credits;
mod service;
mod settle;

use mpp::{MppError, PaymentError, PaymentErrorDetails, Receipt, VerificationError};

pub use chain::{Chain, ChainError, ChannelEvent, EventPos, OnChain, RpcChain};
pub use channels::{
    ChannelBackend, ChannelRecord, EmbeddedChannels, ForcedClose, Lifecycle, PendingCredit,
    PoisonedCredit, RedisChannels, SharedChannels, account_of,
};
pub use config::PaymentsConfig;
pub use metrics::PaymentMetrics;
pub use service::{Payments, RoundsGate};

/// The protection space a credential was issued for. Credentials of one are refused at the
/// other: a voucher paid on a hosted service's 402 cannot identify its payer over MCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Realm {
    /// MCP and the HTTP top-up API: the configured public MCP host.
    Platform,
    /// The 402 of hosted services at the proxy (`<platform realm>/services`).
    Services,
}

/// What the payer did with an accepted credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Open,
    Voucher,
    TopUp,
    Close,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Open => "open",
            Action::Voucher => "voucher",
            Action::TopUp => "topUp",
            Action::Close => "close",
        }
    }

    /// Management actions (deposit changes) carry no payment for the request itself: answer
    /// them with 204 and the receipt, without running the paid operation.
    pub fn is_management(self) -> bool {
        matches!(self, Action::TopUp | Action::Close)
    }
}

/// An accepted session credential.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The payer's account (`did:pkh:eip155:{chain}:{address}`).
    pub account: String,
    pub action: Action,
    pub channel_id: String,
    /// The channel's accepted cumulative amount after this credential (base units).
    pub accepted_cumulative: u128,
    pub receipt: Receipt,
    pub challenge_id: String,
}

impl Accepted {
    /// Unique per accepted payment: `{channel}:{cumulative}`.
    pub fn payment_ref(&self) -> String {
        format!("{}:{}", self.channel_id, self.accepted_cumulative)
    }
}

/// A refused credential: a problem document, and whether the same credential may be retried
/// (the store or chain was unavailable: 503) or the client must pay again (402).
#[derive(Debug, Clone)]
pub struct Rejection {
    pub problem: Box<PaymentErrorDetails>,
    pub retryable: bool,
}

impl Rejection {
    pub fn from_verification(e: VerificationError) -> Self {
        let retryable = e.retryable
            || matches!(
                e.code,
                Some(mpp::ErrorCode::NetworkError) | Some(mpp::ErrorCode::Internal)
            );
        let message = e.message.clone();
        let mut problem = MppError::from(e).to_problem_details(None);
        if problem.detail.is_empty() {
            problem.detail = message;
        }
        Rejection {
            problem: Box::new(problem),
            retryable,
        }
    }

    fn invalid(kind: &str, detail: impl Into<String>) -> Self {
        let e = match kind {
            "challenge" => VerificationError::invalid_challenge(detail),
            "payload" => VerificationError::invalid_payload(detail),
            "signature" => VerificationError::invalid_signature(detail),
            "expired" => VerificationError::expired(detail),
            "not-found" => VerificationError::channel_not_found(detail),
            "closed" => VerificationError::channel_closed(detail),
            "deposit" => VerificationError::amount_exceeds_deposit(detail),
            "amount" => VerificationError::invalid_amount(detail),
            _ => VerificationError::new(detail),
        };
        Rejection::from_verification(e)
    }

    /// HTTP status: 503 for retryable failures, the problem's own status otherwise (402, or
    /// 410 for an unknown channel).
    pub fn status(&self) -> u16 {
        if self.retryable {
            503
        } else {
            self.problem.status
        }
    }
}
