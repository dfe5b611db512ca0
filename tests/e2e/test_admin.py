"""Spend visibility: admin API, /metrics against the ledger, status, workers adding up."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import httpx
import openai
import pytest
import redis

from guardproxy.admin.status import render
from guardproxy.budget.periods import utc_now
from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.config.settings import Config, parse_config
from guardproxy.observe.state import read_states
from guardproxy.store.redis import BudgetStore
from tests.helpers import (
    ADMIN,
    ADMIN_KEY,
    GPT4O,
    HI,
    MINI,
    SERVICE_KEY,
    TENANT_KEY,
    all_settled,
    config_dict,
    keys,
    make_config,
    metric,
    proxy_process,
    redis_int,
)


@pytest.fixture
def config(upstream_url: str, redis_url: str) -> Config:
    return make_config(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})




def test_admin_api_is_off_without_a_key_and_needs_the_key(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], config: Config
) -> None:
    off = serve_proxy(make_config(upstream_url, store={"redis_url": redis_url}))
    assert httpx.get(off + "/admin/tenants", headers=ADMIN).status_code == 404
    on = serve_proxy(config)
    assert httpx.get(on + "/admin/tenants").status_code == 401
    wrong = httpx.get(on + "/admin/tenants", headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(on + "/admin/tenants", headers=ADMIN).status_code == 200


def test_tenant_state_has_the_contract_shape_and_exact_figures(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    url = serve_proxy(config)
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY)
    usage = client.chat.completions.create(model="gpt-4o", messages=HI).usage
    assert usage is not None
    cost = cost_micros(Usage(usage.prompt_tokens, usage.completion_tokens), GPT4O)
    all_settled(redis_url)
    state = httpx.get(url + "/admin/tenants/acme", headers=ADMIN).json()
    assert set(state) == {"tenant", "state", "day", "month", "soft_cap", "hard_cap", "timezone", "overridden",
                          "remaining_usd", "rate_limits", "job_usd", "burn_rate_usd_per_hour", "levels"}
    assert state["tenant"] == "acme" and state["state"] == "active" and state["timezone"] == "UTC"
    assert state["levels"] == []  # no level beside the day and month is configured
    assert state["soft_cap"] == 0.8 and state["hard_cap"] == 1.0
    day = state["day"]
    assert set(day) == {"period", "limit_usd", "spent_usd", "reserved_usd", "remaining_usd", "utilization",
                        "resets_at", "projected_usd", "hard_cap_at"}
    assert day["limit_usd"] == 1.0 and day["spent_usd"] == cost / 1e6 and day["reserved_usd"] == 0.0
    assert day["utilization"] == round(cost / 1_000_000, 7)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T00:00:00Z", day["resets_at"])
    assert state["month"]["period"] == day["period"][:7] and state["month"]["limit_usd"] == 20.0
    listed = httpx.get(url + "/admin/tenants", headers=ADMIN).json()["data"]
    assert [t["tenant"] for t in listed] == ["acme", "globex"]


def test_override_applies_at_once_on_every_replica_and_can_be_dropped(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    first, second = serve_proxy(config), serve_proxy(config)
    put = httpx.put(first + "/admin/tenants/acme/budget", headers=ADMIN, json={"daily_usd": 0.000005})
    assert put.status_code == 200
    assert put.json()["day"]["limit_usd"] == 0.000005 and put.json()["overridden"] is True
    client = openai.OpenAI(base_url=second + "/v1", api_key=TENANT_KEY, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert httpx.get(second + "/admin/tenants/acme", headers=ADMIN).json()["day"]["limit_usd"] == 0.000005
    bad = httpx.put(first + "/admin/tenants/acme/budget", headers=ADMIN, json={"soft_cap": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "soft_cap"
    unknown = httpx.put(first + "/admin/tenants/acme/budget", headers=ADMIN, json={"timezone": "UTC"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "timezone"
    assert httpx.delete(first + "/admin/tenants/acme/budget", headers=ADMIN).json()["day"]["limit_usd"] == 1.0
    client.chat.completions.create(model="gpt-4o", messages=HI)


def test_calls_log_is_the_audit_trail(config: Config, serve_proxy: Callable[..., str], redis_url: str) -> None:
    url = serve_proxy(config)
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    all_settled(redis_url)  # so that the audit log's order is the calls' order
    list(client.chat.completions.create(model="gpt-4o", messages=HI, stream=True))
    all_settled(redis_url)
    calls = httpx.get(url + "/admin/tenants/acme/calls?limit=5", headers=ADMIN).json()["data"]
    assert [c["model"] for c in calls] == ["gpt-4o", "gpt-4o-mini"]  # newest first
    oldest = calls[1]
    usage = raw.parse().usage
    assert usage is not None
    assert oldest["request_id"] == raw.headers["x-request-id"]
    assert oldest["prompt_tokens"] == usage.prompt_tokens and oldest["completion_tokens"] == usage.completion_tokens
    assert oldest["cost_micros"] == cost_micros(Usage(usage.prompt_tokens, usage.completion_tokens), MINI)
    assert oldest["outcome"] == "completed" and oldest["requested_model"] == "gpt-4o-mini"
    assert sum(c["cost_micros"] for c in calls) == redis_int(redis_url, keys()[0])
    assert httpx.get(url + "/admin/tenants/acme/calls?limit=0", headers=ADMIN).status_code == 400


def test_metrics_equal_what_the_ledger_settled(config: Config, serve_proxy: Callable[..., str], redis_url: str) -> None:
    url = serve_proxy(config)
    acme = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY)
    for _ in range(3):
        acme.chat.completions.create(model="gpt-4o", messages=HI, extra_headers={"x-fake-cached-tokens": "5"})
    service = openai.OpenAI(base_url=url + "/v1", api_key=SERVICE_KEY, default_headers={"X-Tenant-Id": "shop-9"})
    service.chat.completions.create(model="gpt-4o-mini", messages=HI)
    all_settled(redis_url)
    redis.Redis.from_url(redis_url).set(keys()[0], 900_000)  # acme past its soft cap
    acme.chat.completions.create(model="gpt-4o", messages=HI)
    all_settled(redis_url)
    all_settled(redis_url, "shop-9")
    text = httpx.get(url + "/metrics").text
    day = redis_int(redis_url, keys()[0])
    assert metric(text, "guardproxy_budget_spent_usd", tenant="acme", period="day") == day / 1e6
    assert metric(text, "guardproxy_budget_limit_usd", tenant="acme", period="month") == 20.0
    assert metric(text, "guardproxy_budget_utilization_ratio", tenant="acme", period="day") == day / 1_000_000
    shop = redis_int(redis_url, keys("shop-9")[0])
    assert metric(text, "guardproxy_budget_spent_usd", tenant="shop-9", period="day") == shop / 1e6
    spend = metric(text, "guardproxy_spend_usd_total", tenant="acme", model="gpt-4o")
    spend += metric(text, "guardproxy_spend_usd_total", tenant="acme", model="gpt-4o-mini")
    assert round(spend * 1e6) == redis_int(redis_url, keys()[1])  # the month key has every acme charge
    assert metric(text, "guardproxy_tokens_total", tenant="acme", model="gpt-4o", type="cached_prompt") == 15
    assert metric(text, "guardproxy_requests_total", tenant="acme", model="gpt-4o", outcome="allowed") == 3
    assert metric(text, "guardproxy_requests_total", tenant="acme", model="gpt-4o", outcome="downgraded") == 1
    assert metric(text, "guardproxy_downgrades_total", tenant="acme", from_model="gpt-4o", to_model="gpt-4o-mini") == 1
    assert metric(text, "guardproxy_upstream_request_duration_seconds_count", upstream="openai", model="gpt-4o") == 3
    assert "guardproxy_time_to_first_token_seconds" in text
    assert 'model="claude' not in text


@pytest.mark.slow
@pytest.mark.counts_only
def test_two_workers_add_up(upstream_url: str, redis_url: str, tmp_path: Path) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    with proxy_process(raw, tmp_path, workers=2) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY)
        for _ in range(8):
            # A new connection each time, so both workers take some of the calls.
            client.with_options(default_headers={"connection": "close"}).chat.completions.create(
                model="gpt-4o-mini", messages=HI
            )
        all_settled(redis_url)
        scrapes = [httpx.get(url + "/metrics", headers={"connection": "close"}).text for _ in range(4)]
    for text in scrapes:
        assert metric(text, "guardproxy_requests_total", tenant="acme", model="gpt-4o-mini", outcome="allowed") == 8
        assert round(metric(text, "guardproxy_spend_usd_total", tenant="acme", model="gpt-4o-mini") * 1e6) == \
            redis_int(redis_url, keys()[0])
        assert metric(text, "guardproxy_journal_pending") == 0  # summed over the live workers


@pytest.mark.anyio
async def test_status_table_reads_the_store(upstream_url: str, redis_url: str) -> None:
    config = parse_config(config_dict(upstream_url, store={"redis_url": redis_url}), {})
    redis.Redis.from_url(redis_url).set(keys()[0], 850_000)
    store = BudgetStore.from_config(config.store)
    try:
        states = await read_states(store, config, ["acme"], utc_now())
    finally:
        await store.aclose()
    table = render(states)
    assert "acme" in table and "downgrading" in table and "85.0%" in table and "$0.85 / $1.00" in table
