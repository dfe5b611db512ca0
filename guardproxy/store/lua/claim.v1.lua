-- claim.v1: take the alert events of one tenant that are due for delivery, for one sender, atomically.
-- Each claimed event's next delivery time moves a lease ahead, so no other sender (another replica)
-- takes it while this one delivers; the sender then marks it delivered (removed from the due set) or
-- reschedules it. A sender that dies mid-delivery loses its claim when the lease runs out.
--
-- Returns a list of {entry id, attempts so far, delivered webhooks ("" or "0,2"), field, value, ...}

local alerts = KEYS[1]        -- stream of the tenant's alert events
local alerts_due = KEYS[2]    -- zset: entry id -> next delivery at ms
local delivery = KEYS[3]      -- hash: <id>:attempts, <id>:hooks (indexes of the webhooks delivered to)

local lease_ms = tonumber(ARGV[1])
local at_most = tonumber(ARGV[2])

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', alerts_due, '-inf', now_ms, 'LIMIT', 0, at_most)
local out = {}
for _, id in ipairs(due) do
  local entry = redis.call('XRANGE', alerts, id, id)
  if #entry == 0 then
    -- trimmed from the stream (it keeps the latest 10000): nothing left to deliver
    redis.call('ZREM', alerts_due, id)
  else
    redis.call('ZADD', alerts_due, now_ms + lease_ms, id)
    local state = redis.call('HMGET', delivery, id .. ':attempts', id .. ':hooks')
    local item = {id, state[1] or '0', state[2] or ''}
    for _, v in ipairs(entry[1][2]) do
      item[#item + 1] = v
    end
    out[#out + 1] = item
  end
end
return out
