-- shared.lua: the steps several scripts take, written once. The store sends each script as this text
-- followed by the script's own (store/redis.py, script_source), so each is still one atomic script.

-- Queue an alert event: append it to the tenant's stream of events (the latest 10,000 kept) and make
-- it due for delivery at at_ms (claim.v1 hands it to a sender). The rest are its field, value pairs.
local function queue_alert(alerts_key, alerts_due_key, at_ms, ...)
  local id = redis.call('XADD', alerts_key, 'MAXLEN', '~', 10000, '*', ...)
  redis.call('ZADD', alerts_due_key, at_ms, id)
end

-- jobs (v4): a reservation that ends (settled, released, or its lease ran out) frees its job's share
-- of the job's live reservations.
local function free_job_hold(resv_job_key, job_held_key, id, amount)
  local job = redis.call('HGET', resv_job_key, id)
  if job then
    if redis.call('HINCRBY', job_held_key, job, 0 - tonumber(amount)) <= 0 then redis.call('HDEL', job_held_key, job) end
    redis.call('HDEL', resv_job_key, id)
  end
end

