"""The budget scripts for the SQLite store: admit.v4, settle.v4, renew.v1, claim.v1, loop.v1 and velocity.v1,
transcribed from their Lua.

Line for line the same commands on the same keys (``KEYS[i]`` is ``K[i]``, ``ARGV[i]`` is ``A[i]``, all
text), run inside one ``BEGIN IMMEDIATE`` transaction, so each is as atomic across processes as a script
is in Redis, and each answers what the script answers. The Lua files stay the source of truth:
``SCRIPTS`` maps each file's SHA1 to its transcription, the store refuses to start on a script it has
no transcription for, and ``tests/unit/test_sqlite_scripts.py`` runs generated sequences of calls on the
Lua on a real redis-server and on these, comparing every reply and every resulting key.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from guardproxy.store.sqlite_data import Tx, Value

WINDOW_MS = 60000
Script = Callable[[Tx, list[Any], list[Any]], Any]


def num(value: Value | None) -> int:
    """Lua's ``tonumber`` of an integer reply or argument (of nothing: the script fails, as in Lua)."""
    if value is None:
        raise TypeError("tonumber of nil")
    return int(value)


def num_or_0(value: Value | None) -> int:
    """``tonumber(x or '0')``."""
    return 0 if value is None else int(value)


def text(value: Value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def admit_v4(r: Tx, K: list[Any], A: list[Any]) -> list[int]:
    now_ms = r.now_ms

    for id_ in r.zrangebyscore(K[3], '-inf', now_ms, 0, 100):
        amount = r.hget(K[4], id_)
        if amount is not None:
            r.decrby(K[5], amount)
            r.hdel(K[4], id_)
            job = r.hget(K[16], id_)
            if job is not None:
                if r.hincrby(K[17], job, -num(amount)) <= 0:
                    r.hdel(K[17], job)
                r.hdel(K[16], id_)
        r.zrem(K[3], id_)
    if r.zcard(K[3]) == 0:
        r.delete(K[5])

    soft_day, hard_day = num(A[3]), num(A[4])
    soft_month, hard_month = num(A[5]), num(A[6])
    rpm, tpm = num(A[7]), num(A[8])
    limit_day, limit_month = num(A[14]), num(A[15])
    override = r.hmget(K[6], 'soft_day', 'hard_day', 'soft_month', 'hard_month', 'rpm', 'tpm',
                       'daily_micros', 'monthly_micros')
    if override[0] is not None:
        soft_day, hard_day = num(override[0]), num(override[1])
        soft_month, hard_month = num(override[2]), num(override[3])
        if override[4] is not None:
            rpm = num(override[4])
        if override[5] is not None:
            tpm = num(override[5])
        if override[6] is not None:
            limit_day, limit_month = num(override[6]), num(override[7])

    reserved = num_or_0(r.get(K[5]))
    used_day = num_or_0(r.get(K[1])) + reserved
    used_month = num_or_0(r.get(K[2])) + reserved

    def fits_tenant(worst: int) -> bool:
        return used_day + worst <= hard_day and used_month + worst <= hard_month

    job, job_cap, job_used = A[18], num(A[19]), 0
    if job != '':
        job_override = r.hget(K[6], 'job_micros')
        if job_override is not None:
            job_cap = num(job_override)
        job_used = num_or_0(r.hget(K[18], 'cost_micros')) + num_or_0(r.hget(K[17], job))
    else:
        job_cap = -1

    def fits(worst: int) -> bool:
        return fits_tenant(worst) and (job_cap < 0 or job_used + worst <= job_cap)

    first = 21
    candidates = len(A) - first
    chosen = -1
    if fits(num(A[first])):
        chosen = 0
        soft = used_day >= soft_day or used_month >= soft_month
        if soft and candidates > 1 and fits(num(A[first + 1])):
            chosen = 1
    else:
        for i in range(1, candidates):
            if fits(num(A[first + i])):
                chosen = i
                break

    settled = 1 if r.hexists(K[7], A[1]) == 1 else 0

    cutoff = now_ms - WINDOW_MS
    requests, tokens = 0, 0
    if rpm > 0:
        r.zremrangebyscore(K[8], '-inf', cutoff)
        requests = r.zcard(K[8])
    if tpm > 0:
        while True:
            aged = r.zrangebyscore(K[9], '-inf', cutoff, 0, 1000)
            if not aged:
                break
            freed = sum(num_or_0(n) for n in r.hmget(K[10], *aged))
            r.decrby(K[11], freed)
            r.hdel(K[10], *aged)
            r.zrem(K[9], *aged)
        if r.zcard(K[9]) > 0:
            tokens = num_or_0(r.get(K[11]))
    call_tokens = num(A[9])

    def leaves_at(key: int, limit: int) -> int:
        if limit == 0:
            return 0
        oldest = r.zrange(K[key], 0, 0)
        if not oldest:
            return 0
        return max(1, int(oldest[0][1]) + WINDOW_MS - now_ms)

    limited, wait_ms = 0, 0
    if chosen >= 0 and settled == 0:
        if rpm > 0 and requests + 1 > rpm:
            limited = 1
            nth = r.zrange(K[8], requests - rpm, requests - rpm)
            wait_ms = max(1, int(nth[0][1]) + WINDOW_MS - now_ms)
        elif tpm > 0 and call_tokens > tpm:
            limited = 3
        elif tpm > 0 and tokens + call_tokens > tpm:
            limited = 2
            freed = 0
            for id_, at in r.zrange(K[9], 0, -1):
                freed += num_or_0(r.hget(K[10], id_))
                if tokens - freed + call_tokens <= tpm:
                    wait_ms = max(1, int(at) + WINDOW_MS - now_ms)
                    break

    def queue(event: str, period: str, period_id: str, spent: int, limit: int) -> None:
        if A[10] != '1':
            return
        entry = r.xadd(K[14], ['event', event, 'tenant', A[11], 'period', period, 'period_id', period_id,
                               'threshold', '', 'spent', spent, 'limit', limit, 'at_ms', now_ms], maxlen=10000)
        r.zadd(K[15], now_ms, entry)

    exhausted = 0
    job_refused = False
    if chosen < 0 and job_cap >= 0:
        for i in range(candidates):
            if fits_tenant(num(A[first + i])):
                job_refused = True
    if job_refused:
        exhausted = 3
    elif chosen < 0:
        exhausted = 1
        if used_month + num(A[-1]) > hard_month:
            exhausted = 2
        flags, ttl = K[12], A[16]
        period, period_id, spent, limit = 'day', A[12], used_day - reserved, limit_day
        if exhausted == 2:
            flags, ttl = K[13], A[17]
            period, period_id, spent, limit = 'month', A[13], used_month - reserved, limit_month
        if A[20] != '1':
            r.hset(flags, 'blocked', now_ms)
            r.expire(flags, ttl)
            if r.hsetnx(flags, 'blocked_event', now_ms) == 1:
                queue('blocked', period, period_id, spent, limit)
    elif settled == 0 and limited == 0:
        worst = num(A[first + chosen])  # the Lua's local "amount"
        r.zadd(K[3], now_ms + num(A[2]), A[1])
        r.hset(K[4], A[1], worst)
        r.incrby(K[5], worst)
        if job != '':
            r.hset(K[16], A[1], job)
            r.hincrby(K[17], job, worst)
        r.hdel(K[12], 'blocked')
        r.hdel(K[13], 'blocked')
        if rpm > 0:
            r.zadd(K[8], now_ms, A[1])
            r.pexpire(K[8], WINDOW_MS * 2)
            requests += 1
        if tpm > 0:
            r.zadd(K[9], now_ms, A[1])
            r.hset(K[10], A[1], call_tokens)
            tokens = r.incrby(K[11], call_tokens)
            for k in (9, 10, 11):
                r.pexpire(K[k], WINDOW_MS * 2)
        # the period's first call sent to a cheaper tier by the tenant's budget (one downgraded by a job's
        # cap alone says nothing of the tenant's day or month)
        by_day = used_day >= soft_day or used_day + num(A[first]) > hard_day
        by_month = used_month >= soft_month or used_month + num(A[first]) > hard_month
        if chosen > 0 and (by_day or by_month):
            flags, ttl, period, period_id, spent, limit = (K[12], A[16], 'day', A[12], used_day - reserved,
                                                           limit_day)
            if not by_day:
                flags, ttl, period, period_id, spent, limit = (K[13], A[17], 'month', A[13],
                                                               used_month - reserved, limit_month)
            if r.hsetnx(flags, 'downgrading', now_ms) == 1:
                r.expire(flags, ttl)
                queue('downgrading', period, period_id, spent, limit)

    blocked = 0
    if r.hexists(K[12], 'blocked') == 1 or r.hexists(K[13], 'blocked') == 1:
        blocked = 1
    return [chosen, used_day, used_month, exhausted, soft_day, hard_day, soft_month, hard_month, settled,
            limited, rpm, tpm, requests, tokens, wait_ms, leaves_at(8, rpm), leaves_at(9, tpm), blocked,
            job_cap, job_used]


def settle_v4(r: Tx, K: list[Any], A: list[Any]) -> list[int]:
    if r.hexists(K[7], A[1]) == 1:
        return [num_or_0(r.get(K[1])), num_or_0(r.get(K[2])), 0, 0]

    live = 0
    amount = r.hget(K[4], A[1])
    if amount is not None:
        live = 1
        r.decrby(K[5], amount)
        r.hdel(K[4], A[1])
        held_by = r.hget(K[15], A[1])
        if held_by is not None:
            if r.hincrby(K[16], held_by, -num(amount)) <= 0:
                r.hdel(K[16], held_by)
            r.hdel(K[15], A[1])
    r.zrem(K[3], A[1])

    counted = r.hget(K[8], A[1])
    if counted is not None:
        real = num(A[6])
        r.hset(K[8], A[1], real)
        r.incrby(K[9], real - num(counted))

    charge = num(A[2])
    r.hset(K[7], A[1], charge)
    r.expire(K[7], A[3])

    if charge > 0:
        day = r.incrby(K[1], charge)
        month = r.incrby(K[2], charge)
        r.expire(K[1], A[3])
        r.expire(K[2], A[4])
    else:
        day = num_or_0(r.get(K[1]))
        month = num_or_0(r.get(K[2]))

    thresholds = num(A[12])
    job_at = 13 + thresholds
    log_from = job_at + 2
    last = len(A) - 1  # Lua's #ARGV
    if charge > 0 and thresholds > 0:
        limit_day, limit_month = num(A[10]), num(A[11])
        override = r.hmget(K[10], 'daily_micros', 'monthly_micros')
        if override[0] is not None:
            limit_day, limit_month = num(override[0]), num(override[1])
        now_ms = r.now_ms
        periods = [('day', A[8], day, limit_day, K[11], A[3]), ('month', A[9], month, limit_month, K[12], A[4])]
        for name, period_id, spent, limit, flags, ttl in periods:
            for i in range(13, 13 + thresholds):
                if (limit > 0 and spent * 1000000 >= limit * num(A[i])
                        and r.hsetnx(flags, 'threshold:' + A[i], now_ms) == 1):
                    r.expire(flags, ttl)
                    entry = r.xadd(K[13], ['event', 'threshold', 'tenant', A[7], 'period', name,
                                           'period_id', period_id, 'threshold', A[i], 'spent', spent,
                                           'limit', limit, 'at_ms', now_ms], maxlen=10000)
                    r.zadd(K[14], now_ms, entry)

    job = A[job_at]
    if job != '' and last >= log_from:
        fields = {A[i]: A[i + 1] for i in range(log_from, last, 2)}
        prompt = num(fields.get('prompt_tokens', '0'))
        completion = num(fields.get('completion_tokens', '0'))
        model = fields.get('model', '')
        at_ms = r.now_ms
        job_ttl = num(A[job_at + 1])
        r.hincrby(K[17], 'calls', 1)
        r.hincrby(K[17], 'prompt_tokens', prompt)
        r.hincrby(K[17], 'completion_tokens', completion)
        r.hincrby(K[17], 'cost_micros', charge)
        r.hincrby(K[17], 'model:' + model + ':calls', 1)
        r.hincrby(K[17], 'model:' + model + ':prompt_tokens', prompt)
        r.hincrby(K[17], 'model:' + model + ':completion_tokens', completion)
        r.hincrby(K[17], 'model:' + model + ':cost_micros', charge)
        r.hsetnx(K[17], 'first_at', at_ms)
        r.hset(K[17], 'last_at', at_ms)
        r.expire(K[17], job_ttl)
        r.zadd(K[18], at_ms, job)
        r.zremrangebyscore(K[18], '-inf', at_ms - job_ttl * 1000)
        r.expire(K[18], job_ttl)

    kept = num(A[5])
    if kept > 0 and last >= log_from:
        r.xadd(K[6], A[log_from:], maxlen=kept)
        r.expire(K[6], A[4])
    return [day, month, live, 1]


def renew_v1(r: Tx, K: list[Any], A: list[Any]) -> list[bytes]:
    expiry = r.now_ms + num(A[1])
    lost = []
    for id_ in A[2:]:
        if r.zscore(K[1], id_) is not None:
            r.zadd(K[1], expiry, id_, xx=True)
        else:
            lost.append(id_.encode())
    return lost


def claim_v1(r: Tx, K: list[Any], A: list[Any]) -> list[list[bytes]]:
    now_ms = r.now_ms
    out = []
    for id_ in r.zrangebyscore(K[2], '-inf', now_ms, 0, num(A[2])):
        entry = r.xrange(K[1], id_, id_)
        if not entry:
            r.zrem(K[2], id_)
        else:
            r.zadd(K[2], now_ms + num(A[1]), id_)
            attempts, hooks = r.hmget(K[3], id_ + ':attempts', id_ + ':hooks')
            out.append([id_.encode(), b'0' if attempts is None else attempts, b'' if hooks is None else hooks,
                        *(v.encode() for v in entry[0][1])])
    return out


def loop_v1(r: Tx, K: list[Any], A: list[Any]) -> list[int]:
    max_repeats, window_ms = num(A[2]), num(A[3])
    now_ms = r.now_ms
    r.zremrangebyscore(K[1], '-inf', now_ms - window_ms)
    seen = r.zcard(K[1])
    if seen < max_repeats:
        r.zadd(K[1], now_ms, A[1])
        r.pexpire(K[1], window_ms)
        return [0, seen + 1, 0]
    oldest = r.zrange(K[1], 0, 0)
    retry_ms = max(1, int(oldest[0][1]) + window_ms - now_ms)
    if A[5] == '1' and r.set(K[2], now_ms, ex_ms=window_ms, nx=True):
        entry = r.xadd(K[3], ['event', 'loop', 'tenant', A[6], 'key', A[7], 'job', A[8], 'digest', A[9],
                              'repeats', seen + 1, 'max_repeats', max_repeats, 'window_ms', window_ms,
                              'action', A[4], 'at_ms', now_ms], maxlen=10000)
        r.zadd(K[4], now_ms, entry)
    return [1, seen + 1, retry_ms]


def velocity_v1(r: Tx, K: list[Any], A: list[Any]) -> list[int]:
    # Lua's numbers are doubles: the products and quotients below are floats, as in the script
    charge, factor_ppm, baseline_hours, min_micros = num(A[1]), num(A[2]), num(A[3]), num(A[4])
    now_ms = r.now_ms
    hour = now_ms // 3600000

    current = r.hincrby(K[1], hour, charge)
    r.expire(K[1], (baseline_hours + 3) * 3600)
    if r.hlen(K[1]) > baseline_hours + 2:
        for field in r.hkeys(K[1]):
            if int(field) < hour - baseline_hours - 1:
                r.hdel(K[1], field)

    previous = num_or_0(r.hget(K[1], hour - 1))
    into_hour_ms = now_ms - hour * 3600000
    last_hour = current + math.floor(float(previous) * (3600000 - into_hour_ms) / 3600000)
    baseline = 0
    for h in range(hour - 1 - baseline_hours, hour - 1):
        baseline += num_or_0(r.hget(K[1], h))
    average = math.floor(baseline / baseline_hours)

    queued = 0
    if (baseline > 0 and last_hour >= min_micros
            and float(last_hour) * baseline_hours * 1000000 > float(factor_ppm) * baseline
            and r.get(K[2]) != str(hour).encode()):
        r.set(K[2], hour, ex_ms=7200 * 1000)
        if A[5] == '1':
            entry = r.xadd(K[3], ['event', 'velocity', 'tenant', A[6], 'period', 'hour', 'hour', hour,
                                  'spent', last_hour, 'baseline', average,
                                  'limit', math.floor(float(factor_ppm) * baseline / baseline_hours / 1000000),
                                  'factor_ppm', factor_ppm, 'at_ms', now_ms], maxlen=10000)
            r.zadd(K[4], now_ms, entry)
        queued = 1
    return [last_hour, average, queued]


#: The SHA1 of the script each function transcribes (as ``register_script`` computes it) -> the function.
#: Written out, not computed from the files: a script edited without its transcription has none, and
#: the SQLite store refuses to run it (``tests/unit/test_sqlite_scripts.py`` fails meanwhile).
SCRIPTS: dict[str, Script] = {
    "af3a3380cceb131e3e2a58f5175cd0e9339dacc5": admit_v4,  # admit.v4.lua
    "34ce43d1a471f9dc9ecedf2b185792d3251be9db": settle_v4,  # settle.v4.lua
    "7322ef8d3a9e153870c4d861e1ec3a74a9657e58": renew_v1,  # renew.v1.lua
    "eafc744244492addcca55033717156bebf097d85": claim_v1,  # claim.v1.lua
    "71a9dbdd588a0ece07db234cdd9877c00d852234": loop_v1,  # loop.v1.lua
    "daa2702f77aea023bb135d283b04c7b62f4a798e": velocity_v1,  # velocity.v1.lua
}
