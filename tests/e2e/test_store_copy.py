"""``guardproxy store copy``: a user outgrowing one box moves to Redis mid-month, and back, with every budget intact.

A SQLite store is filled the way a serving proxy fills it (admissions, settlements with call logs, jobs,
overrides, runtime keys, external bookings, alert events, a live reservation); the copy into a real
redis-server (through the CLI) and back into a new SQLite file must hold the same keys, values and TTLs,
and the next admission on each must see the same spend.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import AlertArgs, JobArgs, Reservation
from guardproxy.config.settings import StoreConfig
from guardproxy.store.copy import copy_store, open_store
from guardproxy.store.keys import KeyRing
from guardproxy.store.redis import BudgetStore
from guardproxy.store.redis.base import text
from tests.helpers import guardproxy

pytestmark = pytest.mark.anyio
PERIODS = periods_at(datetime.now(UTC), ZoneInfo("UTC"))
LIMITS = Thresholds(soft_day=8_000, hard_day=10_000, soft_month=80_000, hard_month=100_000)
HOUR_MS = 3_600_000


async def fill(store: BudgetStore) -> None:
    alerts = AlertArgs(10_000, 100_000, (500_000,), enabled=True)
    for i in range(5):
        admitted = await store.admit("acme", PERIODS, LIMITS, [1_500, 300], f"r{i}", HOUR_MS, alerts=alerts,
                                     job=JobArgs("J7", 50_000))
        assert admitted.reservation is not None
        await store.settle(admitted.reservation, 1_200, {"model": "gpt-4o", "prompt_tokens": 10,
                                                         "completion_tokens": 20, "outcome": "ok"}, alerts)
    live = await store.admit("globex", PERIODS, LIMITS, [700], "held", HOUR_MS)
    assert live.reservation is not None
    await store.set_override("globex", {"daily_micros": "5000", "monthly_micros": "9000"})
    await store.booking_day("acme", "ext:1", PERIODS.day)
    await KeyRing(store).create("acme", "night shift")
    await store.register_tenant("acme")
    # ids <epoch>.<seq> (store.markers): released, one under the mark, one above it
    epoch = await store.new_epoch()
    for seq, floor in ((1, 2), (2, 0), (3, 3)):
        admitted = await store.admit("acme", PERIODS, LIMITS, [100], f"{epoch}.{seq}", HOUR_MS)
        assert admitted.reservation is not None
        await store.settle(admitted.reservation, 0, floor=floor)


async def dump(store: BudgetStore) -> dict[str, Any]:
    out: dict[str, Any] = {}
    client = store.client
    for key in sorted({text(k) async for k in client.scan_iter(match=f"{store.prefix}:*")}):
        kind = text(await client.type(key))
        read = {"string": client.get, "hash": client.hgetall, "set": client.smembers, "stream": client.xrange,
                "zset": lambda k: client.zrange(k, 0, -1, withscores=True)}[kind]
        out[key] = (kind, await read(key), await client.ttl(key))
    return out


def same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, (kind, value, ttl) in a.items():
        assert b[key][:2] == (kind, value), key
        # the copy's TTL: the one left when copied (seconds pass between the dumps, on a busy machine too)
        assert 0 <= ttl - b[key][2] <= 60 or ttl == b[key][2] == -1, (key, ttl, b[key][2])


async def next_admission(store: BudgetStore) -> tuple[int, int, int]:
    a = await store.admit("acme", PERIODS, LIMITS, [100], "after-copy", HOUR_MS)
    g = await store.admit("globex", PERIODS, LIMITS, [100], "after-copy", HOUR_MS)
    return a.decision.used_day, a.decision.used_month, g.decision.used_day


async def test_sqlite_to_redis_and_back_keeps_every_budget(tmp_path: Path, redis_url: str) -> None:
    first_url, last_url = f"sqlite://{tmp_path}/first.db", f"sqlite://{tmp_path}/last.db"
    first = open_store(first_url, "gp")
    try:
        await fill(first)
        before = await dump(first)
    finally:
        await first.aclose()
    assert len(before) > 15 and any(kind == "stream" for kind, _, _ in before.values())

    done = guardproxy("store", "copy", "--from", first_url, "--to", redis_url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"copied {len(before)} keys")
    again = guardproxy("store", "copy", "--from", first_url, "--to", redis_url)
    assert again.returncode == 1 and "already holds keys" in again.stderr

    on_redis = BudgetStore.from_config(StoreConfig(redis_url=redis_url))
    last = open_store(last_url, "gp")
    try:
        same(before, await dump(on_redis))
        copied = await copy_store(on_redis, last)
        assert copied.keys == len(before)
        same(before, await dump(last))
        # every budget continues exactly: 5 x 1_200 settled + globex's live 700
        assert await next_admission(on_redis) == (6_000, 6_000, 700) == await next_admission(last)
        assert await last.settled_charge("acme", PERIODS.day, "r3") == 1_200
        assert (await last.job_usage("acme", "J7")) == (await on_redis.job_usage("acme", "J7"))
        assert [k.name for k in await KeyRing(last).list("acme")] == ["night shift"]
        # the epoch counter and the epoch's markers came along: no new process reuses the epoch, and no
        # id of it settles twice
        assert await last.new_epoch() == 2 == await on_redis.new_epoch()
        for seq in (1, 2, 3):
            replay = Reservation(f"1.{seq}", "acme", PERIODS.day, PERIODS.month, 100)
            assert not (await last.settle(replay, 100)).applied
            assert not (await on_redis.settle(replay, 100)).applied
    finally:
        await on_redis.aclose()
        await last.aclose()
    with redis.Redis.from_url(redis_url) as sync:
        assert sync.xlen("gp:{acme}:calls") == 5
