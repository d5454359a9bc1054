//! The money core. Integer pico-dollars, accounts whose invariant
//! `credited − debited = available + Σ leases` always holds, leases that nodes spend locally, and
//! settlement/credits that are idempotent by keys the caller persists first. No Pingora here.
//! Operators: docs/money.md.

pub mod cluster_store;
pub mod embedded;
pub mod journal;
pub mod money;
mod redis_scripts;
pub mod redis_store;
pub mod store;
pub mod types;
pub mod units;

pub use cluster_store::{ClusterStore, DEFAULT_SHARDS, check_restore_layout, shard_of};
pub use embedded::EmbeddedStore;
pub use journal::{Journal, JournalContent, JournalError, KeptBatch, parse_journal};
pub use money::{MoneyError, PICOS_PER_USD, Picos, Prices, Usage};
pub use redis_store::{
    DEFAULT_LEDGER_RETENTION, RedisStore, RestoreReport, RestoreSet, decode_feed, ledger_lines,
};
pub use store::{FeedEvent, MAX_BATCH_ENTRIES, MAX_OP_AMOUNT, Store, StoreError};
/// Where [`connect_shared`] connects (one Redis or a Redis Cluster).
pub use tollgate_kv::Target;
/// The shared money store at `target`: one Redis's, or a Redis Cluster's laid out in `shards`
/// (each write acknowledged by the target's `replica_acks` replicas).
pub async fn connect_shared(
    target: &tollgate_kv::Target,
    prefix: &str,
    lease_ttl: std::time::Duration,
    shards: u32,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match target {
        tollgate_kv::Target::One(url) => {
            std::sync::Arc::new(RedisStore::connect(url, prefix, lease_ttl).await?)
        }
        tollgate_kv::Target::Cluster {
            seeds,
            replica_acks,
        } => std::sync::Arc::new(
            ClusterStore::connect_with(seeds, prefix, lease_ttl, shards, *replica_acks).await?,
        ),
    })
}

pub use types::{
    AccountChange, AccountState, BookMarks, ChargeError, ChargeOutcome, CreditError, CreditOutcome,
    DebitMode, Incarnation, LeaseGrant, LedgerEntry, LedgerMarks, LedgerPos, SettleBatch,
    SettleEntry, SettleError, SettleOutcome, Status, validate_account_id,
};
