//! The Redis backend: every operation is one Lua script, so it is atomic and either fully applied
//! or not at all. Money arithmetic happens in `HINCRBY` (exact 64-bit integers); Lua numbers
//! (doubles) only ever hold amounts below 2⁵³ (lease sizes, batch costs), see
//! [`crate::store::MAX_OP_AMOUNT`]. JSON leaving a script is assembled from Redis' own integer
//! strings, never from Lua numbers, so no amount is printed in exponent form.
//!
//! Keys (prefix `tollgate`), documented in docs/money.md:
//! `acct:{id}` hash (credited, debited, avail, leased, status, ver) · `lease:{id}` hash
//! (`node:epoch` → p$) · `leases` zset (`id|node:epoch` by expiry ms) · `inc:{node}:{epoch}` hash
//! (hwm, digest, reply, released) · `incacct:{node}:{epoch}` set · `epoch:{node}` counter ·
//! `credits` hash (key → `id|amount`) · `ledger` stream · `accounts:events` channel.

pub(crate) mod restore;

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::broadcast;

use crate::redis_scripts::{
    BEGIN, BOOK_MARKS, CHARGE, CREDIT, GENERATION, LUA_COMMON, LUA_RETURN_LEASE, REAP, RELEASE,
    SETTLE, header,
};
use crate::store::{
    FeedEvent, Store, StoreError, validate_batch, validate_charge, validate_credit,
};
use crate::types::{
    AccountChange, AccountState, BookMarks, ChargeError, ChargeOutcome, CreditError, CreditOutcome,
    DebitMode, Incarnation, LeaseGrant, LedgerEntry, LedgerMarks, LedgerPos, SettleBatch,
    SettleEntry, SettleError, SettleOutcome, Status,
};

pub use restore::{RestoreReport, RestoreSet};

/// How long the ledger stream keeps entries by default (a billing dispute window); export it
/// (`XRANGE`) to keep more.
pub const DEFAULT_LEDGER_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

impl RedisStore {
    /// Ledger entries older than this are trimmed by the periodic reaper (zero: keep all).
    pub fn with_ledger_retention(mut self, keep: Duration) -> Self {
        self.ledger_retention = keep;
        self
    }

    /// Up to `count` ledger stream entries after stream id `after` (`0-0`: from the start),
    /// oldest first: (stream id, its lines: one per account).
    pub async fn ledger_page(
        &self,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, Vec<LedgerEntry>)>, StoreError> {
        let mut c = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{}:ledger", self.prefix))
            .arg(format!("({after}"))
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        reply
            .ids
            .iter()
            .map(|id| Ok((id.id.clone(), ledger_lines(id)?)))
            .collect()
    }

    /// A connection to this store's Redis (the book of record copies the payment channel
    /// records kept beside the ledger through it).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The key prefix of this store.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Records that the book of record holds every ledger entry up to stream id `id`. From the
    /// first call on, the reaper trims no entry after the last id recorded, whatever its age.
    pub async fn mark_booked(&self, id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(format!("{}:ledger:book", self.prefix))
            .arg("1")
            .ignore()
            .cmd("SET")
            .arg(format!("{}:ledger:booked", self.prefix))
            .arg(id)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(unavailable)
    }

    /// Declares that a book of record copies this ledger (before its first copy): entries are
    /// no longer trimmed by age alone.
    pub async fn enable_book(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(format!("{}:ledger:book", self.prefix))
            .arg("1")
            .query_async::<()>(&mut c)
            .await
            .map_err(unavailable)
    }
}

/// The ledger lines of one stream entry: a settle batch has one line per account (`lines`),
/// the other kinds one.
pub fn ledger_lines(id: &redis::streams::StreamId) -> Result<Vec<LedgerEntry>, StoreError> {
    #[derive(serde::Deserialize)]
    struct Line {
        account: String,
        amount: i64,
        requests: u64,
        cpu_us: u64,
        deploys: u64,
        #[serde(default)]
        rows_read: u64,
        #[serde(default)]
        rows_written: u64,
    }
    let s = |k: &str| -> String { id.get::<String>(k).unwrap_or_default() };
    let n = |k: &str| -> u64 { s(k).parse().unwrap_or(0) };
    if let Some(lines) = id.get::<String>("lines") {
        let lines: Vec<Line> = serde_json::from_str(&lines)
            .map_err(|e| StoreError::Corrupt(format!("ledger {}: {e}", id.id)))?;
        return Ok(lines
            .into_iter()
            .map(|l| LedgerEntry {
                kind: s("kind"),
                key: s("key"),
                account: l.account,
                amount: l.amount,
                requests: l.requests,
                cpu_us: l.cpu_us,
                deploys: l.deploys,
                rows_read: l.rows_read,
                rows_written: l.rows_written,
            })
            .collect());
    }
    Ok(vec![LedgerEntry {
        kind: s("kind"),
        key: s("key"),
        account: s("account"),
        amount: s("amount").parse().unwrap_or(0),
        requests: n("requests"),
        cpu_us: n("cpu_us"),
        deploys: n("deploys"),
        rows_read: n("rows_read"),
        rows_written: n("rows_written"),
    }])
}

/// Redis-backed store. Cheap to clone.
#[derive(Clone)]
pub struct RedisStore {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    lease_ttl: Duration,
    ledger_retention: Duration,
    settle: redis::Script,
    credit: redis::Script,
    charge: redis::Script,
    release: redis::Script,
    reap: redis::Script,
    book_marks: redis::Script,
    feed: broadcast::Sender<FeedEvent>,
    /// The feed task ends once every clone of the store is gone.
    _alive: std::sync::Arc<()>,
}

/// A money script: the `SHARDED` header, then its parts.
pub(crate) fn script(sharded: bool, parts: &[&str]) -> redis::Script {
    redis::Script::new(&format!("{}{}", header(sharded), parts.concat()))
}

/// The `BOOK_MARKS` script's reply.
pub(crate) fn parse_book_marks(reply: &[String]) -> Result<BookMarks, StoreError> {
    let [declared, booked, last, generation, hwms @ ..] = reply else {
        return Err(StoreError::Corrupt("book marks: short reply".into()));
    };
    Ok(BookMarks {
        declared: declared == "1",
        // An unreadable mark counts as none: batches are kept longer, never dropped early.
        booked: LedgerPos::parse(booked),
        last: LedgerPos::parse(last),
        generation: (!generation.is_empty()).then(|| generation.clone()),
        hwms: hwms
            .iter()
            .map(|h| {
                h.split(':')
                    .next()
                    .and_then(|h| h.parse().ok())
                    .unwrap_or(0)
            })
            .collect(),
        // A lost range that does not read counts as everything lost: kept longer, never less.
        lost: hwms
            .iter()
            .map(|h| {
                let mut f = h.split(':').skip(1);
                match (f.next(), f.next()) {
                    (None, _) => None,
                    (Some(a), Some(b)) => {
                        Some((a.parse().unwrap_or(0), b.parse().unwrap_or(u64::MAX)))
                    }
                    (Some(_), None) => Some((0, u64::MAX)),
                }
            })
            .collect(),
    })
}

pub(crate) fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Connects; `lease_ttl` is how long a lease lives on the store's clock without a settle.
    pub async fn connect(url: &str, prefix: &str, lease_ttl: Duration) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| StoreError::Invalid(e.to_string()))?;
        // Fail fast while Redis is away: callers (the agent) retry with their own schedule and
        // must stay responsive (shutdown, lease validity), not wait in the client's backoff.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(unavailable)?;
        let (feed, _) = broadcast::channel(65_536);
        let alive = std::sync::Arc::new(());
        let store = RedisStore {
            client,
            conn,
            prefix: prefix.to_owned(),
            lease_ttl,
            ledger_retention: DEFAULT_LEDGER_RETENTION,
            settle: script(false, &[LUA_COMMON, SETTLE]),
            credit: script(false, &[LUA_COMMON, CREDIT]),
            charge: script(false, &[LUA_COMMON, CHARGE]),
            release: script(false, &[LUA_COMMON, LUA_RETURN_LEASE, RELEASE]),
            reap: script(false, &[LUA_COMMON, LUA_RETURN_LEASE, REAP]),
            book_marks: redis::Script::new(BOOK_MARKS),
            feed,
            _alive: alive.clone(),
        };
        tokio::spawn(feed_loop(
            store.client.clone(),
            format!("{prefix}:accounts:events"),
            store.feed.clone(),
            std::sync::Arc::downgrade(&alive),
        ));
        Ok(store)
    }

    fn acct_key(&self, id: &str) -> String {
        format!("{}:acct:{id}", self.prefix)
    }
}

/// A batch's entries as the settle script reads them: amounts as strings (exact in JSON).
pub(crate) fn entries_json(entries: &[SettleEntry]) -> Result<String, SettleError> {
    #[derive(serde::Serialize)]
    struct E<'a> {
        account: &'a str,
        cost: String,
        give_back: String,
        ask: String,
        requests: String,
        cpu_us: String,
        deploys: String,
        rows_read: String,
        rows_written: String,
    }
    let entries: Vec<E> = entries
        .iter()
        .map(|e| E {
            account: &e.account,
            cost: e.cost.to_string(),
            give_back: e.give_back.to_string(),
            ask: e.ask.to_string(),
            requests: e.usage.requests.to_string(),
            cpu_us: e.usage.cpu_us.to_string(),
            deploys: e.usage.deploys.to_string(),
            rows_read: e.usage.rows_read.to_string(),
            rows_written: e.usage.rows_written.to_string(),
        })
        .collect();
    serde_json::to_string(&entries).map_err(|e| SettleError::Invalid(e.to_string()))
}

/// What the settle script answered, for batch `seq`.
pub(crate) fn settle_reply(seq: u64, reply: &[String]) -> Result<SettleOutcome, SettleError> {
    let tag = reply.first().map(String::as_str).unwrap_or("");
    let body = reply.get(1).map(String::as_str).unwrap_or("");
    let grants = || -> Result<Vec<LeaseGrant>, SettleError> {
        serde_json::from_str(body).map_err(|e| SettleError::Unavailable(format!("bad reply: {e}")))
    };
    match tag {
        "OK" => Ok(SettleOutcome::Applied(grants()?)),
        "DUP" => Ok(SettleOutcome::Duplicate(grants()?)),
        "MISMATCH" => Err(SettleError::Mismatch { seq }),
        "STALE" => Err(SettleError::Stale {
            seq,
            hwm: body.parse().unwrap_or(0),
        }),
        "OVERFLOW" => Err(SettleError::Invalid(format!(
            "account {body}: lifetime debits would pass the 64-bit limit"
        ))),
        "GAP" => Err(SettleError::Gap {
            expected: body.parse().unwrap_or(0),
            got: seq,
        }),
        other => Err(SettleError::Unavailable(format!(
            "unexpected reply {other}"
        ))),
    }
}

/// The charge script's name for a debit mode.
pub(crate) fn mode_arg(mode: DebitMode) -> &'static str {
    match mode {
        DebitMode::All => "all",
        DebitMode::UpToAvailable => "avail",
        DebitMode::UpToBalance => "balance",
    }
}

/// What the credit script answered: applied (`false`: the key was credited before).
pub(crate) fn credit_reply(key: &str, reply: &[String]) -> Result<bool, CreditError> {
    let applied = match reply.first().map(String::as_str) {
        Some("OK") => true,
        Some("DUP") => false,
        Some("OVERFLOW") => {
            return Err(CreditError::Invalid(
                "lifetime credits of this account would pass the 64-bit limit".into(),
            ));
        }
        Some("MISMATCH") => {
            let stored = reply
                .get(1)
                .and_then(|s| s.rsplit('|').next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            return Err(CreditError::Mismatch {
                key: key.to_owned(),
                stored,
            });
        }
        _ => return Err(CreditError::Unavailable("unexpected reply".into())),
    };
    Ok(applied)
}

/// What the charge script answered: (applied, taken).
pub(crate) fn charge_reply(key: &str, reply: &[String]) -> Result<(bool, i64), ChargeError> {
    let number = |i: usize| -> Result<i64, ChargeError> {
        reply
            .get(i)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ChargeError::Unavailable("unexpected reply".into()))
    };
    let (applied, taken) = match reply.first().map(String::as_str) {
        Some("OK") => (true, number(1)?),
        Some("DUP") => (false, number(1)?),
        Some("INSUFFICIENT") => {
            return Err(ChargeError::Insufficient {
                available: number(1)?,
            });
        }
        Some("MISMATCH") => {
            return Err(ChargeError::Mismatch {
                key: key.to_owned(),
            });
        }
        Some("OVERFLOW") => {
            return Err(ChargeError::Invalid(
                "lifetime debits of this account would pass the 64-bit limit".into(),
            ));
        }
        _ => return Err(ChargeError::Unavailable("unexpected reply".into())),
    };
    Ok((applied, taken))
}

/// One change-feed message: a settle publishes one array per batch, other operations one
/// object. Anything else is an error (logged by the subscriber, never applied).
pub fn decode_feed(payload: &[u8]) -> Result<Vec<AccountChange>, serde_json::Error> {
    serde_json::from_slice::<Vec<AccountChange>>(payload)
        .or_else(|_| serde_json::from_slice::<AccountChange>(payload).map(|c| vec![c]))
}

/// Subscriber loop: pushes changes into the broadcast channel; pings the connection and
/// resubscribes on loss. Every time the subscription becomes live (the first time included) it
/// announces `Resync`, so caches re-read what they may have missed. Ends with the store.
async fn feed_loop(
    client: redis::Client,
    channel: String,
    tx: broadcast::Sender<FeedEvent>,
    alive: std::sync::Weak<()>,
) {
    let mut backoff = Duration::from_millis(50);
    while alive.strong_count() > 0 {
        let session = async {
            let pubsub = tokio::time::timeout(Duration::from_secs(1), client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            let (mut sink, mut stream) = pubsub.split();
            sink.subscribe(&channel).await.map_err(|e| e.to_string())?;
            let _ = tx.send(FeedEvent::Resync);
            backoff = Duration::from_millis(50);
            let mut ping = tokio::time::interval(Duration::from_millis(250));
            ping.tick().await;
            loop {
                tokio::select! {
                    m = stream.next() => {
                        let Some(m) = m else { return Err::<(), String>("stream ended".into()) };
                        let payload: Vec<u8> = m.get_payload().unwrap_or_default();
                        match decode_feed(&payload) {
                            Ok(cs) => for c in cs { let _ = tx.send(FeedEvent::Change(c)); },
                            Err(e) => tracing::warn!(error = %e, "account change that does not parse"),
                        }
                    }
                    _ = ping.tick() => {
                        if alive.strong_count() == 0 {
                            return Ok(());
                        }
                        tokio::time::timeout(Duration::from_millis(500), sink.ping::<redis::Value>())
                            .await
                            .map_err(|_| "ping timed out".to_owned())?
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
        };
        if let Err(e) = session.await {
            tracing::warn!(error = %e, "account change feed lost; resubscribing");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

pub(crate) fn parse_state(
    id: &str,
    v: Vec<Option<String>>,
) -> Result<Option<AccountState>, StoreError> {
    if v.iter().all(Option::is_none) {
        return Ok(None);
    }
    let num = |i: usize| -> Result<i64, StoreError> {
        v.get(i)
            .cloned()
            .flatten()
            .unwrap_or_else(|| "0".into())
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("account {id} field {i}")))
    };
    let status = match v.get(4).cloned().flatten().as_deref() {
        Some("active") => Status::Active,
        _ => Status::Suspended,
    };
    Ok(Some(AccountState {
        account: id.to_owned(),
        credited: num(0)?,
        debited: num(1)?,
        available: num(2)?,
        leased: num(3)?,
        status,
        version: num(5)? as u64,
    }))
}

pub(crate) const FIELDS: [&str; 6] = ["credited", "debited", "avail", "leased", "status", "ver"];

#[async_trait]
impl Store for RedisStore {
    async fn begin(&self, node_id: &str) -> Result<Incarnation, StoreError> {
        self.begin_after(node_id, 0).await
    }

    async fn begin_after(&self, node_id: &str, floor: u64) -> Result<Incarnation, StoreError> {
        let mut c = self.conn.clone();
        // Never an epoch whose incarnation the store already knows (a counter restored by
        // `book rebuild` may lag a journal it was not given; the next number is fresh), nor
        // one at or below `floor`.
        let epoch: u64 = script(false, &[BEGIN])
            .key(format!("{}:epoch:{node_id}", self.prefix))
            .arg(format!("{}:inc:{node_id}:", self.prefix))
            .arg(floor)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(Incarnation {
            node_id: node_id.to_owned(),
            epoch,
        })
    }

    async fn settle(&self, batch: &SettleBatch) -> Result<SettleOutcome, SettleError> {
        validate_batch(batch)?;
        let json = entries_json(&batch.entries)?;
        let mut c = self.conn.clone();
        let reply: Vec<String> = self
            .settle
            .arg(&self.prefix)
            .arg(&batch.node_id)
            .arg(batch.epoch)
            .arg(batch.seq)
            .arg(batch.digest())
            .arg(self.lease_ttl.as_millis() as u64)
            .arg(json)
            .invoke_async(&mut c)
            .await
            .map_err(|e| SettleError::Unavailable(e.to_string()))?;
        settle_reply(batch.seq, &reply)
    }

    async fn release(&self, inc: &Incarnation) -> Result<u64, StoreError> {
        let mut c = self.conn.clone();
        self.release
            .arg(&self.prefix)
            .arg(&inc.node_id)
            .arg(inc.epoch)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn credit(
        &self,
        account: &str,
        key: &str,
        amount: i64,
    ) -> Result<CreditOutcome, CreditError> {
        validate_credit(account, key, amount)?;
        let mut c = self.conn.clone();
        let reply: Vec<String> = self
            .credit
            .arg(&self.prefix)
            .arg(account)
            .arg(key)
            .arg(amount)
            .invoke_async(&mut c)
            .await
            .map_err(|e| CreditError::Unavailable(e.to_string()))?;
        let applied = credit_reply(key, &reply)?;
        let state = self
            .account(account)
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
        let mut c = self.conn.clone();
        let reply: Vec<String> = self
            .charge
            .arg(&self.prefix)
            .arg(account)
            .arg(key)
            .arg(amount)
            .arg(mode_arg(mode))
            .arg(mode.ledger_kind())
            .invoke_async(&mut c)
            .await
            .map_err(|e| ChargeError::Unavailable(e.to_string()))?;
        let (applied, taken) = charge_reply(key, &reply)?;
        let state = self
            .account(account)
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
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET").arg(self.acct_key(id)).arg(&FIELDS[..]);
        }
        let mut c = self.conn.clone();
        let rows: Vec<Vec<Option<String>>> = pipe.query_async(&mut c).await.map_err(unavailable)?;
        ids.iter()
            .zip(rows)
            .map(|(id, row)| parse_state(id, row))
            .collect()
    }

    async fn account_changes(
        &self,
        ids: &[String],
    ) -> Result<Vec<Option<AccountChange>>, StoreError> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(self.acct_key(id))
                .arg(&["ver", "avail", "status"]);
        }
        let mut c = self.conn.clone();
        let rows: Vec<(Option<u64>, Option<i64>, Option<String>)> =
            pipe.query_async(&mut c).await.map_err(unavailable)?;
        Ok(ids
            .iter()
            .zip(rows)
            .map(|(id, (ver, avail, status))| {
                let ver = ver?;
                Some(AccountChange {
                    account: id.clone(),
                    version: ver,
                    available: avail.unwrap_or(0),
                    status: if status.as_deref() == Some("active") {
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
        let mut c = self.conn.clone();
        self.reap
            .arg(&self.prefix)
            .arg(self.ledger_retention.as_millis() as u64)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)
    }

    async fn ledger_generation(&self) -> Result<Option<String>, StoreError> {
        let mut c = self.conn.clone();
        let g: String = redis::Script::new(GENERATION)
            .key(format!("{}:ledger:gen", self.prefix))
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(Some(g))
    }

    async fn book_marks(&self, incs: &[Incarnation]) -> Result<Option<LedgerMarks>, StoreError> {
        let mut c = self.conn.clone();
        let p = &self.prefix;
        let mut inv = self.book_marks.prepare_invoke();
        inv.key(format!("{p}:ledger:book"))
            .key(format!("{p}:ledger:booked"))
            .key(format!("{p}:ledger"))
            .key(format!("{p}:ledger:gen"));
        for i in incs {
            inv.key(format!("{p}:inc:{}:{}", i.node_id, i.epoch));
        }
        let reply: Vec<String> = inv.invoke_async(&mut c).await.map_err(unavailable)?;
        Ok(Some(parse_book_marks(&reply)?.into()))
    }

    async fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        let mut c = self.conn.clone();
        let reply: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(format!("{}:ledger", self.prefix))
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(reply.ids.len());
        for id in reply.ids {
            out.extend(ledger_lines(&id)?);
        }
        Ok(out)
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.feed.subscribe()
    }
}
