-- settle.v2: release a reservation, charge what the call really cost and log the call, atomically,
-- at most once per reservation id (contract §4).
-- v2: every settled (or released) id is marked in the hash settled:<day of the reservation>, kept
-- as long as that day's spend counter; a second settle of the id (a retry after a lost reply, a
-- journal replay) changes nothing and says so.
--
-- KEYS: 1 spend:day:<day>  2 spend:month:<month>  3 resv  4 resv:amount  5 reserved  6 calls (stream)
--       7 settled:<day>
-- ARGV: 1 reservation id  2 charge micros (0: a release)  3 day key ttl s  4 month key ttl s
--       5 calls kept (0: no log)  6.. field, value pairs of the call's log entry
-- Returns {day spend, month spend, 1 if the reservation was still live else 0,
--          1 if this settle was applied else 0 (the id was settled before)}

if redis.call('HEXISTS', KEYS[7], ARGV[1]) == 1 then
  return {tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(redis.call('GET', KEYS[2]) or '0'), 0, 0}
end

local live = 0
local amount = redis.call('HGET', KEYS[4], ARGV[1])
if amount then
  live = 1
  redis.call('DECRBY', KEYS[5], amount)
  redis.call('HDEL', KEYS[4], ARGV[1])
end
redis.call('ZREM', KEYS[3], ARGV[1])

local charge = tonumber(ARGV[2])
redis.call('HSET', KEYS[7], ARGV[1], charge)
redis.call('EXPIRE', KEYS[7], ARGV[3])

local day, month
if charge > 0 then
  day = redis.call('INCRBY', KEYS[1], charge)
  month = redis.call('INCRBY', KEYS[2], charge)
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
else
  day = tonumber(redis.call('GET', KEYS[1]) or '0')
  month = tonumber(redis.call('GET', KEYS[2]) or '0')
end

local kept = tonumber(ARGV[5])
if kept > 0 and #ARGV > 5 then
  local entry = {}
  for i = 6, #ARGV do
    entry[#entry + 1] = ARGV[i]
  end
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', kept, '*', unpack(entry))
  redis.call('EXPIRE', KEYS[6], ARGV[4])
end
return {day, month, live, 1}
