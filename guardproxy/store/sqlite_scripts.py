"""The budget scripts for the SQLite store: admit.v5, settle.v4, renew.v1, claim.v1, loop.v1 and
velocity.v1, transcribed from their Lua.

Line for line the same commands on the same keys (``KEYS[i]`` is ``K[i]``, ``ARGV[i]`` is ``A[i]``, all
text), run inside one ``BEGIN IMMEDIATE`` transaction, so each is as atomic across processes as a script
is in Redis, and each answers what the script answers. The Lua files stay the source of truth:
``SCRIPTS`` maps each file's SHA1 to its transcription, the store refuses to start on a script it has
no transcription for, and ``tests/unit/test_sqlite_scripts.py`` runs generated sequences of calls on the
Lua on a real redis-server and on these, comparing every reply and every resulting key.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

from guardproxy.store.sqlite_data import Tx, Value

WINDOW_MS = 60000
_EPOCH_ID = re.compile(r'[0-9]+\.([0-9]+)')
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


def _marker_seq(reservation_id: Value) -> str | None:
    """markers: the seq of an id ``<epoch>.<seq>`` (``string.match(id, '^%d+%.(%d+)$')``), else ``None``."""
    matched = _EPOCH_ID.fullmatch(text(reservation_id))
    return None if matched is None else matched.group(1)


def _score_or_0(score: float | None) -> int:
    """``tonumber(redis.call('ZSCORE', ...) or '0')`` of an integer score."""
    return 0 if score is None else int(score)


def _release_held(r: Tx, books: str, amount: int) -> str:
    kept = ''
    for line in books.split('\n'):
        if not line:
            continue
        if line.startswith('h '):
            if r.decrby(line[2:], amount) <= 0:
                r.delete(line[2:])
        else:
            kept += line + '\n'
    return kept


def admit_v5(r: Tx, K: list[Any], A: list[Any]) -> list[int]:
    spend_day_key, spend_month_key = K[1], K[2]
    resv_key, resv_amount_key, reserved_key = K[3], K[4], K[5]
    budget_key, settled_key = K[6], K[7]
    rl_req_key, rl_tok_key, rl_tok_n_key, rl_tok_sum_key = K[8], K[9], K[10], K[11]
    flags_day_key, flags_month_key = K[12], K[13]
    alerts_key, alerts_due_key = K[14], K[15]
    resv_job_key, job_held_key, job_key = K[16], K[17], K[18]
    resv_levels_key = K[19]
    done_key = K[20]  # markers

    reservation_id, lease_ms = A[1], num(A[2])
    arg_soft_day, arg_hard_day, arg_soft_month, arg_hard_month = A[3], A[4], A[5], A[6]
    arg_rpm, arg_tpm, call_tokens = A[7], A[8], num(A[9])
    queue_alerts, tenant, day_id, month_id = A[10] == '1', A[11], A[12], A[13]
    arg_limit_day, arg_limit_month, day_ttl, month_ttl = A[14], A[15], A[16], A[17]
    job, arg_job_cap, provisional = A[18], A[19], A[20] == '1'
    levels = json.loads(A[21])
    first_worst = 22
    now_ms = r.now_ms

    for id_ in r.zrangebyscore(resv_key, '-inf', now_ms, 0, 100):
        freed_amount = r.hget(resv_amount_key, id_)
        if freed_amount is not None:
            r.decrby(reserved_key, freed_amount)
            r.hdel(resv_amount_key, id_)
            held_by = r.hget(resv_job_key, id_)
            if held_by is not None:
                if r.hincrby(job_held_key, held_by, -num(freed_amount)) <= 0:
                    r.hdel(job_held_key, held_by)
                r.hdel(resv_job_key, id_)
            books = r.hget(resv_levels_key, id_)
            if books is not None:
                kept = _release_held(r, text(books), num(freed_amount))
                if kept == '':
                    r.hdel(resv_levels_key, id_)
                else:
                    r.hset(resv_levels_key, id_, kept)
        r.zrem(resv_key, id_)
    if r.zcard(resv_key) == 0:
        r.delete(reserved_key)

    soft_day, hard_day = num(arg_soft_day), num(arg_hard_day)
    soft_month, hard_month = num(arg_soft_month), num(arg_hard_month)
    rpm, tpm = num(arg_rpm), num(arg_tpm)
    limit_day, limit_month = num(arg_limit_day), num(arg_limit_month)
    override = r.hmget(budget_key, 'soft_day', 'hard_day', 'soft_month', 'hard_month', 'rpm', 'tpm',
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

    reserved = num_or_0(r.get(reserved_key))
    used_day = num_or_0(r.get(spend_day_key)) + reserved
    used_month = num_or_0(r.get(spend_month_key)) + reserved

    candidates = len(A) - first_worst

    def worst(i: int) -> int:
        return num(A[first_worst + i])

    def fits_tenant(w: int) -> bool:
        return used_day + w <= hard_day and used_month + w <= hard_month

    job_cap, job_used = num(arg_job_cap), 0
    if job != '':
        job_override = r.hget(budget_key, 'job_micros')
        if job_override is not None:
            job_cap = num(job_override)
        job_used = num_or_0(r.hget(job_key, 'cost_micros')) + num_or_0(r.hget(job_held_key, job))
    else:
        job_cap = -1

    def fits_v4(w: int) -> bool:
        return fits_tenant(w) and (job_cap < 0 or job_used + w <= job_cap)

    caps, models = levels['caps'], levels['models']
    own = r.hmget(budget_key, 'hourly_micros', 'soft_hour', 'hard_hour', 'weekly_micros', 'soft_week', 'hard_week')
    own_of = {'hour': 0, 'week': 3}
    for cap in caps:
        first = own_of.get(cap['window'])
        overridden = own[first] if cap['level'] == 'tenant' and first is not None else None
        if first is not None and overridden is not None:
            cap['limit'], cap['soft'], cap['hard'] = text(overridden), num(own[first + 1]), num(own[first + 2])
    cap_used = [num_or_0(r.get(cap['spend'])) + num_or_0(r.get(cap['held'])) for cap in caps]

    def applies(cap: dict[str, Any], i: int) -> bool:
        return bool(cap['model'] == '' or (i < len(models) and cap['model'] == models[i]))

    def refusing_cap(i: int) -> int:
        w = worst(i)
        for c, cap in enumerate(caps):
            if applies(cap, i) and cap_used[c] + w > cap['hard']:
                return c + 1
        return 0

    def fits(i: int) -> bool:
        return fits_v4(worst(i)) and refusing_cap(i) == 0

    def soft_levels(i: int) -> bool:
        return any(applies(cap, i) and cap_used[c] >= cap['soft'] for c, cap in enumerate(caps))

    chosen = -1
    if fits(0):
        chosen = 0
        soft = used_day >= soft_day or used_month >= soft_month or soft_levels(0)
        if soft and candidates > 1 and fits(1):
            chosen = 1
    else:
        for i in range(1, candidates):
            if fits(i):
                chosen = i
                break
    downgraded_by, downgraded_used = 0, 0
    if chosen > 0:
        for c, cap in enumerate(caps):
            if applies(cap, 0) and (cap_used[c] >= cap['soft'] or cap_used[c] + worst(0) > cap['hard']):
                downgraded_by, downgraded_used = c + 1, cap_used[c]
                break

    # markers (epochs)
    marker_seq = _marker_seq(reservation_id)
    if marker_seq is not None:
        settled = 1 if (int(marker_seq) <= _score_or_0(r.zscore(done_key, 'mark'))
                        or r.zscore(done_key, marker_seq) is not None) else 0
    else:
        settled = 1 if r.hexists(settled_key, reservation_id) == 1 else 0
    # end markers

    cutoff = now_ms - WINDOW_MS
    requests, tokens = 0, 0
    if rpm > 0:
        r.zremrangebyscore(rl_req_key, '-inf', cutoff)
        requests = r.zcard(rl_req_key)
    if tpm > 0:
        while True:
            aged = r.zrangebyscore(rl_tok_key, '-inf', cutoff, 0, 1000)
            if not aged:
                break
            freed = sum(num_or_0(n) for n in r.hmget(rl_tok_n_key, *aged))
            r.decrby(rl_tok_sum_key, freed)
            r.hdel(rl_tok_n_key, *aged)
            r.zrem(rl_tok_key, *aged)
        if r.zcard(rl_tok_key) > 0:
            tokens = num_or_0(r.get(rl_tok_sum_key))

    def leaves_at(key: str, limit: int) -> int:
        if limit == 0:
            return 0
        oldest = r.zrange(key, 0, 0)
        if not oldest:
            return 0
        return max(1, int(oldest[0][1]) + WINDOW_MS - now_ms)

    limited, wait_ms = 0, 0
    if chosen >= 0 and settled == 0:
        if rpm > 0 and requests + 1 > rpm:
            limited = 1
            nth = r.zrange(rl_req_key, requests - rpm, requests - rpm)
            wait_ms = max(1, int(nth[0][1]) + WINDOW_MS - now_ms)
        elif tpm > 0 and call_tokens > tpm:
            limited = 3
        elif tpm > 0 and tokens + call_tokens > tpm:
            limited = 2
            freed = 0
            for id_, at in r.zrange(rl_tok_key, 0, -1):
                freed += num_or_0(r.hget(rl_tok_n_key, id_))
                if tokens - freed + call_tokens <= tpm:
                    wait_ms = max(1, int(at) + WINDOW_MS - now_ms)
                    break

    def queue(event: str, period: str, period_id: str, spent: int, limit: int, level: str | None = None) -> None:
        if not queue_alerts:
            return
        fields: list[Any] = ['event', event, 'tenant', tenant, 'period', period, 'period_id', period_id,
                             'threshold', '', 'spent', spent, 'limit', limit, 'at_ms', now_ms]
        if level is not None:
            fields += ['level', level]
        entry = r.xadd(alerts_key, fields, maxlen=10000)
        r.zadd(alerts_due_key, now_ms, entry)

    exhausted, refused_by = 0, 0
    if chosen < 0:
        for i in range(candidates):
            if fits_v4(worst(i)):
                refused_by = refusing_cap(i)
                break
    job_refused = False
    if chosen < 0 and job_cap >= 0:
        for i in range(candidates):
            if fits_tenant(worst(i)):
                job_refused = True
    if refused_by > 0:
        exhausted = 4
        cap = caps[refused_by - 1]
        if not provisional and r.hsetnx(cap['flags'], 'blocked_event:' + cap['scope'], now_ms) == 1:
            r.expire(cap['flags'], cap['ttl'])
            queue('blocked', cap['window'], cap['period'], cap_used[refused_by - 1], cap['limit'], cap['level'])
    elif job_refused:
        exhausted = 3
    elif chosen < 0:
        exhausted = 1
        if used_month + worst(candidates - 1) > hard_month:
            exhausted = 2
        flags, ttl = flags_day_key, day_ttl
        period, period_id, spent, limit = 'day', day_id, used_day - reserved, limit_day
        if exhausted == 2:
            flags, ttl = flags_month_key, month_ttl
            period, period_id, spent, limit = 'month', month_id, used_month - reserved, limit_month
        if not provisional:
            r.hset(flags, 'blocked', now_ms)
            r.expire(flags, ttl)
            if r.hsetnx(flags, 'blocked_event', now_ms) == 1:
                queue('blocked', period, period_id, spent, limit)
    elif settled == 0 and limited == 0:
        amount = worst(chosen)
        r.zadd(resv_key, now_ms + lease_ms, reservation_id)
        r.hset(resv_amount_key, reservation_id, amount)
        r.incrby(reserved_key, amount)
        if job != '':
            r.hset(resv_job_key, reservation_id, job)
            r.hincrby(job_held_key, job, amount)
        booked, seen = '', set()
        for c, cap in enumerate(caps):
            if applies(cap, chosen):
                if cap['own'] == 1 and 'h ' + cap['held'] not in seen:
                    seen.add('h ' + cap['held'])
                    r.incrby(cap['held'], amount)
                    booked += 'h ' + cap['held'] + '\n'
                if 's ' + cap['spend'] not in seen:
                    seen.add('s ' + cap['spend'])
                    booked += 's ' + '\t'.join(str(cap[f]) for f in ('ttl', 'limit', 'level', 'window', 'period',
                                                                     'scope', 'flags', 'spend')) + '\n'
                cap_used[c] += amount
        if booked != '':
            r.hset(resv_levels_key, reservation_id, booked)
            r.expire(resv_levels_key, day_ttl)
        r.hdel(flags_day_key, 'blocked')
        r.hdel(flags_month_key, 'blocked')
        if rpm > 0:
            r.zadd(rl_req_key, now_ms, reservation_id)
            r.pexpire(rl_req_key, WINDOW_MS * 2)
            requests += 1
        if tpm > 0:
            r.zadd(rl_tok_key, now_ms, reservation_id)
            r.hset(rl_tok_n_key, reservation_id, call_tokens)
            tokens = r.incrby(rl_tok_sum_key, call_tokens)
            for key in (rl_tok_key, rl_tok_n_key, rl_tok_sum_key):
                r.pexpire(key, WINDOW_MS * 2)
        by_day = used_day >= soft_day or used_day + worst(0) > hard_day
        by_month = used_month >= soft_month or used_month + worst(0) > hard_month
        if chosen > 0 and (by_day or by_month):
            flags, ttl, period, period_id, spent, limit = (flags_day_key, day_ttl, 'day', day_id,
                                                           used_day - reserved, limit_day)
            if not by_day:
                flags, ttl, period, period_id, spent, limit = (flags_month_key, month_ttl, 'month', month_id,
                                                               used_month - reserved, limit_month)
            if r.hsetnx(flags, 'downgrading', now_ms) == 1:
                r.expire(flags, ttl)
                queue('downgrading', period, period_id, spent, limit)
        elif downgraded_by > 0:
            cap = caps[downgraded_by - 1]
            if r.hsetnx(cap['flags'], 'downgrading:' + cap['scope'], now_ms) == 1:
                r.expire(cap['flags'], cap['ttl'])
                queue('downgrading', cap['window'], cap['period'], downgraded_used, num(cap['limit']), cap['level'])

    blocked = 0
    if r.hexists(flags_day_key, 'blocked') == 1 or r.hexists(flags_month_key, 'blocked') == 1:
        blocked = 1
    return [chosen, used_day, used_month, exhausted, soft_day, hard_day, soft_month, hard_month, settled,
            limited, rpm, tpm, requests, tokens, wait_ms, leaves_at(rl_req_key, rpm), leaves_at(rl_tok_key, tpm),
            blocked, job_cap, job_used, refused_by, *cap_used,
            *[v for cap in caps for v in (cap['hard'], cap['soft'], num(cap['limit']))]]


def settle_v4(r: Tx, K: list[Any], A: list[Any]) -> list[int]:
    # markers (epochs)
    marker_seq = _marker_seq(A[1])
    marker_mark = 0
    if marker_seq is not None:
        marker_mark = _score_or_0(r.zscore(K[20], 'mark'))
    if ((marker_seq is not None and (int(marker_seq) <= marker_mark or r.zscore(K[20], marker_seq) is not None))
            or (marker_seq is None and r.hexists(K[7], A[1]) == 1)):
        return [num_or_0(r.get(K[1])), num_or_0(r.get(K[2])), 0, 0]
    # end markers

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
    # markers (epochs)
    if marker_seq is not None:
        r.zadd(K[20], marker_seq, marker_seq)
        raised = num(A[16 + num(A[12])]) - 1
        if raised > marker_mark:
            r.zremrangebyscore(K[20], '-inf', raised)
            r.zadd(K[20], raised, 'mark')
        r.expire(K[20], A[3])
    else:
        r.hset(K[7], A[1], charge)
        r.expire(K[7], A[3])
    # end markers

    books = r.hget(K[19], A[1])
    given_books = A[15 + num(A[12])]
    if books is None and given_books != '':
        books = given_books
    if books is not None:
        alert_thresholds = num(A[12])
        for line in text(books).split('\n'):
            if line.startswith('h '):
                if amount is not None and r.decrby(line[2:], amount) <= 0:
                    r.delete(line[2:])
            elif line and charge > 0:
                ttl, cap_limit, level, window, period, scope, flags, key = line[2:].split('\t', 7)
                spent = r.incrby(key, charge)
                r.expire(key, ttl)
                if alert_thresholds > 0 and int(cap_limit) > 0:
                    at_ms = r.now_ms
                    for i in range(13, 13 + alert_thresholds):
                        if (spent * 1000000 >= int(cap_limit) * num(A[i])
                                and r.hsetnx(flags, 'threshold:' + scope + ':' + A[i], at_ms) == 1):
                            r.expire(flags, ttl)
                            entry = r.xadd(K[13], ['event', 'threshold', 'tenant', A[7], 'period', window,
                                                   'period_id', period, 'threshold', A[i], 'spent', spent,
                                                   'limit', cap_limit, 'at_ms', at_ms, 'level', level], maxlen=10000)
                            r.zadd(K[14], at_ms, entry)
        r.hdel(K[19], A[1])

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
    log_from = job_at + 4  # markers: after the floor
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


#: The SHA1 of the script each function transcribes (as ``register_script`` computes it: ``lua/shared.lua``
#: followed by the script's file, ``redis.base.script_source``) -> the function.
#: Written out, not computed from the files: a script edited without its transcription has none, and
#: the SQLite store refuses to run it (``tests/unit/test_sqlite_scripts.py`` fails meanwhile).
SCRIPTS: dict[str, Script] = {
    "61c012c6776cb241b4bbd541b6bdd5912eb7c209": settle_v4,  # settle.v4.lua
    "da3e016500064e9d77965eb0dded2df2b5cc70ce": admit_v5,  # admit.v5.lua
    "722f10b539391b0c33ce915f4aa3ccba5b01a1ca": renew_v1,  # renew.v1.lua
    "d574ea4ca531557e03532e19bd3073651ab4e569": claim_v1,  # claim.v1.lua
    "7a18016cd6cef422a087648719a67616c4a16644": loop_v1,  # loop.v1.lua
    "187e200913be798c2416fb13d195974650a34a93": velocity_v1,  # velocity.v1.lua
}
