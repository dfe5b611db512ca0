-- admit.v4: decide and reserve for one call of one tenant, atomically (contract §4).
-- The decision mirrors guardproxy/budget.py:decide and rate_verdict (a differential test keeps
-- them equal).
-- v2: the reservation holds a lease (renewed by renew.v1 while the call runs), and an id that
-- was already settled or released (settle's marker) is never reserved.
-- v4: jobs (work orders): a call may name a job; its worst case must also fit the job's cap
-- (the job's settled cost + the job's live reservations + worst case <= cap), else it is refused
-- with exhausted = 3 (the tenant's blocked flag and alerts are left alone). The job's share of
-- live reservations is held in job:held and dropped with the reservation (settle, release or an
-- expired lease). Blocks marked "jobs (v4)".
-- v3: per-minute request and token limits (sliding logs over the last 60 s of server time); a
-- period's "blocked" flag (set by a budget refusal, cleared by the next admitted call); the alert
-- events "blocked" (first refusal) and "downgrading" (first cheaper tier), each once per period.
--
-- KEYS: 1 spend:day:<day>  2 spend:month:<month>  3 resv (zset id -> lease expiry ms)
--       4 resv:amount (hash id -> micros)  5 reserved (micros held by live reservations)
--       6 budget (hash of runtime overrides, written by the admin API)
--       7 settled:<day> (hash id -> charge of every id settled or released, see settle)
--       8 rl:req (zset id -> admitted at ms)  9 rl:tok (zset id -> admitted at ms)
--       10 rl:tok:n (hash id -> tokens)  11 rl:tok:sum (tokens in the window)
--       12 flags:day:<day>  13 flags:month:<month> (hashes: blocked, blocked_event,
--       downgrading, threshold:<t>)
--       14 alerts (stream of events)  15 alerts:due (zset entry id -> next delivery at ms)
--       16 resv:job (hash reservation id -> job id)  17 job:held (hash job id -> micros reserved)
--       18 job:<job id> (the job's counters; see settle.v4)
-- ARGV: 1 reservation id  2 lease ms  3 soft_day  4 hard_day  5 soft_month  6 hard_month
--       7 rpm (0: none)  8 tpm (0: none)  9 the call's worst-case tokens
--       10 queue alert events (1) or not (0)  11 tenant  12 day  13 month  14 limit_day micros
--       15 limit_month micros  16 day flags ttl s  17 month flags ttl s
--       18 job id ('' none)  19 job cap micros (-1 none; the override's job_micros wins)
--       20 provisional (1: a clamped admission may follow a refusal, which then records nothing)
--       21.. worst case micros of each candidate: the requested model, then its downgrade chain
-- Returns {index or -1, used_day, used_month, exhausted (0 none, 1 day, 2 month),
--          soft_day, hard_day, soft_month, hard_month, 1 if the id was already settled else 0,
--          limited (0 none, 1 requests, 2 tokens, 3 tokens: the call alone exceeds tpm),
--          rpm, tpm, requests in the window, tokens in the window,
--          ms until the window admits this call (0 when admitted),
--          ms until the oldest request leaves the window, ms until the oldest tokens leave it,
--          1 if the period is flagged blocked else 0,
--          the job's cap (-1: no job or no cap), the job's spent + held micros before this call}

local WINDOW_MS = 60000
local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- Reservations whose lease ran out (their process died or lost the store) expire here
-- (bounded work per call).
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_ms, 'LIMIT', 0, 100)
for _, id in ipairs(expired) do
  local amount = redis.call('HGET', KEYS[4], id)
  if amount then
    redis.call('DECRBY', KEYS[5], amount)
    redis.call('HDEL', KEYS[4], id)
    -- jobs (v4): the job's share of the reservation frees with it
    local job = redis.call('HGET', KEYS[16], id)
    if job then
      if redis.call('HINCRBY', KEYS[17], job, 0 - tonumber(amount)) <= 0 then redis.call('HDEL', KEYS[17], job) end
      redis.call('HDEL', KEYS[16], id)
    end
    -- end jobs (v4)
  end
  redis.call('ZREM', KEYS[3], id)
end
if redis.call('ZCARD', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[5])
end

local soft_day, hard_day = tonumber(ARGV[3]), tonumber(ARGV[4])
local soft_month, hard_month = tonumber(ARGV[5]), tonumber(ARGV[6])
local rpm, tpm = tonumber(ARGV[7]), tonumber(ARGV[8])
local limit_day, limit_month = tonumber(ARGV[14]), tonumber(ARGV[15])
local override = redis.call('HMGET', KEYS[6], 'soft_day', 'hard_day', 'soft_month', 'hard_month', 'rpm', 'tpm',
                            'daily_micros', 'monthly_micros')
if override[1] then
  soft_day, hard_day = tonumber(override[1]), tonumber(override[2])
  soft_month, hard_month = tonumber(override[3]), tonumber(override[4])
  if override[5] then rpm = tonumber(override[5]) end
  if override[6] then tpm = tonumber(override[6]) end
  if override[7] then limit_day, limit_month = tonumber(override[7]), tonumber(override[8]) end
end

local reserved = tonumber(redis.call('GET', KEYS[5]) or '0')
local used_day = tonumber(redis.call('GET', KEYS[1]) or '0') + reserved
local used_month = tonumber(redis.call('GET', KEYS[2]) or '0') + reserved

local function fits_tenant(worst)
  return used_day + worst <= hard_day and used_month + worst <= hard_month
end

-- jobs (v4): the job's cap, its spend and live reservations
local job, job_cap, job_used = ARGV[18], tonumber(ARGV[19]), 0
if job ~= '' then
  local job_override = redis.call('HGET', KEYS[6], 'job_micros')
  if job_override then job_cap = tonumber(job_override) end
  job_used = tonumber(redis.call('HGET', KEYS[18], 'cost_micros') or '0')
    + tonumber(redis.call('HGET', KEYS[17], job) or '0')
else
  job_cap = -1
end
local function fits(worst)
  return fits_tenant(worst) and (job_cap < 0 or job_used + worst <= job_cap)
end
-- end jobs (v4)

local first = 21
local candidates = #ARGV - first + 1
local chosen = -1
if fits(tonumber(ARGV[first])) then
  chosen = 0
  local soft = used_day >= soft_day or used_month >= soft_month
  if soft and candidates > 1 and fits(tonumber(ARGV[first + 1])) then
    chosen = 1
  end
else
  for i = 1, candidates - 1 do
    if fits(tonumber(ARGV[first + i])) then
      chosen = i
      break
    end
  end
end

local settled = 0
if redis.call('HEXISTS', KEYS[7], ARGV[1]) == 1 then
  settled = 1
end

-- The sliding windows: what was admitted in the last 60 s (kept only for the limits a tenant has).
local cutoff = now_ms - WINDOW_MS
local requests, tokens = 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', cutoff)
  requests = redis.call('ZCARD', KEYS[8])
end
if tpm > 0 then
  -- in chunks: unpack() has a limit of a few thousand values
  while true do
    local aged = redis.call('ZRANGEBYSCORE', KEYS[9], '-inf', cutoff, 'LIMIT', 0, 1000)
    if #aged == 0 then break end
    local freed = 0
    for _, n in ipairs(redis.call('HMGET', KEYS[10], unpack(aged))) do
      freed = freed + tonumber(n or '0')
    end
    redis.call('DECRBY', KEYS[11], freed)
    redis.call('HDEL', KEYS[10], unpack(aged))
    redis.call('ZREM', KEYS[9], unpack(aged))
  end
  if redis.call('ZCARD', KEYS[9]) > 0 then
    tokens = tonumber(redis.call('GET', KEYS[11]) or '0')
  end
end
local call_tokens = tonumber(ARGV[9])

local function leaves_at(key, limit)
  if limit == 0 then return 0 end
  local oldest = redis.call('ZRANGE', KEYS[key], 0, 0, 'WITHSCORES')
  if #oldest == 0 then return 0 end
  return math.max(1, tonumber(oldest[2]) + WINDOW_MS - now_ms)
end

local limited, wait_ms = 0, 0
if chosen >= 0 and settled == 0 then
  if rpm > 0 and requests + 1 > rpm then
    limited = 1
    -- the (requests + 1 - rpm)-th oldest request must leave first
    local nth = redis.call('ZRANGE', KEYS[8], requests - rpm, requests - rpm, 'WITHSCORES')
    wait_ms = math.max(1, tonumber(nth[2]) + WINDOW_MS - now_ms)
  elseif tpm > 0 and call_tokens > tpm then
    limited = 3
  elseif tpm > 0 and tokens + call_tokens > tpm then
    limited = 2
    local freed = 0
    for _, id in ipairs(redis.call('ZRANGE', KEYS[9], 0, -1)) do
      freed = freed + tonumber(redis.call('HGET', KEYS[10], id) or '0')
      if tokens - freed + call_tokens <= tpm then
        wait_ms = math.max(1, tonumber(redis.call('ZSCORE', KEYS[9], id)) + WINDOW_MS - now_ms)
        break
      end
    end
  end
end

local function queue(event, period, period_id, spent, limit)
  if ARGV[10] ~= '1' then return end
  local id = redis.call('XADD', KEYS[14], 'MAXLEN', '~', 10000, '*', 'event', event, 'tenant', ARGV[11],
                        'period', period, 'period_id', period_id, 'threshold', '', 'spent', spent,
                        'limit', limit, 'at_ms', now_ms)
  redis.call('ZADD', KEYS[15], now_ms, id)
end

local exhausted = 0
-- jobs (v4): refused by the job's cap alone (some candidate fits the tenant): the tenant is not blocked
local job_refused = false
if chosen < 0 and job_cap >= 0 then
  for i = 0, candidates - 1 do
    if fits_tenant(tonumber(ARGV[first + i])) then job_refused = true end
  end
end
-- end jobs (v4)
if job_refused then
  exhausted = 3
elseif chosen < 0 then
  exhausted = 1
  if used_month + tonumber(ARGV[#ARGV]) > hard_month then
    exhausted = 2
  end
  -- the period's first refusal flags it blocked (until it ends or an override re-arms it)
  local flags, ttl = KEYS[12], ARGV[16]
  local period, period_id, spent, limit = 'day', ARGV[12], used_day - reserved, limit_day
  if exhausted == 2 then
    flags, ttl = KEYS[13], ARGV[17]
    period, period_id, spent, limit = 'month', ARGV[13], used_month - reserved, limit_month
  end
  if ARGV[20] ~= '1' then
    redis.call('HSET', flags, 'blocked', now_ms)
    redis.call('EXPIRE', flags, ttl)
    if redis.call('HSETNX', flags, 'blocked_event', now_ms) == 1 then
      queue('blocked', period, period_id, spent, limit)
    end
  end
elseif settled == 0 and limited == 0 then
  local amount = tonumber(ARGV[first + chosen])
  redis.call('ZADD', KEYS[3], now_ms + tonumber(ARGV[2]), ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], amount)
  redis.call('INCRBY', KEYS[5], amount)
  -- jobs (v4): the job holds its share until the reservation goes
  if job ~= '' then
    redis.call('HSET', KEYS[16], ARGV[1], job)
    redis.call('HINCRBY', KEYS[17], job, amount)
  end
  -- end jobs (v4)
  -- a call that fits again ends the blocked state (a cheaper call, a raised cap, released reservations)
  redis.call('HDEL', KEYS[12], 'blocked')
  redis.call('HDEL', KEYS[13], 'blocked')
  if rpm > 0 then
    redis.call('ZADD', KEYS[8], now_ms, ARGV[1])
    redis.call('PEXPIRE', KEYS[8], WINDOW_MS * 2)
    requests = requests + 1
  end
  if tpm > 0 then
    redis.call('ZADD', KEYS[9], now_ms, ARGV[1])
    redis.call('HSET', KEYS[10], ARGV[1], call_tokens)
    tokens = redis.call('INCRBY', KEYS[11], call_tokens)
    for k = 9, 11 do redis.call('PEXPIRE', KEYS[k], WINDOW_MS * 2) end
  end
  if chosen > 0 then
    -- the period's first call sent to a cheaper tier
    local flags, ttl, period, period_id, spent, limit = KEYS[12], ARGV[16], 'day', ARGV[12], used_day - reserved,
      limit_day
    if used_day < soft_day and used_day + tonumber(ARGV[first]) <= hard_day then
      flags, ttl, period, period_id, spent, limit = KEYS[13], ARGV[17], 'month', ARGV[13],
        used_month - reserved, limit_month
    end
    if redis.call('HSETNX', flags, 'downgrading', now_ms) == 1 then
      redis.call('EXPIRE', flags, ttl)
      queue('downgrading', period, period_id, spent, limit)
    end
  end
end

local blocked = 0
if redis.call('HEXISTS', KEYS[12], 'blocked') == 1 or redis.call('HEXISTS', KEYS[13], 'blocked') == 1 then
  blocked = 1
end
return {chosen, used_day, used_month, exhausted, soft_day, hard_day, soft_month, hard_month, settled,
        limited, rpm, tpm, requests, tokens, wait_ms, leaves_at(8, rpm), leaves_at(9, tpm), blocked,
        job_cap, job_used}
