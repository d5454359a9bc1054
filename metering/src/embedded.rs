//! The embedded backend for one node (`tollgate dev`): a redb database file, every operation one
//! write transaction committed durably (fsync) before it answers, so a restart loses no balance,
//! lease or ledger entry. Same semantics as the Redis scripts; the conformance suite runs both.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::store::{
    FeedEvent, Store, StoreError, validate_batch, validate_charge, validate_credit,
};
use crate::types::{
    AccountChange, AccountState, ChargeError, ChargeOutcome, CreditError, CreditOutcome, DebitMode,
    Incarnation, LeaseGrant, LedgerEntry, SettleBatch, SettleError, SettleOutcome, Status,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// `id|node:epoch` → lease.
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
/// `node:epoch` → incarnation record.
const INCS: TableDefinition<&str, &[u8]> = TableDefinition::new("incarnations");
const CREDITS: TableDefinition<&str, &[u8]> = TableDefinition::new("credits");
const CHARGES: TableDefinition<&str, &[u8]> = TableDefinition::new("charges");
const LEDGER: TableDefinition<u64, &[u8]> = TableDefinition::new("ledger");

#[derive(Serialize, Deserialize)]
struct Lease {
    amount: i64,
    expires_ms: u64,
}

#[derive(Serialize, Deserialize, Default)]
struct IncRecord {
    hwm: u64,
    digest: String,
    reply: Vec<LeaseGrant>,
    released: bool,
    accounts: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct CreditRecord {
    account: String,
    amount: i64,
}

#[derive(Serialize, Deserialize)]
struct ChargeRecord {
    account: String,
    amount: i64,
    taken: i64,
}

#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    lease_ttl: Duration,
    feed: broadcast::Sender<FeedEvent>,
}

#[derive(Debug)]
struct E(String);

impl<T: std::fmt::Display> From<T> for E {
    fn from(e: T) -> Self {
        E(e.to_string())
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn enc<T: Serialize>(v: &T) -> Result<Vec<u8>, E> {
    Ok(serde_json::to_vec(v)?)
}

fn dec<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T, E> {
    Ok(serde_json::from_slice(b)?)
}

/// Recomputes status and bumps the version, like the scripts' `touch`.
fn touch(s: &mut AccountState, changes: &mut Vec<AccountChange>) {
    s.status = if s.available > 0 {
        Status::Active
    } else {
        Status::Suspended
    };
    s.version += 1;
    changes.push(AccountChange {
        account: s.account.clone(),
        version: s.version,
        available: s.available,
        status: s.status,
        at_us: Some(now_us()),
    });
}

/// Wall-clock µs (the same clock the Redis store stamps changes with: the machine's).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

struct Tx<'a> {
    accounts: redb::Table<'a, &'static str, &'static [u8]>,
    leases: redb::Table<'a, &'static str, &'static [u8]>,
    ledger: redb::Table<'a, u64, &'static [u8]>,
    changes: Vec<AccountChange>,
}

impl Tx<'_> {
    fn get(&self, id: &str) -> Result<AccountState, E> {
        match self.accounts.get(id)? {
            Some(v) => dec(v.value()),
            None => Ok(AccountState::empty(id)),
        }
    }

    fn put(&mut self, s: &AccountState) -> Result<(), E> {
        self.accounts
            .insert(s.account.as_str(), enc(s)?.as_slice())?;
        Ok(())
    }

    fn log(&mut self, entry: &LedgerEntry) -> Result<(), E> {
        let next = self.ledger.last()?.map_or(1, |(k, _)| k.value() + 1);
        self.ledger.insert(next, enc(entry)?.as_slice())?;
        Ok(())
    }

    /// Returns one lease to its account (release and reaping).
    fn return_lease(&mut self, id: &str, field: &str, why: &str) -> Result<bool, E> {
        let key = format!("{id}|{field}");
        let lease: Option<Lease> = match self.leases.remove(key.as_str())? {
            Some(v) => Some(dec(v.value())?),
            None => None,
        };
        let Some(lease) = lease else { return Ok(false) };
        let mut s = self.get(id)?;
        s.available += lease.amount;
        s.leased -= lease.amount;
        touch(&mut s, &mut self.changes);
        self.put(&s)?;
        self.log(&LedgerEntry {
            kind: why.into(),
            key: format!("{why}:{field}"),
            account: id.into(),
            amount: 0,
            requests: 0,
            cpu_us: 0,
            deploys: 0,
            rows_read: 0,
            rows_written: 0,
        })?;
        Ok(true)
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the database file.
    pub fn open(path: &Path, lease_ttl: Duration) -> Result<Self, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        let (feed, _) = broadcast::channel(65_536);
        Ok(EmbeddedStore {
            db: Arc::new(db),
            lease_ttl,
            feed,
        })
    }

    /// Runs `f` in one write transaction on a blocking thread, commits durably, then publishes
    /// the changes it made.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Tx<'_>, &redb::WriteTransaction) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
        let db = self.db.clone();
        let (out, changes) = tokio::task::spawn_blocking(move || -> Result<_, E> {
            let wtx = db.begin_write()?;
            let out;
            let changes;
            {
                let mut tx = Tx {
                    accounts: wtx.open_table(ACCOUNTS)?,
                    leases: wtx.open_table(LEASES)?,
                    ledger: wtx.open_table(LEDGER)?,
                    changes: Vec::new(),
                };
                out = f(&mut tx, &wtx)?;
                changes = std::mem::take(&mut tx.changes);
            }
            wtx.commit()?;
            Ok((out, changes))
        })
        .await??;
        for c in changes {
            let _ = self.feed.send(FeedEvent::Change(c));
        }
        Ok(out)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db.begin_read()?)).await?
    }
}

fn store_err(e: E) -> StoreError {
    StoreError::Unavailable(e.0)
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn begin(&self, node_id: &str) -> Result<Incarnation, StoreError> {
        let node = node_id.to_owned();
        self.write(move |_, wtx| {
            let mut meta = wtx.open_table(META)?;
            let key = format!("epoch:{node}");
            let next = meta.get(key.as_str())?.map_or(1, |v| v.value() + 1);
            meta.insert(key.as_str(), next)?;
            Ok(Incarnation {
                node_id: node,
                epoch: next,
            })
        })
        .await
        .map_err(store_err)
    }

    async fn settle(&self, batch: &SettleBatch) -> Result<SettleOutcome, SettleError> {
        validate_batch(batch)?;
        let batch = batch.clone();
        let ttl = self.lease_ttl.as_millis() as u64;
        enum R {
            Ok(SettleOutcome),
            Err(SettleError),
        }
        let r = self
            .write(move |tx, wtx| {
                let mut incs = wtx.open_table(INCS)?;
                let field = format!("{}:{}", batch.node_id, batch.epoch);
                let mut inc: IncRecord = match incs.get(field.as_str())? {
                    Some(v) => dec(v.value())?,
                    None => IncRecord::default(),
                };
                let digest = batch.digest();
                if batch.seq <= inc.hwm {
                    if batch.seq == inc.hwm {
                        if inc.digest != digest {
                            return Ok(R::Err(SettleError::Mismatch { seq: batch.seq }));
                        }
                        return Ok(R::Ok(SettleOutcome::Duplicate(inc.reply)));
                    }
                    return Ok(R::Err(SettleError::Stale {
                        seq: batch.seq,
                        hwm: inc.hwm,
                    }));
                }
                if batch.seq != inc.hwm + 1 {
                    return Ok(R::Err(SettleError::Gap {
                        expected: inc.hwm + 1,
                        got: batch.seq,
                    }));
                }
                let expires_ms = now_ms() + ttl;
                let key = format!("settle:{field}:{}", batch.seq);
                let mut grants = Vec::with_capacity(batch.entries.len());
                for e in &batch.entries {
                    let lkey = format!("{}|{field}", e.account);
                    let old: i64 = match tx.leases.get(lkey.as_str())? {
                        Some(v) => dec::<Lease>(v.value())?.amount,
                        None => 0,
                    };
                    let ask = if inc.released { 0 } else { e.ask };
                    let mut s = tx.get(&e.account)?;
                    s.debited = s
                        .debited
                        .checked_add(e.cost)
                        .ok_or_else(|| E("lifetime debits pass the 64-bit limit".into()))?;
                    s.available += e.give_back;
                    let mut o = old - e.cost - e.give_back;
                    if o < 0 {
                        s.available += o;
                        o = 0;
                    }
                    let g = crate::store::grant(ask, s.available);
                    s.available -= g;
                    let new = o + g;
                    s.leased += new - old;
                    if new > 0 {
                        tx.leases.insert(
                            lkey.as_str(),
                            enc(&Lease {
                                amount: new,
                                expires_ms,
                            })?
                            .as_slice(),
                        )?;
                        if !inc.accounts.contains(&e.account) {
                            inc.accounts.push(e.account.clone());
                        }
                    } else {
                        tx.leases.remove(lkey.as_str())?;
                    }
                    touch(&mut s, &mut tx.changes);
                    tx.put(&s)?;
                    tx.log(&LedgerEntry {
                        kind: "settle".into(),
                        key: key.clone(),
                        account: e.account.clone(),
                        amount: e.cost,
                        requests: e.usage.requests,
                        cpu_us: e.usage.cpu_us,
                        deploys: e.usage.deploys,
                        rows_read: e.usage.rows_read,
                        rows_written: e.usage.rows_written,
                    })?;
                    grants.push(LeaseGrant {
                        account: e.account.clone(),
                        lease: new,
                        prev: old,
                        available: s.available,
                        status: s.status,
                        version: s.version,
                    });
                }
                inc.hwm = batch.seq;
                inc.digest = digest;
                inc.reply = grants.clone();
                incs.insert(field.as_str(), enc(&inc)?.as_slice())?;
                Ok(R::Ok(SettleOutcome::Applied(grants)))
            })
            .await
            .map_err(|e| SettleError::Unavailable(e.0))?;
        match r {
            R::Ok(o) => Ok(o),
            R::Err(e) => Err(e),
        }
    }

    async fn release(&self, inc: &Incarnation) -> Result<u64, StoreError> {
        let field = format!("{}:{}", inc.node_id, inc.epoch);
        self.write(move |tx, wtx| {
            let mut incs = wtx.open_table(INCS)?;
            let mut rec: IncRecord = match incs.get(field.as_str())? {
                Some(v) => dec(v.value())?,
                None => IncRecord::default(),
            };
            let mut n = 0;
            for id in std::mem::take(&mut rec.accounts) {
                if tx.return_lease(&id, &field, "release")? {
                    n += 1;
                }
            }
            rec.released = true;
            incs.insert(field.as_str(), enc(&rec)?.as_slice())?;
            Ok(n)
        })
        .await
        .map_err(store_err)
    }

    async fn credit(
        &self,
        account: &str,
        key: &str,
        amount: i64,
    ) -> Result<CreditOutcome, CreditError> {
        validate_credit(account, key, amount)?;
        let (account, key_owned) = (account.to_owned(), key.to_owned());
        enum R {
            Done(CreditOutcome),
            Mismatch(i64),
        }
        let r = self
            .write(move |tx, wtx| {
                let key = key_owned;
                let mut credits = wtx.open_table(CREDITS)?;
                let prev: Option<CreditRecord> = match credits.get(key.as_str())? {
                    Some(v) => Some(dec(v.value())?),
                    None => None,
                };
                if let Some(prev) = prev {
                    if prev.account != account || prev.amount != amount {
                        return Ok(R::Mismatch(prev.amount));
                    }
                    return Ok(R::Done(CreditOutcome {
                        applied: false,
                        state: tx.get(&account)?,
                    }));
                }
                credits.insert(
                    key.as_str(),
                    enc(&CreditRecord {
                        account: account.clone(),
                        amount,
                    })?
                    .as_slice(),
                )?;
                let mut s = tx.get(&account)?;
                s.credited = s
                    .credited
                    .checked_add(amount)
                    .ok_or_else(|| E("lifetime credits pass the 64-bit limit".into()))?;
                s.available += amount;
                touch(&mut s, &mut tx.changes);
                tx.put(&s)?;
                tx.log(&LedgerEntry {
                    kind: "credit".into(),
                    key: format!("credit:{key}"),
                    account: account.clone(),
                    amount,
                    requests: 0,
                    cpu_us: 0,
                    deploys: 0,
                    rows_read: 0,
                    rows_written: 0,
                })?;
                Ok(R::Done(CreditOutcome {
                    applied: true,
                    state: s,
                }))
            })
            .await
            .map_err(|e| CreditError::Unavailable(e.0))?;
        match r {
            R::Done(o) => Ok(o),
            R::Mismatch(stored) => Err(CreditError::Mismatch {
                key: key.to_owned(),
                stored,
            }),
        }
    }

    async fn debit(
        &self,
        account: &str,
        key: &str,
        amount: i64,
        mode: DebitMode,
    ) -> Result<ChargeOutcome, ChargeError> {
        validate_charge(account, key, amount)?;
        let (account, key_owned) = (account.to_owned(), key.to_owned());
        enum R {
            Done(ChargeOutcome),
            Mismatch,
            Insufficient(i64),
        }
        let r = self
            .write(move |tx, wtx| {
                let key = key_owned;
                let mut charges = wtx.open_table(CHARGES)?;
                let prev: Option<ChargeRecord> = match charges.get(key.as_str())? {
                    Some(v) => Some(dec(v.value())?),
                    None => None,
                };
                if let Some(prev) = prev {
                    if prev.account != account || prev.amount != amount {
                        return Ok(R::Mismatch);
                    }
                    return Ok(R::Done(ChargeOutcome {
                        applied: false,
                        taken: prev.taken,
                        state: tx.get(&account)?,
                    }));
                }
                let mut s = tx.get(&account)?;
                let Some(taken) = mode.take(amount, s.available, s.leased) else {
                    return Ok(R::Insufficient(s.available));
                };
                charges.insert(
                    key.as_str(),
                    enc(&ChargeRecord {
                        account: account.clone(),
                        amount,
                        taken,
                    })?
                    .as_slice(),
                )?;
                if taken > 0 {
                    s.debited = s
                        .debited
                        .checked_add(taken)
                        .ok_or_else(|| E("lifetime debits pass the 64-bit limit".into()))?;
                    s.available -= taken;
                    touch(&mut s, &mut tx.changes);
                    tx.put(&s)?;
                    let kind = mode.ledger_kind();
                    tx.log(&LedgerEntry {
                        kind: kind.into(),
                        key: format!("{kind}:{key}"),
                        account: account.clone(),
                        amount: taken,
                        requests: 0,
                        cpu_us: 0,
                        deploys: 0,
                        rows_read: 0,
                        rows_written: 0,
                    })?;
                }
                Ok(R::Done(ChargeOutcome {
                    applied: true,
                    taken,
                    state: s,
                }))
            })
            .await
            .map_err(|e| ChargeError::Unavailable(e.0))?;
        match r {
            R::Done(o) => Ok(o),
            R::Mismatch => Err(ChargeError::Mismatch {
                key: key.to_owned(),
            }),
            R::Insufficient(available) => Err(ChargeError::Insufficient { available }),
        }
    }

    async fn accounts(&self, ids: &[String]) -> Result<Vec<Option<AccountState>>, StoreError> {
        let ids = ids.to_vec();
        self.read(move |rtx| {
            let t = match rtx.open_table(ACCOUNTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![None; ids.len()]),
                Err(e) => return Err(e.into()),
            };
            ids.iter()
                .map(|id| match t.get(id.as_str())? {
                    Some(v) => Ok(Some(dec(v.value())?)),
                    None => Ok(None),
                })
                .collect()
        })
        .await
        .map_err(store_err)
    }

    async fn reap_expired(&self) -> Result<u64, StoreError> {
        let now = now_ms();
        self.write(move |tx, _| {
            let mut expired = Vec::new();
            for row in tx.leases.iter()? {
                let (k, v) = row?;
                let lease: Lease = dec(v.value())?;
                if lease.expires_ms <= now {
                    expired.push(k.value().to_owned());
                }
            }
            let mut n = 0;
            for k in expired {
                if let Some((id, field)) = k.split_once('|')
                    && tx.return_lease(id, field, "expire")?
                {
                    n += 1;
                }
            }
            Ok(n)
        })
        .await
        .map_err(store_err)
    }

    async fn ledger(&self) -> Result<Vec<LedgerEntry>, StoreError> {
        self.read(|rtx| {
            let t = match rtx.open_table(LEDGER) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for row in t.iter()? {
                let (_, v) = row?;
                out.push(dec(v.value())?);
            }
            Ok(out)
        })
        .await
        .map_err(store_err)
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        let rx = self.feed.subscribe();
        // In-process: the feed is live as soon as one subscribes.
        let _ = self.feed.send(FeedEvent::Resync);
        rx
    }
}
