//! The Redis backend's Lua scripts: each money operation is one script, so it is atomic and
//! either fully applied or not at all (see `redis_store` for what calls them, and docs/money.md
//! for the keys). Each script is compiled behind a header that sets `SHARDED` (see
//! [`header`]): false on one Redis, true for the shards of a Redis Cluster.

/// The first line of every script: whether it runs in a shard of a cluster.
pub(crate) fn header(sharded: bool) -> String {
    format!("local SHARDED = {sharded}\n")
}

/// Shared Lua: recompute status, bump the version, publish the change. `acct` is the hash key,
/// `id` the account id. Returns the new version.
pub(crate) const LUA_COMMON: &str = r#"
-- `p` is the key prefix: the whole store's on one Redis, one shard's (`{prefix:m<n>}`, a hash
-- tag, so every key a script touches is in one slot) on a cluster, whose feed is the shard's
-- sharded channel.
local function feed(p, msg)
  if SHARDED then redis.call('SPUBLISH', p .. ':events', msg)
  else redis.call('PUBLISH', p .. ':accounts:events', msg) end
end
local function touch(p, id, acct)
  local avail = redis.call('HGET', acct, 'avail') or '0'
  local status = 'active'
  if tonumber(avail) <= 0 then status = 'suspended' end
  redis.call('HSET', acct, 'status', status)
  local ver = redis.call('HINCRBY', acct, 'ver', 1)
  local t = redis.call('TIME')
  feed(p,
    '{"account":' .. cjson.encode(id) .. ',"version":' .. ver .. ',"available":' .. avail ..
    ',"status":"' .. status .. '","at_us":' .. t[1] .. string.format('%06d', tonumber(t[2])) .. '}')
  return {avail, status, ver}
end
local function fmt(n) return string.format('%d', n) end
-- A duplicate answer on a cluster writes a counter: the client's `WAIT` that follows then
-- covers the master's replication stream up to here, so up to the original write too, even on
-- a connection that never made it.
local function mark(p)
  if SHARDED then redis.call('INCR', p .. ':w') end
end
"#;

/// A new epoch for a node: the next number whose incarnation hash does not exist.
pub(crate) const BEGIN: &str = r#"
-- Never at or below the floor (the last epoch the node's journal knows: a Redis that lost its
-- data restarts its counters, and a reused epoch would reuse settle keys the book holds).
local floor = tonumber(ARGV[2] or '0')
if tonumber(redis.call('GET', KEYS[1]) or '0') < floor then redis.call('SET', KEYS[1], floor) end
local e = redis.call('INCR', KEYS[1])
while redis.call('EXISTS', ARGV[1] .. e) == 1 do e = redis.call('INCR', KEYS[1]) end
-- On a cluster the incarnation's marks live in the shards: a key beside the counter says the
-- epoch was handed out.
if SHARDED then redis.call('SET', ARGV[1] .. e, '1') end
return e
"#;

pub(crate) const SETTLE: &str = r#"
local p, node, epoch = ARGV[1], ARGV[2], ARGV[3]
local seq = tonumber(ARGV[4])
local digest, ttl = ARGV[5], tonumber(ARGV[6])
local entries = cjson.decode(ARGV[7])
local inc = p .. ':inc:' .. node .. ':' .. epoch
local hwm = tonumber(redis.call('HGET', inc, 'hwm') or '0')
if seq <= hwm then
  if seq == hwm then
    if redis.call('HGET', inc, 'digest') ~= digest then return {'MISMATCH', ''} end
    mark(p)
    return {'DUP', redis.call('HGET', inc, 'reply')}
  end
  return {'STALE', tostring(hwm)}
end
-- On a cluster, ARGV[8] is the last seq of this incarnation this shard acknowledged to the
-- caller: a mark below it means the shard lost acknowledged writes (both copies failed, a
-- forced takeover). They cannot be re-applied from here; the part is applied and the loss
-- reported, as on one Redis the gap starts a new incarnation.
local lost = nil
if SHARDED and hwm < tonumber(ARGV[8] or '0') then lost = tostring(hwm) end
-- One Redis sees every batch of an incarnation, in order. A shard sees only the batches with
-- lines for it: later ones skip seqs, and `seq > hwm` (the agent sends one batch at a time) is
-- what makes it applied at most once.
if not SHARDED and seq ~= hwm + 1 then return {'GAP', tostring(hwm + 1)} end
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
-- Kept with the mark: seqs (hwm, acknowledged] of this incarnation are not in this shard any
-- more, whatever later parts move the mark to, so a node's journal never takes the mark as
-- proof it still holds them (widened over repeated losses).
if lost then
  local from, to = hwm + 1, tonumber(ARGV[8])
  local was = redis.call('HMGET', inc, 'lost_from', 'lost_to')
  if was[1] then from = math.min(from, tonumber(was[1])) end
  if was[2] then to = math.max(to, tonumber(was[2])) end
  redis.call('HSET', inc, 'lost_from', from, 'lost_to', to)
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
    e.requests .. ',"cpu_us":' .. e.cpu_us .. ',"deploys":' .. e.deploys .. ',"rows_read":' ..
    e.rows_read .. ',"rows_written":' .. e.rows_written .. '}'
  out[#out + 1] = '{"account":' .. jid .. ',"lease":' .. fmt(new) .. ',"prev":' .. fmt(old) ..
    ',"available":' .. avail .. ',"status":"' .. status .. '","version":' .. ver .. '}'
end
-- One ledger entry and one feed message per batch (their lines are per account).
if #lines > 0 then
  redis.call('XADD', p .. ':ledger', '*', 'kind', 'settle', 'key', key,
    'lines', '[' .. table.concat(lines, ',') .. ']')
  feed(p, '[' .. table.concat(changes, ',') .. ']')
end
local reply = '[' .. table.concat(out, ',') .. ']'
redis.call('HSET', inc, 'hwm', ARGV[4], 'digest', digest, 'reply', reply)
if lost then return {'OK', reply, 'LOST', lost} end
return {'OK', reply}
"#;

pub(crate) const CREDIT: &str = r#"
local p, id, ckey, amount = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local acct = p .. ':acct:' .. id
local prev = redis.call('HGET', p .. ':credits', ckey)
if prev then
  if prev ~= id .. '|' .. amount then return {'MISMATCH', prev} end
  mark(p)
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
pub(crate) const CHARGE: &str = r#"
local p, id, ckey, amount, mode, kind = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local acct = p .. ':acct:' .. id
local prev = redis.call('HGET', p .. ':charges', ckey)
if prev then
  local head = id .. '|' .. amount .. '|'
  if string.sub(prev, 1, #head) ~= head then return {'MISMATCH'} end
  mark(p)
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
pub(crate) const LUA_RETURN_LEASE: &str = r#"
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

pub(crate) const RELEASE: &str = r#"
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

pub(crate) const REAP: &str = r#"
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
-- With a book of record (`ledger:book` set), never past what the book holds (`ledger:booked`,
-- a stream id): an entry is trimmed only once it is both old and copied.
local keep = tonumber(ARGV[2] or '0') or 0
local upto = nil
if keep > 0 and now > keep then upto = string.format('%d', now - keep) end
if upto and redis.call('EXISTS', p .. ':ledger:book') == 1 then
  local booked = redis.call('GET', p .. ':ledger:booked')
  if not booked then
    upto = nil
  else
    local ms = tonumber(string.match(booked, '^(%d+)-')) or 0
    if ms <= tonumber(upto) then upto = booked end
  end
end
if upto then
  local old = redis.call('XRANGE', p .. ':ledger', '-', upto, 'COUNT', 1000)
  if #old > 0 then
    local ids = {}
    for i, e in ipairs(old) do ids[i] = e[1] end
    redis.call('XDEL', p .. ':ledger', unpack(ids))
  end
end
return n
"#;

/// The ledger's generation: made once per Redis lifetime from its clock (a Redis that lost its
/// data makes a new one), so that positions and marks of two lifetimes are never compared.
pub(crate) const GENERATION: &str = r#"
local g = redis.call('GET', KEYS[1])
if not g then
  local t = redis.call('TIME')
  g = t[1] .. '.' .. t[2]
  redis.call('SET', KEYS[1], g)
end
return g
"#;

/// At one instant: whether a book is declared, its mark, the id of the ledger's last entry
/// (only the id leaves Redis: a settle entry has a field pair per account), the generation
/// (never made here), and the high-water mark of each incarnation in KEYS[5..]
/// (`<hwm>:<lost_from>:<lost_to>` where a cluster shard lost acknowledged parts of it).
pub(crate) const BOOK_MARKS: &str = r#"
local declared = redis.call('EXISTS', KEYS[1])
local booked = redis.call('GET', KEYS[2]) or ''
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
local id = ''
if last[1] then id = last[1][1] end
local out = {tostring(declared), booked, id, redis.call('GET', KEYS[4]) or ''}
for i = 5, #KEYS do
  local m = redis.call('HMGET', KEYS[i], 'hwm', 'lost_from', 'lost_to')
  local h = m[1] or '0'
  if m[2] then h = h .. ':' .. m[2] .. ':' .. (m[3] or m[2]) end
  out[#out + 1] = h
end
return out
"#;

/// Cluster only: pins an idempotency key (credit or charge) to one account and amount, in the
/// key's own shard, before the account's shard applies it. KEYS[1] is the shard's `claims`
/// hash; ARGV: field (`credit:<key>` or `charge:<key>`), `id|amount`. A claim is never taken
/// back (not even after a charge refused for too little money): freeing it could race a
/// retry that applied, and let the key be used for another account.
pub(crate) const CLAIM: &str = r#"
local prev = redis.call('HGET', KEYS[1], ARGV[1])
if prev then
  if prev ~= ARGV[2] then return {'MISMATCH', prev} end
  redis.call('INCR', KEYS[1] .. ':w')
  return {'OK'}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return {'OK'}
"#;
