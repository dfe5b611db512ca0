"""Budget levels and windows (admit.v5 + settle.v4's levels block) hold their caps under concurrency,
on every backend of ``tests/stores.py``, over two replicas (two store clients on the same store).

Each scenario sends 200 concurrent calls, alternating between the two clients; every admitted call
settles its worst case. A cap of C with a worst case of W admits exactly C // W calls (0 overshoot,
none refused that fitted), the level's spend counter ends at exactly the sum charged, every hold is
freed, and a refusal names the level and window that refused it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import anyio
import pytest
import redis

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.levels import LevelArgs, LevelCap
from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import Admission
from guardproxy.config.settings import StoreConfig
from guardproxy.errors import StoreUnavailable
from guardproxy.store.layout import GlobalKeys
from guardproxy.store.redis import BudgetStore
from guardproxy.store.sqlite import SqliteClient
from tests.stores import BACKENDS, PREFIX

pytestmark = pytest.mark.anyio

PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
PERIOD_OF = {"hour": "2026-11-22T12", "day": "2026-11-22", "week": "2026-W47", "month": "2026-11"}
ROOMY = Thresholds(10**12, 10**12, 10**13, 10**13)
HOUR_MS = 3_600_000
CALLS = 200
WORST = 7_000
CAP = 500_000  # 71 calls of 7,000 fit (497,000); the 72nd would overshoot
TAG = "all-tenants"


@pytest.fixture(params=[b.name for b in BACKENDS])
async def replicas(request: pytest.FixtureRequest) -> AsyncIterator[tuple[BudgetStore, BudgetStore]]:
    """Two store clients on one empty store of each backend; one hash tag for every tenant, as
    ``budgets.global`` needs on a cluster (``store.hash_tag``)."""
    name = request.param
    if name == "sqlite":
        path = request.getfixturevalue("tmp_path") / "spend.db"
        stores = [BudgetStore(SqliteClient(path), PREFIX, hash_tag=TAG) for _ in range(2)]
    else:
        if name == "redis":
            url = request.getfixturevalue("redis_server").url
            with redis.Redis.from_url(url) as sync:
                sync.flushall()
        else:
            url = request.getfixturevalue("sentinel_url" if name == "sentinel" else "cluster_url")
        stores = [BudgetStore.from_config(StoreConfig(redis_url=url, key_prefix=PREFIX, hash_tag=TAG))
                  for _ in range(2)]
    try:
        for store in stores:  # one after the other: each opens (on SQLite: sets up) its connection
            await store.ping()
        for store in stores:
            await open_connections(store)
        yield stores[0], stores[1]
    finally:
        for store in stores:
            await store.aclose()


async def open_connections(store: BudgetStore) -> None:
    """``CALLS // 2`` pings at once: the pool's connections are opened before the burst, not during it.
    Through Sentinel each new connection first asks the three Sentinels for the primary; on a busy machine
    100 of them at once can miss the store's 2 s deadline, and the pings that missed it are sent again
    (a wave is no part of what the test checks; the burst then finds its connections open)."""
    for _ in range(3):
        missed = 0

        async def ping() -> None:
            nonlocal missed
            try:
                await store.ping()
            except StoreUnavailable:
                missed += 1

        async with anyio.create_task_group() as tg:
            for _ in range(CALLS // 2):
                tg.start_soon(ping)
        if not missed:
            return
    raise AssertionError(f"{missed} of {CALLS // 2} pings missed the store's deadline three times")


def cap(level: str, window: str, limit: int = CAP, model: str = "") -> LevelCap:
    scope = {"global": "global", "tenant": "tenant", "key": "key:k1", "model": f"model:{model}"}[level]
    return LevelCap(level, scope, window, PERIOD_OF[window], limit, limit, limit, model=model)


async def burst(
    replicas: tuple[BudgetStore, BudgetStore], tenants: list[str], levels: LevelArgs, worst: list[int],
) -> list[Admission]:
    """``CALLS`` concurrent calls over both replicas and ``tenants``; each admitted call settles its worst case."""
    results: list[Admission] = []

    async def one(i: int) -> None:
        store = replicas[i % 2]
        admission = await store.admit(tenants[i % len(tenants)], PERIODS, ROOMY, worst, f"c{i}", HOUR_MS,
                                      levels=levels)
        results.append(admission)
        if admission.reservation is not None:
            await anyio.sleep(0.001 * (i % 5))
            await store.settle(admission.reservation, admission.reservation.amount)

    async with anyio.create_task_group() as tg:
        for i in range(CALLS):
            tg.start_soon(one, i)
    return results


async def get_int(store: BudgetStore, key: str) -> int:
    return int(await store.client.get(key) or 0)


LEVEL_WINDOWS = [("global", w) for w in ("hour", "day", "week", "month")] + [
    ("tenant", "hour"), ("tenant", "week")] + [("key", w) for w in ("hour", "day", "week", "month")] + [
    ("model", w) for w in ("hour", "day", "week", "month")]


@pytest.mark.parametrize(("level", "window"), LEVEL_WINDOWS)
async def test_each_level_and_window_holds_its_cap_under_200_concurrent_calls(
    replicas: tuple[BudgetStore, BudgetStore], level: str, window: str,
) -> None:
    limit = cap(level, window, model="m1" if level == "model" else "")
    tenants = ["acme", "globex", "initech"] if level == "global" else ["acme"]
    results = await burst(replicas, tenants, LevelArgs((limit,), ("m1",)), [WORST])

    admitted = [a for a in results if a.decision.admitted]
    assert len(admitted) == CAP // WORST  # all that fit, and not one more
    refused = [a for a in results if not a.decision.admitted]
    assert refused and all(a.decision.exhausted == "level" and a.refused_by == limit for a in refused)
    store = replicas[0]
    where = GlobalKeys(PREFIX, TAG) if level == "global" else store.keys("acme")
    spent = await get_int(store, where.level_spend(limit.scope, window, limit.period))
    assert spent == len(admitted) * WORST <= CAP
    if level != "tenant":
        assert await store.client.get(where.level_held(limit.scope)) is None  # every hold freed
    for tenant in tenants:
        assert await store.client.hlen(store.keys(tenant).reservation_levels) == 0  # every book settled


async def test_every_level_at_once_refuses_at_the_tightest(replicas: tuple[BudgetStore, BudgetStore]) -> None:
    caps = (cap("global", "day", 900_000), cap("tenant", "hour", 800_000), cap("key", "day", 300_000),
            cap("model", "month", 600_000, model="m1"))
    results = await burst(replicas, ["acme"], LevelArgs(caps, ("m1",)), [WORST])
    admitted = [a for a in results if a.decision.admitted]
    assert len(admitted) == 300_000 // WORST
    assert {a.refused_by.level for a in results if a.refused_by is not None} == {"key"}
    store = replicas[0]
    for c in caps:
        where = GlobalKeys(PREFIX, TAG) if c.level == "global" else store.keys("acme")
        assert await get_int(store, where.level_spend(c.scope, c.window, c.period)) == len(admitted) * WORST


async def test_a_model_cap_moves_the_chain_on_then_refuses_past_the_last(
    replicas: tuple[BudgetStore, BudgetStore],
) -> None:
    """m1's daily cap full: calls go to m2 (its own cap), then past the last tier: 429 at the model level."""
    caps = (cap("model", "day", 140_000, model="m1"), cap("model", "day", 60_000, model="m2"))
    results = await burst(replicas, ["acme"], LevelArgs(caps, ("m1", "m2")), [WORST, 3_000])
    to_m1 = [a for a in results if a.decision.index == 0]
    to_m2 = [a for a in results if a.decision.index == 1]
    assert len(to_m1) == 140_000 // WORST and len(to_m2) == 60_000 // 3_000
    refused = [a for a in results if not a.decision.admitted]
    assert len(refused) == CALLS - len(to_m1) - len(to_m2)
    assert all(a.refused_by is not None and a.refused_by.level == "model" for a in refused)
    k = replicas[0].keys("acme")
    assert await get_int(replicas[0], k.level_spend("model:m1", "day", PERIOD_OF["day"])) == len(to_m1) * WORST
    assert await get_int(replicas[0], k.level_spend("model:m2", "day", PERIOD_OF["day"])) == len(to_m2) * 3_000


async def test_a_settlement_charges_every_level_once_even_after_its_lease_ran_out(
    replicas: tuple[BudgetStore, BudgetStore],
) -> None:
    a, b = replicas
    caps = (cap("key", "hour"), cap("global", "week"))
    admission = await a.admit("acme", PERIODS, ROOMY, [WORST], "late", 1, levels=LevelArgs(caps, ("m1",)))
    assert admission.reservation is not None
    await anyio.sleep(0.05)
    # another replica's admission sweeps the expired lease: the holds free, the books stay for the settlement
    await b.admit("acme", PERIODS, ROOMY, [WORST], "other", HOUR_MS, levels=LevelArgs(caps, ("m1",)))
    for _ in range(2):  # a retried settlement is not charged again
        await b.settle(admission.reservation, 5_000)
    k, g = a.keys("acme"), GlobalKeys(PREFIX, TAG)
    assert await get_int(a, k.level_spend("key:k1", "hour", PERIOD_OF["hour"])) == 5_000
    assert await get_int(a, g.level_spend("global", "week", PERIOD_OF["week"])) == 5_000
    assert await get_int(a, k.level_held("key:k1")) == WORST  # only "other" holds now
