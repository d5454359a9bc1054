//! The money store on a Redis Cluster. The same Lua scripts as [`crate::RedisStore`], compiled
//! `SHARDED`, each run inside one shard, so every key a script touches is in one slot.
//!
//! - **Shards.** An account lives in shard `fnv1a(id) % shards`; shard `n`'s keys share the
//!   hash tag `{prefix:m<n>}`: accounts, leases, the lease expiry index, the incarnation marks,
//!   the credit and charge records, the ledger stream and the change feed's sharded channel
//!   (`SPUBLISH {prefix:m<n>}:events`). The number of shards is fixed when the cluster is first
//!   used (`{prefix}:shards`) and checked on every connect: a different number would move
//!   accounts.
//! - **Settle.** A batch is split by shard; each part is applied by the settle script in its
//!   shard, at most once by `(node, epoch, seq)` (each shard keeps its own mark). The parts are
//!   independent, so a part applied before a failure answers as a duplicate when the agent
//!   retries the batch.
//! - **Credits and charges** are idempotent per key across shards: the key is first claimed for
//!   its account and amount in the key's own shard (`claims`), then applied in the account's.
//! - **Replication.** Each write script goes in one pipeline with `WAIT 1` (every script writes,
//!   a duplicate answer a counter), and is acknowledged only once a replica has it, so a
//!   failover keeps every acknowledged write. Without a replica answer the caller gets
//!   `Unavailable` and retries; the retry is applied once by whichever master holds the slot by
//!   then.
//! - The book of record reads each shard's stream and keeps its marks itself (tollgate-book's
//!   `Ledgers`); `book rebuild` restores an empty cluster from it ([`ClusterStore::restore`]).
//!   Each shard has its own ledger generation (`{prefix:m<n>}:ledger:gen`); a node's
//!   incarnation records them all, and its journal keeps an acknowledged batch until every
//!   shard it touched shows the book holds its part ([`crate::Journal::release_booked`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use tokio::sync::broadcast;

mod restore;
pub use restore::check_restore_layout;

use crate::redis_scripts::{
    BEGIN, BOOK_MARKS, CHARGE, CLAIM, CREDIT, GENERATION, LUA_COMMON, LUA_RETURN_LEASE, REAP,
    RELEASE, SETTLE, header,
};
use crate::redis_store::{
    DEFAULT_LEDGER_RETENTION, FIELDS, charge_reply, credit_reply, decode_feed, entries_json,
    ledger_lines, mode_arg, parse_book_marks, parse_state, settle_reply, unavailable,
};
use crate::store::{
    FeedEvent, Store, StoreError, validate_batch, validate_charge, validate_credit,
};
use crate::types::{
    AccountChange, AccountState, ChargeError, ChargeOutcome, CreditError, CreditOutcome, DebitMode,
    Incarnation, LeaseGrant, LedgerEntry, LedgerMarks, SettleBatch, SettleError, SettleOutcome,
    Status,
};

/// Shards a new cluster is laid out in by default: enough to spread over tens of masters, few
/// enough that a release or a reap round (one call per shard) stays cheap.
pub const DEFAULT_SHARDS: u32 = 32;

/// How long a write waits for its replicas; past it the write is not acknowledged (the
/// caller retries, and the retry is applied once).
const REPLICA_WAIT: Duration = Duration::from_millis(1000);

/// The shard an account (or an idempotency key) lives in. FNV-1a 64: stable across versions
/// and platforms, which the layout depends on.
pub fn shard_of(id: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as u32
}

/// (node, epoch, shard): whose settle parts a shard's mark counts.
type PartMark = (String, u64, u32);

/// The last two seqs a shard acknowledged for a (node, epoch): a retry of the last one is
/// checked against the one before.
#[derive(Clone, Copy, Default)]
struct Acked {
    last: u64,
    before: u64,
}

/// A script's source and its SHA1: sent as `EVALSHA`, and as `EVAL` when a master does not
/// know it yet (a new master after a failover, a restart).
struct Lua {
    code: String,
    sha: String,
}

impl Lua {
    fn new(code: String) -> Lua {
        let sha = redis::Script::new(&code).get_hash().to_owned();
        Lua { code, sha }
    }
}

/// The scripts; each write goes in one pipeline with its `WAIT` (see [`ClusterStore::write`]).
struct Scripts {
    settle: Lua,
    credit: Lua,
    charge: Lua,
    release: Lua,
    reap: Lua,
    begin: Lua,
    claim: Lua,
    shards: Lua,
    generation: Lua,
    book_marks: Lua,
}

/// The layout key: set once; its write counter moves, so the `WAIT` after it covers the value
/// whoever set it.
const SHARDS: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('INCR', KEYS[1] .. ':w')
return redis.call('GET', KEYS[1])
"#;

/// `EVALSHA sha numkeys keys…`; the caller adds the arguments.
fn eval(lua: &Lua, keys: &[String]) -> redis::Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(&lua.sha).arg(keys.len()).arg(keys);
    c
}

/// The same call as `EVAL` with the script's source (the master did not know the SHA).
fn with_source(lua: &Lua, evalsha: &redis::Cmd) -> redis::Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(&lua.code);
    for a in evalsha.args_iter().skip(2) {
        if let redis::Arg::Simple(b) = a {
            c.arg(b);
        }
    }
    c
}

/// Redis Cluster–backed store. Cheap to clone.
#[derive(Clone)]
pub struct ClusterStore {
    /// Money writes and the `WAIT`s after them, and the state a credit or charge answers with
    /// (read where the write went).
    conn: ClusterConnection,
    /// Other reads (accounts, the ledger): a `WAIT` holds its connection until a replica
    /// answers, so they do not queue behind one.
    rconn: ClusterConnection,
    /// The last seq each (node, epoch, shard) acknowledged through this handle: a shard whose
    /// mark is found below it lost acknowledged writes (reported, see [`ClusterStore::lost_parts`]).
    acked: Arc<std::sync::Mutex<HashMap<PartMark, Acked>>>,
    lost: Arc<AtomicU64>,
    prefix: String,
    shards: u32,
    /// Replicas each write must reach before it is acknowledged.
    replica_acks: u32,
    lease_ttl: Duration,
    ledger_retention: Duration,
    scripts: Arc<Scripts>,
    feed: broadcast::Sender<FeedEvent>,
    /// The feed task ends once every clone of the store is gone.
    _alive: Arc<()>,
}

fn client(
    urls: &[String],
    push: Option<tokio::sync::mpsc::UnboundedSender<redis::PushInfo>>,
) -> Result<redis::cluster::ClusterClient, StoreError> {
    let mut b = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
        .connection_timeout(Duration::from_secs(1))
        .response_timeout(Duration::from_secs(5))
        .retries(3)
        .min_retry_wait(50)
        .max_retry_wait(1000);
    if let Some(tx) = push {
        b = b
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx);
    }
    b.build().map_err(|e| StoreError::Invalid(e.to_string()))
}

impl ClusterStore {
    /// Connects to the cluster that `urls` (any of its members) belong to. `shards` is the
    /// layout to use (or check, once the cluster holds money): see [`DEFAULT_SHARDS`].
    pub async fn connect(
        urls: &[String],
        prefix: &str,
        lease_ttl: Duration,
        shards: u32,
    ) -> Result<Self, StoreError> {
        Self::connect_with(urls, prefix, lease_ttl, shards, 1).await
    }

    /// [`ClusterStore::connect`], with the number of replicas each write must reach before it
    /// is acknowledged (1 by default; 0 for a cluster without replicas, whose failovers then
    /// lose what a master had not passed on).
    pub async fn connect_with(
        urls: &[String],
        prefix: &str,
        lease_ttl: Duration,
        shards: u32,
        replica_acks: u32,
    ) -> Result<Self, StoreError> {
        if urls.is_empty() {
            return Err(StoreError::Invalid("redis.cluster lists no member".into()));
        }
        if !(1..=1024).contains(&shards) {
            return Err(StoreError::Invalid(format!(
                "money shards must be 1..=1024, got {shards}"
            )));
        }
        let cluster = client(urls, None)?;
        let conn = cluster.get_async_connection().await.map_err(unavailable)?;
        let rconn = cluster.get_async_connection().await.map_err(unavailable)?;
        let code = |parts: &[&str]| Lua::new(format!("{}{}", header(true), parts.concat()));
        let (feed, _) = broadcast::channel(65_536);
        let alive = Arc::new(());
        let store = ClusterStore {
            conn,
            rconn,
            acked: Arc::default(),
            lost: Arc::default(),
            prefix: prefix.to_owned(),
            shards,
            replica_acks,
            lease_ttl,
            ledger_retention: DEFAULT_LEDGER_RETENTION,
            scripts: Arc::new(Scripts {
                settle: code(&[LUA_COMMON, SETTLE]),
                credit: code(&[LUA_COMMON, CREDIT]),
                charge: code(&[LUA_COMMON, CHARGE]),
                release: code(&[LUA_COMMON, LUA_RETURN_LEASE, RELEASE]),
                reap: code(&[LUA_COMMON, LUA_RETURN_LEASE, REAP]),
                begin: code(&[BEGIN]),
                claim: code(&[CLAIM]),
                shards: Lua::new(SHARDS.to_owned()),
                generation: Lua::new(GENERATION.to_owned()),
                book_marks: Lua::new(BOOK_MARKS.to_owned()),
            }),
            feed,
            _alive: alive.clone(),
        };
        // The layout is fixed by the first user: another count would look for accounts in the
        // wrong shards.
        let key = format!("{{{prefix}}}:shards");
        let mut cmd = eval(&store.scripts.shards, std::slice::from_ref(&key));
        cmd.arg(shards);
        let held: String = store
            .write(&store.scripts.shards, cmd)
            .await
            .map_err(StoreError::Unavailable)?;
        if held != shards.to_string() {
            return Err(StoreError::Invalid(format!(
                "this cluster's money is laid out in {held} shards ({key}); this process was \
                 configured with {shards}: set the same number everywhere"
            )));
        }
        let channels = (0..shards)
            .map(|s| format!("{}:events", store.tag(s)))
            .collect();
        tokio::spawn(feed_loop(
            urls.to_vec(),
            channels,
            store.feed.clone(),
            Arc::downgrade(&alive),
        ));
        Ok(store)
    }

    /// Ledger entries older than this are trimmed by the periodic reaper (zero: keep all).
    pub fn with_ledger_retention(mut self, keep: Duration) -> Self {
        self.ledger_retention = keep;
        self
    }

    /// The number of shards money is laid out in.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Shard `s`'s key prefix: a hash tag, so all its keys share a slot.
    fn tag(&self, s: u32) -> String {
        format!("{{{}:m{s}}}", self.prefix)
    }

    fn shard(&self, id: &str) -> u32 {
        shard_of(id, self.shards)
    }

    /// Sends a write script and, in the same pipeline, `WAIT replica_acks`: the pipeline goes
    /// to the script's slot's master on one connection (and is sent again whole if the client
    /// retries), so the wait counts that connection's writes, the script's included. Every
    /// script writes even when it answers a duplicate (a counter), so the wait also covers the
    /// original write, whoever made it. Only a write a replica holds is acknowledged: a master
    /// that answers alone may be about to lose it (it dies and its replica takes over, or it
    /// came back empty and will be demoted). Otherwise `Err`, and the caller retries; the retry
    /// is applied once by whichever master holds the slot by then.
    async fn write<T: redis::FromRedisValue>(
        &self,
        lua: &Lua,
        cmd: redis::Cmd,
    ) -> Result<T, String> {
        let pipe = |cmd: redis::Cmd| {
            let mut pipe = redis::pipe();
            pipe.add_command(cmd);
            if self.replica_acks > 0 {
                pipe.cmd("WAIT")
                    .arg(self.replica_acks)
                    .arg(REPLICA_WAIT.as_millis() as u64);
            }
            pipe
        };
        let mut c = self.conn.clone();
        let mut replies: Vec<redis::Value> = match pipe(cmd.clone()).query_async(&mut c).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                pipe(with_source(lua, &cmd)).query_async(&mut c).await
            }
            other => other,
        }
        .map_err(|e| e.to_string())?;
        if self.replica_acks > 0 {
            match replies.pop() {
                Some(redis::Value::Int(n)) if n >= i64::from(self.replica_acks) => {}
                other => {
                    return Err(format!(
                        "the write reached {other:?} replicas in {REPLICA_WAIT:?}, {} needed; not acknowledged",
                        self.replica_acks
                    ));
                }
            }
        }
        let first = replies.pop().ok_or_else(|| "empty reply".to_owned())?;
        redis::from_redis_value(first).map_err(|e| e.to_string())
    }

    async fn settle_part(
        &self,
        s: u32,
        part: SettleBatch,
        json: String,
    ) -> Result<Result<SettleOutcome, SettleError>, SettleError> {
        let tag = self.tag(s);
        let mark = (part.node_id.clone(), part.epoch, s);
        let acked = self
            .acked
            .lock()
            .map(|a| a.get(&mark).copied().unwrap_or_default())
            .unwrap_or_default();
        // A retry of the part last acknowledged (a batch some of whose parts failed) may find
        // that very part lost: it is applied again, and only earlier ones count as lost.
        let prev = if acked.last == part.seq {
            acked.before
        } else {
            acked.last
        };
        let mut cmd = eval(
            &self.scripts.settle,
            &[format!("{tag}:inc:{}:{}", part.node_id, part.epoch)],
        );
        cmd.arg(&tag)
            .arg(&part.node_id)
            .arg(part.epoch)
            .arg(part.seq)
            .arg(part.digest())
            .arg(self.lease_ttl.as_millis() as u64)
            .arg(json)
            .arg(prev);
        let reply: Vec<String> = self
            .write(&self.scripts.settle, cmd)
            .await
            .map_err(SettleError::Unavailable)?;
        let out = settle_reply(part.seq, &reply);
        if out.is_ok() {
            if reply.get(2).map(String::as_str) == Some("LOST") {
                self.lost.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    shard = s,
                    node = %part.node_id,
                    epoch = part.epoch,
                    acknowledged = prev,
                    found = reply.get(3).map(String::as_str).unwrap_or(""),
                    "a shard lost acknowledged settle parts (both copies failed, or a forced takeover): their usage is not charged"
                );
            }
            if let Ok(mut a) = self.acked.lock() {
                // One incarnation per node at a time: earlier epochs' marks go.
                a.retain(|(n, e, _), _| n != &part.node_id || *e >= part.epoch);
                let m = a.entry(mark).or_default();
                if m.last != part.seq {
                    m.before = m.last;
                    m.last = part.seq;
                }
            }
        }
        Ok(out)
    }

    /// `batch` split by shard: each part keeps the batch's (node, epoch, seq).
    fn parts(&self, batch: &SettleBatch) -> BTreeMap<u32, SettleBatch> {
        let mut parts: BTreeMap<u32, SettleBatch> = BTreeMap::new();
        for e in &batch.entries {
            parts
                .entry(self.shard(&e.account))
                .or_insert_with(|| SettleBatch {
                    node_id: batch.node_id.clone(),
                    epoch: batch.epoch,
                    seq: batch.seq,
                    entries: Vec::new(),
                })
                .entries
                .push(e.clone());
        }
        parts
    }

    /// Settle parts found applied on top of a shard that had lost acknowledged parts of the
    /// same incarnation, since this handle was made (the loss is logged at error level).
    pub fn lost_parts(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Pins `key` to `id|amount` in the key's shard (`kind`: `credit` or `charge`).
    async fn claim(&self, kind: &str, key: &str, value: &str) -> Result<Option<String>, String> {
        let mut cmd = eval(
            &self.scripts.claim,
            &[format!("{}:claims", self.tag(self.shard(key)))],
        );
        cmd.arg(format!("{kind}:{key}")).arg(value);
        let reply: Vec<String> = self.write(&self.scripts.claim, cmd).await?;
        match reply.first().map(String::as_str) {
            Some("OK") => Ok(None),
            Some("MISMATCH") => Ok(Some(reply.get(1).cloned().unwrap_or_default())),
            _ => Err("unexpected reply".into()),
        }
    }
}

/// Subscribes to every shard's channel through the cluster client (sharded pub/sub: each
/// message goes to the subscribers of its shard's master only, not over the whole cluster's
/// bus). A session ends at the first sign of a lost connection (a disconnection, a failed
/// ping of the masters); the next one subscribes again and announces `Resync`.
async fn feed_loop(
    urls: Vec<String>,
    channels: Vec<String>,
    tx: broadcast::Sender<FeedEvent>,
    alive: std::sync::Weak<()>,
) {
    let mut backoff = Duration::from_millis(50);
    while alive.strong_count() > 0 {
        let session = async {
            let (push_tx, mut push) = tokio::sync::mpsc::unbounded_channel();
            let client = client(&urls, Some(push_tx)).map_err(|e| e.to_string())?;
            let mut conn =
                tokio::time::timeout(Duration::from_secs(2), client.get_async_connection())
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
            for ch in &channels {
                tokio::time::timeout(Duration::from_secs(2), conn.ssubscribe(ch))
                    .await
                    .map_err(|_| "subscribe timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
            }
            let _ = tx.send(FeedEvent::Resync);
            backoff = Duration::from_millis(50);
            let mut ping = tokio::time::interval(Duration::from_millis(250));
            ping.tick().await;
            loop {
                tokio::select! {
                    m = push.recv() => {
                        let Some(m) = m else { return Err::<(), String>("push channel ended".into()) };
                        match m.kind {
                            redis::PushKind::SMessage | redis::PushKind::Message => {
                                let payload = match m.data.get(1) {
                                    Some(redis::Value::BulkString(b)) => b.as_slice(),
                                    _ => &[],
                                };
                                match decode_feed(payload) {
                                    Ok(cs) => for c in cs { let _ = tx.send(FeedEvent::Change(c)); },
                                    Err(e) => tracing::warn!(error = %e, "account change that does not parse"),
                                }
                            }
                            redis::PushKind::Disconnection => {
                                return Err("a member's connection closed".into());
                            }
                            // A channel moved (a failover): resubscribed by the client, but
                            // changes may have been missed meanwhile.
                            redis::PushKind::SUnsubscribe => {
                                return Err("a shard's channel was unsubscribed".into());
                            }
                            _ => {}
                        }
                    }
                    _ = ping.tick() => {
                        if alive.strong_count() == 0 {
                            return Ok(());
                        }
                        let all = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                        tokio::time::timeout(Duration::from_millis(500), conn.route_command(redis::cmd("PING"), all))
                            .await
                            .map_err(|_| "ping timed out".to_owned())?
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
        };
        if let Err(e) = session.await {
            tracing::warn!(error = %e, "account change feed (cluster) lost; resubscribing");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

#[async_trait]
impl Store for ClusterStore {
    async fn begin(&self, node_id: &str) -> Result<Incarnation, StoreError> {
        self.begin_after(node_id, 0).await
    }

    async fn begin_after(&self, node_id: &str, floor: u64) -> Result<Incarnation, StoreError> {
        let tag = format!("{{{}:n:{node_id}}}", self.prefix);
        // Acknowledged once a replica has the counter: an epoch handed out twice would reuse
        // settle keys.
        let mut cmd = eval(&self.scripts.begin, &[format!("{tag}:epoch")]);
        cmd.arg(format!("{tag}:inc:")).arg(floor);
        let epoch: u64 = self
            .write(&self.scripts.begin, cmd)
            .await
            .map_err(StoreError::Unavailable)?;
        Ok(Incarnation {
            node_id: node_id.to_owned(),
            epoch,
        })
    }

    async fn settle(&self, batch: &SettleBatch) -> Result<SettleOutcome, SettleError> {
        validate_batch(batch)?;
        // Every part's arguments first: nothing is sent unless all of them can be.
        let parts = self.parts(batch);
        let mut sends = Vec::with_capacity(parts.len());
        let mut accounts: Vec<Vec<String>> = Vec::with_capacity(parts.len());
        for (s, p) in parts {
            let json = entries_json(&p.entries)?;
            accounts.push(p.entries.iter().map(|e| e.account.clone()).collect());
            sends.push(self.settle_part(s, p, json));
        }
        let outcomes = join_all(sends).await;
        let mut grants: Vec<LeaseGrant> = Vec::with_capacity(batch.entries.len());
        let (mut applied, mut refused) = (batch.entries.is_empty(), None);
        let (mut unavailable, mut stale) = (None, None);
        let mut stale_accounts: Vec<String> = Vec::new();
        for (o, ids) in outcomes.into_iter().zip(accounts) {
            match o {
                Ok(Ok(SettleOutcome::Applied(g))) => {
                    applied = true;
                    grants.extend(g);
                }
                Ok(Ok(SettleOutcome::Duplicate(g))) => grants.extend(g),
                // The shard applied a later batch of the incarnation, so this part before it
                // (batches go one at a time): as on one Redis, "applied before". A replay
                // after a rebuild meets it beside parts that answer as duplicates.
                Ok(Err(e @ SettleError::Stale { .. })) => {
                    stale = Some(e);
                    stale_accounts.extend(ids);
                }
                Ok(Err(e)) => refused = Some(e),
                Err(e) => unavailable = Some(e),
            }
        }
        // A part that could not be sent: the agent retries the whole batch, and the parts
        // applied now answer as duplicates then.
        if let Some(e) = unavailable {
            return Err(e);
        }
        if let Some(e) = refused {
            // A refusal (a bug: content changed under the same seq, or a lifetime total at
            // its limit) beside parts that did apply: the agent would cut those again under a
            // new incarnation. Keep it retrying this batch instead, loudly.
            if !grants.is_empty() {
                tracing::error!(error = %e, seq = batch.seq, node = %batch.node_id, "settle: one shard refused its part while others applied theirs; retrying, not re-cutting");
                return Err(SettleError::Unavailable(format!(
                    "a shard refused its part of batch {}: {e}",
                    batch.seq
                )));
            }
            return Err(e);
        }
        if let Some(e) = stale {
            // Every part past: the whole batch was applied before, as on one Redis.
            if grants.is_empty() {
                return Err(e);
            }
            // Some parts past beside others that answered: the reply still covers every entry
            // (a node pairs entries and grants): the past parts' accounts get no lease, with
            // their state now. Not a re-cut: those parts were applied.
            let states = self
                .accounts(&stale_accounts)
                .await
                .map_err(|e| SettleError::Unavailable(e.to_string()))?;
            for (id, st) in stale_accounts.iter().zip(states) {
                let st = st.unwrap_or_else(|| AccountState::empty(id));
                grants.push(LeaseGrant {
                    account: id.clone(),
                    lease: 0,
                    prev: 0,
                    available: st.available,
                    status: st.status,
                    version: st.version,
                });
            }
        }
        let order: std::collections::HashMap<&str, usize> = batch
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.account.as_str(), i))
            .collect();
        grants.sort_by_key(|g| order.get(g.account.as_str()).copied().unwrap_or(usize::MAX));
        Ok(if applied {
            SettleOutcome::Applied(grants)
        } else {
            SettleOutcome::Duplicate(grants)
        })
    }

    async fn release(&self, inc: &Incarnation) -> Result<u64, StoreError> {
        let calls = (0..self.shards).map(|s| async move {
            let tag = self.tag(s);
            let mut cmd = eval(
                &self.scripts.release,
                &[format!("{tag}:inc:{}:{}", inc.node_id, inc.epoch)],
            );
            cmd.arg(&tag).arg(&inc.node_id).arg(inc.epoch);
            let n: u64 = self
                .write(&self.scripts.release, cmd)
                .await
                .map_err(StoreError::Unavailable)?;
            Ok::<u64, StoreError>(n)
        });
        let mut total = 0;
        for r in join_all(calls).await {
            total += r?;
        }
        Ok(total)
    }

    async fn credit(
        &self,
        account: &str,
        key: &str,
        amount: i64,
    ) -> Result<CreditOutcome, CreditError> {
        validate_credit(account, key, amount)?;
        if let Some(prev) = self
            .claim("credit", key, &format!("{account}|{amount}"))
            .await
            .map_err(CreditError::Unavailable)?
        {
            return Err(CreditError::Mismatch {
                key: key.to_owned(),
                stored: prev
                    .rsplit('|')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0),
            });
        }
        let tag = self.tag(self.shard(account));
        let mut cmd = eval(&self.scripts.credit, &[format!("{tag}:acct:{account}")]);
        cmd.arg(&tag).arg(account).arg(key).arg(amount);
        let reply: Vec<String> = self
            .write(&self.scripts.credit, cmd)
            .await
            .map_err(CreditError::Unavailable)?;
        let applied = credit_reply(key, &reply)?;
        let state = self
            .own_state(account)
            .await
            .map_err(|e| CreditError::Unavailable(e.to_string()))?
            .ok_or_else(|| CreditError::Unavailable("account vanished".into()))?;
        Ok(CreditOutcome { applied, state })
    }

    async fn debit(
        &self,
        account: &str,
        key: &str,
        amount: i64,
        mode: DebitMode,
    ) -> Result<ChargeOutcome, ChargeError> {
        validate_charge(account, key, amount)?;
        if self
            .claim("charge", key, &format!("{account}|{amount}"))
            .await
            .map_err(ChargeError::Unavailable)?
            .is_some()
        {
            return Err(ChargeError::Mismatch {
                key: key.to_owned(),
            });
        }
        let tag = self.tag(self.shard(account));
        let mut cmd = eval(&self.scripts.charge, &[format!("{tag}:acct:{account}")]);
        cmd.arg(&tag)
            .arg(account)
            .arg(key)
            .arg(amount)
            .arg(mode_arg(mode))
            .arg(mode.ledger_kind());
        let reply: Vec<String> = self
            .write(&self.scripts.charge, cmd)
            .await
            .map_err(ChargeError::Unavailable)?;
        let (applied, taken) = charge_reply(key, &reply)?;
        let state = self
            .own_state(account)
            .await
            .map_err(|e| ChargeError::Unavailable(e.to_string()))?
            .unwrap_or_else(|| AccountState::empty(account));
        Ok(ChargeOutcome {
            applied,
            taken,
            state,
        })
    }

    async fn accounts(&self, ids: &[String]) -> Result<Vec<Option<AccountState>>, StoreError> {
        let rows = self.read_rows(ids, &FIELDS[..]).await?;
        ids.iter()
            .zip(rows)
            .map(|(id, row)| parse_state(id, row))
            .collect()
    }

    async fn account_changes(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<AccountChange>>, StoreError> {
        let rows = self.read_rows(ids, &["ver", "avail", "status"]).await?;
        Ok(ids
            .iter()
            .zip(rows)
            .map(|(id, row)| {
                let ver = row.first().cloned().flatten()?.parse().ok()?;
                let avail = row
                    .get(1)
                    .cloned()
                    .flatten()
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0);
                Some(AccountChange {
                    account: id.clone(),
                    version: ver,
                    available: avail,
                    status: if row.get(2).cloned().flatten().as_deref() == Some("active") {
                        Status::Active
                    } else {
                        Status::Suspended
                    },
                    at_us: None,
                })
            })
            .collect())
    }

    async fn reap_expired(&self) -> Result<u64, StoreError> {
        let calls = (0..self.shards).map(|s| async move {
            let tag = self.tag(s);
            let mut cmd = eval(&self.scripts.reap, &[format!("{tag}:leases")]);
            cmd.arg(&tag).arg(self.ledger_retention.as_millis() as u64);
            // Nothing waits on a reap's answer: a reap a failover loses is done again.
            let n: u64 = self.unacked(&self.conn, &self.scripts.reap, cmd).await?;
            Ok::<u64, StoreError>(n)
        });
        let mut total = 0;
        for r in join_all(calls).await {
            total += r?;
        }
        Ok(total)
    }

    async fn ledger_generation(&self) -> Result<Option<String>, StoreError> {
        let calls = (0..self.shards).map(|s| async move {
            let cmd = eval(
                &self.scripts.generation,
                &[format!("{}:ledger:gen", self.tag(s))],
            );
            // Not waited for: a generation a failover takes back only makes the batches kept
            // under it stay longer (their marks never match again), never go early. So a
            // shard whose replica is gone does not stop its node from keeping batches.
            self.unacked::<String>(&self.rconn, &self.scripts.generation, cmd)
                .await
        });
        let gens = join_all(calls)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(gens.join(",")))
    }

    async fn book_marks(&self, incs: &[Incarnation]) -> Result<Option<LedgerMarks>, StoreError> {
        let calls = (0..self.shards).map(|s| async move {
            let tag = self.tag(s);
            let mut keys = vec![
                format!("{tag}:ledger:book"),
                format!("{tag}:ledger:booked"),
                format!("{tag}:ledger"),
                format!("{tag}:ledger:gen"),
            ];
            keys.extend(
                incs.iter()
                    .map(|i| format!("{tag}:inc:{}:{}", i.node_id, i.epoch)),
            );
            let cmd = eval(&self.scripts.book_marks, &keys);
            let reply: Vec<String> = self
                .unacked(&self.rconn, &self.scripts.book_marks, cmd)
                .await?;
            parse_book_marks(&reply)
        });
        let streams = join_all(calls)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some(LedgerMarks {
            shards: self.shards,
            streams,
        }))
    }

    async fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let calls = (0..self.shards).map(|s| async move {
            let mut c = self.rconn.clone();
            let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(format!("{}:ledger", self.tag(s)))
                .arg("-")
                .arg("+")
                .query_async(&mut c)
                .await
                .map_err(unavailable)?;
            Ok::<_, StoreError>(reply.ids)
        });
        let mut ids = Vec::new();
        for r in join_all(calls).await {
            ids.extend(r?);
        }
        // Oldest first across shards (stream ids are `<ms>-<n>` of each master's clock).
        ids.sort_by_key(|i| {
            let (ms, n) = i.id.split_once('-').unwrap_or((&i.id, "0"));
            (
                ms.parse::<u64>().unwrap_or(0),
                n.parse::<u64>().unwrap_or(0),
            )
        });
        let mut out = Vec::with_capacity(ids.len());
        for id in &ids {
            out.extend(ledger_lines(id)?);
        }
        Ok(out)
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.feed.subscribe()
    }

    fn lost_parts(&self) -> u64 {
        ClusterStore::lost_parts(self)
    }
}

impl ClusterStore {
    /// Runs a script without a `WAIT` (a reap, whose loss in a failover is redone; a read of
    /// the book's marks, whose every value a journal acts on was acknowledged by a replica
    /// when written), sending its source when the master does not know it.
    async fn unacked<T: redis::FromRedisValue>(
        &self,
        conn: &ClusterConnection,
        lua: &Lua,
        cmd: redis::Cmd,
    ) -> Result<T, StoreError> {
        let mut c = conn.clone();
        match cmd.query_async(&mut c).await {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                with_source(lua, &cmd).query_async(&mut c).await
            }
            other => other,
        }
        .map_err(unavailable)
    }

    /// `HMGET fields` of each account, one pipeline per shard (a pipeline stays in one slot).
    async fn read_rows(
        &self,
        ids: &[String],
        fields: &[&str],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError> {
        self.read_rows_on(&self.rconn, ids, fields).await
    }

    /// An account as its writer sees it right after a write: read on the write connection,
    /// which follows the slot to the master that just took the write.
    async fn own_state(&self, id: &str) -> Result<Option<AccountState>, StoreError> {
        let ids = [id.to_owned()];
        let row = self
            .read_rows_on(&self.conn, &ids, &FIELDS[..])
            .await?
            .into_iter()
            .next()
            .unwrap_or_default();
        parse_state(id, row)
    }

    async fn read_rows_on(
        &self,
        conn: &ClusterConnection,
        ids: &[String],
        fields: &[&str],
    ) -> Result<Vec<Vec<Option<String>>>, StoreError> {
        let mut by_shard: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, id) in ids.iter().enumerate() {
            by_shard.entry(self.shard(id)).or_default().push(i);
        }
        let calls = by_shard.into_iter().map(|(s, idx)| async move {
            let tag = self.tag(s);
            let mut pipe = redis::pipe();
            for &i in &idx {
                pipe.cmd("HMGET")
                    .arg(format!("{tag}:acct:{}", ids[i]))
                    .arg(fields);
            }
            let mut c = conn.clone();
            let rows: Vec<Vec<Option<String>>> =
                pipe.query_async(&mut c).await.map_err(unavailable)?;
            Ok::<_, StoreError>(idx.into_iter().zip(rows).collect::<Vec<_>>())
        });
        let mut out = vec![Vec::new(); ids.len()];
        for r in join_all(calls).await {
            for (i, row) in r? {
                out[i] = row;
            }
        }
        Ok(out)
    }
}
