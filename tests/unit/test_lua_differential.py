"""admit.v4 on the SQLite store against budget.decide and budget.rate_verdict, over generated scenarios.

The script is what runs in production (its Lua on Redis, its transcription on SQLite, which
``test_sqlite_scripts.py`` holds to the Lua); ``budget.decide`` is its readable reference. The
differential test sets spend and live reservations directly in the store under the key names
of ``layout.Keys`` and checks that both pick the same candidate and report the same figures. The
scripts' whole contract (settlement, exactly-once, leases, overrides) runs on every backend in
``tests/contract/test_store.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.budget.decision import RateLimits, Thresholds, decide, rate_verdict
from guardproxy.budget.records import JobArgs, Reservation
from guardproxy.store.layout import Keys
from guardproxy.store.redis import BudgetStore
from tests.helpers import HOUR_MS, PERIODS, TENANT, new_store

T = TypeVar("T")
DAY_S = 86_400




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
    """A live reservation written the way admit.v4.lua writes one."""
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


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(0, 10**10), st.lists(st.integers(0, 10**4), max_size=3), st.data())
def test_admit_with_a_job_cap_agrees_with_decide(
    scenario: tuple[int, int, list[int], Thresholds, list[int]], job_spent: int, job_held: list[int],
    data: st.DataObject,
) -> None:
    """The job's cap (its spend + its live reservations + worst case) is one more bound on "fits";
    a call only the job refuses is refused as ``job``, and the job's share is held and counted."""
    spend_day, spend_month, reserved, limits, worst = scenario
    used_day, used_month = spend_day + sum(reserved), spend_month + sum(reserved)
    job_used = job_spent + sum(job_held)
    # caps around what the job has used plus each candidate's worst case, as well as anywhere
    cap = data.draw(st.one_of(
        st.sampled_from([job_used + w for w in worst]).flatmap(lambda c: st.integers(max(0, c - 1), c + 1)),
        st.integers(0, 2 * job_used + 10),
    ))

    async def go(store: BudgetStore) -> tuple[Any, int]:
        k = store.keys(TENANT)
        await store.client.set(k.spend_day(PERIODS.day), spend_day)
        await store.client.set(k.spend_month(PERIODS.month), spend_month)
        for i, amount in enumerate(reserved):
            await hold(store, f"earlier-{i}", amount)
        await store.client.hset(k.job("J1"), "cost_micros", job_spent)
        for i, amount in enumerate(job_held):
            await hold(store, f"job-{i}", amount)
            await store.client.hset(k.reservation_jobs, f"job-{i}", "J1")
            await store.client.hincrby(k.job_held, "J1", amount)
        admission = await store.admit(TENANT, PERIODS, limits, worst, "r-new", HOUR_MS,
                                      job=JobArgs("J1", cap))
        return admission, int(await store.client.hget(k.job_held, "J1") or 0)

    admission, held_after = run(go)
    # the job's reservations count against the tenant's caps too
    expected_with_held = decide(used_day + sum(job_held), used_month + sum(job_held), limits, worst,
                                job_room=cap - job_used)
    assert admission.decision == expected_with_held
    assert admission.job_room == max(0, cap - job_used)
    if expected_with_held.index is None:
        assert admission.reservation is None and held_after == sum(job_held)
    else:
        assert admission.reservation is not None and admission.reservation.job == "J1"
        assert held_after == sum(job_held) + worst[expected_with_held.index]


def test_keys_layout() -> None:
    k = Keys("gp", "acme")
    assert k.spend_day("2026-11-22") == "gp:{acme}:spend:day:2026-11-22"
    assert k.spend_month("2026-11") == "gp:{acme}:spend:month:2026-11"
    for key in (k.reservations, k.reservation_amounts, k.reserved, k.budget, k.settled("2026-11-22"), k.calls):
        assert key.startswith("gp:{acme}:")


# --- admit: the rate-limit rule against budget.rate_verdict ------------------------------------

ROOMY = Thresholds(soft_day=10**12, hard_day=10**12, soft_month=10**13, hard_month=10**13)
# entry ages in ms, away from the window's edge (the script runs a few ms after the test reads the time)
AGES = st.one_of(st.integers(0, 58_000), st.integers(62_000, 120_000))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rpm=st.integers(0, 5), tpm=st.sampled_from([0, 1, 50, 100, 200]),
    request_ages=st.lists(AGES, max_size=7), token_entries=st.lists(st.tuples(AGES, st.integers(0, 80)), max_size=6),
    call_tokens=st.integers(0, 150),
)
def test_admit_rate_rule_agrees_with_rate_verdict(
    rpm: int, tpm: int, request_ages: list[int], token_entries: list[tuple[int, int]], call_tokens: int
) -> None:
    limits = RateLimits(rpm, tpm)

    async def go(store: BudgetStore) -> tuple[Any, int]:
        k = store.keys(TENANT)
        now_s, now_us = await store.client.time()
        now_ms = now_s * 1000 + now_us // 1000
        if request_ages:
            await store.client.zadd(k.rate_requests, {f"q{i}": now_ms - age for i, age in enumerate(request_ages)})
        for i, (age, n) in enumerate(token_entries):
            await store.client.zadd(k.rate_tokens, {f"t{i}": now_ms - age})
            await store.client.hset(k.rate_token_counts, f"t{i}", n)
            await store.client.incrby(k.rate_token_sum, n)
        admission = await store.admit(TENANT, PERIODS, ROOMY, [1], "r-new", HOUR_MS, rate=limits,
                                      call_tokens=call_tokens)
        return admission, now_ms

    admission, now_ms = run(go)
    requests_at = sorted(now_ms - age for age in request_ages)
    tokens_at = sorted((now_ms - age, n) for age, n in token_entries)
    expected = rate_verdict(limits, now_ms, requests_at, tokens_at, call_tokens)
    window = admission.rate
    if expected is None:
        assert window.limited is None and admission.reservation is not None
        return
    assert window.limited == expected.kind and admission.reservation is None
    if expected.wait_ms is None:
        assert window.wait_ms is None
    else:
        assert window.wait_ms is not None and abs(window.wait_ms - expected.wait_ms) <= 1_000
