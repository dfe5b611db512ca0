-- renew.v1: extend the lease of a tenant's live reservations whose calls are still running.
-- Only ids still in the set are renewed (ZADD XX): a reservation that expired and was swept, or
-- was settled, is never brought back.
--
-- Returns the ids that were no longer live.

local leases = KEYS[1]        -- zset: reservation id -> lease expiry ms
local lease_ms = tonumber(ARGV[1])
-- ARGV[2..]: the reservation ids

local time = redis.call('TIME')
local expiry = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000) + lease_ms
local lost = {}
for i = 2, #ARGV do
  if redis.call('ZSCORE', leases, ARGV[i]) then
    redis.call('ZADD', leases, 'XX', expiry, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
