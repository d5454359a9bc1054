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

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mpp::VerificationError;
use mpp::protocol::methods::tempo::session::ChannelDescriptor;
use mpp::protocol::methods::tempo::session_method::{ChannelState, ChannelStore};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

use crate::units::base_to_picos;

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
/// credit it no longer backs. See docs/payments.md ("Channel lifecycle").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForcedClose {
    /// Chain time (Unix seconds) from which the payer may `withdraw` the deposit.
    pub grace_end: u64,
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
    /// The write-off went back to the account (the voucher was captured after all, or the payer
    /// cancelled the close).
    #[serde(default)]
    pub restored: bool,
    /// The payer cancelled the request (a top-up on chain).
    #[serde(default)]
    pub cancelled: bool,
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
}

impl ChannelRecord {
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

/// Storage for channel records and pending credits.
#[async_trait]
pub trait ChannelBackend: Send + Sync + 'static {
    async fn get(&self, id: &str) -> Result<Option<ChannelRecord>, VerificationError>;
    /// Atomic read-modify-write of one channel; when the updater fails nothing is written.
    async fn update(&self, id: &str, f: Updater) -> Result<ChannelRecord, VerificationError>;
    async fn pending_credits(&self) -> Result<Vec<PendingCredit>, VerificationError>;
    /// Records a credit to apply outside any channel update (a reversal); idempotent by key.
    async fn add_pending(&self, credit: &PendingCredit) -> Result<(), VerificationError>;
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

fn unavailable(e: impl std::fmt::Display) -> VerificationError {
    VerificationError::network_error(format!("channel store unavailable: {e}")).retryable()
}

fn corrupt(e: impl std::fmt::Display) -> VerificationError {
    VerificationError::internal(format!("channel record unreadable: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Redis

/// Writes the record and the pending credits only while this node still holds the lock.
const COMMIT: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'LOST' end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[3])
for i = 4, #ARGV, 2 do redis.call('HSETNX', KEYS[3], ARGV[i], ARGV[i + 1]) end
redis.call('DEL', KEYS[1])
return 'OK'
"#;

const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#;

/// Channel records in Redis. Keys (prefix configurable): `{p}:mpp:ch:{id}` JSON record,
/// `{p}:mpp:lock:{id}` lock token, `{p}:mpp:channels` set of ids, `{p}:mpp:credits:pending`
/// hash key → JSON credit, `{p}:mpp:credits:poisoned` hash key → JSON [`PoisonedCredit`],
/// `{p}:mpp:forced` set of ids with an unresolved forced close, `{p}:mpp:meta` hash (the close
/// watcher's block cursor).
#[derive(Clone)]
pub struct RedisChannels {
    conn: ConnectionManager,
    prefix: String,
    commit: redis::Script,
    unlock: redis::Script,
    lock_ttl: Duration,
    lock_wait: Duration,
}

impl RedisChannels {
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, VerificationError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unavailable)?;
        Ok(RedisChannels {
            conn,
            prefix: prefix.to_owned(),
            commit: redis::Script::new(COMMIT),
            unlock: redis::Script::new(UNLOCK),
            lock_ttl: Duration::from_secs(5),
            lock_wait: Duration::from_secs(3),
        })
    }

    fn key(&self, what: &str) -> String {
        format!("{}:mpp:{what}", self.prefix)
    }
}

#[async_trait]
impl ChannelBackend for RedisChannels {
    async fn get(&self, id: &str) -> Result<Option<ChannelRecord>, VerificationError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = redis::cmd("GET")
            .arg(self.key(&format!("ch:{id}")))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        raw.map(|s| serde_json::from_str(&s).map_err(corrupt))
            .transpose()
    }

    async fn update(&self, id: &str, f: Updater) -> Result<ChannelRecord, VerificationError> {
        let mut c = self.conn.clone();
        let lock = self.key(&format!("lock:{id}"));
        let token = format!("{:032x}", rand_token());
        let deadline = tokio::time::Instant::now() + self.lock_wait;
        let mut pause = Duration::from_millis(2);
        loop {
            let got: Option<String> = redis::cmd("SET")
                .arg(&lock)
                .arg(&token)
                .arg("NX")
                .arg("PX")
                .arg(self.lock_ttl.as_millis() as u64)
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            if got.is_some() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(VerificationError::network_error(
                    "channel is busy with another update; retry",
                )
                .retryable());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
        let result = async {
            let prev = self.get(id).await?;
            let upd = f(prev)?;
            let json = serde_json::to_string(&upd.record).map_err(corrupt)?;
            let mut inv = self.commit.prepare_invoke();
            inv.key(&lock)
                .key(self.key(&format!("ch:{id}")))
                .key(self.key("credits:pending"))
                .key(self.key("channels"))
                .arg(&token)
                .arg(json)
                .arg(id);
            for credit in &upd.credits {
                inv.arg(&credit.key)
                    .arg(serde_json::to_string(credit).map_err(corrupt)?);
            }
            let reply: String = inv.invoke_async(&mut c).await.map_err(unavailable)?;
            if reply != "OK" {
                return Err(VerificationError::network_error(
                    "channel update lost its lock (the node stalled); nothing was written",
                )
                .retryable());
            }
            Ok(upd.record)
        }
        .await;
        if result.is_err() {
            // Best effort: the lock expires by itself anyway.
            let _: Result<i64, _> = self
                .unlock
                .key(&lock)
                .arg(&token)
                .invoke_async(&mut c)
                .await;
        }
        result
    }

    async fn pending_credits(&self) -> Result<Vec<PendingCredit>, VerificationError> {
        let mut c = self.conn.clone();
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.key("credits:pending"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        all.into_iter()
            .map(|(_, v)| serde_json::from_str(&v).map_err(corrupt))
            .collect()
    }

    async fn add_pending(&self, credit: &PendingCredit) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HSETNX")
            .arg(self.key("credits:pending"))
            .arg(&credit.key)
            .arg(serde_json::to_string(credit).map_err(corrupt)?)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn credit_done(&self, key: &str) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HDEL")
            .arg(self.key("credits:pending"))
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn channel_ids(&self) -> Result<Vec<String>, VerificationError> {
        let mut c = self.conn.clone();
        redis::cmd("SMEMBERS")
            .arg(self.key("channels"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn poison(&self, p: &PoisonedCredit) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let json = serde_json::to_string(p).map_err(corrupt)?;
        let _: () = redis::pipe()
            .atomic()
            .cmd("HSET")
            .arg(self.key("credits:poisoned"))
            .arg(&p.credit.key)
            .arg(json)
            .ignore()
            .cmd("HDEL")
            .arg(self.key("credits:pending"))
            .arg(&p.credit.key)
            .ignore()
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn poisoned(&self) -> Result<Vec<PoisonedCredit>, VerificationError> {
        let mut c = self.conn.clone();
        let all: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg(self.key("credits:poisoned"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        all.into_iter()
            .map(|(_, v)| serde_json::from_str(&v).map_err(corrupt))
            .collect()
    }

    async fn unpoison(
        &self,
        key: &str,
        retry: bool,
    ) -> Result<Option<PoisonedCredit>, VerificationError> {
        let mut c = self.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.key("credits:poisoned"))
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let Some(raw) = raw else { return Ok(None) };
        let p: PoisonedCredit = serde_json::from_str(&raw).map_err(corrupt)?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("HDEL")
            .arg(self.key("credits:poisoned"))
            .arg(key)
            .ignore();
        if retry {
            pipe.cmd("HSETNX")
                .arg(self.key("credits:pending"))
                .arg(key)
                .arg(serde_json::to_string(&p.credit).map_err(corrupt)?)
                .ignore();
        }
        let _: () = pipe.query_async(&mut c).await.map_err(unavailable)?;
        Ok(Some(p))
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>, VerificationError> {
        let mut c = self.conn.clone();
        redis::cmd("HGET")
            .arg(self.key("meta"))
            .arg(key)
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn meta_set(&self, key: &str, value: &str) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd("HSET")
            .arg(self.key("meta"))
            .arg(key)
            .arg(value)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn forced_add(&self, id: &str) -> Result<(), VerificationError> {
        self.set_op("SADD", id).await
    }

    async fn forced_remove(&self, id: &str) -> Result<(), VerificationError> {
        self.set_op("SREM", id).await
    }

    async fn forced_ids(&self) -> Result<Vec<String>, VerificationError> {
        let mut c = self.conn.clone();
        redis::cmd("SMEMBERS")
            .arg(self.key("forced"))
            .query_async(&mut c)
            .await
            .map_err(unavailable)
    }
}

impl RedisChannels {
    async fn set_op(&self, op: &str, id: &str) -> Result<(), VerificationError> {
        let mut c = self.conn.clone();
        let _: i64 = redis::cmd(op)
            .arg(self.key("forced"))
            .arg(id)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

fn rand_token() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    // Unique per call within and across processes: two random hasher seeds and the clock.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let hi = h.finish();
    let lo = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (u128::from(hi) << 64) | u128::from(lo)
}

// ---------------------------------------------------------------------------------------------
// Embedded (redb)

const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("mpp_channels");
const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("mpp_pending_credits");
const POISONED: TableDefinition<&str, &[u8]> = TableDefinition::new("mpp_poisoned_credits");
const META: TableDefinition<&str, &str> = TableDefinition::new("mpp_meta");
const FORCED: TableDefinition<&str, ()> = TableDefinition::new("mpp_forced_closes");

/// Channel records in a redb file; every update is one durable write transaction.
#[derive(Clone)]
pub struct EmbeddedChannels {
    db: Arc<Database>,
}

impl EmbeddedChannels {
    pub fn open(path: &Path) -> Result<Self, VerificationError> {
        let db = Database::create(path).map_err(unavailable)?;
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(CHANNELS).map_err(unavailable)?;
        tx.open_table(PENDING).map_err(unavailable)?;
        tx.open_table(POISONED).map_err(unavailable)?;
        tx.open_table(META).map_err(unavailable)?;
        tx.open_table(FORCED).map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        Ok(EmbeddedChannels { db: Arc::new(db) })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, VerificationError> + Send + 'static,
    ) -> Result<T, VerificationError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }
}

#[async_trait]
impl ChannelBackend for EmbeddedChannels {
    async fn get(&self, id: &str) -> Result<Option<ChannelRecord>, VerificationError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(CHANNELS).map_err(unavailable)?;
            match t.get(id.as_str()).map_err(unavailable)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(corrupt)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn update(&self, id: &str, f: Updater) -> Result<ChannelRecord, VerificationError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            // redb runs one write transaction at a time: this is the per-channel lock.
            let tx = db.begin_write().map_err(unavailable)?;
            let record = {
                let mut t = tx.open_table(CHANNELS).map_err(unavailable)?;
                let prev: Option<ChannelRecord> = match t.get(id.as_str()).map_err(unavailable)? {
                    Some(v) => Some(serde_json::from_slice(v.value()).map_err(corrupt)?),
                    None => None,
                };
                // An error here drops `tx` uncommitted: nothing is written.
                let upd = f(prev)?;
                let bytes = serde_json::to_vec(&upd.record).map_err(corrupt)?;
                t.insert(id.as_str(), bytes.as_slice())
                    .map_err(unavailable)?;
                let mut p = tx.open_table(PENDING).map_err(unavailable)?;
                for credit in &upd.credits {
                    if p.get(credit.key.as_str()).map_err(unavailable)?.is_none() {
                        let bytes = serde_json::to_vec(credit).map_err(corrupt)?;
                        p.insert(credit.key.as_str(), bytes.as_slice())
                            .map_err(unavailable)?;
                    }
                }
                upd.record
            };
            tx.commit().map_err(unavailable)?;
            Ok(record)
        })
        .await
    }

    async fn pending_credits(&self) -> Result<Vec<PendingCredit>, VerificationError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(PENDING).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (_, v) = row.map_err(unavailable)?;
                out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
            }
            Ok(out)
        })
        .await
    }

    async fn add_pending(&self, credit: &PendingCredit) -> Result<(), VerificationError> {
        let credit = credit.clone();
        let bytes = serde_json::to_vec(&credit).map_err(corrupt)?;
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(PENDING).map_err(unavailable)?;
                if t.get(credit.key.as_str()).map_err(unavailable)?.is_none() {
                    t.insert(credit.key.as_str(), bytes.as_slice())
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn credit_done(&self, key: &str) -> Result<(), VerificationError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            tx.open_table(PENDING)
                .map_err(unavailable)?
                .remove(key.as_str())
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn channel_ids(&self) -> Result<Vec<String>, VerificationError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(CHANNELS).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (k, _) = row.map_err(unavailable)?;
                out.push(k.value().to_owned());
            }
            Ok(out)
        })
        .await
    }

    async fn poison(&self, p: &PoisonedCredit) -> Result<(), VerificationError> {
        let bytes = serde_json::to_vec(p).map_err(corrupt)?;
        let key = p.credit.key.clone();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            {
                let mut t = tx.open_table(POISONED).map_err(unavailable)?;
                t.insert(key.as_str(), bytes.as_slice())
                    .map_err(unavailable)?;
                let mut pending = tx.open_table(PENDING).map_err(unavailable)?;
                pending.remove(key.as_str()).map_err(unavailable)?;
            }
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn poisoned(&self) -> Result<Vec<PoisonedCredit>, VerificationError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(POISONED).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (_, v) = row.map_err(unavailable)?;
                out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
            }
            Ok(out)
        })
        .await
    }

    async fn unpoison(
        &self,
        key: &str,
        retry: bool,
    ) -> Result<Option<PoisonedCredit>, VerificationError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            let found: Option<PoisonedCredit> = {
                let mut t = tx.open_table(POISONED).map_err(unavailable)?;
                match t.remove(key.as_str()).map_err(unavailable)? {
                    Some(v) => Some(serde_json::from_slice(v.value()).map_err(corrupt)?),
                    None => None,
                }
            };
            if let (Some(p), true) = (&found, retry) {
                let bytes = serde_json::to_vec(&p.credit).map_err(corrupt)?;
                let mut pending = tx.open_table(PENDING).map_err(unavailable)?;
                if pending.get(key.as_str()).map_err(unavailable)?.is_none() {
                    pending
                        .insert(key.as_str(), bytes.as_slice())
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(found)
        })
        .await
    }

    async fn meta_get(&self, key: &str) -> Result<Option<String>, VerificationError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(META).map_err(unavailable)?;
            Ok(t.get(key.as_str())
                .map_err(unavailable)?
                .map(|v| v.value().to_owned()))
        })
        .await
    }

    async fn meta_set(&self, key: &str, value: &str) -> Result<(), VerificationError> {
        let (key, value) = (key.to_owned(), value.to_owned());
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            tx.open_table(META)
                .map_err(unavailable)?
                .insert(key.as_str(), value.as_str())
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn forced_add(&self, id: &str) -> Result<(), VerificationError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            tx.open_table(FORCED)
                .map_err(unavailable)?
                .insert(id.as_str(), ())
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn forced_remove(&self, id: &str) -> Result<(), VerificationError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(unavailable)?;
            tx.open_table(FORCED)
                .map_err(unavailable)?
                .remove(id.as_str())
                .map_err(unavailable)?;
            tx.commit().map_err(unavailable)?;
            Ok(())
        })
        .await
    }

    async fn forced_ids(&self) -> Result<Vec<String>, VerificationError> {
        self.blocking(|db| {
            let tx = db.begin_read().map_err(unavailable)?;
            let t = tx.open_table(FORCED).map_err(unavailable)?;
            let mut out = Vec::new();
            for row in t.iter().map_err(unavailable)? {
                let (k, _) = row.map_err(unavailable)?;
                out.push(k.value().to_owned());
            }
            Ok(out)
        })
        .await
    }
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
