-- settle.v4: release a reservation, charge what the call really cost and log the call, atomically,
-- at most once per reservation id (contract §4).
-- v2: every settled (or released) id is marked in the hash settled:<day of the reservation>, kept
-- as long as that day's spend counter; a second settle of the id (a retry after a lost reply, a
-- journal replay) changes nothing and says so.
-- v3: the token window counts the call's real tokens instead of its worst case; a charge that
-- takes the day's or month's spend to an alert threshold queues a "threshold" event, once per
-- period and threshold (the flags hash records the ones fired; an override or a new period re-arms).
-- levels (with admit.v5; budgets.global, the tenant's hour and week, keys, models): the reservation's books in
-- resv:levels (written by admit.v5) name the holds to free and the spend counters to charge; both
-- happen here, once, under the same settled marker. Block marked "levels (v5)". A charge no admission
-- booked (served unbudgeted under fail_open, a batch or external spend booked after the fact) brings
-- its own books (spend lines only, argument "books"): used when resv:levels has none for the id.
-- v4: jobs (work orders): a call that names a job frees the job's share of its reservation and
-- adds its calls, tokens and cost (also per model) to the job's hash, which a per-tenant zset
-- lists by last activity; both kept job_ttl s from the last call. Blocks marked "jobs (v4)".
--
-- KEYS: 1 spend:day:<day>  2 spend:month:<month>  3 resv  4 resv:amount  5 reserved  6 calls (stream)
--       7 settled:<day>  8 rl:tok:n  9 rl:tok:sum  10 budget  11 flags:day:<day>
--       12 flags:month:<month>  13 alerts (stream)  14 alerts:due
--       15 resv:job  16 job:held  17 job:<job id>  18 jobs (zset job id -> last call at ms)
--       19 resv:levels (hash id -> the reservation's books, see admit.v5)
--       20 done:<epoch> (markers, below); 21.. the keys the given books name (declared for Redis Cluster)
-- ARGV: 1 reservation id  2 charge micros (0: a release)  3 day key ttl s  4 month key ttl s
--       5 calls kept (0: no log)  6 the call's real tokens  7 tenant  8 day  9 month
--       10 limit_day micros  11 limit_month micros  12 number of thresholds n (0: no alerts)
--       13..12+n thresholds in parts per million (750000 = 75%)
--       then the job id ('' none), the job's ttl s and the books of a charge no admission booked ('' none)
--       then the markers' floor (0: this settle raises no mark)
--       then field, value pairs of the call's log entry (the job's tokens and model are read from it)
-- Returns {day spend, month spend, 1 if the reservation was still live else 0,
--          1 if this settle was applied else 0 (the id was settled before)}
--
-- KEYS, named once (21.. : the keys the given books name, declared for Redis Cluster)
local spend_day_key, spend_month_key = KEYS[1], KEYS[2]
local resv_key, resv_amount_key, reserved_key = KEYS[3], KEYS[4], KEYS[5]  -- zset id -> lease expiry ms; hash id -> micros; micros held
local calls_key, settled_key = KEYS[6], KEYS[7]  -- the call log (stream); settled:<day> (id -> charge)
local rl_tok_n_key, rl_tok_sum_key = KEYS[8], KEYS[9]
local budget_key, flags_day_key, flags_month_key = KEYS[10], KEYS[11], KEYS[12]
local alerts_key, alerts_due_key = KEYS[13], KEYS[14]
local resv_job_key, job_held_key, job_key, jobs_key = KEYS[15], KEYS[16], KEYS[17], KEYS[18]
local resv_levels_key, done_key = KEYS[19], KEYS[20]

-- ARGV, the fixed part named once (as strings; the part after the thresholds is read where it is used)
local reservation_id, arg_charge, day_ttl, month_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local calls_kept, real_tokens, tenant_name, day_id, month_id = ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local arg_limit_day, arg_limit_month, arg_thresholds = ARGV[10], ARGV[11], ARGV[12]

-- markers (epochs): an id '<epoch>.<seq>' (a process's epoch, its call's sequence number) is marked in
-- the zset done_key (done:<epoch>): member 'mark' scored with the epoch's high-water mark (every seq up
-- to it is settled, released or can never be reserved) and each seq settled above it, scored with itself.
-- The settling process passes a floor (the lowest seq of its own that can still settle): the mark rises
-- to floor - 1 and the seqs under it leave the set, so it holds what is in flight, not history. Any
-- other id (background responses, batches, rebuild:, ext:) is marked in settled:<day> as before.
local marker_seq = string.match(reservation_id, '^%d+%.(%d+)$')
local marker_mark = 0
if marker_seq then
  marker_mark = tonumber(redis.call('ZSCORE', done_key, 'mark') or '0')
end
if (marker_seq and (tonumber(marker_seq) <= marker_mark or redis.call('ZSCORE', done_key, marker_seq)))
    or (not marker_seq and redis.call('HEXISTS', settled_key, reservation_id) == 1) then
  return {tonumber(redis.call('GET', spend_day_key) or '0'), tonumber(redis.call('GET', spend_month_key) or '0'), 0, 0}
end
-- end markers

local live = 0
local amount = redis.call('HGET', resv_amount_key, reservation_id)
if amount then
  live = 1
  redis.call('DECRBY', reserved_key, amount)
  redis.call('HDEL', resv_amount_key, reservation_id)
  free_job_hold(resv_job_key, job_held_key, reservation_id, amount)  -- jobs (v4), shared.lua
end
redis.call('ZREM', resv_key, reservation_id)

-- The token window (if the call is still in it) holds its real tokens from now on.
local counted = redis.call('HGET', rl_tok_n_key, reservation_id)
if counted then
  local real = tonumber(real_tokens)
  redis.call('HSET', rl_tok_n_key, reservation_id, real)
  redis.call('INCRBY', rl_tok_sum_key, real - tonumber(counted))
end

local charge = tonumber(arg_charge)
-- markers (epochs): mark the id, then raise the epoch's mark to the floor the settling process passed
if marker_seq then
  redis.call('ZADD', done_key, marker_seq, marker_seq)
  local raised = tonumber(ARGV[16 + tonumber(arg_thresholds)]) - 1
  if raised > marker_mark then
    redis.call('ZREMRANGEBYSCORE', done_key, '-inf', raised)
    redis.call('ZADD', done_key, raised, 'mark')
  end
  redis.call('EXPIRE', done_key, day_ttl)
else
  redis.call('HSET', settled_key, reservation_id, charge)
  redis.call('EXPIRE', settled_key, day_ttl)
end
-- end markers

-- levels (v5): free the reservation's holds at every level and charge every level's window; a charge
-- that takes a window to an alert threshold queues its event, once per scope, window and threshold
local books = redis.call('HGET', resv_levels_key, reservation_id)
local given_books = ARGV[15 + tonumber(arg_thresholds)]
if not books and given_books ~= '' then books = given_books end
if books then
  local alert_thresholds = tonumber(arg_thresholds)
  for line in string.gmatch(books, '[^\n]+') do
    if string.sub(line, 1, 2) == 'h ' then
      if amount and redis.call('DECRBY', string.sub(line, 3), amount) <= 0 then redis.call('DEL', string.sub(line, 3)) end
    elseif charge > 0 then
      local ttl, limit, level, window, period, scope, flags, key =
        string.match(line, '^s (%d+)\t(%d+)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
      local spent = redis.call('INCRBY', key, charge)
      redis.call('EXPIRE', key, ttl)
      if alert_thresholds > 0 and tonumber(limit) > 0 then
        local clock = redis.call('TIME')
        local at_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
        for i = 13, 12 + alert_thresholds do
          if spent * 1000000 >= tonumber(limit) * tonumber(ARGV[i])
              and redis.call('HSETNX', flags, 'threshold:' .. scope .. ':' .. ARGV[i], at_ms) == 1 then
            redis.call('EXPIRE', flags, ttl)
            queue_alert(alerts_key, alerts_due_key, at_ms, 'event', 'threshold', 'tenant', tenant_name,
                        'period', window, 'period_id', period, 'threshold', ARGV[i], 'spent', spent,
                        'limit', limit, 'at_ms', at_ms, 'level', level)
          end
        end
      end
    end
  end
  redis.call('HDEL', resv_levels_key, reservation_id)
end
-- end levels (v5)

local day, month
if charge > 0 then
  day = redis.call('INCRBY', spend_day_key, charge)
  month = redis.call('INCRBY', spend_month_key, charge)
  redis.call('EXPIRE', spend_day_key, day_ttl)
  redis.call('EXPIRE', spend_month_key, month_ttl)
else
  day = tonumber(redis.call('GET', spend_day_key) or '0')
  month = tonumber(redis.call('GET', spend_month_key) or '0')
end

local thresholds = tonumber(arg_thresholds)
local job_at = 13 + thresholds
local log_from = job_at + 4  -- markers: after the floor
if charge > 0 and thresholds > 0 then
  local limit_day, limit_month = tonumber(arg_limit_day), tonumber(arg_limit_month)
  local override = redis.call('HMGET', budget_key, 'daily_micros', 'monthly_micros')
  if override[1] then
    limit_day, limit_month = tonumber(override[1]), tonumber(override[2])
  end
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local periods = {
    {'day', day_id, day, limit_day, flags_day_key, day_ttl},
    {'month', month_id, month, limit_month, flags_month_key, month_ttl},
  }
  for _, p in ipairs(periods) do
    local name, period_id, spent, limit, flags, ttl = p[1], p[2], p[3], p[4], p[5], p[6]
    for i = 13, 12 + thresholds do
      -- spent / limit >= ppm / 1e6, in integers (exact below 2^53)
      if limit > 0 and spent * 1000000 >= limit * tonumber(ARGV[i]) then
        if redis.call('HSETNX', flags, 'threshold:' .. ARGV[i], now_ms) == 1 then
          redis.call('EXPIRE', flags, ttl)
          queue_alert(alerts_key, alerts_due_key, now_ms, 'event', 'threshold', 'tenant', tenant_name,
                      'period', name, 'period_id', period_id, 'threshold', ARGV[i], 'spent', spent,
                      'limit', limit, 'at_ms', now_ms)
        end
      end
    end
  end
end

-- jobs (v4): the job's counters, from the call's own log entry (so a job's report and its calls agree)
local job = ARGV[job_at]
if job ~= '' and #ARGV >= log_from then
  local entry = {}
  for i = log_from, #ARGV - 1, 2 do
    entry[ARGV[i]] = ARGV[i + 1]
  end
  local prompt = tonumber(entry['prompt_tokens'] or '0')
  local completion = tonumber(entry['completion_tokens'] or '0')
  local model = entry['model'] or ''
  local now = redis.call('TIME')
  local at_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local job_ttl = tonumber(ARGV[job_at + 1])
  redis.call('HINCRBY', job_key, 'calls', 1)
  redis.call('HINCRBY', job_key, 'prompt_tokens', prompt)
  redis.call('HINCRBY', job_key, 'completion_tokens', completion)
  redis.call('HINCRBY', job_key, 'cost_micros', charge)
  redis.call('HINCRBY', job_key, 'model:' .. model .. ':calls', 1)
  redis.call('HINCRBY', job_key, 'model:' .. model .. ':prompt_tokens', prompt)
  redis.call('HINCRBY', job_key, 'model:' .. model .. ':completion_tokens', completion)
  redis.call('HINCRBY', job_key, 'model:' .. model .. ':cost_micros', charge)
  redis.call('HSETNX', job_key, 'first_at', at_ms)
  redis.call('HSET', job_key, 'last_at', at_ms)
  redis.call('EXPIRE', job_key, job_ttl)
  redis.call('ZADD', jobs_key, at_ms, job)
  redis.call('ZREMRANGEBYSCORE', jobs_key, '-inf', at_ms - job_ttl * 1000)
  redis.call('EXPIRE', jobs_key, job_ttl)
end
-- end jobs (v4)

local kept = tonumber(calls_kept)
if kept > 0 and #ARGV >= log_from then
  local entry = {}
  for i = log_from, #ARGV do
    entry[#entry + 1] = ARGV[i]
  end
  redis.call('XADD', calls_key, 'MAXLEN', '~', kept, '*', unpack(entry))
  redis.call('EXPIRE', calls_key, month_ttl)
end
return {day, month, live, 1}
