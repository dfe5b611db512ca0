-- claim.v1: take the alert events of one tenant that are due for delivery, for one sender, atomically.
-- Each claimed event's next delivery time moves a lease ahead, so no other sender (another replica)
-- takes it while this one delivers; the sender then marks it delivered (removed from the due set) or
-- reschedules it. A sender that dies mid-delivery loses its claim when the lease runs out.
--
-- KEYS: 1 alerts (stream)  2 alerts:due (zset entry id -> next delivery at ms)
--       3 alerts:delivery (hash: <id>:attempts, <id>:hooks (delivered webhook indexes), ...)
-- ARGV: 1 lease ms  2 at most this many events
-- Returns a list of {entry id, attempts so far, delivered webhooks ("" or "0,2"), field, value, ...}

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now_ms, 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(due) do
  local entry = redis.call('XRANGE', KEYS[1], id, id)
  if #entry == 0 then
    -- trimmed from the stream (it keeps the latest 10000): nothing left to deliver
    redis.call('ZREM', KEYS[2], id)
  else
    redis.call('ZADD', KEYS[2], now_ms + tonumber(ARGV[1]), id)
    local state = redis.call('HMGET', KEYS[3], id .. ':attempts', id .. ':hooks')
    local item = {id, state[1] or '0', state[2] or ''}
    for _, v in ipairs(entry[1][2]) do
      item[#item + 1] = v
    end
    out[#out + 1] = item
  end
end
return out
