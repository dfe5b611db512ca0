"""The fleet brakes' counts and the call log's export reads, on every backend (``tests/stores.py``):
the loop script's window, the velocity script's hourly spend, and paging through the call log."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import Reservation
from guardproxy.store.redis import BudgetStore

pytestmark = pytest.mark.anyio

TENANT = "acme"
KEY = "0123456789abcdef"
DIGEST = "d" * 32
HOUR_MS = 3_600_000


async def alert_events(store: BudgetStore) -> list[dict[str, str]]:
    return [r.fields for r in reversed(await store.recent_alerts([TENANT], 100))]


async def repeat(store: BudgetStore, n: int, *, key: str = KEY, job: str = "", digest: str = DIGEST,
                 window_ms: int = 60_000, action: str = "refuse") -> list[tuple[bool, int, int]]:
    out = []
    for i in range(n):
        count = await store.count_repeat(TENANT, key, job, digest, f"r{i}-{time.monotonic_ns()}", 3, window_ms,
                                         action=action, alerts=True)
        out.append((count.over, count.repeats, count.retry_ms))
    return out


async def test_the_fourth_repeat_of_three_allowed_is_over_and_alerts_once(budget_store: BudgetStore) -> None:
    counts = await repeat(budget_store, 5)
    assert [(over, repeats) for over, repeats, _ in counts] == [
        (False, 1), (False, 2), (False, 3), (True, 4), (True, 4),
    ]
    assert all(retry == 0 for _, _, retry in counts[:3])
    assert all(0 < retry <= 60_000 for _, _, retry in counts[3:])
    events = await alert_events(budget_store)
    assert len(events) == 1
    assert {k: events[0][k] for k in ("event", "tenant", "key", "job", "digest", "repeats", "max_repeats",
                                      "window_ms", "action")} == {
        "event": "loop", "tenant": TENANT, "key": KEY, "job": "", "digest": DIGEST, "repeats": "4",
        "max_repeats": "3", "window_ms": "60000", "action": "refuse",
    }


async def test_other_keys_jobs_and_requests_count_apart(budget_store: BudgetStore) -> None:
    await repeat(budget_store, 3)
    assert (await repeat(budget_store, 1))[0][0] is True
    assert (await repeat(budget_store, 1, key="fedcba9876543210"))[0][:2] == (False, 1)
    assert (await repeat(budget_store, 1, job="WO-1"))[0][:2] == (False, 1)
    assert (await repeat(budget_store, 1, digest="e" * 32))[0][:2] == (False, 1)


async def test_the_window_slides_past_the_oldest_repeat(budget_store: BudgetStore) -> None:
    counts = await repeat(budget_store, 4, window_ms=400)
    assert counts[3][0] is True
    await asyncio.sleep(counts[3][2] / 1000 + 0.05)
    again = await repeat(budget_store, 2, window_ms=400)
    assert again[0][0] is False  # the oldest left: one more fits


async def test_alert_action_is_recorded_in_the_event(budget_store: BudgetStore) -> None:
    await repeat(budget_store, 5, action="alert")
    (event,) = await alert_events(budget_store)
    assert event["action"] == "alert"


def _hour_now() -> int:
    """The current UTC hour number, waiting out the last seconds of an hour so a test stays in one."""
    into = time.time() % 3600
    if into > 3590:
        time.sleep(3600 - into + 0.5)
    return int(time.time() // 3600)


async def test_velocity_fires_once_when_the_last_hour_passes_factor_times_the_average(
    budget_store: BudgetStore,
) -> None:
    hour = _hour_now()
    # baseline of 4 hours before the previous one: 1000 micro-USD each, an average of 1000
    await budget_store.client.hset(budget_store.keys(TENANT).spend_hours,
                                   mapping={str(h): 1000 for h in range(hour - 5, hour - 1)})

    async def charge(micros: int) -> tuple[int, int, bool]:
        c = await budget_store.count_hourly_spend(TENANT, micros, 3_000_000, 4, 0, alerts=True)
        return c.last_hour_micros, c.average_micros, c.fired

    assert await charge(2000) == (2000, 1000, False)
    assert await charge(1001) == (3001, 1000, True)  # over 3 x 1000
    assert await charge(500) == (3501, 1000, False)  # once per hour
    (event,) = await alert_events(budget_store)
    assert {k: event[k] for k in ("event", "tenant", "hour", "spent", "baseline", "limit", "factor_ppm")} == {
        "event": "velocity", "tenant": TENANT, "hour": str(hour), "spent": "3001", "baseline": "1000",
        "limit": "3000", "factor_ppm": "3000000",
    }


async def test_velocity_needs_a_baseline_and_the_minimum(budget_store: BudgetStore) -> None:
    _hour_now()
    fresh = await budget_store.count_hourly_spend(TENANT, 10**9, 2_000_000, 24, 0, alerts=True)
    assert (fresh.last_hour_micros, fresh.fired) == (10**9, False)  # no history: nothing to compare with
    hour = _hour_now()
    await budget_store.client.hset(budget_store.keys(TENANT).spend_hours, str(hour - 2), 24)
    small = await budget_store.count_hourly_spend(TENANT, 1, 2_000_000, 24, 2 * 10**9, alerts=True)
    assert small.fired is False  # under min_micros
    assert await alert_events(budget_store) == []


async def test_logged_calls_page_through_a_period_oldest_first(budget_store: BudgetStore) -> None:
    periods = periods_at(datetime.now(UTC), ZoneInfo("UTC"))
    before_ms = int(time.time() * 1000) - 1
    for i in range(7):
        reservation = Reservation(f"r{i}", TENANT, periods.day, periods.month, 0)
        await budget_store.settle(reservation, 10 + i, {"request_id": f"req{i}", "cost_micros": 10 + i})
    after_ms = int(time.time() * 1000) + 1
    seen, after = [], None
    while True:
        page = await budget_store.logged_calls(TENANT, before_ms, after_ms, after=after, count=3)
        seen += [c.fields["request_id"] for c in page]
        if len(page) < 3:
            break
        after = page[-1].id
    assert seen == [f"req{i}" for i in range(7)]
    assert await budget_store.logged_calls(TENANT, after_ms, after_ms + 1000) == []
    length, oldest = await budget_store.call_log_extent(TENANT)
    assert length == 7 and oldest is not None and before_ms <= oldest < after_ms
    assert await budget_store.call_log_extent("nobody") == (0, None)
