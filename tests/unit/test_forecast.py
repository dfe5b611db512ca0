"""Forecasts (``forecast.py``): a tenant spending at a steady rate is projected within 10% of the
truth, however often it calls and whenever it began; the hard cap's time follows the rate."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from guardproxy.budget.forecast import RECENT_WINDOW_S, SAMPLE_CALLS, Spent, burn_rate, project

DAY_START = datetime(2026, 11, 23, tzinfo=UTC)
DAY_END = DAY_START + timedelta(days=1)


def steady_log(start_s: float, calls: int, interval_s: float, cost: int, jitter: float, seed: int) -> list[Spent]:
    """``calls`` calls every ``interval_s`` from ``start_s`` (each moved by up to ``jitter`` of an
    interval), newest first, cut to what a call log sample holds."""
    rng = random.Random(seed)
    times = [start_s + i * interval_s + rng.uniform(-jitter, jitter) * interval_s for i in range(calls)]
    return [Spent(int(t * 1000), cost) for t in sorted(times, reverse=True)][:SAMPLE_CALLS]


@settings(max_examples=300, deadline=None)
@given(
    interval_s=st.floats(0.05, 300),
    cost=st.integers(1, 1_000_000),
    started_after_s=st.floats(0, 20 * 3600),
    calls=st.integers(11, 5000),
    since_last=st.floats(0, 0.999),
    jitter=st.sampled_from([0.0, 0.2]),
    seed=st.integers(0, 1000),
)
def test_a_steady_tenant_is_projected_within_ten_percent(
    interval_s: float, cost: int, started_after_s: float, calls: int, since_last: float, jitter: float, seed: int
) -> None:
    # Exactly periodic calls need 11 to tell their rate within 10%; calls moved by up to a fifth of
    # an interval either way need about 30.
    assume(calls >= (30 if jitter else 11))
    start_s = DAY_START.timestamp() + started_after_s
    # Now: some time after the last call, before the next one is due.
    now_s = start_s + (calls - 1 + since_last) * interval_s + (jitter * interval_s if jitter else 0)
    if now_s >= DAY_END.timestamp():
        return
    now = datetime.fromtimestamp(now_s, UTC)
    log = steady_log(start_s, calls, interval_s, cost, jitter, seed)
    spent = calls * cost  # the day's spend so far (the log's sample may hold only the latest calls)
    truth = spent + cost / interval_s * (DAY_END.timestamp() - now_s)
    rate = burn_rate(log, int(now_s * 1000))
    forecast = project(spent, 10**15, rate, now, DAY_END)
    assert abs(forecast.projected_micros - truth) <= 0.10 * truth


def test_the_rate_of_a_full_hour_is_the_hours_spend() -> None:
    now_ms = 10 * 3_600_000
    log = [Spent(now_ms - i * 60_000, 100) for i in range(120)]  # every minute for two hours
    assert burn_rate(log, now_ms) == 60 * 100 / RECENT_WINDOW_S


def test_a_tenant_that_began_recently_is_rated_on_its_own_span() -> None:
    now_ms = 10 * 3_600_000
    log = [Spent(now_ms - i * 10_000, 50) for i in range(6)]  # six calls 10 s apart, nothing before
    assert burn_rate(log, now_ms) == 5 * 50 / 50
    assert burn_rate(log[:1], now_ms) == 50 / RECENT_WINDOW_S  # one call tells no rate: spread over the hour
    assert burn_rate([], now_ms) == 0
    assert burn_rate([Spent(now_ms - 7_200_000, 999)], now_ms) == 0  # idle for the last hour


def test_the_hard_cap_time_follows_the_rate() -> None:
    now = DAY_START + timedelta(hours=6)
    # 1,000 micro-USD a second, 4,000,000 spent of 10,000,000: the cap in 6,000 s.
    forecast = project(4_000_000, 10_000_000, 1_000.0, now, DAY_END)
    assert forecast.hard_cap_at == now + timedelta(seconds=6_000)
    assert forecast.projected_micros == 4_000_000 + 1_000 * 18 * 3600
    assert project(4_000_000, 10**12, 1_000.0, now, DAY_END).hard_cap_at is None  # not this period
    assert project(4_000_000, 10_000_000, 0.0, now, DAY_END).hard_cap_at is None
    assert project(10_000_000, 10_000_000, 0.0, now, DAY_END).hard_cap_at == now  # reached already
    assert project(5, 10, 3.0, DAY_END, DAY_END).projected_micros == 5  # nothing left of the period
