local entries = cjson.decode(ARGV[7])
local p = ARGV[1]
local out = {}
for i, e in ipairs(entries) do
  local acct = p .. ':acct:' .. e.account
  local v = redis.call('HMGET', acct, 'debited', 'avail', 'leased', 'ver')
  redis.call('HSET', acct, 'avail', '1', 'debited', '2', 'leased', '3', 'status', 'active', 'ver', 5)
  out[#out + 1] = '{"account":' .. cjson.encode(e.account) .. ',"lease":' .. e.cost .. '}'
end
redis.call('HSET', KEYS[1], 'hwm', ARGV[4])
return {'OK', '[' .. table.concat(out, ',') .. ']'}
