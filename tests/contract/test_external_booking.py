"""What external bookings (``external.py``) need of the store, on every backend of ``tests/stores.py``:
the day a key was first booked on is remembered, and a settled id's charge can be read back."""

from __future__ import annotations

import pytest

from guardproxy.store import DAY_KEY_TTL_S, BudgetStore, Reservation

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
