-- One interval of one replica (driftguard fleet). ARGV: prefix, replica, now_ms, slot_ms, slots in the
-- rule window, slot key TTL ms, heartbeat window ms, then (field, increment) pairs for the current slot.
-- Adds the increments, beats the heartbeat, and returns {replicas alive, state generation, state JSON,
-- {field, sum over the window's slots, ...}}: the merge happens here, so the reply's size does not grow
-- with the number of replicas.
local p = ARGV[1]
local now = tonumber(ARGV[3])
local slot_ms = tonumber(ARGV[4])
local slots = tonumber(ARGV[5])
local cur = math.floor(now / slot_ms)
local key = p .. ':w:' .. cur
if #ARGV >= 9 then
  for i = 8, #ARGV - 1, 2 do
    redis.call('HINCRBY', key, ARGV[i], ARGV[i + 1])
  end
  redis.call('PEXPIRE', key, ARGV[6])
end
local beats = p .. ':replicas'
redis.call('ZADD', beats, now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', beats, '-inf', now - tonumber(ARGV[7]))
redis.call('PEXPIRE', beats, ARGV[7])
local sums, order = {}, {}
for s = cur - slots + 1, cur do
  local h = redis.call('HGETALL', p .. ':w:' .. s)
  for j = 1, #h, 2 do
    local f = h[j]
    if sums[f] == nil then
      sums[f] = 0
      order[#order + 1] = f
    end
    sums[f] = sums[f] + tonumber(h[j + 1])
  end
end
local out = {}
for _, f in ipairs(order) do
  out[#out + 1] = f
  out[#out + 1] = string.format('%d', sums[f])
end
local st = redis.call('HMGET', p .. ':state', 'gen', 'state')
return {redis.call('ZCARD', beats), tonumber(st[1] or '0'), st[2] or '', out}
