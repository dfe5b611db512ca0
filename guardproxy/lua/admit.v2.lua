-- admit.v2: decide and reserve for one call of one tenant, atomically (contract §4).
-- The decision mirrors guardproxy/budget.py:decide (a differential test keeps them equal).
-- v2: the reservation holds a lease (renewed by renew.v1 while the call runs), and an id that
-- was already settled or released (settle.v2's marker) is never reserved: a late admit whose
-- caller gave up and released the id holds nothing.
--
-- KEYS: 1 spend:day:<day>  2 spend:month:<month>  3 resv (zset id -> lease expiry ms)
--       4 resv:amount (hash id -> micros)  5 reserved (micros held by live reservations)
--       6 budget (hash of runtime threshold overrides, written by the admin API)
--       7 settled:<day> (hash id -> charge of every id settled or released, see settle.v2)
-- ARGV: 1 reservation id  2 lease ms  3 soft_day  4 hard_day  5 soft_month  6 hard_month
--       7.. worst case micros of each candidate: the requested model, then its downgrade chain
-- Returns {index or -1, used_day, used_month, exhausted (0 none, 1 day, 2 month),
--          soft_day, hard_day, soft_month, hard_month, 1 if the id was already settled else 0}

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- Reservations whose lease ran out (their process died or lost the store) expire here
-- (bounded work per call).
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  local amount = redis.call('HGET', KEYS[4], id)
  if amount then
    redis.call('DECRBY', KEYS[5], amount)
    redis.call('HDEL', KEYS[4], id)
  end
  redis.call('ZREM', KEYS[3], id)
end
if redis.call('ZCARD', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[5])
end

local soft_day, hard_day = tonumber(ARGV[3]), tonumber(ARGV[4])
local soft_month, hard_month = tonumber(ARGV[5]), tonumber(ARGV[6])
local override = redis.call('HMGET', KEYS[6], 'soft_day', 'hard_day', 'soft_month', 'hard_month')
if override[1] then
  soft_day, hard_day = tonumber(override[1]), tonumber(override[2])
  soft_month, hard_month = tonumber(override[3]), tonumber(override[4])
end

local reserved = tonumber(redis.call('GET', KEYS[5]) or '0')
local used_day = tonumber(redis.call('GET', KEYS[1]) or '0') + reserved
local used_month = tonumber(redis.call('GET', KEYS[2]) or '0') + reserved

local function fits(worst)
  return used_day + worst <= hard_day and used_month + worst <= hard_month
end

local candidates = #ARGV - 6
local chosen = -1
if fits(tonumber(ARGV[7])) then
  chosen = 0
  local soft = used_day >= soft_day or used_month >= soft_month
  if soft and candidates > 1 and fits(tonumber(ARGV[8])) then
    chosen = 1
  end
else
  for i = 1, candidates - 1 do
    if fits(tonumber(ARGV[7 + i])) then
      chosen = i
      break
    end
  end
end

local settled = 0
if redis.call('HEXISTS', KEYS[7], ARGV[1]) == 1 then
  settled = 1
end

local exhausted = 0
if chosen < 0 then
  exhausted = 1
  if used_month + tonumber(ARGV[6 + candidates]) > hard_month then
    exhausted = 2
  end
elseif settled == 0 then
  local amount = tonumber(ARGV[7 + chosen])
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], amount)
  redis.call('INCRBY', KEYS[5], amount)
end
return {chosen, used_day, used_month, exhausted, soft_day, hard_day, soft_month, hard_month, settled}
