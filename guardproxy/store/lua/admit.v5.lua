-- admit.v5: decide and reserve for one call of one tenant, atomically (contract §4), at every budget
-- level the call belongs to. The decision mirrors guardproxy/budget/decision.py:decide_levels (and
-- decide, without levels); differential tests keep them equal.
--
-- v5 (levels): beside the tenant's day and month (below as in v4), the call must fit every cap of the
-- levels argument: the global level (all tenants, UTC periods), the tenant's hour and week, the
-- caller's key and the candidate's model, each in its hour, day, week or month. A cap counts the
-- settled spend of its window (its "spend" key) plus its scope's live reservations (its "held" key);
-- a cap with a model applies only to the candidate of that model. What the chosen candidate reserved
-- at each level is written to resv:levels (id -> lines "h <held key>" and, tab-separated, "s <ttl>
-- <limit> <level> <window> <period> <scope> <flags key> <spend key>"), so that settle charges exactly
-- those counters (and queues their threshold alerts) and the lease sweep frees exactly those holds.
-- A call refused by a level alone (some candidate fits the tenant's day, month and the job) has
-- exhausted = 4 and names the first cap that refused it; its first refusal per scope and period
-- queues a "blocked" event with the level (the tenant's blocked flag is left alone). A runtime override
-- of the tenant's hour or week (budget hash: hourly_micros, soft_hour, hard_hour; the same for week)
-- replaces those caps' limits. The first call per scope and period that a level's cap (soft, or refusing
-- the requested model) sends to a cheaper tier queues a "downgrading" event with the level, unless the
-- tenant's day or month sent it there (their own event).
-- v4: jobs (work orders): the job's cap (spent + live reservations + worst case <= cap), exhausted = 3.
-- v3: per-minute request and token limits (sliding logs over the last 60 s of server time); a
-- period's "blocked" flag (set by a budget refusal, cleared by the next admitted call); the alert
-- events "blocked" (first refusal) and "downgrading" (first cheaper tier), each once per period.
-- v2: the reservation holds a lease (renewed by renew.v1 while the call runs), and an id that
-- was already settled or released (settle's marker) is never reserved.
--
-- Arguments and reply are built and decoded in one place: guardproxy/store/admit_args.py.

-- KEYS (21.. : the levels' own keys, declared for Redis Cluster; the levels argument names them)
local spend_day_key, spend_month_key = KEYS[1], KEYS[2]
local resv_key, resv_amount_key, reserved_key = KEYS[3], KEYS[4], KEYS[5]  -- zset id -> lease expiry ms; hash id -> micros; micros held
local budget_key, settled_key = KEYS[6], KEYS[7]   -- runtime overrides; settled:<day> (id -> charge)
local rl_req_key, rl_tok_key, rl_tok_n_key, rl_tok_sum_key = KEYS[8], KEYS[9], KEYS[10], KEYS[11]
local flags_day_key, flags_month_key = KEYS[12], KEYS[13]  -- blocked, blocked_event, downgrading, threshold:<t>
local alerts_key, alerts_due_key = KEYS[14], KEYS[15]
local resv_job_key, job_held_key, job_key = KEYS[16], KEYS[17], KEYS[18]
local resv_levels_key = KEYS[19]
local done_key = KEYS[20]  -- markers: done:<epoch> (see settle.v4)

-- ARGV
local reservation_id, lease_ms = ARGV[1], tonumber(ARGV[2])
local arg_soft_day, arg_hard_day, arg_soft_month, arg_hard_month = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local arg_rpm, arg_tpm, call_tokens = ARGV[7], ARGV[8], tonumber(ARGV[9])
local queue_alerts, tenant, day_id, month_id = ARGV[10] == '1', ARGV[11], ARGV[12], ARGV[13]
local arg_limit_day, arg_limit_month, day_ttl, month_ttl = ARGV[14], ARGV[15], ARGV[16], ARGV[17]
local job, arg_job_cap, provisional = ARGV[18], ARGV[19], ARGV[20] == '1'
-- {models = {model of each candidate}, caps = {{level, scope, window, period, spend, held, own, hard, soft,
--  limit, model, flags, ttl}, ...}}
local levels = cjson.decode(ARGV[21])
local FIRST_WORST = 22  -- worst case micros of each candidate: the requested model, then its downgrade chain

local WINDOW_MS = 60000
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- levels (v5): free the holds a reservation's books list (its spend lines stay for its settlement)
local function release_held(books, amount)
  local kept = ''
  for line in string.gmatch(books, '[^\n]+') do
    if string.sub(line, 1, 2) == 'h ' then
      if redis.call('DECRBY', string.sub(line, 3), amount) <= 0 then redis.call('DEL', string.sub(line, 3)) end
    else
      kept = kept .. line .. '\n'
    end
  end
  return kept
end

-- Reservations whose lease ran out (their process died or lost the store) expire here
-- (bounded work per call).
local expired = redis.call('ZRANGEBYSCORE', resv_key, '-inf', now_ms, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  local amount = redis.call('HGET', resv_amount_key, id)
  if amount then
    redis.call('DECRBY', reserved_key, amount)
    redis.call('HDEL', resv_amount_key, id)
    free_job_hold(resv_job_key, job_held_key, id, amount)  -- jobs (v4), shared.lua
    -- levels (v5): so do its holds at every level
    local books = redis.call('HGET', resv_levels_key, id)
    if books then
      local kept = release_held(books, tonumber(amount))
      if kept == '' then redis.call('HDEL', resv_levels_key, id) else redis.call('HSET', resv_levels_key, id, kept) end
    end
  end
  redis.call('ZREM', resv_key, id)
end
if redis.call('ZCARD', resv_key) == 0 then
  redis.call('DEL', reserved_key)
end

local soft_day, hard_day = tonumber(arg_soft_day), tonumber(arg_hard_day)
local soft_month, hard_month = tonumber(arg_soft_month), tonumber(arg_hard_month)
local rpm, tpm = tonumber(arg_rpm), tonumber(arg_tpm)
local limit_day, limit_month = tonumber(arg_limit_day), tonumber(arg_limit_month)
local override = redis.call('HMGET', budget_key, 'soft_day', 'hard_day', 'soft_month', 'hard_month', 'rpm', 'tpm',
                            'daily_micros', 'monthly_micros')
if override[1] then
  soft_day, hard_day = tonumber(override[1]), tonumber(override[2])
  soft_month, hard_month = tonumber(override[3]), tonumber(override[4])
  if override[5] then rpm = tonumber(override[5]) end
  if override[6] then tpm = tonumber(override[6]) end
  if override[7] then limit_day, limit_month = tonumber(override[7]), tonumber(override[8]) end
end

local reserved = tonumber(redis.call('GET', reserved_key) or '0')
local used_day = tonumber(redis.call('GET', spend_day_key) or '0') + reserved
local used_month = tonumber(redis.call('GET', spend_month_key) or '0') + reserved

local candidates = #ARGV - FIRST_WORST + 1
local function worst(i) return tonumber(ARGV[FIRST_WORST + i]) end

local function fits_tenant(w)
  return used_day + w <= hard_day and used_month + w <= hard_month
end

-- jobs (v4): the job's cap, its spend and live reservations
local job_cap, job_used = tonumber(arg_job_cap), 0
if job ~= '' then
  local job_override = redis.call('HGET', budget_key, 'job_micros')
  if job_override then job_cap = tonumber(job_override) end
  job_used = tonumber(redis.call('HGET', job_key, 'cost_micros') or '0')
    + tonumber(redis.call('HGET', job_held_key, job) or '0')
else
  job_cap = -1
end
local function fits_v4(w)
  return fits_tenant(w) and (job_cap < 0 or job_used + w <= job_cap)
end
-- end jobs (v4)

-- levels (v5): what each cap has used (settled in its window + held by its scope's live reservations)
local caps, models = levels.caps, levels.models
-- a runtime override of the tenant's hour or week (PUT /admin/tenants/{t}/budget) replaces that cap
local own = redis.call('HMGET', budget_key, 'hourly_micros', 'soft_hour', 'hard_hour',
                       'weekly_micros', 'soft_week', 'hard_week')
local own_of = {hour = 1, week = 4}
for _, cap in ipairs(caps) do
  local at = own_of[cap.window]
  if cap.level == 'tenant' and at and own[at] then
    cap.limit, cap.soft, cap.hard = own[at], tonumber(own[at + 1]), tonumber(own[at + 2])
  end
end
local cap_used = {}
for i, cap in ipairs(caps) do
  cap_used[i] = tonumber(redis.call('GET', cap.spend) or '0') + tonumber(redis.call('GET', cap.held) or '0')
end
local function applies(cap, i)
  return cap.model == '' or cap.model == models[i + 1]
end
-- the first cap candidate i does not fit (its index), or 0
local function refusing_cap(i)
  local w = worst(i)
  for c, cap in ipairs(caps) do
    if applies(cap, i) and cap_used[c] + w > cap.hard then return c end
  end
  return 0
end
local function fits(i)
  return fits_v4(worst(i)) and refusing_cap(i) == 0
end
local function soft_levels(i)
  for c, cap in ipairs(caps) do
    if applies(cap, i) and cap_used[c] >= cap.soft then return true end
  end
  return false
end
-- end levels (v5)

local chosen = -1
if fits(0) then
  chosen = 0
  local soft = used_day >= soft_day or used_month >= soft_month or soft_levels(0)
  if soft and candidates > 1 and fits(1) then
    chosen = 1
  end
else
  for i = 1, candidates - 1 do
    if fits(i) then
      chosen = i
      break
    end
  end
end
-- levels (v5): the first cap that sends the call to a cheaper tier (soft, or refusing the requested model)
local downgraded_by, downgraded_used = 0, 0
if chosen > 0 then
  for c, cap in ipairs(caps) do
    if applies(cap, 0) and (cap_used[c] >= cap.soft or cap_used[c] + worst(0) > cap.hard) then
      downgraded_by, downgraded_used = c, cap_used[c]
      break
    end
  end
end
-- end levels (v5)

local settled = 0
-- markers (epochs): an id '<epoch>.<seq>' is settled at or under its epoch's mark or in its set
local marker_seq = string.match(reservation_id, '^%d+%.(%d+)$')
if marker_seq then
  if tonumber(marker_seq) <= tonumber(redis.call('ZSCORE', done_key, 'mark') or '0')
      or redis.call('ZSCORE', done_key, marker_seq) then
    settled = 1
  end
elseif redis.call('HEXISTS', settled_key, reservation_id) == 1 then
  settled = 1
end
-- end markers

-- The sliding windows: what was admitted in the last 60 s (kept only for the limits a tenant has).
local cutoff = now_ms - WINDOW_MS
local requests, tokens = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', rl_req_key, '-inf', cutoff)
  requests = redis.call('ZCARD', rl_req_key)
end
if tpm > 0 then
  -- in chunks: unpack() has a limit of a few thousand values
  while true do
    local aged = redis.call('ZRANGEBYSCORE', rl_tok_key, '-inf', cutoff, 'LIMIT', 0, 1000)
    if #aged == 0 then break end
    local freed = 0
    for _, n in ipairs(redis.call('HMGET', rl_tok_n_key, unpack(aged))) do
      freed = freed + tonumber(n or '0')
    end
    redis.call('DECRBY', rl_tok_sum_key, freed)
    redis.call('HDEL', rl_tok_n_key, unpack(aged))
    redis.call('ZREM', rl_tok_key, unpack(aged))
  end
  if redis.call('ZCARD', rl_tok_key) > 0 then
    tokens = tonumber(redis.call('GET', rl_tok_sum_key) or '0')
  end
end

local function leaves_at(key, limit)
  if limit == 0 then return 0 end
  local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return math.max(1, tonumber(oldest[2]) + WINDOW_MS - now_ms)
end

local limited, wait_ms = 0, 0
if chosen >= 0 and settled == 0 then
  if rpm > 0 and requests + 1 > rpm then
    limited = 1
    -- the (requests + 1 - rpm)-th oldest request must leave first
    local nth = redis.call('ZRANGE', rl_req_key, requests - rpm, requests - rpm, 'WITHSCORES')
    wait_ms = math.max(1, tonumber(nth[2]) + WINDOW_MS - now_ms)
  elseif tpm > 0 and call_tokens > tpm then
    limited = 3
  elseif tpm > 0 and tokens + call_tokens > tpm then
    limited = 2
    local freed = 0
    for _, id in ipairs(redis.call('ZRANGE', rl_tok_key, 0, -1)) do
      freed = freed + tonumber(redis.call('HGET', rl_tok_n_key, id) or '0')
      if tokens - freed + call_tokens <= tpm then
        wait_ms = math.max(1, tonumber(redis.call('ZSCORE', rl_tok_key, id)) + WINDOW_MS - now_ms)
        break
      end
    end
  end
end

local function queue(event, period, period_id, spent, limit, level)
  if not queue_alerts then return end
  local fields = {'event', event, 'tenant', tenant, 'period', period, 'period_id', period_id, 'threshold', '',
                  'spent', spent, 'limit', limit, 'at_ms', now_ms}
  if level then
    fields[#fields + 1] = 'level'
    fields[#fields + 1] = level
  end
  queue_alert(alerts_key, alerts_due_key, now_ms, unpack(fields))
end

local exhausted, refused_by = 0, 0
-- levels (v5): refused by a level alone (some candidate fits the tenant's day, month and job)
if chosen < 0 then
  for i = 0, candidates - 1 do
    if fits_v4(worst(i)) then
      refused_by = refusing_cap(i)
      break
    end
  end
end
-- end levels (v5)
-- jobs (v4): refused by the job's cap alone (some candidate fits the tenant): the tenant is not blocked
local job_refused = false
if chosen < 0 and job_cap >= 0 then
  for i = 0, candidates - 1 do
    if fits_tenant(worst(i)) then job_refused = true end
  end
end
-- end jobs (v4)
if refused_by > 0 then
  exhausted = 4
  local cap = caps[refused_by]
  if not provisional and redis.call('HSETNX', cap.flags, 'blocked_event:' .. cap.scope, now_ms) == 1 then
    redis.call('EXPIRE', cap.flags, cap.ttl)
    queue('blocked', cap.window, cap.period, cap_used[refused_by], cap.limit, cap.level)
  end
elseif job_refused then
  exhausted = 3
elseif chosen < 0 then
  exhausted = 1
  if used_month + worst(candidates - 1) > hard_month then
    exhausted = 2
  end
  -- the period's first refusal flags it blocked (until it ends or an override re-arms it)
  local flags, ttl = flags_day_key, day_ttl
  local period, period_id, spent, limit = 'day', day_id, used_day - reserved, limit_day
  if exhausted == 2 then
    flags, ttl = flags_month_key, month_ttl
    period, period_id, spent, limit = 'month', month_id, used_month - reserved, limit_month
  end
  if not provisional then
    redis.call('HSET', flags, 'blocked', now_ms)
    redis.call('EXPIRE', flags, ttl)
    if redis.call('HSETNX', flags, 'blocked_event', now_ms) == 1 then
      queue('blocked', period, period_id, spent, limit)
    end
  end
elseif settled == 0 and limited == 0 then
  local amount = worst(chosen)
  redis.call('ZADD', resv_key, now_ms + lease_ms, reservation_id)
  redis.call('HSET', resv_amount_key, reservation_id, amount)
  redis.call('INCRBY', reserved_key, amount)
  -- jobs (v4): the job holds its share until the reservation goes
  if job ~= '' then
    redis.call('HSET', resv_job_key, reservation_id, job)
    redis.call('HINCRBY', job_held_key, job, amount)
  end
  -- end jobs (v4)
  -- levels (v5): each level holds the amount, and the reservation's books name what its settlement charges
  local books, seen = '', {}
  for c, cap in ipairs(caps) do
    if applies(cap, chosen) then
      if cap.own == 1 and not seen['h ' .. cap.held] then
        seen['h ' .. cap.held] = true
        redis.call('INCRBY', cap.held, amount)
        books = books .. 'h ' .. cap.held .. '\n'
      end
      if not seen['s ' .. cap.spend] then
        seen['s ' .. cap.spend] = true
        books = books .. 's ' .. table.concat({cap.ttl, cap.limit, cap.level, cap.window, cap.period, cap.scope,
                                               cap.flags, cap.spend}, '\t') .. '\n'
      end
      cap_used[c] = cap_used[c] + amount
    end
  end
  if books ~= '' then
    redis.call('HSET', resv_levels_key, reservation_id, books)
    redis.call('EXPIRE', resv_levels_key, day_ttl)
  end
  -- end levels (v5)
  -- a call that fits again ends the blocked state (a cheaper call, a raised cap, released reservations)
  redis.call('HDEL', flags_day_key, 'blocked')
  redis.call('HDEL', flags_month_key, 'blocked')
  if rpm > 0 then
    redis.call('ZADD', rl_req_key, now_ms, reservation_id)
    redis.call('PEXPIRE', rl_req_key, WINDOW_MS * 2)
    requests = requests + 1
  end
  if tpm > 0 then
    redis.call('ZADD', rl_tok_key, now_ms, reservation_id)
    redis.call('HSET', rl_tok_n_key, reservation_id, call_tokens)
    tokens = redis.call('INCRBY', rl_tok_sum_key, call_tokens)
    for _, key in ipairs({rl_tok_key, rl_tok_n_key, rl_tok_sum_key}) do redis.call('PEXPIRE', key, WINDOW_MS * 2) end
  end
  -- the period's first call sent to a cheaper tier by the tenant's budget (one downgraded by a job's
  -- cap alone says nothing of the tenant's day or month)
  local by_day = used_day >= soft_day or used_day + worst(0) > hard_day
  local by_month = used_month >= soft_month or used_month + worst(0) > hard_month
  if chosen > 0 and (by_day or by_month) then
    local flags, ttl, period, period_id, spent, limit = flags_day_key, day_ttl, 'day', day_id, used_day - reserved,
      limit_day
    if not by_day then
      flags, ttl, period, period_id, spent, limit = flags_month_key, month_ttl, 'month', month_id,
        used_month - reserved, limit_month
    end
    if redis.call('HSETNX', flags, 'downgrading', now_ms) == 1 then
      redis.call('EXPIRE', flags, ttl)
      queue('downgrading', period, period_id, spent, limit)
    end
  elseif downgraded_by > 0 then
    -- levels (v5): or by another level's cap: its first such call per scope and period
    local cap = caps[downgraded_by]
    if redis.call('HSETNX', cap.flags, 'downgrading:' .. cap.scope, now_ms) == 1 then
      redis.call('EXPIRE', cap.flags, cap.ttl)
      queue('downgrading', cap.window, cap.period, downgraded_used, cap.limit, cap.level)
    end
  end
end

local blocked = 0
if redis.call('HEXISTS', flags_day_key, 'blocked') == 1 or redis.call('HEXISTS', flags_month_key, 'blocked') == 1 then
  blocked = 1
end
-- The reply, decoded by AdmitReply.decode: 20 values as in v4, the cap that refused (0: none), then
-- what each cap has used (after this call, if it was admitted), then each cap's hard, soft and limit
-- in force (an override's).
local reply = {chosen, used_day, used_month, exhausted, soft_day, hard_day, soft_month, hard_month, settled,
               limited, rpm, tpm, requests, tokens, wait_ms, leaves_at(rl_req_key, rpm), leaves_at(rl_tok_key, tpm),
               blocked, job_cap, job_used, refused_by}
for c = 1, #caps do reply[#reply + 1] = cap_used[c] end
for c = 1, #caps do
  reply[#reply + 1] = caps[c].hard
  reply[#reply + 1] = caps[c].soft
  reply[#reply + 1] = tonumber(caps[c].limit)
end
return reply
