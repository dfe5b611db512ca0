"""The SQLite store's scripts (``guardproxy/store/sqlite_scripts.py``) against the Lua scripts on a real redis-server.

Hypothesis draws sequences of admissions, settlements (duplicates, releases, jobs, alert thresholds),
lease renewals, alert claims, overrides and clock steps (leases expire, rate windows slide) on one
tenant; each runs through ``BudgetStore`` on both stores. Every script reply and, at the end, every key
(type, value, TTL) must be the same. Both sides read one test clock: the SQLite store through
``SqliteClient``'s ``clock``, the Lua through its ``redis.call('TIME')`` rewritten to read a clock key (the
only change to the scripts); TTLs run on real time on both. Stream entry ids come from each side's own
clock, so they are compared by position.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from guardproxy.budget.decision import RateLimits, Thresholds
from guardproxy.budget.levels import NO_LEVELS, LevelArgs, LevelCap
from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import AlertArgs, JobArgs, Reservation
from guardproxy.store.redis import BudgetStore
from guardproxy.store.redis.base import script_source
from guardproxy.store.sqlite import SqliteClient
from guardproxy.store.sqlite_scripts import SCRIPTS as TRANSCRIPTIONS

TENANT = "acme"
PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
CLOCK_KEY = "test:clock"
SCRIPTS = ("admit.v5.lua", "settle.v4.lua", "renew.v1.lua", "claim.v1.lua", "loop.v1.lua", "velocity.v1.lua")


def source(name: str) -> str:
    return script_source(name)


def test_every_script_has_a_transcription(tmp_path: Any) -> None:
    """An edited script must come with its edited transcription (until then the SQLite store refuses it)."""
    store = BudgetStore(SqliteClient(tmp_path / "spend.db"), "gp")
    scripts = (store._admit, store._settle, store._renew, store._claim, store._loop, store._velocity)
    assert {s.sha for s in scripts} == set(TRANSCRIPTIONS)
    assert all("redis.call('TIME')" in source(name) for name in SCRIPTS)
    with pytest.raises(RuntimeError, match="no transcription"):
        SqliteClient(tmp_path / "other.db").register_script(source("admit.v5.lua") + "\n-- edited")


# -- the two stores, recording every script reply ---------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now_s = time.time()

    def __call__(self) -> float:
        return self.now_s


class LuaOnRedis(aioredis.Redis):
    """A real redis-server running the scripts as they are, but for TIME read from ``CLOCK_KEY``."""

    lua_by_sha: ClassVar[dict[str, str]] = {}

    def __init__(self, url: str, clock: Clock) -> None:
        super().__init__(connection_pool=aioredis.ConnectionPool.from_url(url))
        self.clock = clock
        self.replies: list[Any] = []

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        us = round(self.clock() * 1_000_000)
        await self.hset(CLOCK_KEY, mapping={"s": us // 1_000_000, "us": us % 1_000_000})
        try:
            reply = await self.eval(self.lua_by_sha[sha], numkeys, *keys_and_args)
        except Exception as exc:
            self.replies.append(("error", type(exc).__name__))
            raise
        self.replies.append(reply)
        return reply


class RecordingSqlite(SqliteClient):
    def __init__(self, path: str, clock: Clock) -> None:
        super().__init__(path, clock=clock, ttl_clock=time.time)
        self.replies: list[Any] = []

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        try:
            reply = await super().evalsha(sha, numkeys, *keys_and_args)
        except Exception as exc:
            self.replies.append(("error", type(exc).__name__))
            raise
        self.replies.append(reply)
        return reply


for _name in SCRIPTS:
    _sha = hashlib.sha1(source(_name).encode()).hexdigest()
    LuaOnRedis.lua_by_sha[_sha] = source(_name).replace(
        "redis.call('TIME')", f"redis.call('HMGET', '{CLOCK_KEY}', 's', 'us')"
    )


# -- the operations ----------------------------------------------------------------------------------------

# uuid-like ids (per-day markers) and ids <epoch>.<seq> (markers by epoch, raised by a settle's floor)
IDS = [f"r{i}" for i in range(4)] + ["7.1", "7.2", "7.3", "7.4", "8.1"]
JOBS = ["", "J1", "J2"]


@dataclass(frozen=True)
class Admit:
    id: str
    lease_ms: int
    limits: Thresholds
    worst: list[int]
    rate: RateLimits
    call_tokens: int
    alerts: bool
    job: str
    job_cap: int | None
    provisional: bool
    levels: LevelArgs = NO_LEVELS


@dataclass(frozen=True)
class Settle:
    id: str
    charge: int
    record: dict[str, str | int] | None
    thresholds: tuple[int, ...]
    job: str
    job_ttl_s: int
    #: The levels a charge no admission booked names (settle's "books" argument).
    levels: tuple[LevelCap, ...] = ()
    floor: int = 0


@dataclass(frozen=True)
class Renew:
    ids: list[str]
    lease_ms: int


@dataclass(frozen=True)
class Claim:
    lease_ms: int
    limit: int


@dataclass(frozen=True)
class Override:
    fields: dict[str, str] = field(default_factory=dict)  # empty: clear it


@dataclass(frozen=True)
class Advance:
    ms: int


@dataclass(frozen=True)
class Repeat:
    """One request through the loop brake's count (``loop.v1.lua``)."""

    key: str
    job: str
    digest: str
    max_repeats: int
    window_ms: int
    action: str
    alerts: bool


@dataclass(frozen=True)
class Spend:
    """One charge into the velocity alert's hourly counter (``velocity.v1.lua``)."""

    charge: int
    factor_ppm: int
    baseline_hours: int
    min_micros: int
    alerts: bool


@st.composite
def thresholds(draw: st.DrawFn) -> Thresholds:
    hard_day = draw(st.integers(0, 1500))
    hard_month = draw(st.integers(hard_day, 4000))
    return Thresholds(draw(st.integers(0, hard_day)), hard_day, draw(st.integers(0, hard_month)), hard_month)


PERIOD_OF = {"hour": "2026-11-22T12", "day": "2026-11-22", "week": "2026-W47", "month": "2026-11"}
SCOPES = {"global": ["global"], "tenant": ["tenant"], "key": ["key:k1", "key:k2"], "model": ["model:m1", "model:m2"]}


@st.composite
def level_caps(draw: st.DrawFn) -> LevelCap:
    level = draw(st.sampled_from(list(SCOPES)))
    scope = draw(st.sampled_from(SCOPES[level]))
    window = draw(st.sampled_from(list(PERIOD_OF) if level != "tenant" else ["hour", "week"]))
    hard = draw(st.integers(0, 1500))
    return LevelCap(level, scope, window, PERIOD_OF[window], hard, draw(st.integers(0, hard)), hard,
                    model=scope.removeprefix("model:") if level == "model" else "")


# the caps of a call: mostly the same within one sequence (st.shared), so that they fill up
LEVEL_ARGS = st.builds(LevelArgs, st.lists(level_caps(), max_size=4).map(tuple),
                       st.lists(st.sampled_from(["m1", "m2", "m3"]), min_size=1, max_size=3).map(tuple))
RATES = st.builds(RateLimits, st.sampled_from([0, 1, 2, 3]), st.sampled_from([0, 60, 100]))
# mostly the same limits and rates within one sequence (st.shared), so windows and caps fill up
ADMITS = st.builds(Admit, id=st.sampled_from(IDS), lease_ms=st.sampled_from([1, 2_000, 60_000]),
                   limits=st.one_of(st.shared(thresholds(), key="limits"), thresholds()),
                   worst=st.lists(st.integers(0, 600), min_size=1, max_size=3),
                   rate=st.one_of(st.shared(RATES, key="rate"), RATES),
                   call_tokens=st.sampled_from([0, 1, 20, 30, 40, 59, 60, 61, 100, 120]), alerts=st.booleans(),
                   job=st.sampled_from(JOBS), job_cap=st.sampled_from([None, 0, 300, 1000]),
                   provisional=st.booleans(),
                   levels=st.one_of(st.just(NO_LEVELS), st.shared(LEVEL_ARGS, key="levels"), LEVEL_ARGS))
ops = st.one_of(
    ADMITS, ADMITS,  # twice as likely: the scripts' state builds up through admissions
    st.builds(Settle, id=st.sampled_from(IDS), charge=st.sampled_from([0, 0, 1, 100, 450, 900]),
              record=st.one_of(st.none(), st.fixed_dictionaries({
                  "model": st.sampled_from(["m1", "m2"]), "prompt_tokens": st.sampled_from([0, 10, 20, 30]),
                  "completion_tokens": st.sampled_from([0, 10, 30]), "outcome": st.just("ok")})),
              thresholds=st.sampled_from([(), (500_000,), (500_000, 1_000_000)]), job=st.sampled_from(JOBS),
              job_ttl_s=st.sampled_from([60, 3600]),
              levels=st.one_of(st.just(()), st.lists(level_caps(), max_size=3).map(tuple)),
              floor=st.sampled_from([0, 0, 1, 2, 3, 4, 6])),
    st.builds(Renew, ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=3, unique=True),
              lease_ms=st.sampled_from([1, 60_000])),
    st.builds(Claim, lease_ms=st.sampled_from([0, 1_000]), limit=st.sampled_from([1, 5])),
    st.builds(Override, st.one_of(st.just({}), thresholds().map(lambda t: {
        "soft_day": str(t.soft_day), "hard_day": str(t.hard_day), "soft_month": str(t.soft_month),
        "hard_month": str(t.hard_month), "rpm": "2", "daily_micros": "1000", "monthly_micros": "3000",
        "job_micros": "500"}), thresholds().map(lambda t: {  # the tenant's hour and week overridden too
        "soft_day": str(t.soft_day), "hard_day": str(t.hard_day), "soft_month": str(t.soft_month),
        "hard_month": str(t.hard_month), "hourly_micros": str(t.hard_day), "hard_hour": str(t.hard_day),
        "soft_hour": str(t.soft_day), "weekly_micros": str(t.hard_month), "hard_week": str(t.hard_month),
        "soft_week": str(t.soft_month)}))),
    st.builds(Advance, st.sampled_from([0, 1, 999, 2_500, 30_000, 61_000, 1_800_000, 3_600_000])),
    # windows long in real time too: the keys' PEXPIRE runs on each server's own clock
    st.builds(Repeat, key=st.sampled_from(["k1", "k2"]), job=st.sampled_from(JOBS),
              digest=st.sampled_from(["d1", "d2"]), max_repeats=st.shared(st.sampled_from([1, 2, 3]), key="repeats"),
              window_ms=st.shared(st.sampled_from([5_000, 60_000]), key="window"),
              action=st.sampled_from(["refuse", "alert"]), alerts=st.booleans()),
    st.builds(Spend, charge=st.sampled_from([1, 100, 5_000, 10**6]), factor_ppm=st.sampled_from([1_000_000, 2_500_000]),
              baseline_hours=st.shared(st.sampled_from([1, 2, 24]), key="baseline"),
              min_micros=st.sampled_from([0, 1_000]), alerts=st.booleans()),
)


async def apply(store: BudgetStore, clock: Clock, op: Any) -> None:
    if isinstance(op, Admit):
        await store.admit(TENANT, PERIODS, op.limits, op.worst, op.id, op.lease_ms, rate=op.rate,
                          call_tokens=op.call_tokens, alerts=AlertArgs(1000, 3000, enabled=op.alerts),
                          job=JobArgs(op.job, op.job_cap), provisional=op.provisional, levels=op.levels)
    elif isinstance(op, Settle):
        reservation = Reservation(op.id, TENANT, PERIODS.day, PERIODS.month, 0, op.job, op.levels)
        await store.settle(reservation, op.charge, op.record, AlertArgs(1000, 3000, op.thresholds), op.job_ttl_s,
                           floor=op.floor)
    elif isinstance(op, Renew):
        await store.renew([Reservation(i, TENANT, PERIODS.day, PERIODS.month, 0) for i in op.ids], op.lease_ms)
    elif isinstance(op, Claim):
        await store.claim_alerts([TENANT], op.lease_ms, op.limit)
    elif isinstance(op, Repeat):
        await store.count_repeat(TENANT, op.key, op.job, op.digest, f"q{clock.now_s}-{op}", op.max_repeats,
                                 op.window_ms, action=op.action, alerts=op.alerts)
    elif isinstance(op, Spend):
        await store.count_hourly_spend(TENANT, op.charge, op.factor_ppm, op.baseline_hours, op.min_micros,
                                       alerts=op.alerts)
    elif isinstance(op, Override):
        if op.fields:
            await store.set_override(TENANT, op.fields)
        else:
            await store.clear_override(TENANT)
    else:
        clock.now_s += op.ms / 1000


# -- comparing what the two stores hold ------------------------------------------------------------------


async def dump(client: Any) -> tuple[dict[str, Any], dict[bytes, str]]:
    """Every key's type, value and TTL (s); alert ids replaced by ``<stream>#<position>``, also where a
    zset or hash names them. Returns the dump and the id renaming (for the replies)."""
    # The tenant index is scored by the client's own clock (not the scripts'): left out.
    keys = sorted(k for k in await client.keys("*") if k not in (CLOCK_KEY.encode(), b"gp:tenant-index"))
    renamed: dict[bytes, str] = {}
    for key in keys:
        if key.endswith(b":alerts"):  # the one stream whose ids the scripts hand on
            for position, (entry_id, _) in enumerate(await client.xrange(key)):
                renamed[entry_id] = f"{key.decode()}#{position}"

    def name(value: bytes) -> str:
        for entry_id, new in renamed.items():
            value = value.replace(entry_id, new.encode())
        return value.decode()

    out: dict[str, Any] = {}
    for key in keys:
        kind = (await client.type(key)).decode()
        value: Any
        if kind == "string":
            value = await client.get(key)
        elif kind == "hash":
            value = {name(f): v for f, v in (await client.hgetall(key)).items()}
        elif kind == "zset":
            value = sorted((name(m), s) for m, s in await client.zrange(key, 0, -1, withscores=True))
        elif kind == "stream":
            value = [fields for _, fields in await client.xrange(key)]
        else:
            value = kind
        out[key.decode()] = (kind, value, await client.ttl(key))
    return out, renamed


def rename(reply: Any, renamed: dict[bytes, str]) -> Any:
    if isinstance(reply, list):
        return [rename(r, renamed) for r in reply]
    if isinstance(reply, bytes):
        return renamed.get(reply, reply)
    return reply


def same_ttl(a: int, b: int) -> bool:
    # seconds left, read a few ms apart on two servers (a key of a few seconds may round to 0 on one)
    return a == b or (a >= 0 and b >= 0 and abs(a - b) <= 2)


@pytest.fixture
def redis_url_for_twins(redis_server: Any) -> str:
    url: str = redis_server.url
    return url


ROOMY = Thresholds(10**6, 10**6, 10**7, 10**7)


def admit(id_: str, lease_ms: int = 60_000, call_tokens: int = 0, tpm: int = 0) -> Admit:
    return Admit(id_, lease_ms, ROOMY, [100], RateLimits(0, tpm), call_tokens, False, "", None, False)


@example(sequence=[admit("r0", 1), admit("r1", 1), Advance(999), admit("r2")])  # two leases expire at once
# markers: a mark raised, then replays under and above it
@example(sequence=[admit("7.1"), admit("7.2"), admit("7.3"), Settle("7.2", 100, None, (), "", 60, floor=1),
                   Settle("7.1", 100, None, (), "", 60, floor=3), Settle("7.2", 100, None, (), "", 60, floor=4),
                   admit("7.1"), Settle("7.3", 100, None, (), "", 60, floor=0), admit("7.4")])
@example(sequence=[*[Repeat("k1", "", "d1", 2, 5_000, "refuse", True)] * 4, Advance(5_000),
                   Repeat("k1", "", "d1", 2, 5_000, "refuse", True)])  # over the limit, alerted once, then free
@example(sequence=[Spend(100, 2_000_000, 2, 0, True), Advance(3_600_000), Advance(3_600_000),
                   Spend(100, 2_000_000, 2, 0, True), Spend(100, 2_000_000, 2, 0, True), Advance(1_800_000),
                   Spend(10**6, 2_000_000, 2, 0, True)])  # a baseline, then a spike that fires
@example(sequence=[admit("r0", call_tokens=20, tpm=60), Advance(999), admit("r1", call_tokens=40, tpm=60), Advance(999),
          admit("r2", call_tokens=20, tpm=60)])  # the tokens that must leave the window: exactly enough
@example(sequence=[  # spend right at the day's soft cap: the downgrade is the day's event
    Admit("r0", 60_000, Thresholds(100, 1000, 10**6, 10**7), [100], RateLimits(), 0, True, "", None, False),
    Admit("r1", 60_000, Thresholds(100, 1000, 10**6, 10**7), [200, 50], RateLimits(), 0, True, "", None, False),
])
@example(sequence=[  # a key's hour holds, then refuses; a settlement charges the key's counter, once
    Admit("r0", 60_000, ROOMY, [100], RateLimits(), 0, True, "", None, False,
          LevelArgs((LevelCap("key", "key:k1", "hour", PERIOD_OF["hour"], 150, 150, 150),), ("m1",))),
    Admit("r1", 60_000, ROOMY, [100], RateLimits(), 0, True, "", None, False,
          LevelArgs((LevelCap("key", "key:k1", "hour", PERIOD_OF["hour"], 150, 150, 150),), ("m1",))),
    Settle("r0", 90, None, (500_000,), "", 60), Settle("r0", 90, None, (500_000,), "", 60), Advance(61_000),
])
@example(sequence=[  # an override's hour replaces the tenant's hour cap: 150 -> 250 admits a second call
    Override({"soft_day": "1000000", "hard_day": "1000000", "soft_month": "10000000", "hard_month": "10000000",
              "hourly_micros": "250", "hard_hour": "250", "soft_hour": "200"}),
    *[Admit(f"r{i}", 60_000, ROOMY, [100], RateLimits(), 0, True, "", None, False,
            LevelArgs((LevelCap("tenant", "tenant", "hour", PERIOD_OF["hour"], 150, 150, 150),), ("m1",)))
      for i in range(3)],
])
@example(sequence=[  # a key's soft cap sends calls to the cheaper tier: one "downgrading" event with its level
    *[Admit(f"r{i}", 60_000, ROOMY, [100, 50], RateLimits(), 0, True, "", None, False,
            LevelArgs((LevelCap("key", "key:k1", "hour", PERIOD_OF["hour"], 1000, 0, 1000),), ("m1", "m2")))
      for i in range(2)],
])
@example(sequence=[  # a charge no admission booked: the levels it names, once (a replay charges nothing)
    *[Settle("x1", 900, None, (500_000,), "", 60, (LevelCap("global", "global", "day", PERIOD_OF["day"], 1500, 1500,
                                                            1500),
                                                   LevelCap("tenant", "tenant", "hour", PERIOD_OF["hour"], 1000, 900,
                                                            1000)))] * 2,
])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(sequence=st.lists(ops, min_size=1, max_size=30))
def test_sqlite_equals_the_lua_on_redis(redis_url_for_twins: str, sequence: list[Any]) -> None:
    async def main() -> None:
        lua_clock, twin_clock = Clock(), Clock()
        twin_clock.now_s = lua_clock.now_s
        lua = LuaOnRedis(redis_url_for_twins, lua_clock)
        await lua.flushall()
        folder = tempfile.TemporaryDirectory(prefix="gp-sqlite-")
        twins = RecordingSqlite(f"{folder.name}/spend.db", twin_clock)
        on_redis, embedded = BudgetStore(lua, "gp"), BudgetStore(twins, "gp")
        try:
            for op in sequence:
                outcomes = []
                for store, clock in ((on_redis, lua_clock), (embedded, twin_clock)):
                    try:
                        await apply(store, clock, op)
                        outcomes.append("ok")
                    except Exception as exc:  # both must fail alike
                        outcomes.append(type(exc).__name__)
                assert outcomes[0] == outcomes[1], op
            lua_keys, lua_ids = await dump(lua)
            twin_keys, twin_ids = await dump(twins)
            assert rename(lua.replies, lua_ids) == rename(twins.replies, twin_ids)
            assert {k: v[:2] for k, v in lua_keys.items()} == {k: v[:2] for k, v in twin_keys.items()}
            for key, (_, _, ttl) in lua_keys.items():
                assert same_ttl(ttl, twin_keys[key][2]), (key, ttl, twin_keys[key][2])
        finally:
            await on_redis.aclose()
            await embedded.aclose()
            folder.cleanup()

    asyncio.run(main())

