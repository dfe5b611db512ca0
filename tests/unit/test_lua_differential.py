"""admit.v1.lua / settle.v1.lua on the embedded store, against budget.decide and by hand.

The Lua script is what runs in production; ``budget.decide`` is its readable reference. The
differential test sets spend and live reservations directly in a fake Redis under the key names
of ``store.Keys`` and checks that both pick the same candidate and report the same figures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import fakeredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.budget import Thresholds, decide
from guardproxy.periods import Periods, periods_at
from guardproxy.store import DAY_KEY_TTL_S, MONTH_KEY_TTL_S, BudgetStore, Keys, Reservation

T = TypeVar("T")
TENANT = "acme"
PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
HOUR_MS = 3_600_000
DAY_S = 86_400


def new_store() -> BudgetStore:
    return BudgetStore(fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer()), "gp", embedded=True)


def run(scenario: Callable[[BudgetStore], Awaitable[T]]) -> T:
    """Run one async scenario on a fresh store, in its own event loop (keeps hypothesis sync)."""

    async def main() -> T:
        store = new_store()
        try:
            return await scenario(store)
        finally:
            await store.aclose()

    return asyncio.run(main())


async def hold(store: BudgetStore, reservation_id: str, amount: int, expires_in_ms: int = HOUR_MS) -> None:
    """A live reservation written the way admit.v1.lua writes one."""
    k = store.keys(TENANT)
    now_s, now_us = await store.client.time()
    await store.client.zadd(k.reservations, {reservation_id: now_s * 1000 + now_us // 1000 + expires_in_ms})
    await store.client.hset(k.reservation_amounts, reservation_id, amount)
    await store.client.incrby(k.reserved, amount)


async def get_int(store: BudgetStore, key: str) -> int:
    return int(await store.client.get(key) or 0)


# --- admit: differential against budget.decide ------------------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[int, int, list[int], Thresholds, list[int]]:
    # small scales make spend, caps and worst cases collide often; the large one checks big numbers
    scale = draw(st.sampled_from([10, 1_000, 10**10]))
    hard_day = draw(st.integers(0, scale))
    hard_month = draw(st.integers(0, 10 * scale))
    limits = Thresholds(
        soft_day=draw(st.integers(0, hard_day)), hard_day=hard_day,
        soft_month=draw(st.integers(0, hard_month)), hard_month=hard_month,
    )
    reserved = draw(st.lists(st.integers(0, scale // 4), max_size=3))

    def spend(soft: int, hard: int) -> int:
        # used (spend + reservations) anywhere, or right at a soft or hard cap (+/- 1)
        edge = st.sampled_from([soft, hard]).flatmap(lambda e: st.integers(e - 1, e + 1))
        used = draw(st.one_of(st.integers(0, 2 * hard + 1), edge))
        return max(0, used - sum(reserved))

    spend_day = spend(limits.soft_day, hard_day)
    spend_month = spend(limits.soft_month, hard_month)
    used_day = spend_day + sum(reserved)
    used_month = spend_month + sum(reserved)
    # worst cases near what is left before each cap (+/- 1) as well as anywhere
    near = st.sampled_from([hard_day - used_day, hard_month - used_month]).flatmap(
        lambda edge: st.integers(edge - 1, edge + 1)
    ).map(lambda w: max(0, w))
    worst = draw(st.lists(st.one_of(st.integers(0, scale), near), min_size=1, max_size=4))
    return spend_day, spend_month, reserved, limits, worst


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_admit_agrees_with_decide(scenario: tuple[int, int, list[int], Thresholds, list[int]]) -> None:
    spend_day, spend_month, reserved, limits, worst = scenario
    used_day, used_month = spend_day + sum(reserved), spend_month + sum(reserved)
    expected = decide(used_day, used_month, limits, worst)

    async def go(store: BudgetStore) -> tuple[Any, int, int]:
        k = store.keys(TENANT)
        await store.client.set(k.spend_day(PERIODS.day), spend_day)
        await store.client.set(k.spend_month(PERIODS.month), spend_month)
        for i, amount in enumerate(reserved):
            await hold(store, f"earlier-{i}", amount)
        admission = await store.admit(TENANT, PERIODS, limits, worst, "r-new", HOUR_MS)
        return admission, await get_int(store, k.reserved), await store.client.hlen(k.reservation_amounts)

    admission, reserved_after, live = run(go)
    assert admission.decision == expected
    assert admission.limits == limits
    if expected.index is None:
        assert admission.reservation is None
        assert reserved_after == sum(reserved)
        assert live == len(reserved)
    else:
        assert admission.reservation == Reservation("r-new", TENANT, PERIODS.day, PERIODS.month, worst[expected.index])
        assert reserved_after == sum(reserved) + worst[expected.index]
        assert live == len(reserved) + 1


GRID_LIMITS = [
    Thresholds(soft_day=6, hard_day=10, soft_month=16, hard_month=20),
    Thresholds(soft_day=10, hard_day=10, soft_month=20, hard_month=20),
    Thresholds(soft_day=0, hard_day=3, soft_month=0, hard_month=30),
]
GRID_WORST = [[0], [1], [4], [4, 1], [4, 5], [12, 4, 1], [12, 11, 10], [3, 2, 1, 0], [5, 4, 3, 2]]


def test_admit_agrees_with_decide_on_every_boundary() -> None:
    """Exhaustively, around each cap: every used value from 0 to past the hard caps, with and without
    a live reservation making up part of it."""
    cases = [
        (limits, used_day, used_month, held, worst)
        for limits in GRID_LIMITS
        for used_day in range(limits.hard_day + 3)
        for used_month in sorted({0, limits.soft_month - 1, limits.soft_month, limits.hard_month - 1,
                                  limits.hard_month, limits.hard_month + 1} - {-1})
        for held in {0, min(used_day, used_month, 2)}
        for worst in GRID_WORST
    ]

    async def go(store: BudgetStore) -> list[Any]:
        out = []
        for i, (limits, used_day, used_month, held, worst) in enumerate(cases):
            tenant = f"t{i}"
            k = store.keys(tenant)
            await store.client.set(k.spend_day(PERIODS.day), used_day - held)
            await store.client.set(k.spend_month(PERIODS.month), used_month - held)
            if held:
                await store.client.zadd(k.reservations, {"held": 2**50})
                await store.client.hset(k.reservation_amounts, "held", held)
                await store.client.set(k.reserved, held)
            out.append((await store.admit(tenant, PERIODS, limits, worst, "new", HOUR_MS)).decision)
        return out

    decisions = run(go)
    assert len(decisions) > 1000
    for (limits, used_day, used_month, _, worst), got in zip(cases, decisions, strict=True):
        assert got == decide(used_day, used_month, limits, worst), (limits, used_day, used_month, worst)


def test_admit_reserves_and_counts_own_reservations() -> None:
    limits = Thresholds(soft_day=800, hard_day=1000, soft_month=8000, hard_month=10000)

    async def go(store: BudgetStore) -> list[Any]:
        out = []
        for i in range(4):
            out.append(await store.admit(TENANT, PERIODS, limits, [300, 100], f"r{i}", HOUR_MS))
        return out

    first, second, third, fourth = run(go)
    assert [a.decision.used_day for a in (first, second, third, fourth)] == [0, 300, 600, 900]
    assert [a.decision.index for a in (first, second, third)] == [0, 0, 0]
    # 900 used: at the soft cap and 300 no longer fits; 100 fits exactly
    assert fourth.decision.index == 1
    assert fourth.reservation is not None
    assert fourth.reservation.amount == 100


def test_admit_refusal_names_the_period() -> None:
    limits = Thresholds(soft_day=8, hard_day=10, soft_month=80, hard_month=100)

    async def go(store: BudgetStore) -> tuple[Any, Any]:
        k = store.keys(TENANT)
        await store.client.set(k.spend_day(PERIODS.day), 10)
        day = await store.admit(TENANT, PERIODS, limits, [1], "a", HOUR_MS)
        await store.client.set(k.spend_month(PERIODS.month), 100)
        month = await store.admit(TENANT, PERIODS, limits, [1], "b", HOUR_MS)
        return day, month

    day, month = run(go)
    assert (day.decision.index, day.decision.exhausted) == (None, "day")
    assert (month.decision.index, month.decision.exhausted) == (None, "month")


def test_admit_uses_runtime_override() -> None:
    limits = Thresholds(soft_day=8, hard_day=10, soft_month=80, hard_month=100)
    override = Thresholds(soft_day=1, hard_day=5, soft_month=2, hard_month=50)

    async def go(store: BudgetStore) -> Any:
        await store.set_override(TENANT, {"soft_day": "1", "hard_day": "5", "soft_month": "2", "hard_month": "50"})
        return await store.admit(TENANT, PERIODS, limits, [6, 5], "a", HOUR_MS)

    admission = run(go)
    assert admission.limits == override
    assert admission.decision.index == 1


def test_keys_layout() -> None:
    k = Keys("gp", "acme")
    assert k.spend_day("2026-11-22") == "gp:{acme}:spend:day:2026-11-22"
    assert k.spend_month("2026-11") == "gp:{acme}:spend:month:2026-11"
    for key in (k.reservations, k.reservation_amounts, k.reserved, k.budget):
        assert key.startswith("gp:{acme}:")


# --- settle ----------------------------------------------------------------------------------


def reservation(rid: str, amount: int, periods: Periods = PERIODS) -> Reservation:
    return Reservation(rid, TENANT, periods.day, periods.month, amount)


LIMITS = Thresholds(soft_day=10**9, hard_day=10**9, soft_month=10**10, hard_month=10**10)


@pytest.mark.anyio
async def test_settle_charges_day_and_month_and_releases() -> None:
    store = new_store()
    k = store.keys(TENANT)
    await store.client.set(k.spend_day(PERIODS.day), 1_000)
    await store.client.set(k.spend_month(PERIODS.month), 50_000)
    a = (await store.admit(TENANT, PERIODS, LIMITS, [700], "a", HOUR_MS)).reservation
    b = (await store.admit(TENANT, PERIODS, LIMITS, [300], "b", HOUR_MS)).reservation
    assert a is not None and b is not None
    assert await get_int(store, k.reserved) == 1_000

    await store.settle(a, 123)
    assert await get_int(store, k.spend_day(PERIODS.day)) == 1_123
    assert await get_int(store, k.spend_month(PERIODS.month)) == 50_123
    assert await get_int(store, k.reserved) == 300
    assert await store.client.zscore(k.reservations, "a") is None
    assert await store.client.hget(k.reservation_amounts, "a") is None
    assert await store.client.zscore(k.reservations, "b") is not None

    # settling "a" again must not release b's money
    await store.settle(a, 0)
    assert await get_int(store, k.reserved) == 300
    assert await get_int(store, k.spend_day(PERIODS.day)) == 1_123

    await store.settle(b, 300)
    assert await get_int(store, k.reserved) == 0
    assert await get_int(store, k.spend_day(PERIODS.day)) == 1_423
    assert await get_int(store, k.spend_month(PERIODS.month)) == 50_423
    await store.aclose()


@pytest.mark.anyio
async def test_settle_zero_charge_leaves_counters() -> None:
    store = new_store()
    k = store.keys(TENANT)
    r = (await store.admit(TENANT, PERIODS, LIMITS, [500], "a", HOUR_MS)).reservation
    assert r is not None
    await store.settle(r, 0)
    assert await store.client.exists(k.spend_day(PERIODS.day), k.spend_month(PERIODS.month)) == 0
    assert await get_int(store, k.reserved) == 0

    await store.client.set(k.spend_day(PERIODS.day), 42)
    r2 = (await store.admit(TENANT, PERIODS, LIMITS, [500], "b", HOUR_MS)).reservation
    assert r2 is not None
    await store.settle(r2, -5)  # a negative charge is treated as none
    assert await get_int(store, k.spend_day(PERIODS.day)) == 42
    assert await store.client.ttl(k.spend_day(PERIODS.day)) == -1  # untouched: no ttl was set
    await store.aclose()


@pytest.mark.anyio
async def test_settle_sets_key_ttls() -> None:
    store = new_store()
    k = store.keys(TENANT)
    r = (await store.admit(TENANT, PERIODS, LIMITS, [500], "a", HOUR_MS)).reservation
    assert r is not None
    await store.settle(r, 10)
    day_ttl = await store.client.ttl(k.spend_day(PERIODS.day))
    month_ttl = await store.client.ttl(k.spend_month(PERIODS.month))
    assert DAY_KEY_TTL_S == 40 * DAY_S
    assert MONTH_KEY_TTL_S == 400 * DAY_S
    assert 40 * DAY_S - 60 <= day_ttl <= 40 * DAY_S
    assert 400 * DAY_S - 60 <= month_ttl <= 400 * DAY_S
    await store.aclose()


@pytest.mark.anyio
async def test_settle_charges_the_reservations_own_periods() -> None:
    # a call admitted just before midnight settles into the day it was admitted in
    store = new_store()
    k = store.keys(TENANT)
    r = (await store.admit(TENANT, PERIODS, LIMITS, [500], "a", HOUR_MS)).reservation
    assert r is not None
    await store.settle(r, 77)
    assert await get_int(store, k.spend_day("2026-11-22")) == 77
    assert await get_int(store, k.spend_day("2026-11-23")) == 0
    await store.aclose()


@pytest.mark.anyio
async def test_expired_reservation_is_swept_by_next_admit() -> None:
    store = new_store()
    k = store.keys(TENANT)
    await store.client.set(k.spend_day(PERIODS.day), 100)
    await store.client.set(k.spend_month(PERIODS.month), 100)
    dead = (await store.admit(TENANT, PERIODS, LIMITS, [5_000], "dead", 1)).reservation
    live = (await store.admit(TENANT, PERIODS, LIMITS, [700], "live", HOUR_MS)).reservation
    assert dead is not None and live is not None
    await asyncio.sleep(0.05)

    admission = await store.admit(TENANT, PERIODS, LIMITS, [1], "next", HOUR_MS)
    # the dead reservation no longer counts; the live one still does
    assert admission.decision.used_day == 100 + 700
    assert admission.decision.used_month == 100 + 700
    assert await store.client.zscore(k.reservations, "dead") is None
    assert await store.client.hget(k.reservation_amounts, "dead") is None
    assert await get_int(store, k.reserved) == 701

    # its late settlement charges but does not release a second time
    await store.settle(dead, 40)
    assert await get_int(store, k.reserved) == 701
    assert await get_int(store, k.spend_day(PERIODS.day)) == 140
    await store.aclose()


@pytest.mark.anyio
async def test_sweep_clears_reserved_when_no_reservation_is_left() -> None:
    store = new_store()
    k = store.keys(TENANT)
    await store.client.set(k.reserved, 999)  # drift with no live reservation behind it
    admission = await store.admit(TENANT, PERIODS, LIMITS, [1], "a", HOUR_MS)
    assert admission.decision.used_day == 0
    assert await get_int(store, k.reserved) == 1
    await store.aclose()
