"""The budget store's contract, on every backend of ``tests/stores.py`` (embedded and a real redis-server).

Admission, settlement, exactly-once settlement and release, leases and overrides: what the Lua
scripts (admit.v4, settle.v4, renew.v1) promise, checked the same way wherever they run.
``tests/unit/test_lua_differential.py`` checks the decision against ``budget.decide`` in depth.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import anyio
import pytest

from guardproxy.budget.decision import Thresholds, decide
from guardproxy.budget.periods import Periods, periods_at
from guardproxy.budget.records import Reservation
from guardproxy.store.redis import BudgetStore
from guardproxy.store.redis.base import DAY_KEY_TTL_S, MONTH_KEY_TTL_S

pytestmark = pytest.mark.anyio

TENANT = "acme"
PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
HOUR_MS = 3_600_000
DAY_S = 86_400
LIMITS = Thresholds(soft_day=10**9, hard_day=10**9, soft_month=10**10, hard_month=10**10)


async def get_int(store: BudgetStore, key: str) -> int:
    return int(await store.client.get(key) or 0)


async def reserve(store: BudgetStore, rid: str, amount: int, lease_ms: int = HOUR_MS) -> Reservation:
    admission = await store.admit(TENANT, PERIODS, LIMITS, [amount], rid, lease_ms)
    assert admission.reservation is not None
    return admission.reservation


async def audit_entries(store: BudgetStore) -> list[dict[str, str]]:
    return await store.recent_calls(TENANT, 100)


# --- admission -------------------------------------------------------------------------------


async def test_admit_reserves_and_counts_own_reservations(budget_store: BudgetStore) -> None:
    limits = Thresholds(soft_day=800, hard_day=1000, soft_month=8000, hard_month=10000)
    out = [await budget_store.admit(TENANT, PERIODS, limits, [300, 100], f"r{i}", HOUR_MS) for i in range(4)]
    assert [a.decision.used_day for a in out] == [0, 300, 600, 900]
    assert [a.decision.index for a in out[:3]] == [0, 0, 0]
    # 900 used: at the soft cap and 300 no longer fits; 100 fits exactly
    assert out[3].decision.index == 1
    assert out[3].reservation is not None and out[3].reservation.amount == 100
    assert await get_int(budget_store, budget_store.keys(TENANT).reserved) == 1000


async def test_admit_refusal_names_the_period(budget_store: BudgetStore) -> None:
    limits = Thresholds(soft_day=8, hard_day=10, soft_month=80, hard_month=100)
    k = budget_store.keys(TENANT)
    await budget_store.client.set(k.spend_day(PERIODS.day), 10)
    day = await budget_store.admit(TENANT, PERIODS, limits, [1], "a", HOUR_MS)
    await budget_store.client.set(k.spend_month(PERIODS.month), 100)
    month = await budget_store.admit(TENANT, PERIODS, limits, [1], "b", HOUR_MS)
    assert (day.decision.index, day.decision.exhausted, day.reservation) == (None, "day", None)
    assert (month.decision.index, month.decision.exhausted) == (None, "month")
    assert await budget_store.client.exists(k.reserved) == 0


async def test_admit_agrees_with_decide_on_every_boundary(budget_store: BudgetStore) -> None:
    """Around each cap, every used value, with and without a live reservation making up part of it."""
    cases = [
        (limits, used_day, used_month, held, worst)
        for limits in [Thresholds(6, 10, 16, 20), Thresholds(10, 10, 20, 20), Thresholds(0, 3, 0, 30)]
        for used_day in range(limits.hard_day + 3)
        for used_month in sorted({limits.soft_month - 1, limits.hard_month, limits.hard_month + 1} - {-1})
        for held in {0, min(used_day, used_month, 2)}
        for worst in [[0], [4], [4, 1], [12, 4, 1], [3, 2, 1, 0]]
    ]
    for i, (limits, used_day, used_month, held, worst) in enumerate(cases):
        k = budget_store.keys(f"t{i}")
        await budget_store.client.set(k.spend_day(PERIODS.day), used_day - held)
        await budget_store.client.set(k.spend_month(PERIODS.month), used_month - held)
        if held:
            await budget_store.client.zadd(k.reservations, {"held": 2**50})
            await budget_store.client.hset(k.reservation_amounts, "held", held)
            await budget_store.client.set(k.reserved, held)
        got = (await budget_store.admit(f"t{i}", PERIODS, limits, worst, "new", HOUR_MS)).decision
        assert got == decide(used_day, used_month, limits, worst), (limits, used_day, used_month, worst)


async def test_admit_uses_runtime_override(budget_store: BudgetStore) -> None:
    limits = Thresholds(soft_day=8, hard_day=10, soft_month=80, hard_month=100)
    await budget_store.set_override(TENANT, {"soft_day": "1", "hard_day": "5", "soft_month": "2", "hard_month": "50"})
    admission = await budget_store.admit(TENANT, PERIODS, limits, [6, 5], "a", HOUR_MS)
    assert admission.limits == Thresholds(soft_day=1, hard_day=5, soft_month=2, hard_month=50)
    assert admission.decision.index == 1
    await budget_store.clear_override(TENANT)
    again = await budget_store.admit(TENANT, PERIODS, limits, [6, 5], "b", HOUR_MS)
    assert again.limits == limits


# --- settlement ------------------------------------------------------------------------------


async def test_settle_charges_day_and_month_and_releases(budget_store: BudgetStore) -> None:
    store = budget_store
    k = store.keys(TENANT)
    await store.client.set(k.spend_day(PERIODS.day), 1_000)
    await store.client.set(k.spend_month(PERIODS.month), 50_000)
    a, b = await reserve(store, "a", 700), await reserve(store, "b", 300)
    assert await get_int(store, k.reserved) == 1_000

    settled = await store.settle(a, 123)
    assert settled.applied and settled.released
    assert await get_int(store, k.spend_day(PERIODS.day)) == 1_123
    assert await get_int(store, k.spend_month(PERIODS.month)) == 50_123
    assert await get_int(store, k.reserved) == 300
    assert await store.client.zscore(k.reservations, "a") is None
    assert await store.client.hget(k.reservation_amounts, "a") is None
    assert await store.client.zscore(k.reservations, "b") is not None

    await store.settle(b, 300)
    assert await get_int(store, k.reserved) == 0
    assert await get_int(store, k.spend_day(PERIODS.day)) == 1_423
    assert await get_int(store, k.spend_month(PERIODS.month)) == 50_423


async def test_settle_zero_charge_leaves_counters(budget_store: BudgetStore) -> None:
    store = budget_store
    k = store.keys(TENANT)
    await store.settle(await reserve(store, "a", 500), 0)
    assert await store.client.exists(k.spend_day(PERIODS.day), k.spend_month(PERIODS.month)) == 0
    assert await get_int(store, k.reserved) == 0
    await store.client.set(k.spend_day(PERIODS.day), 42)
    await store.settle(await reserve(store, "b", 500), -5)  # a negative charge is treated as none
    assert await get_int(store, k.spend_day(PERIODS.day)) == 42
    assert await store.client.ttl(k.spend_day(PERIODS.day)) == -1  # untouched: no ttl was set


async def test_settle_sets_key_ttls_and_keeps_the_marker_as_long_as_the_day(budget_store: BudgetStore) -> None:
    store = budget_store
    k = store.keys(TENANT)
    await store.settle(await reserve(store, "a", 500), 10)
    assert (DAY_KEY_TTL_S, MONTH_KEY_TTL_S) == (40 * DAY_S, 400 * DAY_S)
    for key, ttl in ((k.spend_day(PERIODS.day), DAY_KEY_TTL_S), (k.settled(PERIODS.day), DAY_KEY_TTL_S),
                     (k.spend_month(PERIODS.month), MONTH_KEY_TTL_S)):
        assert ttl - 60 <= await store.client.ttl(key) <= ttl, key


async def test_settle_charges_the_reservations_own_periods(budget_store: BudgetStore) -> None:
    # a call admitted just before midnight settles into the day it was admitted in
    k = budget_store.keys(TENANT)
    await budget_store.settle(await reserve(budget_store, "a", 500), 77)
    assert await get_int(budget_store, k.spend_day("2026-11-22")) == 77
    assert await get_int(budget_store, k.spend_day("2026-11-23")) == 0


async def test_settle_writes_the_audit_entry_with_the_charge(budget_store: BudgetStore) -> None:
    r = await reserve(budget_store, "a", 500)
    await budget_store.settle(r, 77, {"request_id": "req_1", "outcome": "completed", "cost_micros": 77})
    (entry,) = await audit_entries(budget_store)
    assert entry["request_id"] == "req_1" and entry["cost_micros"] == "77" and entry["outcome"] == "completed"


# --- exactly once ----------------------------------------------------------------------------


async def test_a_second_settle_of_an_id_changes_nothing_and_says_so(budget_store: BudgetStore) -> None:
    store = budget_store
    k = store.keys(TENANT)
    a, b = await reserve(store, "a", 700), await reserve(store, "b", 300)
    record = {"request_id": "req_a", "outcome": "completed"}
    first = await store.settle(a, 123, record)
    # a retry after a lost reply, a journal replay, a release: all no-ops
    again = [await store.settle(a, 123, record), await store.settle(a, 999, record), await store.settle(a, 0)]
    assert first.applied and not any(s.applied or s.released for s in again)
    assert await get_int(store, k.spend_day(PERIODS.day)) == 123
    assert await get_int(store, k.spend_month(PERIODS.month)) == 123
    assert await get_int(store, k.reserved) == 300  # b's money is not released by a's repeats
    assert len(await audit_entries(store)) == 1
    assert (await store.settle(b, 1)).applied


async def test_a_released_id_is_never_reserved_by_a_late_admit(budget_store: BudgetStore) -> None:
    """The ledger releases an id whose admit reply was lost; the admit itself may run afterwards."""
    store = budget_store
    k = store.keys(TENANT)
    released = await store.settle(Reservation("lost", TENANT, PERIODS.day, PERIODS.month, 0), 0)
    assert released.applied and not released.released
    late = await store.admit(TENANT, PERIODS, LIMITS, [500], "lost", HOUR_MS)
    assert late.already_settled and late.reservation is None
    assert await get_int(store, k.reserved) == 0
    assert await store.client.zcard(k.reservations) == 0


async def test_a_release_after_a_late_admit_frees_what_it_held(budget_store: BudgetStore) -> None:
    store = budget_store
    k = store.keys(TENANT)
    held = await reserve(store, "lost", 500)  # the admit ran; its reply never arrived
    released = await store.settle(Reservation(held.id, TENANT, held.day, held.month, 0), 0)
    assert released.applied and released.released
    assert await get_int(store, k.reserved) == 0


async def test_a_settlement_after_its_lease_ran_out_still_charges_once(budget_store: BudgetStore) -> None:
    store = budget_store
    k = store.keys(TENANT)
    await store.client.set(k.spend_day(PERIODS.day), 100)
    dead = await reserve(store, "dead", 5_000, lease_ms=1)
    await reserve(store, "live", 700)
    await anyio.sleep(0.05)
    admission = await store.admit(TENANT, PERIODS, LIMITS, [1], "next", HOUR_MS)
    # the expired reservation no longer counts (swept); the live one still does
    assert admission.decision.used_day == 100 + 700
    assert await store.client.hget(k.reservation_amounts, "dead") is None
    assert await get_int(store, k.reserved) == 701
    late = await store.settle(dead, 40)
    assert late.applied and not late.released
    assert await get_int(store, k.reserved) == 701
    assert await get_int(store, k.spend_day(PERIODS.day)) == 140
    assert not (await store.settle(dead, 40)).applied
    assert await get_int(store, k.spend_day(PERIODS.day)) == 140


async def test_sweep_clears_reserved_when_no_reservation_is_left(budget_store: BudgetStore) -> None:
    k = budget_store.keys(TENANT)
    await budget_store.client.set(k.reserved, 999)  # drift with no live reservation behind it
    admission = await budget_store.admit(TENANT, PERIODS, LIMITS, [1], "a", HOUR_MS)
    assert admission.decision.used_day == 0
    assert await get_int(budget_store, k.reserved) == 1


# --- leases ----------------------------------------------------------------------------------


async def used_now(store: BudgetStore, rid: str) -> int:
    """What the next admission counts as used today (it sweeps expired leases first)."""
    admission = await store.admit(TENANT, PERIODS, LIMITS, [0], rid, HOUR_MS)
    assert admission.reservation is not None
    await store.settle(admission.reservation, 0)
    return admission.decision.used_day


async def test_an_unrenewed_reservation_frees_after_its_lease(budget_store: BudgetStore) -> None:
    await reserve(budget_store, "crashed", 5_000, lease_ms=300)
    assert await used_now(budget_store, "probe1") == 5_000
    await anyio.sleep(0.4)
    assert await used_now(budget_store, "probe2") == 0


async def test_renewal_keeps_a_reservation_past_its_first_lease(budget_store: BudgetStore) -> None:
    running = await reserve(budget_store, "running", 5_000, lease_ms=300)
    for _ in range(3):  # 0.6 s in all: twice the lease
        await anyio.sleep(0.2)
        assert await budget_store.renew([running], 300) == set()
    assert await used_now(budget_store, "probe") == 5_000
    await budget_store.settle(running, 10)
    assert await used_now(budget_store, "probe2") == 10


async def test_renewal_never_brings_back_a_settled_or_swept_reservation(budget_store: BudgetStore) -> None:
    store = budget_store
    k = store.keys(TENANT)
    settled = await reserve(store, "settled", 100)
    await store.settle(settled, 5)
    swept = await reserve(store, "swept", 200, lease_ms=1)
    await anyio.sleep(0.05)
    await used_now(store, "probe")  # sweeps "swept"
    other = Reservation("other", "globex", PERIODS.day, PERIODS.month, 1)
    live = await reserve(store, "live", 300)
    lost = await store.renew([settled, swept, live, other], HOUR_MS)
    assert lost == {"settled", "swept", "other"}
    assert set(await store.client.zrange(k.reservations, 0, -1)) == {b"live"}
    assert await get_int(store, k.reserved) == 300


def _periods(day: str) -> Periods:
    return periods_at(datetime.fromisoformat(f"{day}T12:00:00+00:00"), ZoneInfo("UTC"))


async def test_markers_are_kept_per_day_of_admission(budget_store: BudgetStore) -> None:
    store = budget_store
    yesterday = _periods("2026-11-21")
    r = await store.admit(TENANT, yesterday, LIMITS, [10], "same-id", HOUR_MS)
    assert r.reservation is not None
    await store.settle(r.reservation, 3)
    k = store.keys(TENANT)
    fields: dict[Any, Any] = await store.client.hgetall(k.settled("2026-11-21"))
    assert fields == {b"same-id": b"3"}
    assert await store.client.exists(k.settled(PERIODS.day)) == 0
