-- One interval of one replica (driftguard fleet). ARGV: prefix, replica, now_ms, slot_ms, slots in the
-- rule window, slot key TTL ms, heartbeat window ms, fleet key, this scope's name, this process's
-- incarnation (a restarted replica keeps its name but starts its totals from 0), then (slot, field,
-- this replica's absolute total) triples. Each total is kept per replica and slot, and only its growth
-- is added to the slot's merged hash: a push sent again after a timeout is not counted twice.
-- Beats the heartbeat, and returns {replicas alive, state generation, state JSON,
-- {field, sum over the window's slots, ...}}: the merge happens here, so the reply's size does not grow
-- with the number of replicas.
local p = ARGV[1]
local now = tonumber(ARGV[3])
local slot_ms = tonumber(ARGV[4])
local slots = tonumber(ARGV[5])
local cur = math.floor(now / slot_ms)
local touched = {}
local me = p .. ':r:' .. ARGV[2] .. '#' .. ARGV[10] .. ':'
for i = 11, #ARGV - 2, 3 do
  local slot, field, total = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local mine = me .. slot
  local before = tonumber(redis.call('HGET', mine, field) or '0')
  if total > before then
    redis.call('HINCRBY', p .. ':w:' .. slot, field, total - before)
    redis.call('HSET', mine, field, total)
  end
  touched[slot] = true
end
for slot, _ in pairs(touched) do
  redis.call('PEXPIRE', p .. ':w:' .. slot, ARGV[6])
  redis.call('PEXPIRE', me .. slot, ARGV[6])
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
-- Every scope's generation and guard state, for /status (a handful of scopes: region by region).
local scopes_key = ARGV[8] .. ':scopes'
redis.call('SADD', scopes_key, ARGV[9])
-- The list of scopes goes with the last replica's heartbeat (the scopes' states stay).
redis.call('PEXPIRE', scopes_key, ARGV[7])
local scopes = {}
for _, s in ipairs(redis.call('SMEMBERS', scopes_key)) do
  local sst = redis.call('HMGET', ARGV[8] .. ':' .. s .. ':state', 'gen', 'state')
  local guard = 'healthy'
  if sst[2] then
    local ok, doc = pcall(cjson.decode, sst[2])
    if ok and type(doc) == 'table' and type(doc.guard) == 'table' and doc.guard.state then
      guard = doc.guard.state
    end
  end
  scopes[#scopes + 1] = s
  scopes[#scopes + 1] = (sst[1] or '0') .. ' ' .. guard
end
local st = redis.call('HMGET', p .. ':state', 'gen', 'state')
return {redis.call('ZCARD', beats), tonumber(st[1] or '0'), st[2] or '', out, scopes}
