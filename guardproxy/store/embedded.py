"""The embedded store: fakeredis, with the budget scripts run as Python twins of their Lua.

Without ``store.redis_url`` the data lives in an in-process fakeredis. fakeredis runs a script through
lupa and every call through RESP on both sides, which cost ~1 ms of CPU per request (issue 10). Here
``evalsha`` of admit.v4, settle.v4, renew.v1, claim.v1, loop.v1 and velocity.v1 runs a Python
transcription of the script instead: line for line the same commands, on fakeredis's own data (the dozen
most frequent done directly on its hashes, sorted sets and strings, the others by its own command
implementations), with no ``await`` between the first and the last, so a twin is as atomic in the event
loop as a script is in Redis. Every other caller (snapshots, admin, keys, jobs, alerts, cache) goes
through fakeredis unchanged and sees the same keys, TTLs included.

The Lua files stay the source of truth (they run on Redis); ``TWINS`` maps each file's SHA1 to its twin,
so an edited script with no edited twin falls back to fakeredis's Lua (correct, just slow) and
``tests/unit/test_embedded_twins.py`` fails until the twin follows. That test also runs generated
sequences of calls on both the Lua on a real redis-server and the twins and compares the replies and
every resulting key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis import exceptions as redis_errors

from guardproxy.store.compat import internals, require

# fakeredis's private modules: this module is their one seam (guardproxy/store/compat.py). A release that
# moves them stops this import with IncompatibleLibrary naming fakeredis, its version and this range.
FAKEREDIS_TESTED = ">=2.40,<2.42"
with internals("fakeredis", FAKEREDIS_TESTED):
    import fakeredis
    from fakeredis._command_args_parsing import Int
    from fakeredis._core import Item
    from fakeredis._helpers import SimpleError
    from fakeredis._msgs import WRONGTYPE_MSG
    from fakeredis._socket._fakesocket import FakeSocket
    from fakeredis.model import Hash, ZSet


def check_internals() -> None:
    """What the twins reach for on fakeredis's objects at run time is there (``IncompatibleLibrary`` if not)."""
    with internals("fakeredis", FAKEREDIS_TESTED):
        server = fakeredis.FakeServer(version=(7,))
        socket = FakeSocket(server, 0, client_class=fakeredis.FakeAsyncRedis)
        db = socket._db
    require(
        "fakeredis", FAKEREDIS_TESTED,
        FakeServer=(server, ("lock",)),
        FakeSocket=(socket, ("_db", "_name_to_func", "_run_command")),
        Database=(db, ("time", "get", "notify_watch", "__setitem__")),
        ZSet=(ZSet(), ("_byscore", "add", "discard")),
        Item=(Item(b""), ("value", "expireat")),
        Int=(Int, ("decode",)),
    )


check_internals()

Arg = str | int | bytes
Clock = Callable[[], float]
WINDOW_MS = 60000


class Commands:
    """``redis.call`` for the twins: one command on the server's data, as a script's call runs it."""

    def __init__(self, server: fakeredis.FakeServer, db: int, clock: Clock) -> None:
        self._socket = FakeSocket(server, db, client_class=fakeredis.FakeAsyncRedis)
        self._server = server
        self._clock = clock
        self._funcs: dict[str, tuple[Any, Any]] = {}

    def now_ms(self) -> int:
        """``TIME`` as the scripts read it: whole seconds * 1000 + microseconds // 1000."""
        return round(self._clock() * 1_000_000) // 1000

    def run(self, twin: Twin, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        with self._server.lock:
            # as fakeredis does before each command: expiry is judged at this time for the whole twin
            self._socket._db.time = time.time()
            return twin(self, [None, *map(_text, keys)], [None, *map(_text, args)])

    def __call__(self, name: str, *args: Arg) -> Any:
        direct = _DIRECT.get(name)
        if direct is not None:
            return direct(self, *args)
        found = self._funcs.get(name)
        if found is None:
            found = self._funcs[name] = self._socket._name_to_func(name.lower())
        func, sig = found
        result = self._socket._run_command(func, sig, [_bytes(a) for a in args], True)
        if isinstance(result, SimpleError):
            raise redis_errors.ResponseError(result.value)
        return result


Twin = Callable[[Commands, list[Any], list[Any]], Any]


# The commands the twins make most, straight on fakeredis's data; the others go through its commands. Reads
# as its commands read: an expired key is gone, a key of another type is WRONGTYPE.

def _value(r: Commands, key: Arg, kind: type) -> Any:
    item = r._socket._db.get(_bytes(key))
    if item is None:
        return None
    if type(item.value) is not kind:
        raise redis_errors.ResponseError(WRONGTYPE_MSG)
    return item.value


def _get(r: Commands, key: Arg) -> bytes | None:
    value: bytes | None = _value(r, key, bytes)
    return value


def _hget(r: Commands, key: Arg, field: Arg) -> bytes | None:
    fields = _value(r, key, Hash)
    return None if fields is None else fields.get(_bytes(field))


def _hexists(r: Commands, key: Arg, field: Arg) -> int:
    fields = _value(r, key, Hash)
    return 1 if fields is not None and _bytes(field) in fields else 0


def _hmget(r: Commands, key: Arg, *names: Arg) -> list[bytes | None]:
    fields = _value(r, key, Hash)
    return [None if fields is None else fields.get(_bytes(f)) for f in names]


def _zcard(r: Commands, key: Arg) -> int:
    members = _value(r, key, ZSet)
    return 0 if members is None else len(members)


def _zrangebyscore(r: Commands, key: Arg, low: Arg, high: Arg, *limit: Arg) -> list[bytes]:
    """The shape the twins use: ``-inf``, a score, ``LIMIT 0 count``: the members up to ``high``, lowest first."""
    if low != '-inf' or len(limit) != 3 or limit[0] != 'LIMIT' or int(limit[1]) != 0:
        raise ValueError(f"ZRANGEBYSCORE {low!r} {high!r} {limit!r}: the twins' fast one takes -inf x LIMIT 0 n")
    members = _value(r, key, ZSet)
    if members is None:
        return []
    top, count = float(high), int(limit[2])
    out: list[bytes] = []
    for score_, member in members._byscore:  # sorted by (score, member), as Redis orders them
        if score_ > top or len(out) == count:
            break
        out.append(member)
    return out


def _zscore(r: Commands, key: Arg, member: Arg) -> float | None:
    members = _value(r, key, ZSet)
    return None if members is None else members.get(_bytes(member))


# ... and the plain writes they make most (as Redis does them: a container left empty is deleted, a write keeps
# the key's TTL; a client WATCHing the key is told).

def _item(r: Commands, key: bytes, kind: type) -> Item | None:
    item: Item | None = r._socket._db.get(key)
    if item is not None and type(item.value) is not kind:
        raise redis_errors.ResponseError(WRONGTYPE_MSG)
    return item


def _new_item(r: Commands, key: bytes, value: Any) -> Item:
    item = r._socket._db[key] = Item(value)
    return item


def _hset(r: Commands, key: Arg, field: Arg, value: Arg) -> int:
    k = _bytes(key)
    item = _item(r, k, Hash) or _new_item(r, k, Hash())
    f = _bytes(field)
    added = f not in item.value
    item.value[f] = _bytes(value)
    r._socket._db.notify_watch(k)
    return int(added)


def _hdel(r: Commands, key: Arg, *fields: Arg) -> int:
    k = _bytes(key)
    item = _item(r, k, Hash)
    if item is None:
        return 0
    deleted = 0
    for f in map(_bytes, fields):
        if f in item.value:
            del item.value[f]
            deleted += 1
    if deleted:
        _written(r, k, item)
    return deleted


def _incrby(r: Commands, key: Arg, amount: Arg) -> int:
    k = _bytes(key)
    item = _item(r, k, bytes)
    try:
        total = (0 if item is None else Int.decode(item.value)) + Int.decode(_bytes(amount))
        encoded = Int.encode(total)
    except SimpleError as exc:
        raise redis_errors.ResponseError(exc.value) from None
    if item is None:
        _new_item(r, k, encoded)
    else:
        item.value = encoded
    r._socket._db.notify_watch(k)
    return total


def _decrby(r: Commands, key: Arg, amount: Arg) -> int:
    return _incrby(r, key, -int(amount))


def _zadd(r: Commands, key: Arg, *args: Arg) -> int:
    xx = args[0] == 'XX'
    score_, member = args[-2:]
    if len(args) != (3 if xx else 2):
        raise ValueError(f"ZADD {args!r}: the twins' fast ZADD takes [XX] score member")
    k, m = _bytes(key), _bytes(member)
    item = _item(r, k, ZSet)
    if item is None:
        if xx:
            return 0
        item = _new_item(r, k, ZSet())
    added = m not in item.value
    if xx and added:
        return 0
    if item.value.add(m, float(score_)):
        r._socket._db.notify_watch(k)
    return int(added)


def _zrem(r: Commands, key: Arg, *members: Arg) -> int:
    k = _bytes(key)
    item = _item(r, k, ZSet)
    if item is None:
        return 0
    before = len(item.value)
    for m in map(_bytes, members):
        item.value.discard(m)
    deleted = before - len(item.value)
    if deleted:
        _written(r, k, item)
    return deleted


def _written(r: Commands, key: bytes, item: Item) -> None:
    db = r._socket._db
    db.notify_watch(key)
    if not item.value:
        del db[key]


def _expire_in(r: Commands, key: Arg, seconds: float) -> int:
    k = _bytes(key)
    db = r._socket._db
    item: Item | None = db.get(k)
    if item is None:
        return 0
    expireat = db.time + seconds
    item.expireat = expireat  # type: ignore[assignment]  # fakeredis annotates it as None only
    db.schedule_expiry(k, expireat)
    db.notify_watch(k)
    return 1


def _expire(r: Commands, key: Arg, seconds: Arg) -> int:
    return _expire_in(r, key, int(seconds))


def _pexpire(r: Commands, key: Arg, ms: Arg) -> int:
    return _expire_in(r, key, int(ms) / 1000.0)


_DIRECT: dict[str, Callable[..., Any]] = {
    "GET": _get, "HGET": _hget, "HEXISTS": _hexists, "HMGET": _hmget, "ZCARD": _zcard, "ZSCORE": _zscore,
    "ZRANGEBYSCORE": _zrangebyscore,
    "HSET": _hset, "HDEL": _hdel, "INCRBY": _incrby, "DECRBY": _decrby, "ZADD": _zadd, "ZREM": _zrem,
    "EXPIRE": _expire, "PEXPIRE": _pexpire,
}


def _text(value: Arg) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: Arg) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def num(value: Arg) -> int:
    """Lua's ``tonumber`` of an integer reply or argument."""
    return int(value)


def num_or_0(value: Arg | None) -> int:
    """``tonumber(x or '0')``."""
    return 0 if value is None else int(value)


def negated(value: Arg) -> int:
    """The scripts' ``0 - tonumber(value)`` as a command argument (not ``-tonumber``: Lua's -0 reaches
    Redis as "-0", which HINCRBY refuses)."""
    return -num(value)


def score(value: Arg | float) -> int:
    """A sorted set's score (whole ms in every set the scripts keep)."""
    return int(float(value))


# -- the twins: each mirrors its guardproxy/store/lua/<name>.lua; KEYS[i] is K[i] and ARGV[i] is A[i] ------------

def admit_v4(r: Commands, K: list[Any], A: list[Any]) -> list[int]:
    now_ms = r.now_ms()

    for id_ in r('ZRANGEBYSCORE', K[3], '-inf', now_ms, 'LIMIT', 0, 100):
        amount = r('HGET', K[4], id_)
        if amount is not None:
            r('DECRBY', K[5], amount)
            r('HDEL', K[4], id_)
            job = r('HGET', K[16], id_)
            if job is not None:
                if r('HINCRBY', K[17], job, negated(amount)) <= 0:
                    r('HDEL', K[17], job)
                r('HDEL', K[16], id_)
        r('ZREM', K[3], id_)
    if r('ZCARD', K[3]) == 0:
        r('DEL', K[5])

    soft_day, hard_day = num(A[3]), num(A[4])
    soft_month, hard_month = num(A[5]), num(A[6])
    rpm, tpm = num(A[7]), num(A[8])
    limit_day, limit_month = num(A[14]), num(A[15])
    override = r('HMGET', K[6], 'soft_day', 'hard_day', 'soft_month', 'hard_month', 'rpm', 'tpm',
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

    reserved = num_or_0(r('GET', K[5]))
    used_day = num_or_0(r('GET', K[1])) + reserved
    used_month = num_or_0(r('GET', K[2])) + reserved

    def fits_tenant(worst: int) -> bool:
        return used_day + worst <= hard_day and used_month + worst <= hard_month

    job, job_cap, job_used = A[18], num(A[19]), 0
    if job != '':
        job_override = r('HGET', K[6], 'job_micros')
        if job_override is not None:
            job_cap = num(job_override)
        job_used = num_or_0(r('HGET', K[18], 'cost_micros')) + num_or_0(r('HGET', K[17], job))
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

    settled = 1 if r('HEXISTS', K[7], A[1]) == 1 else 0

    cutoff = now_ms - WINDOW_MS
    requests, tokens = 0, 0
    if rpm > 0:
        r('ZREMRANGEBYSCORE', K[8], '-inf', cutoff)
        requests = r('ZCARD', K[8])
    if tpm > 0:
        while True:
            aged = r('ZRANGEBYSCORE', K[9], '-inf', cutoff, 'LIMIT', 0, 1000)
            if not aged:
                break
            freed = sum(num_or_0(n) for n in r('HMGET', K[10], *aged))
            r('DECRBY', K[11], freed)
            r('HDEL', K[10], *aged)
            r('ZREM', K[9], *aged)
        if r('ZCARD', K[9]) > 0:
            tokens = num_or_0(r('GET', K[11]))
    call_tokens = num(A[9])

    def leaves_at(key: int, limit: int) -> int:
        if limit == 0:
            return 0
        oldest = r('ZRANGE', K[key], 0, 0, 'WITHSCORES')
        if not oldest:
            return 0
        return max(1, score(oldest[1]) + WINDOW_MS - now_ms)

    limited, wait_ms = 0, 0
    if chosen >= 0 and settled == 0:
        if rpm > 0 and requests + 1 > rpm:
            limited = 1
            nth = r('ZRANGE', K[8], requests - rpm, requests - rpm, 'WITHSCORES')
            wait_ms = max(1, score(nth[1]) + WINDOW_MS - now_ms)
        elif tpm > 0 and call_tokens > tpm:
            limited = 3
        elif tpm > 0 and tokens + call_tokens > tpm:
            limited = 2
            freed = 0
            for id_ in r('ZRANGE', K[9], 0, -1):
                freed += num_or_0(r('HGET', K[10], id_))
                if tokens - freed + call_tokens <= tpm:
                    wait_ms = max(1, score(r('ZSCORE', K[9], id_)) + WINDOW_MS - now_ms)
                    break

    def queue(event: str, period: str, period_id: str, spent: int, limit: int) -> None:
        if A[10] != '1':
            return
        entry = r('XADD', K[14], 'MAXLEN', '~', 10000, '*', 'event', event, 'tenant', A[11], 'period', period,
                  'period_id', period_id, 'threshold', '', 'spent', spent, 'limit', limit, 'at_ms', now_ms)
        r('ZADD', K[15], now_ms, entry)

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
            r('HSET', flags, 'blocked', now_ms)
            r('EXPIRE', flags, ttl)
            if r('HSETNX', flags, 'blocked_event', now_ms) == 1:
                queue('blocked', period, period_id, spent, limit)
    elif settled == 0 and limited == 0:
        amount = num(A[first + chosen])
        r('ZADD', K[3], now_ms + num(A[2]), A[1])
        r('HSET', K[4], A[1], amount)
        r('INCRBY', K[5], amount)
        if job != '':
            r('HSET', K[16], A[1], job)
            r('HINCRBY', K[17], job, amount)
        r('HDEL', K[12], 'blocked')
        r('HDEL', K[13], 'blocked')
        if rpm > 0:
            r('ZADD', K[8], now_ms, A[1])
            r('PEXPIRE', K[8], WINDOW_MS * 2)
            requests += 1
        if tpm > 0:
            r('ZADD', K[9], now_ms, A[1])
            r('HSET', K[10], A[1], call_tokens)
            tokens = r('INCRBY', K[11], call_tokens)
            for k in (9, 10, 11):
                r('PEXPIRE', K[k], WINDOW_MS * 2)
        if chosen > 0:
            flags, ttl, period, period_id, spent, limit = (K[12], A[16], 'day', A[12], used_day - reserved,
                                                           limit_day)
            if used_day < soft_day and used_day + num(A[first]) <= hard_day:
                flags, ttl, period, period_id, spent, limit = (K[13], A[17], 'month', A[13],
                                                               used_month - reserved, limit_month)
            if r('HSETNX', flags, 'downgrading', now_ms) == 1:
                r('EXPIRE', flags, ttl)
                queue('downgrading', period, period_id, spent, limit)

    blocked = 0
    if r('HEXISTS', K[12], 'blocked') == 1 or r('HEXISTS', K[13], 'blocked') == 1:
        blocked = 1
    return [chosen, used_day, used_month, exhausted, soft_day, hard_day, soft_month, hard_month, settled,
            limited, rpm, tpm, requests, tokens, wait_ms, leaves_at(8, rpm), leaves_at(9, tpm), blocked,
            job_cap, job_used]


def settle_v4(r: Commands, K: list[Any], A: list[Any]) -> list[int]:
    if r('HEXISTS', K[7], A[1]) == 1:
        return [num_or_0(r('GET', K[1])), num_or_0(r('GET', K[2])), 0, 0]

    live = 0
    amount = r('HGET', K[4], A[1])
    if amount is not None:
        live = 1
        r('DECRBY', K[5], amount)
        r('HDEL', K[4], A[1])
        held_by = r('HGET', K[15], A[1])
        if held_by is not None:
            if r('HINCRBY', K[16], held_by, negated(amount)) <= 0:
                r('HDEL', K[16], held_by)
            r('HDEL', K[15], A[1])
    r('ZREM', K[3], A[1])

    counted = r('HGET', K[8], A[1])
    if counted is not None:
        real = num(A[6])
        r('HSET', K[8], A[1], real)
        r('INCRBY', K[9], real - num(counted))

    charge = num(A[2])
    r('HSET', K[7], A[1], charge)
    r('EXPIRE', K[7], A[3])

    if charge > 0:
        day = r('INCRBY', K[1], charge)
        month = r('INCRBY', K[2], charge)
        r('EXPIRE', K[1], A[3])
        r('EXPIRE', K[2], A[4])
    else:
        day = num_or_0(r('GET', K[1]))
        month = num_or_0(r('GET', K[2]))

    thresholds = num(A[12])
    job_at = 13 + thresholds
    log_from = job_at + 2
    last = len(A) - 1  # Lua's #ARGV
    if charge > 0 and thresholds > 0:
        limit_day, limit_month = num(A[10]), num(A[11])
        override = r('HMGET', K[10], 'daily_micros', 'monthly_micros')
        if override[0] is not None:
            limit_day, limit_month = num(override[0]), num(override[1])
        now_ms = r.now_ms()
        periods = [('day', A[8], day, limit_day, K[11], A[3]), ('month', A[9], month, limit_month, K[12], A[4])]
        for name, period_id, spent, limit, flags, ttl in periods:
            for i in range(13, 13 + thresholds):
                if (limit > 0 and spent * 1000000 >= limit * num(A[i])
                        and r('HSETNX', flags, 'threshold:' + A[i], now_ms) == 1):
                    r('EXPIRE', flags, ttl)
                    entry = r('XADD', K[13], 'MAXLEN', '~', 10000, '*', 'event', 'threshold', 'tenant', A[7],
                              'period', name, 'period_id', period_id, 'threshold', A[i], 'spent', spent,
                              'limit', limit, 'at_ms', now_ms)
                    r('ZADD', K[14], now_ms, entry)

    job = A[job_at]
    if job != '' and last >= log_from:
        fields = {A[i]: A[i + 1] for i in range(log_from, last, 2)}
        prompt = num(fields.get('prompt_tokens', '0'))
        completion = num(fields.get('completion_tokens', '0'))
        model = fields.get('model', '')
        at_ms = r.now_ms()
        job_ttl = num(A[job_at + 1])
        r('HINCRBY', K[17], 'calls', 1)
        r('HINCRBY', K[17], 'prompt_tokens', prompt)
        r('HINCRBY', K[17], 'completion_tokens', completion)
        r('HINCRBY', K[17], 'cost_micros', charge)
        r('HINCRBY', K[17], 'model:' + model + ':calls', 1)
        r('HINCRBY', K[17], 'model:' + model + ':prompt_tokens', prompt)
        r('HINCRBY', K[17], 'model:' + model + ':completion_tokens', completion)
        r('HINCRBY', K[17], 'model:' + model + ':cost_micros', charge)
        r('HSETNX', K[17], 'first_at', at_ms)
        r('HSET', K[17], 'last_at', at_ms)
        r('EXPIRE', K[17], job_ttl)
        r('ZADD', K[18], at_ms, job)
        r('ZREMRANGEBYSCORE', K[18], '-inf', at_ms - job_ttl * 1000)
        r('EXPIRE', K[18], job_ttl)

    kept = num(A[5])
    if kept > 0 and last >= log_from:
        r('XADD', K[6], 'MAXLEN', '~', kept, '*', *A[log_from:])
        r('EXPIRE', K[6], A[4])
    return [day, month, live, 1]


def renew_v1(r: Commands, K: list[Any], A: list[Any]) -> list[bytes]:
    expiry = r.now_ms() + num(A[1])
    lost = []
    for id_ in A[2:]:
        if r('ZSCORE', K[1], id_) is not None:
            r('ZADD', K[1], 'XX', expiry, id_)
        else:
            lost.append(id_.encode())
    return lost


def claim_v1(r: Commands, K: list[Any], A: list[Any]) -> list[list[bytes]]:
    now_ms = r.now_ms()
    out = []
    for id_ in r('ZRANGEBYSCORE', K[2], '-inf', now_ms, 'LIMIT', 0, num(A[2])):
        entry = r('XRANGE', K[1], id_, id_)
        if not entry:
            r('ZREM', K[2], id_)
        else:
            r('ZADD', K[2], now_ms + num(A[1]), id_)
            attempts, hooks = r('HMGET', K[3], id_ + b':attempts', id_ + b':hooks')
            out.append([id_, b'0' if attempts is None else attempts, b'' if hooks is None else hooks,
                        *entry[0][1]])
    return out


def loop_v1(r: Commands, K: list[Any], A: list[Any]) -> list[int]:
    max_repeats, window_ms = num(A[2]), num(A[3])
    now_ms = r.now_ms()
    r('ZREMRANGEBYSCORE', K[1], '-inf', now_ms - window_ms)
    seen = r('ZCARD', K[1])
    if seen < max_repeats:
        r('ZADD', K[1], now_ms, A[1])
        r('PEXPIRE', K[1], window_ms)
        return [0, seen + 1, 0]
    oldest = r('ZRANGE', K[1], 0, 0, 'WITHSCORES')
    retry_ms = max(1, score(oldest[1]) + window_ms - now_ms)
    if A[5] == '1' and r('SET', K[2], now_ms, 'NX', 'PX', window_ms) is not None:
        entry = r('XADD', K[3], 'MAXLEN', '~', 10000, '*', 'event', 'loop', 'tenant', A[6], 'key', A[7], 'job', A[8],
                  'digest', A[9], 'repeats', seen + 1, 'max_repeats', max_repeats, 'window_ms', window_ms,
                  'action', A[4], 'at_ms', now_ms)
        r('ZADD', K[4], now_ms, entry)
    return [1, seen + 1, retry_ms]


def velocity_v1(r: Commands, K: list[Any], A: list[Any]) -> list[int]:
    # Lua's numbers are doubles: the products and quotients below are done in floats as the script does
    charge, factor_ppm, baseline_hours, min_micros = num(A[1]), num(A[2]), num(A[3]), num(A[4])
    now_ms = r.now_ms()
    hour = now_ms // 3600000
    current = r('HINCRBY', K[1], hour, charge)
    r('EXPIRE', K[1], (baseline_hours + 3) * 3600)
    if r('HLEN', K[1]) > baseline_hours + 2:
        for name in r('HKEYS', K[1]):
            if int(name) < hour - baseline_hours - 1:
                r('HDEL', K[1], name)
    previous = num_or_0(r('HGET', K[1], hour - 1))
    into_hour_ms = now_ms - hour * 3600000
    last_hour = current + math.floor(float(previous) * (3600000 - into_hour_ms) / 3600000)
    baseline = sum(num_or_0(r('HGET', K[1], h)) for h in range(hour - 1 - baseline_hours, hour - 1))
    average = math.floor(baseline / baseline_hours)
    queued = 0
    if (baseline > 0 and last_hour >= min_micros
            and float(last_hour) * baseline_hours * 1000000 > float(factor_ppm) * baseline
            and r('GET', K[2]) != str(hour).encode()):
        r('SET', K[2], hour, 'EX', 7200)
        if A[5] == '1':
            entry = r('XADD', K[3], 'MAXLEN', '~', 10000, '*', 'event', 'velocity', 'tenant', A[6], 'period', 'hour',
                      'hour', hour, 'spent', last_hour, 'baseline', average,
                      'limit', math.floor(float(factor_ppm) * baseline / baseline_hours / 1000000),
                      'factor_ppm', factor_ppm, 'at_ms', now_ms)
            r('ZADD', K[4], now_ms, entry)
        queued = 1
    return [last_hour, average, queued]


#: The SHA1 of the script each twin transcribes (as ``register_script`` computes it) -> the twin. Written
#: out, not computed from the files: a script edited without its twin then has no twin, and the
#: embedded store runs the edited Lua (slowly, but right) until the twin and its SHA1 follow
#: (``tests/unit/test_embedded_twins.py`` fails meanwhile).
TWINS: dict[str, Twin] = {
    "2ff74c0d2bf5efffe24dbcf9d586219c7a587492": admit_v4,  # admit.v4.lua
    "34ce43d1a471f9dc9ecedf2b185792d3251be9db": settle_v4,  # settle.v4.lua
    "7322ef8d3a9e153870c4d861e1ec3a74a9657e58": renew_v1,  # renew.v1.lua
    "eafc744244492addcca55033717156bebf097d85": claim_v1,  # claim.v1.lua
    "71a9dbdd588a0ece07db234cdd9877c00d852234": loop_v1,  # loop.v1.lua
    "daa2702f77aea023bb135d283b04c7b62f4a798e": velocity_v1,  # velocity.v1.lua
}


class EmbeddedRedis(fakeredis.FakeAsyncRedis):
    """An in-process fakeredis (its own server unless given one) whose budget scripts run as twins.

    ``clock`` (seconds since the epoch) is what the twins read as ``TIME``; the tests set it.
    """

    def __init__(self, *, server: fakeredis.FakeServer | None = None, clock: Clock = time.time,
                 **kwargs: Any) -> None:
        server = server or fakeredis.FakeServer(version=(7,))
        super().__init__(server=server, **kwargs)
        self._twins = Commands(server, int(kwargs.get("db", 0)), clock)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:  # type: ignore[override]
        twin = TWINS.get(sha)
        if twin is None:
            return await super().evalsha(sha, numkeys, *keys_and_args)
        return self._twins.run(twin, keys_and_args[:numkeys], keys_and_args[numkeys:])
