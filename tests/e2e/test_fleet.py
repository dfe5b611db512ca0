"""Agent fleets end to end, over real sockets with the real openai SDK and a real redis-server: the
runaway-agent brake stops a looping agent at ``max_repeats`` (and only it), its ``alert`` action lets
the loop through and queues an alert; the chargeback export of a day's calls sums to the day's
counter to the micro-USD, over the admin API (CSV and Parquet) and the ``guardproxy export`` command."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pyarrow.parquet as pq
import pytest
import redis
import yaml

from guardproxy.cli import main as cli_main
from guardproxy.config.settings import hash_key
from guardproxy.observe.export import COLUMNS
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import audit_log
from tests.helpers import (
    ADMIN,
    HI,
    OTHER_QUESTION,
    SECOND_KEY,
    TENANT_KEY,
    _day_of_calls,
    all_settled,
    close_clients,
    fleet_burst,
    fleet_config,
    keys,
    loop_alerts,
    metric,
    proxy_process,
    redis_int,
    sdk,
    start,
)

__all__ = ["close_clients"]  # the autouse fixture closes the SDK clients of these tests


def test_a_looping_agent_is_stopped_at_max_repeats_and_only_it(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
) -> None:
    url = start(fleet_config(upstream_url, redis_url, loop={"max_repeats": 3, "window_s": 60}), serve_proxy)
    agent = sdk(url)
    answers = [agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20) for _ in range(3)]
    assert all(a.choices[0].message.content for a in answers)
    all_settled(redis_url)
    spent = redis_int(redis_url, keys()[0])
    sent_upstream = len(fake_state.requests)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as refused:
            agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20)
        assert refused.value.code == "loop_detected"
        headers = refused.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 60 and headers["x-should-retry"] == "false"
    # the same question streamed, or tagged with another user, is the same request
    with pytest.raises(openai.RateLimitError):
        agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20, stream=True, user="someone")
    # refused before admission: nothing reached the upstream, nothing was charged or held
    all_settled(redis_url)
    assert len(fake_state.requests) == sent_upstream and redis_int(redis_url, keys()[0]) == spent

    # a changed request passes; the same request from another key, or for a job, counts apart
    assert agent.chat.completions.create(model="gpt-4o", messages=OTHER_QUESTION, max_tokens=20).choices
    assert sdk(url, SECOND_KEY).chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20).choices
    assert agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20,
                                         extra_headers={"x-guardproxy-job": "WO-4711"}).choices
    scrape = httpx.get(url + "/metrics").text
    assert metric(scrape, "guardproxy_loops_detected_total", tenant="acme", action="refuse") == 3
    (event,) = loop_alerts(url)
    assert (event["tenant"], event["repeats"], event["max_repeats"], event["action"]) == ("acme", 4, 3, "refuse")
    assert event["key"] == hash_key(TENANT_KEY)[7:23] and event["job"] is None


def test_a_refused_loop_may_send_again_after_retry_after(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str],
) -> None:
    url = start(fleet_config(upstream_url, redis_url, loop={"max_repeats": 1, "window_s": 1}), serve_proxy)
    agent = sdk(url)
    agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20)
    with pytest.raises(openai.RateLimitError) as refused:
        agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20)
    time.sleep(int(refused.value.response.headers["retry-after"]))
    assert agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20).choices


def test_an_unknown_model_repeated_is_a_404_each_time_and_not_counted(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str],
) -> None:
    url = start(fleet_config(upstream_url, redis_url, loop={"max_repeats": 1, "window_s": 60}), serve_proxy)
    for _ in range(3):
        with pytest.raises(openai.NotFoundError) as bad:
            sdk(url).chat.completions.create(model="gpt-unpriced", messages=HI)
        assert bad.value.code == "model_not_found"
    with redis.Redis.from_url(redis_url) as client:
        assert client.keys("gp:{acme}:loop:*") == []


def test_alert_action_lets_the_loop_through_and_queues_one_alert(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
) -> None:
    raw = fleet_config(upstream_url, redis_url)
    raw["budgets"] = {"defaults": {"loop": {"max_repeats": 2, "window_s": 60, "action": "alert"}}}
    url = start(raw, serve_proxy)
    agent = sdk(url)
    for _ in range(5):
        assert agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20).choices
    assert len(fake_state.requests) == 5
    (event,) = loop_alerts(url)
    assert (event["repeats"], event["max_repeats"], event["action"], event["window_s"]) == (3, 2, "alert", 60)
    assert metric(httpx.get(url + "/metrics").text, "guardproxy_loops_detected_total", tenant="acme",
                  action="alert") == 3


# -- the chargeback export ---------------------------------------------------------------------------




def _rows(text: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    assert tuple(reader.fieldnames or ()) == COLUMNS
    return list(reader)


def test_the_export_of_a_day_sums_to_the_days_counter_to_the_micro_usd(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path,
) -> None:
    raw = fleet_config(upstream_url, redis_url)
    url = start(raw, serve_proxy)
    _day_of_calls(url)
    all_settled(redis_url)
    day_key = keys()[0]
    counter = redis_int(redis_url, day_key)
    day = day_key.rsplit(":", 1)[1]
    logged = {e["request_id"]: int(e["cost_micros"]) for e in audit_log(redis_url)}

    # a window wider than the day: rows are chosen by settle time, summed by the budget day they hit
    today = datetime.now(UTC).date()
    since, until = str(today - timedelta(days=1)), str(today + timedelta(days=2))
    window = {"from": since, "to": until, "tenant": "acme"}
    response = httpx.get(url + "/admin/export", headers=ADMIN, params=window)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "x-guardproxy-export-incomplete" not in response.headers
    rows = _rows(response.text)
    of_day = [r for r in rows if r["x_BudgetDay"] == day]
    assert sum(Decimal(r["BilledCost"]) for r in of_day) * 1_000_000 == counter
    assert int(response.headers["x-guardproxy-export-billed-micros"]) == counter

    # each call's rows add up to its charge; token classes as reported; cache discount = list - effective
    per_call: dict[str, int] = {}
    for r in rows:
        per_call[r["x_RequestId"]] = per_call.get(r["x_RequestId"], 0) + int(r["x_CostMicros"])
        assert Decimal(r["BilledCost"]) == Decimal(r["EffectiveCost"]) <= Decimal(r["ListCost"])
        assert r["SubAccountId"] == r["x_TenantId"] == "acme" and r["ChargeCategory"] == "Usage"
    assert per_call == {rid: cost for rid, cost in logged.items() if cost > 0}
    classes = {(r["x_JobId"], r["x_TokenClass"]): r for r in rows if r["x_JobId"]}
    assert {c for _, c in classes} == {"input", "cached_input", "output", "reasoning"}
    assert ("WO-0", "reasoning") not in classes and classes[("WO-2", "reasoning")]["PricingQuantity"] == "6"
    cached = classes[("WO-1", "cached_input")]
    assert (cached["PricingQuantity"], cached["PricingUnit"], cached["SkuId"]) == ("7", "Tokens", "gpt-4o")
    assert Decimal(cached["ListUnitPrice"]) == Decimal("0.0000025") and Decimal(cached["ListCost"]) > Decimal(
        cached["EffectiveCost"])
    assert classes[("WO-1", "output")]["x_KeyId"] == hash_key(TENANT_KEY)[7:23]
    assert {r["x_KeyId"] for r in rows if r["SkuId"] == "gpt-4o-mini"} == {hash_key(SECOND_KEY)[7:23]}
    assert {r["ProviderName"] for r in rows} == {"openai", "external"}

    # Parquet, from the API and from `guardproxy export`, holds the same figures
    parquet = httpx.get(url + "/admin/export", headers=ADMIN, params={**window, "format": "parquet"})
    assert parquet.status_code == 200, parquet.text
    table = pq.read_table(io.BytesIO(parquet.content))
    assert table.num_rows == len(rows) and tuple(table.column_names) == COLUMNS
    assert sum(table.column("BilledCost").to_pylist()) * 1_000_000 == counter
    config_path = tmp_path / "proxy.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "focus.parquet"
    assert cli_main(["export", "--config", str(config_path), "--from", since, "--to", until,
                     "--format", "parquet", "--output", str(out)]) == 0
    assert pq.read_table(out).column("x_CostMicros").to_pylist() == table.column("x_CostMicros").to_pylist()


def test_export_needs_the_admin_key_and_a_valid_period(upstream_url: str, redis_url: str,
                                                       serve_proxy: Callable[..., str]) -> None:
    url = start(fleet_config(upstream_url, redis_url), serve_proxy)
    assert httpx.get(url + "/admin/export", params={"from": "2026-12-01", "to": "2026-12-02"}).status_code == 401
    for params, param in (({"to": "2026-12-02"}, "from"), ({"from": "2026-12-02", "to": "2026-12-01"}, "from"),
                          ({"from": "yesterday", "to": "2026-12-01"}, "from"),
                          ({"from": "2026-12-01", "to": "2026-12-02", "format": "xlsx"}, "format")):
        response = httpx.get(url + "/admin/export", headers=ADMIN, params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] == param
    empty = httpx.get(url + "/admin/export", headers=ADMIN, params={"from": "2026-12-01", "to": "2026-12-02"})
    assert empty.status_code == 200 and _rows(empty.text) == []


def test_a_spending_spike_fires_one_velocity_alert(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str],
) -> None:
    url = start(fleet_config(upstream_url, redis_url, velocity={"factor": 2, "baseline_hours": 3, "min_usd": 0}),
                serve_proxy)
    into_hour_s = time.time() % 3600
    if into_hour_s > 3590:  # stay within one UTC hour
        time.sleep(3600 - into_hour_s + 0.5)
    hour = int(time.time() // 3600)
    # a quiet baseline: 10 micro-USD in each of the 3 hours before the previous one
    with redis.Redis.from_url(redis_url) as client:
        client.hset("gp:{acme}:spend:hours", mapping={str(h): 10 for h in range(hour - 4, hour - 1)})
    agent = sdk(url)
    for i in range(3):
        agent.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": f"Spike {i}"}],
                                      max_tokens=20)
    all_settled(redis_url)
    scrape = httpx.get(url + "/metrics").text
    assert metric(scrape, "guardproxy_velocity_alerts_total", tenant="acme") == 1
    listed = httpx.get(url + "/admin/alerts", headers=ADMIN).json()["data"]
    (event,) = [a for a in listed if a["event"] == "velocity"]
    assert event["tenant"] == "acme" and event["factor"] == 2 and event["hourly_average_usd"] == 0.00001
    # the first call took the hour over 2 x 10 micro-USD: the event tells the spend as it was then, once
    assert round(event["last_hour_usd"] * 1_000_000) == int(audit_log(redis_url)[0]["cost_micros"]) > 20


@pytest.mark.slow
@pytest.mark.counts_only
def test_concurrent_repeats_over_two_replicas_pass_exactly_max_repeats(
    upstream_url: str, redis_url: str, tmp_path: Path, fake_state: FakeUpstreamState,
) -> None:
    raw = fleet_config(upstream_url, redis_url, loop={"max_repeats": 5, "window_s": 120})

    with proxy_process(raw, tmp_path) as first, proxy_process(raw, tmp_path) as second:
        results = asyncio.run(fleet_burst([first, second], 40))
    assert results.count(200) == 5 and results.count("loop_detected") == 35
    assert len(fake_state.requests) == 5
