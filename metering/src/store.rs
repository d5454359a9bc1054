//! The money store: one interface, two backends (Redis for many nodes, an embedded durable store
//! for one), one conformance suite (`tests/conformance.rs`).
//!
//! Every operation is idempotent by a key the caller chooses and persists before the first try:
//! settles by `(node_id, epoch, seq)`, credits by an external key, releases by incarnation.

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::types::{
    AccountChange, AccountState, ChargeError, ChargeOutcome, CreditError, CreditOutcome, DebitMode,
    Incarnation, LedgerEntry, LedgerMarks, SettleBatch, SettleError, SettleOutcome,
};

/// Largest single amount a store operation accepts (2⁵³ − 1 p$ ≈ $9,007): Redis scripts compare
/// such amounts as Lua numbers (doubles), exact only below 2⁵³. Balances themselves are
/// changed with integer commands and may be larger.
pub const MAX_OP_AMOUNT: i64 = (1 << 53) - 1;

/// Most entries one settle batch may carry (keeps each script short: Redis runs it alone).
pub const MAX_BATCH_ENTRIES: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

/// What the change feed delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    Change(AccountChange),
    /// The feed was interrupted and is live again: events may have been missed, so re-read what
    /// you cache.
    Resync,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Starts a new incarnation of `node_id` (a fresh, never reused epoch).
    async fn begin(&self, node_id: &str) -> Result<Incarnation, StoreError>;

    /// `begin`, with an epoch above `floor` (the last one the node's own journal knows): a
    /// store that lost its data restarts its counters, and a reused epoch would reuse settle
    /// keys. A store that never loses its counter (embedded) may ignore it.
    async fn begin_after(&self, node_id: &str, _floor: u64) -> Result<Incarnation, StoreError> {
        self.begin(node_id).await
    }

    /// Applies a batch once: debits each entry's cost from this incarnation's lease, takes the
    /// handed-back part of the lease back into `available` (any shortfall becomes debt), then
    /// grants up to `ask` more. See [`SettleBatch`] and [`grant`].
    async fn settle(&self, batch: &SettleBatch) -> Result<SettleOutcome, SettleError>;

    /// Returns every lease of an incarnation to its accounts and refuses new leases to it.
    /// Idempotent. Called for a dead incarnation after its journal was replayed.
    async fn release(&self, inc: &Incarnation) -> Result<u64, StoreError>;

    /// Adds `amount` p$ to `account` exactly once per `key`. The same key with another amount is
    /// refused; the same key again changes nothing.
    async fn credit(
        &self,
        account: &str,
        key: &str,
        amount: i64,
    ) -> Result<CreditOutcome, CreditError>;

    /// Debits `amount` p$ from `account`'s available balance exactly once per `key`: a deploy's
    /// price, or the unused credit withdrawn when a payment channel closes. Without `partial` it
    /// is all or nothing ([`ChargeError::Insufficient`], nothing recorded, so the same key may be
    /// retried after a top-up); with `partial` it takes what is available, up to `amount`.
    /// The same key again changes nothing and answers what the first call took.
    async fn charge(
        &self,
        account: &str,
        key: &str,
        amount: i64,
        partial: bool,
    ) -> Result<ChargeOutcome, ChargeError> {
        let mode = if partial {
            DebitMode::UpToAvailable
        } else {
            DebitMode::All
        };
        self.debit(account, key, amount, mode).await
    }

    /// Removes credit that no money backs any more (a payment channel's voucher that can no
    /// longer be captured): up to `amount`, out of the whole balance, leases included (so the
    /// credit cannot come back when a node returns its lease). Idempotent per `key` like a
    /// charge (the same key again answers the first result); ledger kind `write_off`.
    async fn write_off(
        &self,
        account: &str,
        key: &str,
        amount: i64,
    ) -> Result<ChargeOutcome, ChargeError> {
        self.debit(account, key, amount, DebitMode::UpToBalance)
            .await
    }

    /// The one debit primitive behind [`Store::charge`] and [`Store::write_off`]: atomic,
    /// recorded once per `key` (charges and write-offs share the key space), nothing recorded
    /// when [`DebitMode::All`] finds too little.
    async fn debit(
        &self,
        account: &str,
        key: &str,
        amount: i64,
        mode: DebitMode,
    ) -> Result<ChargeOutcome, ChargeError>;

    async fn account(&self, account: &str) -> Result<Option<AccountState>, StoreError> {
        Ok(self
            .accounts(&[account.to_owned()])
            .await?
            .into_iter()
            .next()
            .flatten())
    }

    async fn accounts(&self, ids: &[String]) -> Result<Vec<Option<AccountState>>, StoreError>;

    /// What a node needs to resync its cache: version, available and status per account
    /// (cheaper than [`Store::accounts`] where the backend can read fewer fields).
    async fn account_changes(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<AccountChange>>, StoreError> {
        Ok(self
            .accounts(ids)
            .await?
            .into_iter()
            .map(|s| {
                s.map(|s| AccountChange {
                    account: s.account,
                    version: s.version,
                    available: s.available,
                    status: s.status,
                    at_us: None,
                })
            })
            .collect())
    }

    /// Voids leases whose expiry (the store's clock) has passed and returns them to their
    /// accounts. Returns how many were voided.
    async fn reap_expired(&self) -> Result<u64, StoreError>;

    /// This ledger's generation: a token Redis keeps (`ledger:gen`, made on first use from its
    /// clock), so that a Redis that lost its data, and so its ledger, is told apart from the
    /// one a node settled into. On a cluster, every shard's, comma-separated in shard order.
    /// `None` for a store whose ledger is durable by itself (the embedded store: nothing to
    /// keep for a book).
    async fn ledger_generation(&self) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    /// Where the book of record stands, this ledger's generation, and the high-water mark
    /// held for each of `incs`, read at one instant per ledger stream (each shard's, on a
    /// cluster). `None` for a store without a separate
    /// book. Nodes keep acknowledged batches in their journals until the book holds them, so
    /// that a rebuild after a data loss finds each batch in one or the other.
    async fn book_marks(&self, _incs: &[Incarnation]) -> Result<Option<LedgerMarks>, StoreError> {
        Ok(None)
    }

    /// Settle parts this handle found applied on top of a shard that had lost acknowledged
    /// parts of the same incarnation (a cluster; always 0 elsewhere). A node that sees it grow
    /// begins a new incarnation, as one Redis's gap makes it.
    fn lost_parts(&self) -> u64 {
        0
    }

    /// Every ledger entry, oldest first (tests, reconciliation, audits).
    async fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError>;

    /// The change feed. Each receiver sees every change published after it subscribed (and a
    /// `Resync` whenever it may have missed some).
    fn subscribe(&self) -> broadcast::Receiver<FeedEvent>;
}

/// How much of an `ask` the store grants out of `available`: all of it while at least twice that
/// is left; half of what is left when less (so one node cannot take the last of an account that
/// other nodes serve too); everything that is left once it is no more than the ask. The Redis
/// script implements the same rule.
pub fn grant(ask: i64, available: i64) -> i64 {
    if ask <= 0 || available <= 0 {
        0
    } else if available <= ask {
        available
    } else if available < 2 * ask {
        available / 2
    } else {
        ask
    }
}

/// Checks a batch before any backend touches it: bad input changes nothing.
pub fn validate_batch(b: &SettleBatch) -> Result<(), SettleError> {
    let bad = |m: String| Err(SettleError::Invalid(m));
    if b.node_id.is_empty()
        || b.node_id.len() > 64
        || !b
            .node_id
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return bad(format!(
            "node id '{}' must be 1-64 of [A-Za-z0-9._-]",
            b.node_id
        ));
    }
    if b.seq == 0 {
        return bad("seq starts at 1".into());
    }
    if b.entries.len() > MAX_BATCH_ENTRIES {
        return bad(format!("at most {MAX_BATCH_ENTRIES} entries per batch"));
    }
    let mut seen = std::collections::HashSet::new();
    for e in &b.entries {
        crate::types::validate_account_id(&e.account).map_err(SettleError::Invalid)?;
        if !seen.insert(e.account.as_str()) {
            return bad(format!("account {} appears twice", e.account));
        }
        for v in [e.cost, e.give_back, e.ask] {
            if !(0..=MAX_OP_AMOUNT).contains(&v) {
                return bad(format!(
                    "cost, give_back and ask must be 0..={MAX_OP_AMOUNT} p$"
                ));
            }
        }
    }
    Ok(())
}

/// Checks a credit before any backend touches it.
pub fn validate_charge(account: &str, key: &str, amount: i64) -> Result<(), ChargeError> {
    validate_credit(account, key, amount).map_err(|e| match e {
        CreditError::Invalid(m) => ChargeError::Invalid(m.replace("credit", "charge")),
        other => ChargeError::Invalid(other.to_string()),
    })
}

pub fn validate_credit(account: &str, key: &str, amount: i64) -> Result<(), CreditError> {
    crate::types::validate_account_id(account).map_err(CreditError::Invalid)?;
    if key.is_empty() || key.len() > 256 || key.chars().any(char::is_control) {
        return Err(CreditError::Invalid(
            "credit key must be 1-256 printable characters".into(),
        ));
    }
    if !(1..=MAX_OP_AMOUNT).contains(&amount) {
        return Err(CreditError::Invalid(format!(
            "credit amount must be 1..={MAX_OP_AMOUNT} p$, got {amount}"
        )));
    }
    Ok(())
}
