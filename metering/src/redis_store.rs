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

use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::broadcast;

use crate::store::{
    FeedEvent, Store, StoreError, validate_batch, validate_charge, validate_credit,
};
use crate::types::{
    AccountChange, AccountState, ChargeError, ChargeOutcome, CreditError, CreditOutcome, DebitMode,
    Incarnation, LeaseGrant, LedgerEntry, SettleBatch, SettleError, SettleOutcome, Status,
};

/// Shared Lua: recompute status, bump the version, publish the change. `acct` is the hash key,
/// `id` the account id. Returns the new version.
const LUA_COMMON: &str = r#"
local function touch(p, id, acct)
  local avail = redis.call('HGET', acct, 'avail') or '0'
  local status = 'active'
  if tonumber(avail) <= 0 then status = 'suspended' end
  redis.call('HSET', acct, 'status', status)
  local ver = redis.call('HINCRBY', acct, 'ver', 1)
  local t = redis.call('TIME')
  redis.call('PUBLISH', p .. ':accounts:events',
    '{"account":' .. cjson.encode(id) .. ',"version":' .. ver .. ',"available":' .. avail ..
    ',"status":"' .. status .. '","at_us":' .. t[1] .. string.format('%06d', tonumber(t[2])) .. '}')
  return {avail, status, ver}
end
local function fmt(n) return string.format('%d', n) end
"#;

const SETTLE: &str = r#"
local p, node, epoch = ARGV[1], ARGV[2], ARGV[3]
local seq = tonumber(ARGV[4])
local digest, ttl = ARGV[5], tonumber(ARGV[6])
local entries = cjson.decode(ARGV[7])
local inc = p .. ':inc:' .. node .. ':' .. epoch
local hwm = tonumber(redis.call('HGET', inc, 'hwm') or '0')
if seq <= hwm then
  if seq == hwm then
    if redis.call('HGET', inc, 'digest') ~= digest then return {'MISMATCH', ''} end
    return {'DUP', redis.call('HGET', inc, 'reply')}
  end
  return {'STALE', tostring(hwm)}
end
if seq ~= hwm + 1 then return {'GAP', tostring(hwm + 1)} end
local released = redis.call('HGET', inc, 'released')
local t = redis.call('TIME')
-- When the change happened, on the store's clock: receivers measure the feed's lag with it.
local at_us = t[1] .. string.format('%06d', tonumber(t[2]))
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
local field = node .. ':' .. epoch
local key = 'settle:' .. node .. ':' .. epoch .. ':' .. ARGV[4]
-- Lifetime totals are i64: refuse the whole batch before writing anything.
for _, e in ipairs(entries) do
  local d = tonumber(redis.call('HGET', p .. ':acct:' .. e.account, 'debited') or '0')
  if d + tonumber(e.cost) > 9.0e18 then return {'OVERFLOW', e.account} end
end
local out, changes, lines = {}, {}, {}
for _, e in ipairs(entries) do
  local id = e.account
  local acct = p .. ':acct:' .. id
  local lkey = p .. ':lease:' .. id
  local cost, back, ask = tonumber(e.cost), tonumber(e.give_back), tonumber(e.ask)
  if released then ask = 0 end
  local old = tonumber(redis.call('HGET', lkey, field) or '0')
  -- Net change of avail, computed on small numbers only: the hand-back, any debt (cost past
  -- the lease), minus the grant. Applied with one exact HINCRBY.
  local o = old - cost - back
  local delta = back
  if o < 0 then
    delta = delta + o
    o = 0
  end
  local g = 0
  if ask > 0 then
    local a = tonumber(redis.call('HGET', acct, 'avail') or '0') + delta
    if a <= 0 then g = 0
    elseif a <= ask then g = a
    elseif a < 2 * ask then g = math.floor(a / 2)
    else g = ask end
  end
  delta = delta - g
  local new = o + g
  if delta ~= 0 then redis.call('HINCRBY', acct, 'avail', fmt(delta)) end
  if cost > 0 then redis.call('HINCRBY', acct, 'debited', e.cost) end
  if new ~= old then redis.call('HINCRBY', acct, 'leased', fmt(new - old)) end
  local member = id .. '|' .. field
  if new > 0 then
    redis.call('HSET', lkey, field, fmt(new))
    redis.call('ZADD', p .. ':leases', expires, member)
    if old == 0 then redis.call('SADD', p .. ':incacct:' .. node .. ':' .. epoch, id) end
  elseif old > 0 then
    redis.call('HDEL', lkey, field)
    redis.call('ZREM', p .. ':leases', member)
  end
  local avail = redis.call('HGET', acct, 'avail') or '0'
  local status = 'active'
  if tonumber(avail) <= 0 then status = 'suspended' end
  redis.call('HSET', acct, 'status', status)
  local ver = redis.call('HINCRBY', acct, 'ver', 1)
  local jid = cjson.encode(id)
  changes[#changes + 1] = '{"account":' .. jid .. ',"version":' .. ver .. ',"available":' ..
    avail .. ',"status":"' .. status .. '","at_us":' .. at_us .. '}'
  lines[#lines + 1] = '{"account":' .. jid .. ',"amount":' .. e.cost .. ',"requests":' ..
    e.requests .. ',"cpu_us":' .. e.cpu_us .. ',"deploys":' .. e.deploys .. '}'
  out[#out + 1] = '{"account":' .. jid .. ',"lease":' .. fmt(new) .. ',"prev":' .. fmt(old) ..
    ',"available":' .. avail .. ',"status":"' .. status .. '","version":' .. ver .. '}'
end
-- One ledger entry and one feed message per batch (their lines are per account).
if #lines > 0 then
  redis.call('XADD', p .. ':ledger', '*', 'kind', 'settle', 'key', key,
    'lines', '[' .. table.concat(lines, ',') .. ']')
  redis.call('PUBLISH', p .. ':accounts:events', '[' .. table.concat(changes, ',') .. ']')
end
local reply = '[' .. table.concat(out, ',') .. ']'
redis.call('HSET', inc, 'hwm', ARGV[4], 'digest', digest, 'reply', reply)
return {'OK', reply}
"#;

const CREDIT: &str = r#"
local p, id, ckey, amount = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local acct = p .. ':acct:' .. id
local prev = redis.call('HGET', p .. ':credits', ckey)
if prev then
  if prev ~= id .. '|' .. amount then return {'MISMATCH', prev} end
  return {'DUP'}
end
-- Lifetime totals are i64: refuse before writing anything (a script is not rolled back).
if tonumber(redis.call('HGET', acct, 'credited') or '0') + tonumber(amount) > 9.0e18 then
  return {'OVERFLOW'}
end
redis.call('HINCRBY', acct, 'credited', amount)
redis.call('HINCRBY', acct, 'avail', amount)
redis.call('HSET', p .. ':credits', ckey, id .. '|' .. amount)
touch(p, id, acct)
redis.call('XADD', p .. ':ledger', '*', 'kind', 'credit', 'key', 'credit:' .. ckey,
  'account', id, 'amount', amount, 'requests', 0, 'cpu_us', 0, 'deploys', 0)
return {'OK'}
"#;

/// `charges` hash: key → `id|amount|taken`. Insufficient (all-or-nothing) records nothing.
/// `mode`: `all`, `avail` (up to available) or `balance` (up to available + leased: a
/// write-off, which may leave `avail` below zero by at most what nodes hold).
const CHARGE: &str = r#"
local p, id, ckey, amount, mode, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local acct = p .. ':acct:' .. id
local prev = redis.call('HGET', p .. ':charges', ckey)
if prev then
  local head = id .. '|' .. amount .. '|'
  if string.sub(prev, 1, #head) ~= head then return {'MISMATCH'} end
  return {'DUP', string.sub(prev, #head + 1)}
end
local avail = redis.call('HGET', acct, 'avail') or '0'
local take = amount
if mode == 'balance' then
  local room = tonumber(avail) + tonumber(redis.call('HGET', acct, 'leased') or '0')
  if room < tonumber(amount) then
    take = string.format('%d', room)
    if room < 0 then take = '0' end
  end
elseif tonumber(avail) < tonumber(amount) then
  if mode ~= 'avail' then return {'INSUFFICIENT', avail} end
  take = avail
  if tonumber(avail) < 0 then take = '0' end
end
if tonumber(redis.call('HGET', acct, 'debited') or '0') + tonumber(take) > 9.0e18 then
  return {'OVERFLOW'}
end
redis.call('HSET', p .. ':charges', ckey, id .. '|' .. amount .. '|' .. take)
if tonumber(take) > 0 then
  redis.call('HINCRBY', acct, 'avail', '-' .. take)
  redis.call('HINCRBY', acct, 'debited', take)
  touch(p, id, acct)
  redis.call('XADD', p .. ':ledger', '*', 'kind', kind, 'key', kind .. ':' .. ckey,
    'account', id, 'amount', take, 'requests', 0, 'cpu_us', 0, 'deploys', 0)
end
return {'OK', take}
"#;

/// Returns one lease (`id|node:epoch`) to its account. Shared by release and reap.
const LUA_RETURN_LEASE: &str = r#"
local function return_lease(p, id, field, why)
  local lkey = p .. ':lease:' .. id
  local amt = redis.call('HGET', lkey, field)
  redis.call('ZREM', p .. ':leases', id .. '|' .. field)
  if not amt then return 0 end
  local acct = p .. ':acct:' .. id
  redis.call('HDEL', lkey, field)
  redis.call('HINCRBY', acct, 'avail', amt)
  redis.call('HINCRBY', acct, 'leased', '-' .. amt)
  touch(p, id, acct)
  redis.call('XADD', p .. ':ledger', '*', 'kind', why, 'key', why .. ':' .. field,
    'account', id, 'amount', 0, 'requests', 0, 'cpu_us', 0, 'deploys', 0)
  return 1
end
"#;

const RELEASE: &str = r#"
local p, node, epoch = ARGV[1], ARGV[2], ARGV[3]
local field = node .. ':' .. epoch
redis.call('HSET', p .. ':inc:' .. field, 'released', '1')
local set = p .. ':incacct:' .. field
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', set)) do
  n = n + return_lease(p, id, field, 'release')
end
redis.call('DEL', set)
return n
"#;

const REAP: &str = r#"
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', p .. ':leases', '-inf', now, 'LIMIT', 0, 500)) do
  local bar = string.find(m, '|', 1, true)
  local id, field = string.sub(m, 1, bar - 1), string.sub(m, bar + 1)
  n = n + return_lease(p, id, field, 'expire')
end
-- The ledger is an audit trail (idempotency lives in the high-water marks and the credit keys):
-- entries older than the retention go, exactly, so Redis does not grow forever.
-- At most 1,000 entries per round, so a long backlog (retention just lowered, or a first run
-- after an upgrade) cannot block Redis: the rounds catch up.
local keep = tonumber(ARGV[2] or '0') or 0
if keep > 0 and now > keep then
  local old = redis.call('XRANGE', p .. ':ledger', '-', string.format('%d', now - keep),
    'COUNT', 1000)
  if #old > 0 then
    local ids = {}
    for i, e in ipairs(old) do ids[i] = e[1] end
    redis.call('XDEL', p .. ':ledger', unpack(ids))
  end
end
return n
"#;

/// How long the ledger stream keeps entries by default (a billing dispute window); export it
/// (`XRANGE`) to keep more.
pub const DEFAULT_LEDGER_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

impl RedisStore {
    /// Ledger entries older than this are trimmed by the periodic reaper (zero: keep all).
    pub fn with_ledger_retention(mut self, keep: Duration) -> Self {
        self.ledger_retention = keep;
        self
    }
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
    feed: broadcast::Sender<FeedEvent>,
    /// The feed task ends once every clone of the store is gone.
    _alive: std::sync::Arc<()>,
}

fn unavailable(e: redis::RedisError) -> StoreError {
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
            settle: redis::Script::new(&format!("{LUA_COMMON}{SETTLE}")),
            credit: redis::Script::new(&format!("{LUA_COMMON}{CREDIT}")),
            charge: redis::Script::new(&format!("{LUA_COMMON}{CHARGE}")),
            release: redis::Script::new(&format!("{LUA_COMMON}{LUA_RETURN_LEASE}{RELEASE}")),
            reap: redis::Script::new(&format!("{LUA_COMMON}{LUA_RETURN_LEASE}{REAP}")),
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
                        // A settle publishes one array per batch; other operations one object.
                        let parsed = serde_json::from_slice::<Vec<AccountChange>>(&payload)
                            .or_else(|_| serde_json::from_slice::<AccountChange>(&payload).map(|c| vec![c]));
                        match parsed {
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

fn parse_state(id: &str, v: Vec<Option<String>>) -> Result<Option<AccountState>, StoreError> {
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

const FIELDS: [&str; 6] = ["credited", "debited", "avail", "leased", "status", "ver"];

#[async_trait]
impl Store for RedisStore {
    async fn begin(&self, node_id: &str) -> Result<Incarnation, StoreError> {
        let mut c = self.conn.clone();
        let epoch: u64 = redis::cmd("INCR")
            .arg(format!("{}:epoch:{node_id}", self.prefix))
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(Incarnation {
            node_id: node_id.to_owned(),
            epoch,
        })
    }

    async fn settle(&self, batch: &SettleBatch) -> Result<SettleOutcome, SettleError> {
        validate_batch(batch)?;
        #[derive(serde::Serialize)]
        struct E<'a> {
            account: &'a str,
            cost: String,
            give_back: String,
            ask: String,
            requests: String,
            cpu_us: String,
            deploys: String,
        }
        let entries: Vec<E> = batch
            .entries
            .iter()
            .map(|e| E {
                account: &e.account,
                cost: e.cost.to_string(),
                give_back: e.give_back.to_string(),
                ask: e.ask.to_string(),
                requests: e.usage.requests.to_string(),
                cpu_us: e.usage.cpu_us.to_string(),
                deploys: e.usage.deploys.to_string(),
            })
            .collect();
        let json =
            serde_json::to_string(&entries).map_err(|e| SettleError::Invalid(e.to_string()))?;
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
        let tag = reply.first().map(String::as_str).unwrap_or("");
        let body = reply.get(1).map(String::as_str).unwrap_or("");
        let grants = || -> Result<Vec<LeaseGrant>, SettleError> {
            serde_json::from_str(body)
                .map_err(|e| SettleError::Unavailable(format!("bad reply: {e}")))
        };
        match tag {
            "OK" => Ok(SettleOutcome::Applied(grants()?)),
            "DUP" => Ok(SettleOutcome::Duplicate(grants()?)),
            "MISMATCH" => Err(SettleError::Mismatch { seq: batch.seq }),
            "STALE" => Err(SettleError::Stale {
                seq: batch.seq,
                hwm: body.parse().unwrap_or(0),
            }),
            "OVERFLOW" => Err(SettleError::Invalid(format!(
                "account {body}: lifetime debits would pass the 64-bit limit"
            ))),
            "GAP" => Err(SettleError::Gap {
                expected: body.parse().unwrap_or(0),
                got: batch.seq,
            }),
            other => Err(SettleError::Unavailable(format!(
                "unexpected reply {other}"
            ))),
        }
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
            .arg(match mode {
                DebitMode::All => "all",
                DebitMode::UpToAvailable => "avail",
                DebitMode::UpToBalance => "balance",
            })
            .arg(mode.ledger_kind())
            .invoke_async(&mut c)
            .await
            .map_err(|e| ChargeError::Unavailable(e.to_string()))?;
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
        #[derive(serde::Deserialize)]
        struct Line {
            account: String,
            amount: i64,
            requests: u64,
            cpu_us: u64,
            deploys: u64,
        }
        for id in reply.ids {
            let s = |k: &str| -> String { id.get::<String>(k).unwrap_or_default() };
            let n = |k: &str| -> u64 { s(k).parse().unwrap_or(0) };
            if let Some(lines) = id.get::<String>("lines") {
                let lines: Vec<Line> = serde_json::from_str(&lines)
                    .map_err(|e| StoreError::Corrupt(format!("ledger {}: {e}", id.id)))?;
                for l in lines {
                    out.push(LedgerEntry {
                        kind: s("kind"),
                        key: s("key"),
                        account: l.account,
                        amount: l.amount,
                        requests: l.requests,
                        cpu_us: l.cpu_us,
                        deploys: l.deploys,
                    });
                }
                continue;
            }
            out.push(LedgerEntry {
                kind: s("kind"),
                key: s("key"),
                account: s("account"),
                amount: s("amount").parse().unwrap_or(0),
                requests: n("requests"),
                cpu_us: n("cpu_us"),
                deploys: n("deploys"),
            });
        }
        Ok(out)
    }

    fn subscribe(&self) -> broadcast::Receiver<FeedEvent> {
        self.feed.subscribe()
    }
}
