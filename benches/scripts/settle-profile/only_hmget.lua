local entries = cjson.decode(ARGV[7])
local p = ARGV[1]
local out = {}
for i, e in ipairs(entries) do
  local v = redis.call('HMGET', p .. ':acct:' .. e.account, 'debited', 'avail', 'leased', 'ver')
  out[#out + 1] = '{"account":' .. cjson.encode(e.account) .. ',"lease":' .. e.cost .. '}'
end
redis.call('HSET', KEYS[1], 'hwm', ARGV[4])
return {'OK', '[' .. table.concat(out, ',') .. ']'}
