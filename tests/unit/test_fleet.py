"""The fleet brakes' policies and digest, and the chargeback export's rows (pure parts)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.budget.fleet import LoopPolicy, VelocityPolicy, key_fingerprint, request_digest
from guardproxy.budget.pricing import Price, Usage, cost_micros
from guardproxy.budget.records import LoggedCall, Reservation
from guardproxy.cli import main as cli_main
from guardproxy.cli import masked
from guardproxy.config.settings import parse_config
from guardproxy.config.validation import ConfigError
from guardproxy.observe.alerts import event_json, slack_text
from guardproxy.observe.export import COLUMNS, Line, allocate, call_lines, collect, csv_bytes, focus_rows, parse_time
from guardproxy.store.redis import BudgetStore
from guardproxy.store.sqlite import SqliteClient
from tests.helpers import config_dict

GPT4O = Price(2_500_000, 1_250_000, 10_000_000)


def config(**budgets: Any) -> Any:
    raw = config_dict("http://127.0.0.1:9")
    raw["budgets"] = budgets
    return parse_config(raw, {})


# -- config ------------------------------------------------------------------------------------------


def test_loop_and_velocity_are_off_unless_set() -> None:
    policy = config().policy_for("acme")
    assert policy.loop is None and policy.velocity is None


def test_defaults_apply_to_every_tenant_and_a_tenant_overrides_or_turns_them_off() -> None:
    raw = config_dict("http://127.0.0.1:9")
    raw["budgets"] = {"defaults": {"loop": {"max_repeats": 4}, "velocity": {"factor": 3}}}
    raw["tenants"]["acme"]["loop"] = {"action": "alert", "window_s": 30}
    raw["tenants"]["acme"]["velocity"] = None
    parsed = parse_config(raw, {})
    assert parsed.defaults.loop == LoopPolicy(max_repeats=4, window_s=60, action="refuse")
    assert parsed.policy_for("globex").loop == parsed.defaults.loop
    assert parsed.policy_for("acme").loop == LoopPolicy(max_repeats=4, window_s=30, action="alert")
    assert parsed.policy_for("globex").velocity == VelocityPolicy(Decimal(3), 24, 1_000_000)
    assert parsed.policy_for("acme").velocity is None
    assert parsed.policy_for("nobody").loop is not None  # an unlisted tenant gets the defaults


@pytest.mark.parametrize(("section", "path"), [
    ({"loop": {"max_repeats": 0}}, "budgets.defaults.loop.max_repeats"),
    ({"loop": {"window_s": 86_401}}, "budgets.defaults.loop.window_s"),
    ({"loop": {"action": "block"}}, "budgets.defaults.loop.action"),
    ({"loop": {"repeats": 3}}, "budgets.defaults.loop.repeats"),
    ({"loop": 3}, "budgets.defaults.loop"),
    ({"velocity": {}}, "budgets.defaults.velocity.factor"),
    ({"velocity": {"factor": 0.5}}, "budgets.defaults.velocity.factor"),
    ({"velocity": {"factor": 2, "baseline_hours": 0}}, "budgets.defaults.velocity.baseline_hours"),
    ({"velocity": {"factor": 2, "min_usd": -1}}, "budgets.defaults.velocity.min_usd"),
])
def test_bad_brakes_name_the_field(section: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as error:
        config(defaults=section)
    assert error.value.path == path


# -- the canonical request digest ----------------------------------------------------------------------


BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}


def test_the_digest_ignores_key_order_and_delivery_fields() -> None:
    digest = request_digest("chat/completions", BODY)
    shuffled = {"temperature": 0.2, "messages": [{"content": "hi", "role": "user"}], "model": "gpt-4o"}
    assert request_digest("chat/completions", shuffled) == digest
    delivered = {**BODY, "stream": True, "stream_options": {"include_usage": True}, "user": "u-1",
                 "metadata": {"run": "7"}, "store": True, "service_tier": "auto", "prompt_cache_key": "k",
                 "safety_identifier": "s"}
    assert request_digest("chat/completions", delivered) == digest
    assert len(digest) == 32


@pytest.mark.parametrize("change", [
    {"temperature": 0.3}, {"model": "gpt-4o-mini"}, {"messages": [{"role": "user", "content": "hi!"}]},
    {"max_tokens": 5}, {"tools": []},
])
def test_anything_that_changes_the_answer_changes_the_digest(change: dict[str, Any]) -> None:
    assert request_digest("chat/completions", {**BODY, **change}) != request_digest("chat/completions", BODY)


def test_the_endpoint_is_part_of_the_digest_and_keys_are_fingerprinted() -> None:
    assert request_digest("completions", BODY) != request_digest("chat/completions", BODY)
    assert key_fingerprint("sha256:" + "ab" * 32) == "ab" * 8
    assert key_fingerprint(None) == "-"


# -- allocation and the export's rows ------------------------------------------------------------------


@given(st.integers(0, 10**12), st.lists(st.integers(0, 10**15), min_size=1, max_size=6))
def test_allocation_adds_up_exactly_and_stays_within_one_unit_of_the_share(total: int, weights: list[int]) -> None:
    shares = allocate(total, weights)
    assert sum(shares) == total and all(s >= 0 for s in shares)
    whole = sum(weights)
    if whole:
        for share, weight in zip(shares, weights, strict=True):
            exact = Decimal(total) * weight / whole
            assert exact - 1 < share < exact + 1
    assert allocate(total, weights) == shares  # deterministic


def test_allocation_ties_go_to_the_earlier_and_zero_weights_to_the_first() -> None:
    assert allocate(1, [1, 1]) == [1, 0]
    assert allocate(2, [1, 1, 1]) == [1, 1, 0]
    assert allocate(5, [0, 0]) == [5, 0]
    assert allocate(5, []) == []


@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_a_calls_lines_add_up_to_its_charge(prompt: int, cached: int, completion: int, reasoning: int) -> None:
    cached, reasoning = min(cached, prompt), min(reasoning, completion)
    charge = cost_micros(Usage(prompt, completion, cached), GPT4O)
    fields = {"prompt_tokens": str(prompt), "cached_tokens": str(cached), "completion_tokens": str(completion),
              "reasoning_tokens": str(reasoning), "cost_micros": str(charge), "price_input": "2500000",
              "price_cached_input": "1250000", "price_output": "10000000"}
    lines = call_lines(fields, None)
    assert sum(line.effective_micros for line in lines) == charge
    assert sum(line.quantity for line in lines) == prompt + completion
    for line in lines:
        assert line.list_micros >= line.effective_micros
        exact = Decimal(line.quantity * line.price) / 1_000_000
        assert exact - len(lines) <= line.effective_micros <= exact + len(lines)


def test_lines_split_classes_and_show_the_cache_discount() -> None:
    fields = {"prompt_tokens": "1000", "cached_tokens": "400", "completion_tokens": "300", "reasoning_tokens": "100",
              "cost_micros": "5000"}
    lines = call_lines(fields, GPT4O)  # logged without prices: the model's price now
    assert [(x.token_class, x.quantity, x.effective_micros, x.list_micros) for x in lines] == [
        ("input", 600, 1500, 1500), ("cached_input", 400, 500, 1000), ("output", 200, 2000, 2000),
        ("reasoning", 100, 1000, 1000),
    ]


def test_a_charge_logged_without_tokens_still_has_its_row() -> None:
    (line,) = call_lines({"cost_micros": "42"}, GPT4O)
    assert (line.token_class, line.quantity, line.effective_micros) == ("input", 0, 42)
    assert call_lines({"cost_micros": "0"}, GPT4O) == []


def test_focus_rows_of_a_call_and_of_external_spend() -> None:
    cfg = config()
    at_ms = int(datetime(2026, 12, 6, 14, 25, tzinfo=UTC).timestamp() * 1000)
    call = LoggedCall(f"{at_ms}-0", {
        "request_id": "req_1", "model": "gpt-4o", "requested_model": "gpt-4o", "prompt_tokens": "10",
        "completion_tokens": "5", "cached_tokens": "0", "cost_micros": "75", "outcome": "completed",
        "job": "WO-1", "key": "ab" * 8, "day": "2026-12-06", "upstream": "openai",
    })
    rows = focus_rows("acme", call, cfg)
    assert [(r["x_TokenClass"], r["PricingQuantity"], r["x_CostMicros"]) for r in rows] == [
        ("input", 10, 25), ("output", 5, 50)]
    first = rows[0]
    assert set(first) == set(COLUMNS) - {"AvailabilityZone", "CapacityReservationId", "CapacityReservationStatus",
                                         "CommitmentDiscountCategory", "CommitmentDiscountId",
                                         "CommitmentDiscountName", "CommitmentDiscountQuantity",
                                         "CommitmentDiscountStatus", "CommitmentDiscountType",
                                         "CommitmentDiscountUnit", "RegionId", "RegionName", "ResourceName",
                                         "ResourceType"}
    assert first["ChargePeriodStart"] == datetime(2026, 12, 6, 14, tzinfo=UTC)
    assert first["BillingPeriodStart"] == datetime(2026, 12, 1, tzinfo=UTC)
    assert first["BillingPeriodEnd"] == datetime(2027, 1, 1, tzinfo=UTC)
    assert first["ListUnitPrice"] == Decimal("0.0000025") and first["BilledCost"] == Decimal("0.000025")
    assert (first["SkuId"], first["SubAccountId"], first["x_JobId"], first["x_KeyId"], first["Tags"]) == (
        "gpt-4o", "acme", "WO-1", "ab" * 8, '{"job":"WO-1"}')
    external = LoggedCall(f"{at_ms}-1", {"request_id": "ext_1", "cost_micros": "12345", "outcome": "external",
                                         "description": "nightly batch"})
    (row,) = focus_rows("acme", external, cfg)
    assert (row["x_TokenClass"], row["PricingUnit"], row["BilledCost"], row["ProviderName"]) == (
        "external", "Bookings", Decimal("0.012345"), "external")
    failed = LoggedCall(f"{at_ms}-2", {"request_id": "r", "cost_micros": "0", "outcome": "upstream_error"})
    assert focus_rows("acme", failed, cfg) == []
    text = csv_bytes(rows).decode().splitlines()
    assert text[0].split(",")[:3] == ["AvailabilityZone", "BilledCost", "BillingAccountId"]
    assert ",0.000025," in text[1] and "2026-12-06T14:00:00Z" in text[1]


def test_export_times() -> None:
    assert parse_time("2026-12-01", "from") == datetime(2026, 12, 1, tzinfo=UTC)
    assert parse_time("2026-12-01T06:00:00-06:00", "from") == datetime(2026, 12, 1, 12, tzinfo=UTC)
    with pytest.raises(ValueError, match="from must be a date"):
        parse_time("yesterday", "from")
    assert Line("input", 1, 1, 1).effective_micros == 0


# -- alert events ------------------------------------------------------------------------------------


def test_loop_and_velocity_events_read_well() -> None:
    loop = event_json({"event": "loop", "tenant": "acme", "key": "ab" * 8, "job": "", "digest": "d" * 32,
                       "repeats": "4", "max_repeats": "3", "window_ms": "60000", "action": "refuse",
                       "at_ms": "1765000000000"}, None)  # type: ignore[arg-type]
    assert loop["job"] is None and loop["window_s"] == 60 and loop["repeats"] == 4
    assert "sent the same request more than 3 times within 60 s" in slack_text(loop)
    velocity = event_json({"event": "velocity", "tenant": "acme", "hour": "490277", "spent": "3001",
                           "baseline": "1000", "limit": "3000", "factor_ppm": "3000000",
                           "at_ms": "1765000000000"}, None)  # type: ignore[arg-type]
    assert velocity["hour_start"] == "2025-12-06T05:00:00Z" and velocity["factor"] == 3
    assert "over 3x its hourly average" in slack_text(velocity)


@pytest.mark.anyio
async def test_an_export_reaching_past_a_full_call_log_says_it_is_incomplete(tmp_path: Path) -> None:
    raw = config_dict("http://127.0.0.1:9", store={"call_log_size": 3})
    cfg = parse_config(raw, {})
    store = BudgetStore(SqliteClient(tmp_path / "spend.db"), "gp", calls_kept=3)
    start = datetime.now(UTC) - timedelta(minutes=1)
    for i in range(3):
        await store.settle(Reservation(f"r{i}", "acme", "2026-12-06", "2026-12", 0), 5,
                           {"request_id": f"q{i}", "model": "gpt-4o", "prompt_tokens": 2, "cost_micros": 5})
    end = datetime.now(UTC) + timedelta(minutes=1)
    full = await collect(store, cfg, ["acme", "globex"], start, end)
    assert full.incomplete == ["acme"] and full.billed_micros == 15 and len(full.rows) == 3
    _, oldest_ms = await store.call_log_extent("acme")
    assert oldest_ms is not None
    since_oldest = await collect(store, cfg, ["acme"], datetime.fromtimestamp(oldest_ms / 1000, UTC), end)
    assert since_oldest.incomplete == [] and since_oldest.billed_micros == 15
    await store.aclose()


def test_the_export_command_refuses_a_bad_period_or_parquet_without_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config_dict("http://127.0.0.1:9")))
    base = ["export", "--config", str(path)]
    assert cli_main([*base, "--from", "2026-12-02", "--to", "2026-12-01"]) == 2
    assert "to must be later than from" in capsys.readouterr().err
    assert cli_main([*base, "--from", "2026-12-01", "--to", "2026-12-02", "--tenant", "bad tenant"]) == 2
    assert cli_main([*base, "--from", "2026-12-01", "--to", "2026-12-02", "--format", "parquet"]) == 2
    assert "needs --output" in capsys.readouterr().err
    # an empty SQLite store: a header and nothing else, complete
    assert cli_main([*base, "--from", "2026-12-01", "--to", "2026-12-02"]) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [",".join(COLUMNS)] and "0 rows" in out.err


def test_check_config_shows_the_brakes() -> None:
    shown = masked(config(defaults={"loop": {"max_repeats": 4}, "velocity": {"factor": 2.5, "min_usd": 0}}))
    assert shown["budgets"]["defaults"]["loop"] == {"max_repeats": 4, "window_s": 60, "action": "refuse"}
    assert shown["budgets"]["defaults"]["velocity"] == {"factor": 2.5, "baseline_hours": 24, "min_usd": 0.0}
    assert shown["tenants"]["acme"]["loop"] == {"max_repeats": 4, "window_s": 60, "action": "refuse"}
