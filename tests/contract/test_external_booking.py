"""What external bookings (``external.py``) need of the store, on every backend of ``tests/stores.py``:
the day a key was first booked on is remembered, and a settled id's charge can be read back."""

from __future__ import annotations

import pytest

from guardproxy.budget.records import Reservation
from guardproxy.store.redis import BudgetStore
from guardproxy.store.redis.base import DAY_KEY_TTL_S

pytestmark = pytest.mark.anyio

TENANT = "acme"


async def test_the_first_booking_day_is_remembered_until_moved(budget_store: BudgetStore) -> None:
    assert await budget_store.booking_day(TENANT, "ext:1", "2026-11-22") == "2026-11-22"
    assert await budget_store.booking_day(TENANT, "ext:1", "2026-11-23") == "2026-11-22"
    assert await budget_store.booking_day("globex", "ext:1", "2026-11-23") == "2026-11-23"  # per tenant
    await budget_store.move_booking_day(TENANT, "ext:1", "2026-11-24")
    assert await budget_store.booking_day(TENANT, "ext:1", "2026-11-25") == "2026-11-24"
    ttl = await budget_store.client.ttl(budget_store.keys(TENANT).booked_on("ext:1"))
    assert DAY_KEY_TTL_S - 60 < ttl <= DAY_KEY_TTL_S


async def test_settled_charge_reads_the_settle_scripts_marker(budget_store: BudgetStore) -> None:
    booking = Reservation("ext:2", TENANT, "2026-11-22", "2026-11", 0)
    assert await budget_store.settled_charge(TENANT, "2026-11-22", "ext:2") is None
    first = await budget_store.settle(booking, 4_321, {"outcome": "external", "cost_micros": 4_321})
    again = await budget_store.settle(booking, 4_321, {"outcome": "external", "cost_micros": 4_321})
    assert (first.applied, again.applied) == (True, False)
    assert await budget_store.settled_charge(TENANT, "2026-11-22", "ext:2") == 4_321
    assert await budget_store.settled_charge(TENANT, "2026-11-23", "ext:2") is None
    day = budget_store.keys(TENANT).spend_day("2026-11-22")
    assert int(await budget_store.client.get(day) or 0) == 4_321
    assert await budget_store.client.xlen(budget_store.keys(TENANT).calls) == 1


async def test_call_costs_read_each_tenants_log_newest_first_with_the_servers_time(budget_store: BudgetStore) -> None:
    for tenant, costs in (("acme", [5, 7, 11]), ("globex", [3])):
        for i, cost in enumerate(costs):
            booking = Reservation(f"r-{tenant}-{i}", tenant, "2026-11-22", "2026-11", 0)
            outcome = "external" if cost == 7 else "completed"
            await budget_store.settle(booking, cost, {"outcome": outcome, "cost_micros": cost})
    seconds, micros = await budget_store.client.time()
    now_ms, logs = await budget_store.call_costs(["acme", "globex", "nobody"], 2)
    assert abs(now_ms - (int(seconds) * 1000 + int(micros) // 1000)) < 5_000
    assert [[(cost, outcome) for _, cost, outcome in log] for log in logs] == [
        [(11, "completed"), (7, "external")], [(3, "completed")], []]
    assert all(now_ms - 5_000 < at <= now_ms for log in logs for at, _, _ in log)
