"""Budget levels and windows: their config, their periods, and admit.v5 against ``decide_levels``.

The differential test sets each cap's settled spend and its scope's live holds directly in the
(SQLite) store under ``layout.Keys``' names, and checks that the script and the pure twin
(``decision.decide_levels``) pick the same candidate and name the same refusing cap;
``test_sqlite_scripts.py`` holds the transcription to the Lua on a real redis-server.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardproxy.budget.decision import Thresholds, decide_levels
from guardproxy.budget.levels import KeyBudget, LevelArgs, LevelCap, WindowCaps, caps_of, window_ids
from guardproxy.budget.periods import periods_at
from guardproxy.config.settings import hash_key, parse_config
from guardproxy.config.validation import ConfigError
from guardproxy.store.layout import GlobalKeys
from guardproxy.store.redis import BudgetStore
from guardproxy.store.sqlite import SqliteClient
from tests.helpers import TENANT_KEY, minimal

TENANT = "acme"
PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))
ROOMY = Thresholds(10**9, 10**9, 10**10, 10**10)


def parse(**sections: Any) -> Any:
    return parse_config({**minimal(), "models": {
        "gpt-4o": {"input": 2.5, "output": 10, "downgrade_to": "gpt-4o-mini"},
        "gpt-4o-mini": {"input": 0.15, "output": 0.6}}, **sections}, {})


def error_of(**sections: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(**sections)
    return info.value


# --- config ---------------------------------------------------------------------------------------


def test_every_level_and_window_parses() -> None:
    config = parse(
        budgets={"global": {"daily_usd": 500, "monthly_usd": 10000},
                 "defaults": {"hourly_usd": 2, "weekly_usd": "50.5"}},
        tenants={"acme": {"api_keys": [hash_key(TENANT_KEY)], "hourly_usd": None,
                          "models": {"gpt-4o": {"daily_usd": 3, "hourly_usd": "0.5"}},
                          "api_key_budgets": {TENANT_KEY: {"daily_usd": 1, "models": ["gpt-4o-mini"]}}}},
    )
    assert config.global_caps == WindowCaps(day=500_000_000, month=10_000_000_000)
    assert config.defaults.hourly_micros == 2_000_000 and config.defaults.weekly_micros == 50_500_000
    acme = config.tenants["acme"]
    assert acme.policy.hourly_micros is None and acme.policy.weekly_micros == 50_500_000  # null: none; else inherited
    assert acme.policy.model_caps == (("gpt-4o", WindowCaps(hour=500_000, day=3_000_000)),)
    assert acme.key_budgets == {hash_key(TENANT_KEY): KeyBudget(WindowCaps(day=1_000_000), ("gpt-4o-mini",))}


@pytest.mark.parametrize(("sections", "where", "says"), [
    ({"budgets": {"global": {"yearly_usd": 1}}}, "budgets.global.yearly_usd", "unknown field"),
    ({"budgets": {"global": {"daily_usd": -1}}}, "budgets.global.daily_usd", ""),
    ({"budgets": {"defaults": {"weekly_usd": "x"}}}, "budgets.defaults.weekly_usd", ""),
    ({"tenants": {"acme": {"models": {"gpt-5": {"daily_usd": 1}}}}}, "tenants.acme.models.gpt-5", "not a configured"),
    ({"tenants": {"acme": {"models": {"gpt-4o": {"daily": 1}}}}}, "tenants.acme.models.gpt-4o.daily", "unknown"),
    ({"tenants": {"acme": {"api_key_budgets": {"sk-not-listed": {"daily_usd": 1}}}}},
     "tenants.acme.api_key_budgets[0]", "not one of this tenant's api_keys"),
    ({"store": {"hash_tag": "a}b"}}, "store.hash_tag", ""),
    ({"store": {"redis_url": "redis+cluster://127.0.0.1:7000"}, "budgets": {"global": {"daily_usd": 1}}},
     "budgets.global", "store.hash_tag"),
])
def test_bad_level_config_is_refused_clearly(sections: dict[str, Any], where: str, says: str) -> None:
    error = error_of(**sections)
    assert error.path == where and says in str(error)
    assert "sk-not-listed" not in str(error)  # a plain key is never shown


def test_a_cluster_with_one_hash_tag_takes_a_global_cap() -> None:
    config = parse(store={"redis_url": "redis+cluster://127.0.0.1:7000", "hash_tag": "ledger"},
                   budgets={"global": {"daily_usd": 1}})
    assert config.store.hash_tag == "ledger" and config.global_caps.day == 1_000_000


# --- windows ------------------------------------------------------------------------------------


def test_window_ids_and_resets_in_the_tenants_zone() -> None:
    chicago = ZoneInfo("America/Chicago")
    ids = window_ids(datetime(2027, 1, 1, 3, 30, tzinfo=UTC), chicago)  # 21:30 on Dec 31 in Chicago
    assert (ids.hour, ids.day, ids.week, ids.month) == ("2026-12-31T21", "2026-12-31", "2026-W53", "2026-12")
    assert ids.resets_at["hour"] == datetime(2027, 1, 1, 4, tzinfo=UTC)
    assert ids.resets_at["day"] == ids.resets_at["month"] == datetime(2027, 1, 1, 6, tzinfo=UTC)
    assert ids.resets_at["week"] == datetime(2027, 1, 4, 6, tzinfo=UTC)  # Monday 00:00 in Chicago


def test_caps_of_rounds_soft_up_and_hard_down() -> None:
    ids = window_ids(datetime(2026, 11, 22, 12, tzinfo=UTC), UTC)
    (cap,) = caps_of("key", "key:k", WindowCaps(hour=1001), ids, Decimal("0.5"), Decimal("0.999"))
    assert (cap.soft, cap.hard, cap.limit, cap.period) == (501, 999, 1001, "2026-11-22T12")


# --- admit.v5 against decide_levels ---------------------------------------------------------------

SCOPES = [("global", "global", ""), ("tenant", "tenant", ""), ("key", "key:k1", ""), ("model", "model:m1", "m1"),
          ("model", "model:m2", "m2")]


@st.composite
def level_scenarios(draw: st.DrawFn) -> tuple[list[LevelCap], list[int], list[int], list[int], list[str]]:
    scale = draw(st.sampled_from([10, 1_000, 10**10]))
    caps, spent, held = [], [], []
    for level, scope, model in draw(st.lists(st.sampled_from(SCOPES), max_size=4, unique=True)):
        window = draw(st.sampled_from(["hour", "week"] if level == "tenant" else ["hour", "day", "week", "month"]))
        hard = draw(st.integers(0, scale))
        caps.append(LevelCap(level, scope, window, f"p-{window}", hard, draw(st.integers(0, hard)), hard, model))
        spent.append(draw(st.integers(0, scale)))
    for cap in caps:  # one hold per scope (the tenant's is its reservations), shared by its windows
        held.append(0 if cap.level == "tenant" else draw(st.integers(0, scale // 4)))
    worst = draw(st.lists(st.integers(0, scale), min_size=1, max_size=3))
    models = draw(st.lists(st.sampled_from(["m1", "m2", "m3"]), min_size=len(worst), max_size=len(worst)))
    return caps, spent, held, worst, models


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(level_scenarios())
def test_admit_v5_agrees_with_decide_levels(
    scenario: tuple[list[LevelCap], list[int], list[int], list[int], list[str]],
) -> None:
    caps, spent, held, worst, models = scenario
    held_by_scope = {cap.scope: h for cap, h in zip(caps, held, strict=True)}  # the last drawn hold of a scope
    # two caps of one scope and window share a counter: the last drawn spend counts for both
    by_counter = {(cap.scope, cap.window): s for cap, s in zip(caps, spent, strict=True)}
    used = [by_counter[(cap.scope, cap.window)] + held_by_scope[cap.scope] for cap in caps]
    expected, refusing = decide_levels(0, 0, ROOMY, worst, models, caps, used)

    async def go() -> Any:
        store = BudgetStore(SqliteClient(":memory:"), "gp")
        try:
            k, g = store.keys(TENANT), GlobalKeys("gp")
            for cap in caps:
                where = g if cap.level == "global" else k
                await store.client.set(where.level_spend(cap.scope, cap.window, cap.period),
                                       by_counter[(cap.scope, cap.window)])
                if cap.level != "tenant":
                    await store.client.set(where.level_held(cap.scope), held_by_scope[cap.scope])
            return await store.admit(TENANT, PERIODS, ROOMY, worst, "r-new", 60_000,
                                     levels=LevelArgs(tuple(caps), tuple(models)))
        finally:
            await store.aclose()

    admission = asyncio.run(go())
    assert admission.decision == expected
    assert admission.refused_by == (None if refusing is None else caps[refusing])


# --- alert events of levels -----------------------------------------------------------------------


def test_a_level_event_names_its_level_and_when_its_window_resets() -> None:
    from guardproxy.observe.alerts import event_json, slack_text

    chicago = ZoneInfo("America/Chicago")
    fields = {"event": "threshold", "tenant": "acme", "period": "week", "period_id": "2026-W50", "threshold": "800000",
              "spent": "8000000", "limit": "10000000", "at_ms": "1765000000000", "level": "key"}
    event = event_json(fields, chicago)
    assert event["level"] == "key" and event["period"] == "week" and event["threshold"] == 0.8
    assert event["resets_at"] == "2026-12-14T06:00:00Z"  # Monday 00:00 in Chicago
    assert "key budget of tenant acme: weekly" in slack_text(event)
    hourly = event_json({**fields, "period": "hour", "period_id": "2026-12-07T14", "level": "global"}, chicago)
    assert hourly["resets_at"] == "2026-12-07T15:00:00Z"  # the global level's periods are UTC
    assert "the global hourly budget of all tenants" in slack_text(hourly)
