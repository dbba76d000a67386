-- The GCRA of src/guards/budget.rs (LocalBudget), run atomically inside Redis so that every replica
-- using the same key shares one budget. Time is the server's TIME, one clock for all replicas.
--
-- KEYS[1]  a hash: epoch = server seconds taken as time zero, tat = theoretical arrival time in ns since
--          epoch. Absent means a full budget; the key expires once its TAT has passed (it is full then).
-- ARGV     op ("admit" | "refund" | "charge" | "peek"), amount in ns (the admission's cost, the refund,
--          the extra charge), T = ns per token, tolerance = burst * T, burst. The settings come with
--          every call, so a change (reload, rollback throttle) applies at once, as in LocalBudget.
-- Returns  {admitted (1 | 0), retry_after_ns (when refused), available tokens after the operation}.
--
-- Lua numbers are doubles: integers are exact below 2^53 ns (104 days), so time zero moves forward
-- every hour and the TAT is written with %.0f (the default number format keeps only 14 digits).

if redis.replicate_commands then
  redis.replicate_commands() -- Redis < 5: TIME before a write needs effects replication
end

local key = KEYS[1]
local op = ARGV[1]
local amount = tonumber(ARGV[2])
local token_ns = tonumber(ARGV[3])
local tolerance = tonumber(ARGV[4])
local burst = tonumber(ARGV[5])

local time = redis.call('TIME')
local sec = tonumber(time[1])
local usec = tonumber(time[2])
local state = redis.call('HMGET', key, 'epoch', 'tat')
local epoch = tonumber(state[1]) or sec
local tat = tonumber(state[2]) or 0
-- Rebase (also when the clock went back, e.g. after a failover): what is ahead of now stays ahead.
if sec < epoch or sec - epoch > 3600 then
  tat = math.max(tat - (sec - epoch) * 1e9, 0)
  epoch = sec
end
local now = (sec - epoch) * 1e9 + usec * 1000

local admitted = 1
local retry_after = 0
if op == 'admit' then
  local new_tat = math.max(tat, now) + amount
  local ahead = new_tat - now
  if ahead > tolerance then
    admitted = 0
    retry_after = ahead - tolerance
  else
    tat = new_tat
  end
elseif op == 'refund' then
  -- Never before now: time that has passed already refilled the budget.
  if tat > now then
    tat = math.max(tat - amount, now)
  end
elseif op == 'charge' then
  tat = math.max(tat, now) + amount
end

local ahead = tat - now
if ahead > 0 then
  redis.call('HSET', key, 'epoch', string.format('%d', epoch), 'tat', string.format('%.0f', tat))
  -- One second past the TAT: by then the budget is full and the key carries nothing.
  redis.call('PEXPIRE', key, string.format('%.0f', math.ceil(ahead / 1e6) + 1000))
else
  redis.call('DEL', key)
  ahead = 0
end
local available = math.min(math.floor(math.max(tolerance - ahead, 0) / token_ns), burst)
return {admitted, retry_after, available}
