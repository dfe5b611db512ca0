"""Clamp instead of refuse (``clamp.py``) and the choice shared by admission and quotes (``choice.py``).

The arithmetic is checked against brute force on small numbers and by its defining property
(the limit fits, one token more does not) over generated ones. ``choose`` is run twice on the same
spend: once through admit.v4 on the SQLite store (what a call does, reserving) and once
through ``choice.reading`` (what a quote does): both must pick the same model and limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.budget.choice import (
    CLAMPED,
    DOWNGRADED_TO_FIT,
    SOFT_CAP,
    WITHIN_BUDGET,
    Choice,
    choose,
    reading,
    thresholds_in_force,
)
from guardproxy.budget.clamp import Candidate, Tier, candidates, largest_output_tokens
from guardproxy.budget.decision import Thresholds, decide
from guardproxy.budget.levels import LevelArgs, LevelCap
from guardproxy.budget.policy import BudgetPolicy
from guardproxy.budget.pricing import Price, Usage, cost_micros
from guardproxy.budget.records import Admission
from guardproxy.observe.state import override_record
from guardproxy.store.redis import BudgetStore
from tests.helpers import HOUR_MS, PERIODS, TENANT, new_store

GPT4O = Price(2_500_000, 1_250_000, 10_000_000)
MINI = Price(150_000, 75_000, 600_000)
LIMITS = Thresholds(soft_day=16_000, hard_day=20_000, soft_month=16_000_000, hard_month=20_000_000)
CLAMPING = BudgetPolicy(20_000, 20_000_000, Decimal("0.8"), Decimal("1"), "UTC", clamp_max_tokens=True)

prices = st.builds(Price, st.integers(0, 100_000_000), st.integers(0, 100_000_000), st.integers(0, 100_000_000))


def brute_force(room: int, prompt: int, choices: int, tier: Tier) -> int | None:
    fitting = [t for t in range(tier.limit_tokens + 1)
               if room >= 0 and cost_micros(Usage(prompt, choices * t), tier.price) <= room]
    return max(fitting) if fitting else None


@pytest.mark.parametrize("price", [GPT4O, MINI, Price(1, 1, 1), Price(0, 0, 7), Price(3, 3, 0), Price(0, 0, 0)])
def test_largest_output_tokens_equals_brute_force_on_small_numbers(price: Price) -> None:
    for room in range(-2, 40):
        for prompt in (0, 1, 5, 13):
            for choices in (1, 2, 3):
                tier = Tier(price, 40)
                assert largest_output_tokens(room, prompt, choices, tier) == brute_force(room, prompt, choices, tier)


@given(st.integers(-10, 10**9), st.integers(0, 200_000), st.integers(1, 16), prices, st.integers(1, 200_000))
def test_the_limit_fits_and_one_token_more_does_not(
    room: int, prompt: int, choices: int, price: Price, limit: int
) -> None:
    tier = Tier(price, limit)
    tokens = largest_output_tokens(room, prompt, choices, tier)
    if tokens is None:
        assert room < 0 or cost_micros(Usage(prompt, 0), price) > room
        return
    assert 0 <= tokens <= limit
    assert cost_micros(Usage(prompt, choices * tokens), price) <= room
    if tokens < limit:
        assert cost_micros(Usage(prompt, choices * (tokens + 1)), price) > room


def test_the_worked_example_of_the_readme() -> None:
    # 400 micro-USD left, 13 prompt tokens: gpt-4o has room for 36 output tokens, gpt-4o-mini for 663.
    tiers = [Tier(GPT4O, 1000), Tier(MINI, 1000)]
    assert [c.max_tokens for c in candidates(19_600, 19_600, LIMITS, 13, 1, tiers, 1)] == [36, 663]
    only_mini = candidates(19_600, 19_600, LIMITS, 13, 1, tiers, 256)
    assert [(c.index, c.max_tokens, c.worst_case) for c in only_mini] == [(1, 663, 400)]
    assert [c.max_tokens for c in candidates(19_600, 19_600, LIMITS, 13, 2, tiers, 256)] == [331]
    assert candidates(19_600, 19_600, LIMITS, 13, 1, tiers, 664) == []
    assert candidates(19_600, 19_600, LIMITS, 13, 0, tiers, 1) == []  # embeddings: nothing to lower
    # The month's room counts too.
    month_tight = Thresholds(16_000, 20_000, 50, 19_700)
    assert [c.max_tokens for c in candidates(0, 19_600, month_tight, 13, 1, tiers, 1)] == [6, 163]


@given(
    st.integers(0, 30_000), st.integers(0, 30_000), st.integers(0, 2_000), st.integers(0, 4),
    st.lists(st.tuples(prices, st.integers(1, 5_000)), min_size=1, max_size=3), st.integers(1, 2_000),
)
def test_every_candidate_fits_both_caps_and_keeps_the_minimum(
    used_day: int, used_month: int, prompt: int, choices: int, tiers_raw: list[tuple[Price, int]], minimum: int,
) -> None:
    limits = Thresholds(16_000, 20_000, 25_000, 28_000)
    tiers = [Tier(price, limit) for price, limit in tiers_raw]
    found = candidates(used_day, used_month, limits, prompt, choices, tiers, minimum)
    assert [c.index for c in found] == sorted({c.index for c in found})
    for c in found:
        assert c.max_tokens >= minimum and c.max_tokens <= tiers[c.index].limit_tokens
        assert c.worst_case == cost_micros(Usage(prompt, choices * c.max_tokens), tiers[c.index].price)
        assert used_day + c.worst_case <= limits.hard_day and used_month + c.worst_case <= limits.hard_month
    room = min(limits.hard_day - used_day, limits.hard_month - used_month)
    for index, tier in enumerate(tiers):
        if index not in {c.index for c in found} and choices:
            tokens = largest_output_tokens(room, prompt, choices, tier)
            assert tokens is None or tokens < minimum


# -- choose: the same on the Lua script and on a read ---------------------------------------------


def run_choose(
    spend_day: int, spend_month: int, limits: Thresholds, tiers: Sequence[Tier], prompt: int, choices: int,
    policy: BudgetPolicy,
) -> tuple[Choice, Choice, int]:
    """``choose`` through admit.v2.lua (reserving) and through ``reading`` (not); and what the script
    left reserved."""

    async def go() -> tuple[Choice, Choice, int]:
        store: BudgetStore = new_store()
        try:
            k = store.keys(TENANT)
            await store.client.set(k.spend_day(PERIODS.day), spend_day)
            await store.client.set(k.spend_month(PERIODS.month), spend_month)
            ids = iter(range(100))

            async def lua(tenant: str, worst_cases: Sequence[int], provisional: bool, tiers: Sequence[int]
                          ) -> Admission:
                return await store.admit(tenant, PERIODS, limits, worst_cases, f"r{next(ids)}", HOUR_MS,
                                         provisional=provisional)

            real = await choose(TENANT, tiers, prompt, choices, policy, lua)
            quoted = await choose(TENANT, tiers, prompt, choices, policy, reading(spend_day, spend_month, limits))
            return real, quoted, int(await store.client.get(k.reserved) or 0)
        finally:
            await store.aclose()

    return asyncio.run(go())


@settings(max_examples=120, deadline=None)
@given(
    st.integers(0, 21_000), st.integers(0, 300), st.integers(0, 3), st.booleans(),
    st.sampled_from([(), (("max", 100),), (("max", 900),)]), st.integers(1, 700),
)
def test_a_call_and_a_quote_choose_alike(
    spend_day: int, prompt: int, choices: int, clamp_on: bool, limit: tuple[tuple[str, int], ...], minimum: int,
) -> None:
    tokens = dict(limit).get("max", 1000)
    tiers = [Tier(GPT4O, tokens), Tier(MINI, tokens)]
    policy = BudgetPolicy(20_000, 20_000_000, Decimal("0.8"), Decimal("1"), "UTC", clamp_on, minimum)
    real, quoted, held = run_choose(spend_day, spend_day, LIMITS, tiers, prompt, choices, policy)
    assert (real.index, real.clamped_tokens, real.reason) == (quoted.index, quoted.clamped_tokens, quoted.reason)
    assert real.worst_case == quoted.worst_case
    if real.index is None:
        assert held == 0 and real.deciding.reservation is None
    else:
        # The reservation is the (clamped) worst case and it fits: the cap guarantee holds.
        assert real.deciding.reservation is not None and held == real.deciding.reservation.amount == real.worst_case
        assert spend_day + held <= LIMITS.hard_day
        assert real.clamped_tokens is None or real.clamped_tokens >= minimum
    full = [cost_micros(Usage(prompt, choices * t.limit_tokens), t.price) for t in tiers]
    assert real.first.decision == decide(spend_day, spend_day, LIMITS, full)
    if real.first.decision.admitted:  # what fits unclamped is admitted exactly as it always was
        assert real.clamped_tokens is None and real.index == real.first.decision.index
    if not clamp_on:
        assert real.clamped_tokens is None


@pytest.mark.parametrize(
    ("spend", "tokens", "expected"),
    [
        (0, 1000, (0, None, WITHIN_BUDGET)),
        (17_000, 100, (1, None, SOFT_CAP)),
        (12_000, 1000, (1, None, DOWNGRADED_TO_FIT)),
        (19_600, 1000, (1, 663, CLAMPED)),
        (19_900, 1000, (None, None, "daily_budget_exhausted")),
    ],
)
def test_reasons(spend: int, tokens: int, expected: tuple[int | None, int | None, str]) -> None:
    tiers = [Tier(GPT4O, tokens), Tier(MINI, tokens)]
    real, quoted, _ = run_choose(spend, spend, LIMITS, tiers, 13, 1, CLAMPING)
    assert (real.index, real.clamped_tokens, real.reason) == expected == (
        quoted.index, quoted.clamped_tokens, quoted.reason)


def test_a_month_refusal_names_the_month() -> None:
    month = Thresholds(16_000, 20_000, 10, 20)
    real, quoted, _ = run_choose(0, 15, month, [Tier(MINI, 1000)], 13, 1, CLAMPING)
    assert real.reason == quoted.reason == "monthly_budget_exhausted"


def test_thresholds_in_force_are_what_the_script_applies() -> None:
    base = Thresholds(16_000, 20_000, 16_000_000, 20_000_000)
    override = override_record(BudgetPolicy(7_777, 99_999, Decimal("0.5"), Decimal("0.9"), "UTC"))

    async def go() -> Thresholds:
        store = new_store()
        try:
            await store.set_override(TENANT, override)
            admission = await store.admit(TENANT, PERIODS, base, [1], "r", HOUR_MS)
            return admission.limits
        finally:
            await store.aclose()

    assert asyncio.run(go()) == thresholds_in_force(base, override) == Thresholds(3_889, 6_999, 50_000, 89_999)
    assert thresholds_in_force(base, {}) == base


def test_clamping_is_configured_in_the_defaults_and_per_tenant() -> None:
    from guardproxy.config.settings import parse_config
    from guardproxy.config.validation import ConfigError

    raw = {
        "upstreams": {"openai": {"base_url": "http://127.0.0.1:1/v1"}},
        "models": {"m": {"input": 1, "output": 2}},
        "budgets": {"defaults": {"clamp_max_tokens": True, "min_completion_tokens": 64}},
        "tenants": {"a": {}, "b": {"clamp_max_tokens": False}, "c": {"min_completion_tokens": 1}},
    }
    config = parse_config(raw, {})
    assert (config.defaults.clamp_max_tokens, config.defaults.min_completion_tokens) == (True, 64)
    assert [(config.policy_for(t).clamp_max_tokens, config.policy_for(t).min_completion_tokens)
            for t in ("a", "b", "c", "unknown")] == [(True, 64), (False, 64), (True, 1), (True, 64)]
    assert parse_config({**raw, "budgets": {}, "tenants": {}}, {}).defaults.clamp_max_tokens is False
    for bad, field in [({"clamp_max_tokens": "yes"}, "clamp_max_tokens"),
                       ({"min_completion_tokens": 0}, "min_completion_tokens")]:
        with pytest.raises(ConfigError) as error:
            parse_config({**raw, "tenants": {"a": bad}}, {})
        assert error.value.path == f"tenants.a.{field}"


def test_the_lowered_limit_goes_in_the_fields_the_request_used() -> None:
    from guardproxy.http.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES

    assert CHAT.lowered_limit({"max_completion_tokens": 900}, 300) == {"max_completion_tokens": 300}
    assert CHAT.lowered_limit({"max_tokens": 900}, 300) == {"max_tokens": 300}
    assert CHAT.lowered_limit({"max_tokens": 9, "max_completion_tokens": 9}, 3) == {
        "max_tokens": 3, "max_completion_tokens": 3}
    assert CHAT.lowered_limit({"max_tokens": None}, 300) == {"max_tokens": 300}
    assert CHAT.lowered_limit({}, 300) == {"max_tokens": 300}
    assert COMPLETIONS.lowered_limit({}, 300) == {"max_tokens": 300}
    assert RESPONSES.lowered_limit({}, 300) == {"max_output_tokens": 300}
    assert EMBEDDINGS.lowered_limit({}, 300) == {}


def test_a_clamped_admission_binds_each_candidate_by_its_own_models_caps() -> None:
    """Only the cheaper tier can be clamped to fit (the expensive one's prompt alone is over the room):
    the second admission offers that tier alone, and its model's cap (spent) must refuse it, in the
    script and in a quote alike; were the candidates' models taken from the whole chain, the cheaper
    tier would be judged by the expensive model's caps (none) and admitted."""
    mini_cap = LevelCap("model", "model:mini", "day", "d", hard=10, soft=10, limit=10, model="mini")
    levels = LevelArgs((mini_cap,), ("gpt-4o", "mini"))
    tiers = [Tier(GPT4O, 4000), Tier(MINI, 4000)]
    prompt, spend = 2000, 19_000  # room 1,000: gpt-4o's prompt is 5,000, mini's 300

    async def go() -> tuple[Choice, Choice]:
        store: BudgetStore = new_store()
        try:
            k = store.keys(TENANT)
            await store.client.set(k.spend_day(PERIODS.day), spend)
            ids = iter(range(100))

            async def lua(tenant: str, worst_cases: Sequence[int], provisional: bool, tiers: Sequence[int]
                          ) -> Admission:
                return await store.admit(tenant, PERIODS, LIMITS, worst_cases, f"r{next(ids)}", HOUR_MS,
                                         provisional=provisional, levels=levels.for_tiers(tiers))

            real = await choose(TENANT, tiers, prompt, 1, CLAMPING, lua)
            quoted = await choose(TENANT, tiers, prompt, 1, CLAMPING, reading(spend, 0, LIMITS, levels=levels,
                                                                               caps_used=[0]))
            return real, quoted
        finally:
            await store.aclose()

    real, quoted = asyncio.run(go())
    assert [c.index for c in clamp_candidates(spend, prompt, tiers)] == [1]
    for choice in (real, quoted):
        assert choice.index is None
        assert choice.deciding.refused_by == mini_cap


def clamp_candidates(spend: int, prompt: int, tiers: Sequence[Tier]) -> list[Candidate]:
    return candidates(spend, 0, LIMITS, prompt, 1, tiers, CLAMPING.min_completion_tokens)
