"""Jobs (work orders) in the store scripts, on every backend of ``tests/stores.py``: the job's
counters move with the settlement, its share of live reservations with the reservation (settle,
release, an expired lease), and its cap refuses a call without blocking the tenant."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import anyio
import pytest

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import JobArgs, Reservation
from guardproxy.store.redis import BudgetStore

pytestmark = pytest.mark.anyio

TENANT = "acme"
PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
HOUR_MS = 3_600_000
LIMITS = Thresholds(soft_day=10**9, hard_day=10**9, soft_month=10**10, hard_month=10**10)
DAY_S = 86_400


def record(model: str, prompt: int, completion: int, cost: int, job: str = "J1") -> dict[str, str | int]:
    return {"request_id": f"req-{model}-{prompt}", "model": model, "prompt_tokens": prompt,
            "completion_tokens": completion, "cost_micros": cost, "outcome": "completed", "job": job}


async def reserve(store: BudgetStore, rid: str, amount: int, job: JobArgs, lease_ms: int = HOUR_MS) -> Reservation:
    admission = await store.admit(TENANT, PERIODS, LIMITS, [amount], rid, lease_ms, job=job)
    assert admission.reservation is not None, admission.decision
    return admission.reservation


async def held(store: BudgetStore, job: str = "J1") -> int:
    return int(await store.client.hget(store.keys(TENANT).job_held, job) or 0)


async def test_settlements_add_up_in_the_job_per_model_and_once(budget_store: BudgetStore) -> None:
    store = budget_store
    job = JobArgs("J1")
    a = await reserve(store, "a", 1_000, job)
    b = await reserve(store, "b", 2_000, job)
    assert await held(store) == 3_000
    await store.settle(a, 700, record("gpt-4o", 10, 5, 700))
    await store.settle(b, 300, record("gpt-4o-mini", 20, 7, 300))
    assert not (await store.settle(b, 300, record("gpt-4o-mini", 20, 7, 300))).applied
    usage = await store.job_usage(TENANT, "J1")
    assert usage is not None
    assert (usage.calls, usage.prompt_tokens, usage.completion_tokens, usage.cost_micros) == (2, 30, 12, 1_000)
    assert usage.by_model == {
        "gpt-4o": {"calls": 1, "prompt_tokens": 10, "completion_tokens": 5, "cost_micros": 700},
        "gpt-4o-mini": {"calls": 1, "prompt_tokens": 20, "completion_tokens": 7, "cost_micros": 300},
    }
    assert 0 < usage.first_at_ms <= usage.last_at_ms
    assert await held(store) == 0
    # the call log carries the job; the tenant was charged the same
    assert [c["job"] for c in await store.recent_calls(TENANT, 10)] == ["J1", "J1"]
    assert int(await store.client.get(store.keys(TENANT).spend_day(PERIODS.day)) or 0) == 1_000


async def test_jobs_are_listed_by_last_call_and_expire(budget_store: BudgetStore) -> None:
    store = budget_store
    for i, name in enumerate(["old", "mid", "new"]):
        r = await reserve(store, f"r{i}", 10, JobArgs(name, ttl_s=DAY_S))
        await store.settle(r, 1, record("m", 1, 1, 1, job=name), job_ttl_s=DAY_S)
        await anyio.sleep(0.01)
    assert [j.job for j in await store.recent_jobs(TENANT, 2)] == ["new", "mid"]
    ttl = await store.client.ttl(store.keys(TENANT).job("old"))
    assert DAY_S - 5 <= ttl <= DAY_S
    # a call without a job touches no job
    r = await reserve(store, "plain", 10, JobArgs())
    await store.settle(r, 1, {"model": "m", "prompt_tokens": 1, "completion_tokens": 1, "cost_micros": 1})
    assert len(await store.recent_jobs(TENANT, 10)) == 3
    assert await store.job_usage(TENANT, "nope") is None


async def test_a_job_cap_refuses_without_blocking_the_tenant(budget_store: BudgetStore) -> None:
    store = budget_store
    capped = JobArgs("J1", cap_micros=1_000)
    a = await reserve(store, "a", 600, capped)
    refused = await store.admit(TENANT, PERIODS, LIMITS, [500], "b", HOUR_MS, job=capped)
    assert refused.reservation is None and refused.decision.exhausted == "job"
    assert refused.job_room == 400
    assert not refused.refused  # the tenant is not flagged blocked
    # a cheaper candidate that fits the job's room is sent instead
    cheaper = await store.admit(TENANT, PERIODS, LIMITS, [500, 400], "c", HOUR_MS, job=capped)
    assert cheaper.decision.index == 1
    # another job, and a call with no job, are not held back by J1
    assert (await store.admit(TENANT, PERIODS, LIMITS, [500], "d", HOUR_MS, job=JobArgs("J2", 1_000))).reservation
    assert (await store.admit(TENANT, PERIODS, LIMITS, [500], "e", HOUR_MS)).reservation
    # settling for less frees room
    await store.settle(a, 100, record("m", 1, 1, 100))
    again = await store.admit(TENANT, PERIODS, LIMITS, [500], "f", HOUR_MS, job=capped)
    assert again.reservation is not None and again.job_room == 1_000 - 100 - 400


async def test_the_override_job_cap_wins(budget_store: BudgetStore) -> None:
    store = budget_store
    await store.client.hset(store.keys(TENANT).budget, mapping={
        "soft_day": 10**9, "hard_day": 10**9, "soft_month": 10**10, "hard_month": 10**10, "job_micros": 50,
    })
    refused = await store.admit(TENANT, PERIODS, LIMITS, [60], "a", HOUR_MS, job=JobArgs("J1", None))
    assert refused.decision.exhausted == "job"
    await store.client.hset(store.keys(TENANT).budget, "job_micros", -1)  # none
    assert (await store.admit(TENANT, PERIODS, LIMITS, [60], "b", HOUR_MS, job=JobArgs("J1", 10))).reservation


async def test_a_job_share_frees_on_release_and_on_an_expired_lease(budget_store: BudgetStore) -> None:
    store = budget_store
    capped = JobArgs("J1", cap_micros=1_000)
    released = await reserve(store, "released", 900, capped)
    await store.settle(released, 0)  # a release: nothing charged, no call logged
    assert await held(store) == 0
    assert await store.job_usage(TENANT, "J1") is None
    dead = await reserve(store, "dead", 900, capped, lease_ms=200)
    assert (await store.admit(TENANT, PERIODS, LIMITS, [200], "blocked", HOUR_MS, job=capped)).reservation is None
    await anyio.sleep(0.3)
    # the next admission sweeps the dead reservation and the job's share with it
    after = await store.admit(TENANT, PERIODS, LIMITS, [200], "later", HOUR_MS, job=capped)
    assert after.reservation is not None and after.job_room == 1_000
    assert await held(store) == 200
    # its late settlement still charges the job, once
    await store.settle(dead, 50, record("m", 1, 1, 50))
    usage = await store.job_usage(TENANT, "J1")
    assert usage is not None and usage.cost_micros == 50 and usage.calls == 1
    assert await held(store) == 200


async def test_a_free_models_job_reservation_settles_and_expires(budget_store: BudgetStore) -> None:
    """A model priced at 0 reserves 0 for its job: freeing that share must not send HINCRBY "-0"
    (Lua's -0, which Redis refuses as not an integer), on settle nor on an expired lease."""
    store = budget_store
    job = JobArgs("J1")
    free = await reserve(store, "free", 0, job)
    assert (await store.settle(free, 0, record("local-model", 10, 5, 0))).applied
    usage = await store.job_usage(TENANT, "J1")
    assert usage is not None and (usage.calls, usage.cost_micros) == (1, 0)
    await reserve(store, "dies", 0, job, lease_ms=100)
    await anyio.sleep(0.2)
    # the next admission sweeps the expired one, its job share of 0 with it
    assert (await store.admit(TENANT, PERIODS, LIMITS, [10], "next", HOUR_MS, job=job)).reservation is not None
    assert await held(store) == 10
