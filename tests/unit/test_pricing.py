"""Prices and the cost of a call: hand-computed examples and properties over tokens x prices."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.budget.pricing import (
    Price,
    Usage,
    cost_micros,
    lookup_model,
    micros_to_usd,
    price_to_micros,
    usd_to_micros,
)

GPT_4O = Price(input=2_500_000, cached_input=1_250_000, output=10_000_000)
GPT_4O_MINI = Price(input=150_000, cached_input=75_000, output=600_000)

tokens = st.integers(min_value=0, max_value=10_000_000)
prices = st.integers(min_value=0, max_value=1_000_000_000)


@st.composite
def usages(draw: st.DrawFn) -> Usage:
    return Usage(draw(tokens), draw(tokens), draw(tokens))


@st.composite
def price_values(draw: st.DrawFn) -> Price:
    return Price(draw(prices), draw(prices), draw(prices))


# --- hand-computed examples ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usage", "price", "expected"),
    [
        # 600 * 2.5 + 400 * 1.25 + 500 * 10 = 1500 + 500 + 5000
        (Usage(1000, 500, 400), GPT_4O, 7000),
        (Usage(1000, 500), GPT_4O, 7500),
        (Usage(0, 0), GPT_4O, 0),
        (Usage(1_000_000, 0), GPT_4O, 2_500_000),
        (Usage(0, 1_000_000), GPT_4O, 10_000_000),
        (Usage(1_000_000, 0, 1_000_000), GPT_4O, 1_250_000),
        # 1 token of gpt-4o input is 2.5 micros: rounds up to 3.
        (Usage(1, 0), GPT_4O, 3),
        (Usage(2, 0), GPT_4O, 5),
        # gpt-4o-mini: 1 token = 0.15 micros -> 1; 7 tokens = 1.05 -> 2; 20 tokens = 3.0 exactly.
        (Usage(1, 0), GPT_4O_MINI, 1),
        (Usage(7, 0), GPT_4O_MINI, 2),
        (Usage(20, 0), GPT_4O_MINI, 3),
        # 1 cached token 0.075 + 1 completion token 0.6 = 0.675 -> 1 (rounded once, on the sum).
        (Usage(1, 1, 1), GPT_4O_MINI, 1),
        # 10 uncached * 0.15 + 10 cached * 0.075 + 10 out * 0.6 = 1.5 + 0.75 + 6 = 8.25 -> 9
        (Usage(20, 10, 10), GPT_4O_MINI, 9),
        (Usage(100, 100), Price(0, 0, 0), 0),
    ],
)
def test_cost_examples(usage: Usage, price: Price, expected: int) -> None:
    assert cost_micros(usage, price) == expected


def test_cached_above_prompt_is_clamped() -> None:
    # A provider reporting more cached tokens than prompt tokens must not make the cost negative
    # nor bill cached tokens beyond the prompt: all 100 prompt tokens count as cached.
    assert cost_micros(Usage(100, 0, 250), GPT_4O) == 125
    assert cost_micros(Usage(100, 10, 250), GPT_4O) == 125 + 100


def test_negative_tokens_rejected() -> None:
    with pytest.raises(ValueError):
        Usage(-1, 0)
    with pytest.raises(ValueError):
        Usage(0, -1)
    with pytest.raises(ValueError):
        Usage(0, 0, -1)


@pytest.mark.parametrize("field", ["input", "cached_input", "output"])
def test_negative_price_rejected(field: str) -> None:
    values = {"input": 1, "cached_input": 1, "output": 1, field: -1}
    with pytest.raises(ValueError, match=field):
        Price(**values)


# --- properties ------------------------------------------------------------------------------


@given(usages(), price_values())
def test_cost_is_exact_ceiling(usage: Usage, price: Price) -> None:
    cached = min(usage.cached_prompt_tokens, usage.prompt_tokens)
    exact = (
        Fraction(usage.prompt_tokens - cached) * Fraction(price.input, 1_000_000)
        + Fraction(cached) * Fraction(price.cached_input, 1_000_000)
        + Fraction(usage.completion_tokens) * Fraction(price.output, 1_000_000)
    )
    cost = cost_micros(usage, price)
    assert type(cost) is int
    assert cost >= 0
    assert cost - 1 < exact <= cost


@given(usages(), price_values(), st.sampled_from(["prompt", "completion", "cached"]), st.integers(1, 10_000))
def test_cost_monotonic_in_each_token_count(usage: Usage, price: Price, which: str, more: int) -> None:
    if which == "prompt":
        bigger = Usage(usage.prompt_tokens + more, usage.completion_tokens, usage.cached_prompt_tokens)
    elif which == "completion":
        bigger = Usage(usage.prompt_tokens, usage.completion_tokens + more, usage.cached_prompt_tokens)
    else:
        bigger = Usage(usage.prompt_tokens, usage.completion_tokens, usage.cached_prompt_tokens + more)
    before, after = cost_micros(usage, price), cost_micros(bigger, price)
    if which != "cached":
        assert after >= before
    elif price.cached_input <= price.input:
        assert after <= before  # more of the same prompt served from cache never costs more
    else:
        assert after >= before


@given(usages(), price_values(), st.sampled_from(["input", "cached_input", "output"]), st.integers(1, 10**6))
def test_cost_monotonic_in_each_price(usage: Usage, price: Price, which: str, more: int) -> None:
    values = {"input": price.input, "cached_input": price.cached_input, "output": price.output}
    values[which] += more
    assert cost_micros(usage, Price(**values)) >= cost_micros(usage, price)


@given(usages(), usages(), price_values())
def test_splitting_a_call_never_costs_less(a: Usage, b: Usage, price: Price) -> None:
    # Each part rounds up, so two settled halves are at least the whole.
    a = Usage(a.prompt_tokens, a.completion_tokens, min(a.cached_prompt_tokens, a.prompt_tokens))
    b = Usage(b.prompt_tokens, b.completion_tokens, min(b.cached_prompt_tokens, b.prompt_tokens))
    whole = Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                  a.cached_prompt_tokens + b.cached_prompt_tokens)
    assert cost_micros(a, price) + cost_micros(b, price) >= cost_micros(whole, price)


# --- USD conversions -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usd", "micros"),
    [
        ("0.075", 75_000),
        ("2.50", 2_500_000),
        ("10", 10_000_000),
        ("0", 0),
        ("0.000001", 1),
        ("0.0000005", 1),  # half a micro rounds up
        ("0.0000004", 0),
        ("1234.5678905", 1_234_567_891),
    ],
)
def test_usd_to_micros(usd: str, micros: int) -> None:
    result = usd_to_micros(Decimal(usd))
    assert result == micros
    assert type(result) is int


@pytest.mark.parametrize(
    ("usd", "micros"),
    [
        ("0.075", 75_000),
        ("2.50", 2_500_000),
        ("1.25", 1_250_000),
        ("0.15", 150_000),
        ("0", 0),
        ("0.0000001", 1),  # a sub-micro price rounds up: nothing is undercharged
        ("0.0000019", 2),
        ("0.000002", 2),
    ],
)
def test_price_to_micros(usd: str, micros: int) -> None:
    result = price_to_micros(Decimal(usd))
    assert result == micros
    assert type(result) is int


def test_float_like_decimal_from_yaml_is_exact() -> None:
    # str(0.075) is "0.075": the config turns YAML floats into Decimal via str, never via binary float.
    assert price_to_micros(Decimal(str(0.075))) == 75_000
    assert usd_to_micros(Decimal(str(0.1))) == 100_000


def test_micros_to_usd() -> None:
    assert micros_to_usd(1_234_567) == 1.234567
    assert micros_to_usd(0) == 0.0


@given(st.integers(min_value=0, max_value=10**12))
def test_usd_micros_round_trip(micros: int) -> None:
    usd = Decimal(micros) / Decimal(1_000_000)
    assert usd_to_micros(usd) == micros
    assert price_to_micros(usd) == micros


# --- model lookup ----------------------------------------------------------------------------

MODELS = {"gpt-4o": "4o", "gpt-4": "4", "gpt-4o-mini": "mini", "gpt-3.5-turbo": "35",
          "gpt-4o-2024-05-13": "4o-may"}


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt-4o", "4o"),
        ("gpt-4o-2024-08-06", "4o"),
        ("gpt-4-0613", "4"),
        ("gpt-4o-mini-2024-07-18", "mini"),
        ("gpt-3.5-turbo-0125", "35"),
        ("gpt-4o-2024-05-13", "4o-may"),  # a listed snapshot wins over its base
        ("gpt-4.1", None),
        ("gpt-4o-2024-08-06-extra", None),
        ("gpt-4-1106-preview", None),
        ("gpt-4o-24-08-06", None),
        ("gpt-5-2025-08-07", None),  # base not listed
        ("2024-08-06", None),
        ("", None),
        ("GPT-4O", None),
    ],
)
def test_lookup_model(name: str, expected: str | None) -> None:
    assert lookup_model(name, MODELS) == expected


def test_lookup_model_empty_mapping() -> None:
    assert lookup_model("gpt-4o-2024-08-06", {}) is None
