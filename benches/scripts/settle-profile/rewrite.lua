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
local at_us = t[1] .. string.format('%06d', tonumber(t[2]))
local expires = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ttl
local field = node .. ':' .. epoch
local lf = 'l:' .. field
local key = 'settle:' .. node .. ':' .. epoch .. ':' .. ARGV[4]
-- Doubles hold integers exactly below 2^53: an account whose amounts stay below it is written
-- with one HSET; a larger one (over ~$9,000) with exact HINCRBYs.
local EXACT = 9007199254740991
local cur = {}
for i, e in ipairs(entries) do
  local v = redis.call('HMGET', p .. ':acct:' .. e.account, 'debited', 'avail', 'leased', 'ver', lf)
  if tonumber(v[1] or '0') + tonumber(e.cost) > 9.0e18 then return {'OVERFLOW', e.account} end
  cur[i] = v
end
local lexp = p .. ':lexp'
local incacct = p .. ':incacct:' .. field
local out, changes, lines = {}, {}, {}
for i, e in ipairs(entries) do
  local id = e.account
  local acct = p .. ':acct:' .. id
  local v = cur[i]
  local cost, back, ask = tonumber(e.cost), tonumber(e.give_back), tonumber(e.ask)
  if released then ask = 0 end
  local old = tonumber(v[5] or '0')
  local o = old - cost - back
  local delta = back
  if o < 0 then
    delta = delta + o
    o = 0
  end
  local avail0 = tonumber(v[2] or '0')
  local g = 0
  if ask > 0 then
    local a = avail0 + delta
    if a <= 0 then g = 0
    elseif a <= ask then g = a
    elseif a < 2 * ask then g = math.floor(a / 2)
    else g = ask end
  end
  delta = delta - g
  local new = o + g
  local ver = tonumber(v[4] or '0') + 1
  local deb0, led0 = tonumber(v[1] or '0'), tonumber(v[3] or '0')
  local avail, debited, leased = avail0 + delta, deb0 + cost, led0 + new - old
  local small = math.abs(avail0) < EXACT and math.abs(avail) < EXACT and deb0 < EXACT
    and debited < EXACT and math.abs(led0) < EXACT and math.abs(leased) < EXACT
  local status = 'active'
  local av
  if small then
    av = fmt(avail)
    if avail <= 0 then status = 'suspended' end
    if new > 0 then
      redis.call('HSET', acct, 'avail', av, 'debited', fmt(debited), 'leased', fmt(leased),
        'status', status, 'ver', ver, lf, fmt(new))
    else
      redis.call('HSET', acct, 'avail', av, 'debited', fmt(debited), 'leased', fmt(leased),
        'status', status, 'ver', ver)
      if old > 0 then redis.call('HDEL', acct, lf) end
    end
  else
    if delta ~= 0 then redis.call('HINCRBY', acct, 'avail', fmt(delta)) end
    if cost > 0 then redis.call('HINCRBY', acct, 'debited', e.cost) end
    if new ~= old then redis.call('HINCRBY', acct, 'leased', fmt(new - old)) end
    av = redis.call('HGET', acct, 'avail') or '0'
    if tonumber(av) <= 0 then status = 'suspended' end
    redis.call('HSET', acct, 'status', status, 'ver', ver)
    if new > 0 then redis.call('HSET', acct, lf, fmt(new))
    elseif old > 0 then redis.call('HDEL', acct, lf) end
  end
  local member = id .. '|' .. field
  if new > 0 then
    redis.call('ZADD', lexp, expires, member)
    if old == 0 then redis.call('SADD', incacct, id) end
  elseif old > 0 then
    redis.call('ZREM', lexp, member)
  end
  local jid = cjson.encode(id)
  changes[#changes + 1] = '{"account":' .. jid .. ',"version":' .. ver .. ',"available":' ..
    av .. ',"status":"' .. status .. '","at_us":' .. at_us .. '}'
  lines[#lines + 1] = '{"account":' .. jid .. ',"amount":' .. e.cost .. ',"requests":' ..
    e.requests .. ',"cpu_us":' .. e.cpu_us .. ',"deploys":' .. e.deploys .. ',"rows_read":' ..
    e.rows_read .. ',"rows_written":' .. e.rows_written .. '}'
  out[#out + 1] = '{"account":' .. jid .. ',"lease":' .. fmt(new) .. ',"prev":' .. fmt(old) ..
    ',"available":' .. av .. ',"status":"' .. status .. '","version":' .. ver .. '}'
end
if #lines > 0 then
  redis.call('XADD', p .. ':ledger', '*', 'kind', 'settle', 'key', key,
    'lines', '[' .. table.concat(lines, ',') .. ']')
  feed(p, '[' .. table.concat(changes, ',') .. ']')
end
local reply = '[' .. table.concat(out, ',') .. ']'
redis.call('HSET', inc, 'hwm', ARGV[4], 'digest', digest, 'reply', reply)
if lost then return {'OK', reply, 'LOST', lost} end
return {'OK', reply}
