//! The shapes every money backend speaks: accounts, settle batches, credits, the change feed.

use serde::{Deserialize, Serialize};

use crate::money::Usage;

/// An account id: the paying agent (the payments layer derives it from the payer). Opaque to
/// us, but bounded: 1–128 of `[A-Za-z0-9_.:-]`, so it is safe in keys, logs and metrics.
pub fn validate_account_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!(
            "account id must be 1 to 128 characters, got {}",
            id.len()
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        return Err(format!(
            "account id '{id}' may contain only A-Z a-z 0-9 _ . : -"
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    /// Nothing left to lease: nodes answer 402 once their own lease is spent.
    Suspended,
}

/// An account as the store holds it. Invariant (checked by tests after every scenario):
/// `credited - debited == available + leased`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountState {
    pub account: String,
    /// Everything ever credited (p$).
    pub credited: i64,
    /// Everything ever debited (p$).
    pub debited: i64,
    /// Free to lease (p$). Negative means debt (usage that ran past a lease).
    pub available: i64,
    /// Sum of outstanding leases on all nodes (p$).
    pub leased: i64,
    pub status: Status,
    /// Increases with every change; nodes keep only newer versions.
    pub version: u64,
}

impl AccountState {
    /// An account the store has never seen: nothing credited, suspended.
    pub fn empty(id: &str) -> Self {
        AccountState {
            account: id.to_owned(),
            credited: 0,
            debited: 0,
            available: 0,
            leased: 0,
            status: Status::Suspended,
            version: 0,
        }
    }

    pub fn holds_invariant(&self) -> bool {
        i128::from(self.credited) - i128::from(self.debited)
            == i128::from(self.available) + i128::from(self.leased)
    }
}

/// A node incarnation: one process lifetime. `epoch` comes from the store at boot and is never
/// reused, so a restarted node can never collide with batches of its previous life.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Incarnation {
    pub node_id: String,
    pub epoch: u64,
}

/// One account's line in a settle batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleEntry {
    pub account: String,
    /// Raw usage since the last batch (for the ledger and reconciliation).
    pub usage: Usage,
    /// Its price, computed when the batch was cut (p$). Debited from this node's lease.
    pub cost: i64,
    /// Lease the node hands back (p$). It has already removed this from what it may spend, so
    /// the store can give it to others at once: a node never returns money it might still spend.
    pub give_back: i64,
    /// More lease the node asks for (p$). The store grants at most this.
    pub ask: i64,
}

/// What one node settles in one go. Idempotent by `(node_id, epoch, seq)`: the store keeps a
/// high-water mark per incarnation, applies `seq == hwm + 1`, answers `seq == hwm` with the
/// stored reply, and reports anything else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettleBatch {
    pub node_id: String,
    pub epoch: u64,
    pub seq: u64,
    pub entries: Vec<SettleEntry>,
}

impl SettleBatch {
    /// Stable digest of the batch content: a retry with the same seq but other content is a
    /// bug to report, never to apply.
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        // FNV-1a 64: no crypto needed, only "same bytes or not".
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

/// The store's answer for one account of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub account: String,
    /// This node's outstanding lease after the batch (p$).
    pub lease: i64,
    /// The lease the store held for this node before the batch; a node whose own record
    /// differs has drifted (a bug to alert on).
    pub prev: i64,
    pub available: i64,
    pub status: Status,
    pub version: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleOutcome {
    Applied(Vec<LeaseGrant>),
    /// The same batch was applied before; this is its stored reply. Nothing changed.
    Duplicate(Vec<LeaseGrant>),
}

impl SettleOutcome {
    pub fn grants(&self) -> &[LeaseGrant] {
        match self {
            SettleOutcome::Applied(g) | SettleOutcome::Duplicate(g) => g,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettleError {
    #[error("batch {got} arrived but {expected} was expected next: resend the missing batches")]
    Gap { expected: u64, got: u64 },
    #[error("batch {seq} was applied with different content: refusing (node bug or key reuse)")]
    Mismatch { seq: u64 },
    #[error("batch {seq} is older than the last applied one ({hwm})")]
    Stale { seq: u64, hwm: u64 },
    #[error("invalid batch: {0}")]
    Invalid(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditOutcome {
    /// False when the key was credited before (nothing changed).
    pub applied: bool,
    pub state: AccountState,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CreditError {
    #[error("credit key '{key}' was used before for another amount ({stored} p$)")]
    Mismatch { key: String, stored: i64 },
    #[error("invalid credit: {0}")]
    Invalid(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// How much a debit may take (see [`crate::Store::charge`] and [`crate::Store::write_off`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebitMode {
    /// The whole amount from `available`, or nothing.
    All,
    /// Up to what is `available`.
    UpToAvailable,
    /// Up to the account's whole balance, leases included (`available` may go below zero by
    /// what nodes hold: they spend or return it, and the account ends where it should).
    UpToBalance,
}

impl DebitMode {
    /// The ledger kind of a debit taken this way.
    pub fn ledger_kind(self) -> &'static str {
        match self {
            DebitMode::All | DebitMode::UpToAvailable => "charge",
            DebitMode::UpToBalance => "write_off",
        }
    }

    /// How much of `amount` a balance allows.
    pub fn take(self, amount: i64, available: i64, leased: i64) -> Option<i64> {
        match self {
            DebitMode::All => (available >= amount).then_some(amount),
            DebitMode::UpToAvailable => Some(amount.min(available.max(0))),
            DebitMode::UpToBalance => Some(amount.min(available.saturating_add(leased).max(0))),
        }
    }
}

/// What a [`crate::Store::charge`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeOutcome {
    /// False when the key was charged before (nothing changed; `taken` is the first answer's).
    pub applied: bool,
    /// p$ actually debited: the amount, or with `partial` what was available (possibly 0).
    pub taken: i64,
    pub state: AccountState,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChargeError {
    #[error("insufficient balance: {available} p$ available")]
    Insufficient { available: i64 },
    #[error("charge key '{key}' was used before for another account or amount")]
    Mismatch { key: String },
    #[error("invalid charge: {0}")]
    Invalid(String),
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

/// What every change publishes; nodes apply only a newer version per account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountChange {
    pub account: String,
    pub version: u64,
    pub available: i64,
    pub status: Status,
    /// When the store made the change (µs since the Unix epoch, the store's clock); receivers
    /// measure the feed's lag with it. Absent where the change was read rather than published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_us: Option<u64>,
}

/// A position in the Redis ledger stream (an entry id `<ms>-<seq>`), ordered as the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LedgerPos {
    pub ms: u64,
    pub seq: u64,
}

impl LedgerPos {
    /// `<ms>-<seq>`; `None` for anything else.
    pub fn parse(id: &str) -> Option<LedgerPos> {
        let (ms, seq) = id.split_once('-')?;
        Some(LedgerPos {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// Where the book of record stands against one ledger stream, and what Redis still holds of some
/// incarnations (see [`crate::Store::book_marks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BookMarks {
    /// A book of record is declared for this ledger (`ledger:book`).
    pub declared: bool,
    /// The book holds every entry up to here (`None`: nothing yet).
    pub booked: Option<LedgerPos>,
    /// The ledger's last entry when read (`None`: the stream is empty).
    pub last: Option<LedgerPos>,
    /// This Redis's ledger generation (`None`: none yet, e.g. a Redis that just lost its data).
    pub generation: Option<String>,
    /// The high-water mark Redis holds for each incarnation asked about, in order (0: none).
    pub hwms: Vec<u64>,
    /// Per incarnation asked about (in order; missing: none), the seqs a cluster shard
    /// acknowledged and then lost (`lost_from..=lost_to`): its mark proves nothing about them.
    pub lost: Vec<Option<(u64, u64)>>,
}

/// The book's marks over every ledger stream of a store (see [`crate::Store::book_marks`]):
/// one on one Redis, one per money shard on a Redis Cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerMarks {
    /// The money shards accounts are laid out in ([`crate::shard_of`]); 0: one stream holds
    /// every account (one Redis).
    pub shards: u32,
    /// Each stream's marks, in shard order.
    pub streams: Vec<BookMarks>,
}

impl LedgerMarks {
    /// Whether any stream's generation now differs from `recorded` (an incarnation's, as
    /// [`crate::Store::ledger_generation`] gave it): that stream lost its data since.
    pub fn generation_moved(&self, recorded: &str) -> bool {
        let n = self.streams.len();
        self.streams.iter().enumerate().any(|(s, m)| {
            let mine = if n == 1 {
                Some(recorded)
            } else {
                recorded.split(',').nth(s)
            };
            m.generation.as_deref() != mine
        })
    }
}

impl From<BookMarks> for LedgerMarks {
    fn from(m: BookMarks) -> Self {
        LedgerMarks {
            shards: 0,
            streams: vec![m],
        }
    }
}

/// One ledger line: every money movement, with the idempotency key that made it happen once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// `credit` | `settle` | `release`
    pub kind: String,
    /// `credit:<key>`, `settle:<node>:<epoch>:<seq>`, `release:<node>:<epoch>`.
    pub key: String,
    pub account: String,
    /// Money added (credit) or debited (settle cost), p$.
    pub amount: i64,
    pub requests: u64,
    pub cpu_us: u64,
    pub deploys: u64,
    /// Database rows (settle lines only).
    #[serde(default)]
    pub rows_read: u64,
    #[serde(default)]
    pub rows_written: u64,
}
