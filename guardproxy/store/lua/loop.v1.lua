-- loop.v1: count one request of a key and job by its canonical digest and say whether it repeats more
-- than max_repeats times within the window (the runaway-agent brake, fleet.py), atomically across
-- replicas. The hits zset holds the admission times of the repeats inside the window, at most
-- max_repeats of them: a request over the limit is not added, so a looping agent gets its next
-- identical request through when the oldest hit leaves the window (retry_ms), never sooner. The
-- first request over the limit in a window queues a "loop" alert event (when alerts are on).

local hits = KEYS[1]          -- zset: member (request id) -> admission ms, this digest's repeats
local alerted = KEYS[2]       -- string: set for the window once its alert is queued
local alerts = KEYS[3]        -- stream of the tenant's alert events
local alerts_due = KEYS[4]    -- zset: alert event id -> when it is due (ms)

local member = ARGV[1]        -- a unique id for this request
local max_repeats = tonumber(ARGV[2])
local window_ms = tonumber(ARGV[3])
local action = ARGV[4]        -- 'refuse' or 'alert' (recorded in the event)
local alerts_on = ARGV[5] == '1'
local tenant, key_id, job, digest = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
-- Returns {1 if over the limit else 0, repeats in the window counting this one when admitted,
--          ms until the window admits this request again (0 when it was admitted)}

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

redis.call('ZREMRANGEBYSCORE', hits, '-inf', now_ms - window_ms)
local seen = redis.call('ZCARD', hits)
if seen < max_repeats then
  redis.call('ZADD', hits, now_ms, member)
  redis.call('PEXPIRE', hits, window_ms)
  return {0, seen + 1, 0}
end

local oldest = redis.call('ZRANGE', hits, 0, 0, 'WITHSCORES')
local retry_ms = math.max(1, tonumber(oldest[2]) + window_ms - now_ms)
if alerts_on and redis.call('SET', alerted, now_ms, 'NX', 'PX', window_ms) then
  queue_alert(alerts, alerts_due, now_ms, 'event', 'loop', 'tenant', tenant, 'key', key_id, 'job', job,
              'digest', digest, 'repeats', seen + 1, 'max_repeats', max_repeats, 'window_ms', window_ms,
              'action', action, 'at_ms', now_ms)
end
return {1, seen + 1, retry_ms}
