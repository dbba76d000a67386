-- A fleet transition (driftguard fleet): compare-and-set of the state on its generation. ARGV: prefix,
-- expected generation, new state JSON. Returns {1, new generation, ''} when this call won, else
-- {0, current generation, current state}; a win is published on prefix:events.
local k = ARGV[1] .. ':state'
local g = tonumber(redis.call('HGET', k, 'gen') or '0')
if g ~= tonumber(ARGV[2]) then
  return {0, g, redis.call('HGET', k, 'state') or ''}
end
redis.call('HSET', k, 'gen', g + 1, 'state', ARGV[3])
redis.call('PUBLISH', ARGV[1] .. ':events', g + 1)
return {1, g + 1, ''}
