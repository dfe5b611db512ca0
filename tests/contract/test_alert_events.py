"""Alert events as the scripts queue them, on every backend (embedded and a real redis-server):
once per tenant, period and threshold; the first downgrade and refusal of a period; an override
re-arms them; a claimed event is nobody else's until its lease ends."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import AlertArgs
from guardproxy.store.redis import BudgetStore

pytestmark = pytest.mark.anyio

TENANT = "acme"
PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
HOUR_MS = 3_600_000
ALERTS = AlertArgs(limit_day=1000, limit_month=100_000, thresholds_ppm=(500_000, 750_000, 1_000_000), enabled=True)
LIMITS = Thresholds(soft_day=800, hard_day=1000, soft_month=80_000, hard_month=100_000)


async def events(store: BudgetStore) -> list[dict[str, str]]:
    return [r.fields for r in reversed(await store.recent_alerts([TENANT], 100))]


async def charge(store: BudgetStore, rid: str, amount: int) -> None:
    admission = await store.admit(TENANT, PERIODS, LIMITS, [amount], rid, HOUR_MS, alerts=ALERTS)
    assert admission.reservation is not None
    await store.settle(admission.reservation, amount, None, ALERTS)


async def test_each_threshold_fires_once_per_period(budget_store: BudgetStore) -> None:
    await charge(budget_store, "a", 400)  # 40%: nothing
    assert await events(budget_store) == []
    await charge(budget_store, "b", 380)  # 78%: 50% and 75% at once
    await charge(budget_store, "c", 10)  # 79%: nothing new
    got = await events(budget_store)
    assert [(e["event"], e["threshold"], e["period"], e["spent"], e["limit"]) for e in got] == [
        ("threshold", "500000", "day", "780", "1000"), ("threshold", "750000", "day", "780", "1000"),
    ]
    assert all(e["tenant"] == TENANT and e["period_id"] == PERIODS.day for e in got)


async def test_an_override_re_arms_the_thresholds(budget_store: BudgetStore) -> None:
    await charge(budget_store, "a", 600)
    assert len(await events(budget_store)) == 1
    await budget_store.set_override(TENANT, {"daily_micros": "2000", "monthly_micros": "100000", "soft_day": "1600",
                                             "hard_day": "2000", "soft_month": "80000", "hard_month": "100000"},
                                    PERIODS)
    await charge(budget_store, "b", 1)  # 601 / 2000: below every threshold of the new limit
    assert len(await events(budget_store)) == 1
    await charge(budget_store, "c", 500)  # 1101 / 2000: 50% again, under the new limit
    last = (await events(budget_store))[-1]
    assert (last["threshold"], last["spent"], last["limit"]) == ("500000", "1101", "2000")


async def test_first_downgrade_and_first_refusal_of_a_period(budget_store: BudgetStore) -> None:
    k = budget_store.keys(TENANT)
    await budget_store.client.set(k.spend_day(PERIODS.day), 850)  # past the soft cap
    for rid in ("a", "b"):
        out = await budget_store.admit(TENANT, PERIODS, LIMITS, [100, 10], rid, HOUR_MS, alerts=ALERTS)
        assert out.decision.index == 1
    for rid in ("c", "d"):
        out = await budget_store.admit(TENANT, PERIODS, LIMITS, [500, 400], rid, HOUR_MS, alerts=ALERTS)
        assert out.decision.index is None
    got = await events(budget_store)
    assert [(e["event"], e["period"], e["spent"]) for e in got] == [("downgrading", "day", "850"),
                                                                      ("blocked", "day", "850")]


async def test_a_provisional_refusal_records_nothing_and_a_final_one_does(budget_store: BudgetStore) -> None:
    """A tenant that clamps asks first provisionally: if a clamped call then fits, the period must not
    read blocked nor alert; the refusal that stands (admitted again, not provisional) records both."""
    await budget_store.client.set(budget_store.keys(TENANT).spend_day(PERIODS.day), 850)
    out = await budget_store.admit(TENANT, PERIODS, LIMITS, [500, 400], "a", HOUR_MS, alerts=ALERTS, provisional=True)
    assert out.decision.index is None and not out.refused
    assert await events(budget_store) == []
    clamped = await budget_store.admit(TENANT, PERIODS, LIMITS, [150], "b", HOUR_MS, alerts=ALERTS)
    assert clamped.decision.index == 0 and not clamped.refused
    assert await events(budget_store) == []
    final = await budget_store.admit(TENANT, PERIODS, LIMITS, [500, 400], "c", HOUR_MS, alerts=ALERTS)
    assert final.decision.index is None and final.refused
    assert [(e["event"], e["period"]) for e in await events(budget_store)] == [("blocked", "day")]


async def test_nothing_is_queued_without_webhooks(budget_store: BudgetStore) -> None:
    off = AlertArgs(1000, 100_000, (), enabled=False)
    admission = await budget_store.admit(TENANT, PERIODS, LIMITS, [2000], "a", HOUR_MS, alerts=off)
    assert admission.decision.index is None
    assert await events(budget_store) == []


async def test_a_claimed_event_is_nobody_elses_until_its_lease_ends(budget_store: BudgetStore) -> None:
    await charge(budget_store, "a", 600)
    first = await budget_store.claim_alerts([TENANT], lease_ms=60_000)
    second = await budget_store.claim_alerts([TENANT], lease_ms=60_000)
    assert len(first) == 1 and second == []
    await budget_store.record_delivery(first[0], {0}, "retrying", next_at_ms=0, error="HTTP 503")
    again = await budget_store.claim_alerts([TENANT], lease_ms=60_000)
    assert [(a.id, a.attempts, a.delivered_to) for a in again] == [(first[0].id, 1, {0})]
    await budget_store.record_delivery(again[0], {0, 1}, "delivered")
    assert await budget_store.claim_alerts([TENANT], lease_ms=0) == []
    (record,) = await budget_store.recent_alerts([TENANT], 10)
    assert (record.state, record.attempts) == ("delivered", 2)
