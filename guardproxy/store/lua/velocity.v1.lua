-- velocity.v1: add a settled charge to the tenant's hourly spend and say whether the last hour costs
-- more than factor x the average of the baseline hours before it (the spend-velocity alert, fleet.py),
-- atomically across replicas; the first such hour queues one "velocity" alert event (alerts on).
-- Hours are UTC clock hours numbered from the epoch (server TIME). "The last hour" is the current
-- hour so far plus the previous hour weighted by the part of it that is less than an hour ago (a
-- sliding-window estimate); the baseline is the baseline_hours full hours before the previous one.
-- The comparison is in Lua numbers (doubles): exact enough for an alert, never used for money.

local hours = KEYS[1]         -- hash: hour number -> micro-USD settled in that hour
local fired = KEYS[2]         -- string: the hour number whose alert was last queued
local alerts = KEYS[3]        -- stream of the tenant's alert events
local alerts_due = KEYS[4]    -- zset: alert event id -> when it is due (ms)

local charge = tonumber(ARGV[1])
local factor_ppm = tonumber(ARGV[2])
local baseline_hours = tonumber(ARGV[3])
local min_micros = tonumber(ARGV[4])
local alerts_on = ARGV[5] == '1'
local tenant = ARGV[6]
-- Returns {last hour micros, baseline hourly average micros (rounded down), 1 if this call queued the alert}

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local hour = math.floor(now_ms / 3600000)

local current = redis.call('HINCRBY', hours, hour, charge)
redis.call('EXPIRE', hours, (baseline_hours + 3) * 3600)
if redis.call('HLEN', hours) > baseline_hours + 2 then
  for _, field in ipairs(redis.call('HKEYS', hours)) do
    if tonumber(field) < hour - baseline_hours - 1 then
      redis.call('HDEL', hours, field)
    end
  end
end

local previous = tonumber(redis.call('HGET', hours, hour - 1) or '0')
local into_hour_ms = now_ms - hour * 3600000
local last_hour = current + math.floor(previous * (3600000 - into_hour_ms) / 3600000)
local baseline = 0
for h = hour - 1 - baseline_hours, hour - 2 do
  baseline = baseline + tonumber(redis.call('HGET', hours, h) or '0')
end
local average = math.floor(baseline / baseline_hours)

local queued = 0
if baseline > 0 and last_hour >= min_micros and last_hour * baseline_hours * 1000000 > factor_ppm * baseline
   and redis.call('GET', fired) ~= tostring(hour) then
  redis.call('SET', fired, hour, 'EX', 7200)
  if alerts_on then
    queue_alert(alerts, alerts_due, now_ms, 'event', 'velocity', 'tenant', tenant, 'period', 'hour',
                'hour', hour, 'spent', last_hour, 'baseline', average,
                'limit', math.floor(factor_ppm * baseline / baseline_hours / 1000000),
                'factor_ppm', factor_ppm, 'at_ms', now_ms)
  end
  queued = 1
end
return {last_hour, average, queued}
