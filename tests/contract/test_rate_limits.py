"""Per-minute rate limits and the blocked flag, on every backend (embedded and a real redis-server).

What admit.v4 and settle.v4 promise about the sliding windows: requests and worst-case tokens are
counted at admission, tokens corrected to the real usage at settlement, a call over a limit holds
nothing and says how long to wait; a budget refusal flags the period blocked until a call fits.
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from guardproxy.budget.decision import REQUESTS, TOKENS, WINDOW_MS, RateLimits, Thresholds
from guardproxy.budget.periods import periods_at
from guardproxy.store.redis import BudgetStore

pytestmark = pytest.mark.anyio

TENANT = "acme"
PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
HOUR_MS = 3_600_000
ROOMY = Thresholds(soft_day=10**9, hard_day=10**9, soft_month=10**10, hard_month=10**10)


async def server_ms(store: BudgetStore) -> int:
    now_s, now_us = await store.client.time()
    return int(now_s) * 1000 + int(now_us) // 1000


async def test_requests_over_rpm_are_refused_and_hold_nothing(budget_store: BudgetStore) -> None:
    rate = RateLimits(rpm=3)
    out = [await budget_store.admit(TENANT, PERIODS, ROOMY, [10], f"r{i}", HOUR_MS, rate=rate) for i in range(5)]
    assert [a.rate.limited for a in out] == [None, None, None, REQUESTS, REQUESTS]
    assert [a.rate.requests for a in out] == [1, 2, 3, 3, 3]
    refused = out[3]
    assert refused.reservation is None and refused.decision.index is None
    assert refused.rate.wait_ms is not None and 59_000 < refused.rate.wait_ms <= WINDOW_MS
    assert 0 < refused.rate.requests_reset_ms <= WINDOW_MS
    k = budget_store.keys(TENANT)
    assert int(await budget_store.client.get(k.reserved) or 0) == 30  # only the three admitted


async def test_requests_leave_the_window_after_a_minute(budget_store: BudgetStore) -> None:
    k = budget_store.keys(TENANT)
    now = await server_ms(budget_store)
    # two requests admitted 59.5 s and 30 s ago: the older one leaves in about half a second
    await budget_store.client.zadd(k.rate_requests, {"old": now - 59_500, "newer": now - 30_000})
    first = await budget_store.admit(TENANT, PERIODS, ROOMY, [1], "a", HOUR_MS, rate=RateLimits(rpm=2))
    assert first.rate.limited == REQUESTS
    assert first.rate.wait_ms is not None and 0 < first.rate.wait_ms <= 500
    await budget_store.client.zadd(k.rate_requests, {"old": now - 61_000})  # as if time had passed
    second = await budget_store.admit(TENANT, PERIODS, ROOMY, [1], "b", HOUR_MS, rate=RateLimits(rpm=2))
    assert second.rate.limited is None and second.reservation is not None
    assert second.rate.requests == 2


async def test_tokens_count_the_worst_case_then_the_real_usage(budget_store: BudgetStore) -> None:
    rate = RateLimits(tpm=100)
    first = await budget_store.admit(TENANT, PERIODS, ROOMY, [10], "a", HOUR_MS, rate=rate, call_tokens=60)
    assert first.rate.limited is None and first.rate.tokens == 60
    second = await budget_store.admit(TENANT, PERIODS, ROOMY, [10], "b", HOUR_MS, rate=rate, call_tokens=60)
    assert second.rate.limited == TOKENS and second.reservation is None
    assert second.rate.wait_ms is not None and 59_000 < second.rate.wait_ms <= WINDOW_MS
    assert first.reservation is not None
    # the call really used 15 tokens: 15 + 60 fit under 100
    await budget_store.settle(first.reservation, 5, {"prompt_tokens": 10, "completion_tokens": 5})
    k = budget_store.keys(TENANT)
    assert int(await budget_store.client.get(k.rate_token_sum) or 0) == 15
    third = await budget_store.admit(TENANT, PERIODS, ROOMY, [10], "c", HOUR_MS, rate=rate, call_tokens=60)
    assert third.rate.limited is None and third.rate.tokens == 75
    # a repeated settle (a journal replay) corrects nothing twice
    await budget_store.settle(first.reservation, 5, {"prompt_tokens": 10, "completion_tokens": 5})
    assert int(await budget_store.client.get(k.rate_token_sum) or 0) == 75


async def test_a_call_larger_than_tpm_can_never_be_admitted(budget_store: BudgetStore) -> None:
    out = await budget_store.admit(TENANT, PERIODS, ROOMY, [1], "a", HOUR_MS, rate=RateLimits(tpm=100),
                                   call_tokens=101)
    assert out.rate.limited == TOKENS and out.rate.wait_ms is None and out.reservation is None


async def test_no_limits_keep_no_window(budget_store: BudgetStore) -> None:
    out = await budget_store.admit(TENANT, PERIODS, ROOMY, [1], "a", HOUR_MS, call_tokens=50)
    assert out.rate.limited is None and out.reservation is not None
    k = budget_store.keys(TENANT)
    assert await budget_store.client.exists(k.rate_requests, k.rate_tokens, k.rate_token_sum) == 0


async def test_override_limits_win_over_the_configured_ones(budget_store: BudgetStore) -> None:
    await budget_store.set_override(TENANT, {"soft_day": str(10**9), "hard_day": str(10**9),
                                             "soft_month": str(10**10), "hard_month": str(10**10), "rpm": "1",
                                             "tpm": "0"})
    rate = RateLimits(rpm=100)
    first = await budget_store.admit(TENANT, PERIODS, ROOMY, [1], "a", HOUR_MS, rate=rate)
    second = await budget_store.admit(TENANT, PERIODS, ROOMY, [1], "b", HOUR_MS, rate=rate)
    assert (first.rate.limited, second.rate.limited) == (None, REQUESTS)
    assert second.rate.limits == RateLimits(rpm=1, tpm=0)


async def test_a_refusal_flags_blocked_until_a_call_fits_and_snapshots_agree(budget_store: BudgetStore) -> None:
    limits = Thresholds(soft_day=50, hard_day=100, soft_month=1000, hard_month=1000)
    big = await budget_store.admit(TENANT, PERIODS, limits, [101], "a", HOUR_MS)
    assert big.decision.index is None and big.refused
    (snap,) = await budget_store.snapshots([(TENANT, PERIODS)])
    assert snap.refused
    small = await budget_store.admit(TENANT, PERIODS, limits, [10], "b", HOUR_MS)
    assert small.reservation is not None and not small.refused
    (snap,) = await budget_store.snapshots([(TENANT, PERIODS)])
    assert not snap.refused


async def test_thousands_of_aged_token_entries_are_swept_in_one_admission(budget_store: BudgetStore) -> None:
    k = budget_store.keys(TENANT)
    now = await server_ms(budget_store)
    aged = {f"old-{i}": now - 61_000 for i in range(2500)}
    await budget_store.client.zadd(k.rate_tokens, aged)
    await budget_store.client.hset(k.rate_token_counts, mapping=dict.fromkeys(aged, 3))
    await budget_store.client.set(k.rate_token_sum, 7500)
    out = await budget_store.admit(TENANT, PERIODS, ROOMY, [1], "a", HOUR_MS, rate=RateLimits(tpm=10), call_tokens=5)
    assert out.rate.limited is None and out.rate.tokens == 5
    assert await budget_store.client.zcard(k.rate_tokens) == 1
    assert await budget_store.client.hlen(k.rate_token_counts) == 1
