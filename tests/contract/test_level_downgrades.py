"""A level's soft cap sending calls to a cheaper tier queues one "downgrading" alert event per scope and
period, naming the level (as the tenant's day and month do), on every backend of ``tests/stores.py``."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.levels import LevelArgs, LevelCap
from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import AlertArgs, Reservation
from guardproxy.store.redis import BudgetStore

pytestmark = pytest.mark.anyio

PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
ROOMY = Thresholds(10**12, 10**12, 10**13, 10**13)
ALERTS = AlertArgs(10**12, 10**13, (), enabled=True)


async def downgrades(store: BudgetStore) -> list[dict[str, str]]:
    return [a.fields for a in await store.recent_alerts(["acme"], 50) if a.fields["event"] == "downgrading"]


async def test_a_keys_soft_cap_queues_one_downgrading_event_naming_the_key_level(budget_store: BudgetStore) -> None:
    key_hour = LevelCap("key", "key:k1", "hour", "2026-11-22T12", hard=20_000, soft=8_000, limit=20_000)
    levels = LevelArgs((key_hour,), ("m1", "m2"))
    first = await budget_store.admit("acme", PERIODS, ROOMY, [3_000, 1_000], "r0", 60_000, alerts=ALERTS,
                                     levels=levels)
    assert first.decision.index == 0 and first.reservation is not None
    await budget_store.settle(first.reservation, 8_500)  # the key's hour is past its soft cap now
    assert await downgrades(budget_store) == []
    for i in range(1, 3):
        admission = await budget_store.admit("acme", PERIODS, ROOMY, [3_000, 1_000], f"r{i}", 60_000,
                                             alerts=ALERTS, levels=levels)
        assert admission.decision.index == 1  # to the cheaper tier
    [event] = await downgrades(budget_store)  # once per scope and period
    assert (event["level"], event["period"], event["period_id"]) == ("key", "hour", "2026-11-22T12")
    assert (event["spent"], event["limit"]) == ("8500", "20000")


async def test_the_tenants_own_downgrade_is_its_days_event_not_a_levels(budget_store: BudgetStore) -> None:
    key_hour = LevelCap("key", "key:k1", "hour", "2026-11-22T12", hard=10_000, soft=0, limit=10_000)
    soft_day = Thresholds(0, 10**12, 10**13, 10**13)  # the tenant's day is at its soft cap too
    await budget_store.settle(Reservation("x", "acme", PERIODS.day, PERIODS.month, 0), 1)
    admission = await budget_store.admit("acme", PERIODS, soft_day, [3_000, 1_000], "r1", 60_000, alerts=ALERTS,
                                         levels=LevelArgs((key_hour,), ("m1", "m2")))
    assert admission.decision.index == 1
    [event] = await downgrades(budget_store)
    assert event["period"] == "day" and "level" not in event
