"""Validation of external bookings (``external.parse_external_spend``): exact money, strict fields."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.admin.external import MAX_COST_MICROS, ExternalSpend, parse_external_spend
from guardproxy.errors import GuardError

BASE = {"description": "batch", "idempotency_key": "k-1"}


def parse(raw: str) -> ExternalSpend:
    return parse_external_spend(raw.encode())


@pytest.mark.parametrize(
    ("literal", "micros"),
    [("0.29", 290_000), ("0.3", 300_000), ("1.000001", 1_000_001), ("0.0000001", 1), ("0.0000019", 2),
     ("0", 0), ("12", 12_000_000), ('"0.29"', 290_000), ("1E-6", 1), ("1000000000", MAX_COST_MICROS)],
)
def test_cost_usd_is_exact_and_rounds_up(literal: str, micros: int) -> None:
    # As a float, 0.29 * 1e6 is 290000.00000000006: rounding that up would charge a micro-dollar too much.
    spend = parse(f'{{"cost_usd": {literal}, "description": "batch", "idempotency_key": "k-1"}}')
    assert spend.cost_micros == micros


@given(st.decimals(min_value=0, max_value=10**6, places=9, allow_nan=False, allow_infinity=False))
def test_any_decimal_literal_becomes_its_exact_ceiling_in_micros(usd: Decimal) -> None:
    spend = parse(f'{{"cost_usd": {usd:f}, "description": "b", "idempotency_key": "k"}}')
    assert spend.cost_micros == int((usd * 1_000_000).to_integral_value(rounding=ROUND_CEILING))


def test_ids_are_per_key_and_carry_no_key_text() -> None:
    a = parse_external_spend(orjson.dumps({**BASE, "cost_micros": 5}))
    b = parse_external_spend(orjson.dumps({**BASE, "cost_micros": 5, "idempotency_key": "k-2"}))
    assert a.reservation_id != b.reservation_id and a.reservation_id.startswith("ext:")
    assert "k-1" not in a.reservation_id and a.request_id.startswith("ext_")
    assert (a.model, a.prompt_tokens, a.completion_tokens) == (None, 0, 0)


@pytest.mark.parametrize(
    "body",
    ['{"cost_usd": 1.0000000000000000000001e400, "description": "b", "idempotency_key": "k"}',
     '{"cost_usd": "0x10", "description": "b", "idempotency_key": "k"}',
     '{"cost_usd": Infinity, "description": "b", "idempotency_key": "k"}',
     '{"cost_micros": 1000000000000001, "description": "b", "idempotency_key": "k"}',
     '{"cost_micros": ' + "9" * 5000 + ', "description": "b", "idempotency_key": "k"}'],
)
def test_absurd_amounts_are_refused(body: str) -> None:
    with pytest.raises(GuardError) as refused:
        parse(body)
    assert refused.value.status == 400
