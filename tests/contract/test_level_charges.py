"""Charges that reach the ledger without an admission of their own (a call served unbudgeted under
``fail_open``, external spend, a store rebuild, a background call of a lost store) go to every level
and window they belong to, exactly once, through settle's own books (``Reservation.levels``), on every
backend of ``tests/stores.py``. An admitted call's own books win over any given ones (never twice).
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.levels import LevelArgs, LevelCap
from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import AlertArgs, Reservation
from guardproxy.store.layout import GlobalKeys
from guardproxy.store.redis import BudgetStore
from tests.stores import PREFIX

pytestmark = pytest.mark.anyio

PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
PERIOD_OF = {"hour": "2026-11-22T12", "day": "2026-11-22", "week": "2026-W47", "month": "2026-11"}
ROOMY = Thresholds(10**12, 10**12, 10**13, 10**13)
TAG = "all-tenants"  # one hash tag for every tenant, as budgets.global asks of a cluster (store.hash_tag)


def cap(level: str, window: str, limit: int, model: str = "") -> LevelCap:
    scope = {"global": "global", "tenant": "tenant", "key": "key:k1", "model": f"model:{model}"}[level]
    return LevelCap(level, scope, window, PERIOD_OF[window], limit, limit, limit, model=model)


CAPS = (cap("global", "day", 50_000), cap("tenant", "hour", 40_000), cap("tenant", "week", 40_000),
        cap("key", "month", 30_000), cap("model", "day", 20_000, model="m1"))


@pytest.fixture
def store(budget_store: BudgetStore) -> BudgetStore:
    return BudgetStore(budget_store.client, PREFIX, hash_tag=TAG)


async def spent(store: BudgetStore, c: LevelCap, tenant: str = "acme") -> int:
    where = GlobalKeys(PREFIX, TAG) if c.level == "global" else store.keys(tenant)
    return int(await store.client.get(where.level_spend(c.scope, c.window, c.period)) or 0)


async def test_an_unbooked_charge_reaches_every_level_it_names_once(store: BudgetStore) -> None:
    unbooked = Reservation("ext:1", "acme", PERIODS.day, PERIODS.month, 0, levels=CAPS)
    first = await store.settle(unbooked, 12_000)
    again = await store.settle(unbooked, 12_000)  # a replay (the journal, an idempotency key): no second charge
    assert first.applied and not again.applied
    assert [await spent(store, c) for c in CAPS] == [12_000] * len(CAPS)
    assert await store.client.hlen(store.keys("acme").reservation_levels) == 0


async def test_the_next_admission_sees_what_an_unbooked_charge_spent(store: BudgetStore) -> None:
    """The global day cap (50,000) with 45,000 spent through unbooked charges admits 5,000 more, not 5,001."""
    glob = (cap("global", "day", 50_000),)
    for i, tenant in enumerate(["acme", "globex", "initech"]):
        await store.settle(Reservation(f"u{i}", tenant, PERIODS.day, PERIODS.month, 0, levels=glob), 15_000)
    levels = LevelArgs(glob, ("m1",))
    refused = await store.admit("hooli", PERIODS, ROOMY, [5_001], "r1", 60_000, levels=levels)
    assert refused.reservation is None and refused.refused_by == glob[0]
    admitted = await store.admit("hooli", PERIODS, ROOMY, [5_000], "r2", 60_000, levels=levels)
    assert admitted.reservation is not None


async def test_an_admitted_calls_own_books_win_over_given_levels(store: BudgetStore) -> None:
    """A settlement that names levels for a call its admission already booked charges each counter once."""
    levels = LevelArgs(CAPS, ("m1",))
    admission = await store.admit("acme", PERIODS, ROOMY, [9_000], "r1", 60_000, levels=levels)
    assert admission.reservation is not None
    named = Reservation(admission.reservation.id, "acme", PERIODS.day, PERIODS.month, 9_000, levels=CAPS)
    await store.settle(named, 7_000)
    assert [await spent(store, c) for c in CAPS] == [7_000] * len(CAPS)
    assert await store.client.get(store.keys("acme").level_held("key:k1")) is None


async def test_an_unbooked_charge_queues_the_threshold_alerts_of_its_levels(store: BudgetStore) -> None:
    hour = cap("tenant", "hour", 10_000)
    unbooked = Reservation("ext:2", "acme", PERIODS.day, PERIODS.month, 0, levels=(hour,))
    await store.settle(unbooked, 8_000, alerts=AlertArgs(10**9, 10**10, (750_000,)))
    events = [a.fields for a in await store.recent_alerts(["acme"], 10)]
    assert [(e["period"], e["level"], e["threshold"]) for e in events] == [("hour", "tenant", "750000")]
