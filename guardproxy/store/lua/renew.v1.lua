-- renew.v1: extend the lease of a tenant's live reservations whose calls are still running.
-- Only ids still in the set are renewed (ZADD XX): a reservation that expired and was swept, or
-- was settled, is never brought back.
--
-- KEYS: 1 resv (zset id -> lease expiry ms)
-- ARGV: 1 lease ms  2.. reservation ids
-- Returns the ids that were no longer live.

local time = redis.call('TIME')
local expiry = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + tonumber(ARGV[1])
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
