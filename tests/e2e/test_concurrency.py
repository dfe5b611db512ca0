"""Budgets hold under concurrency, across processes sharing one Redis, and across restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardproxy.budget.pricing import Usage, cost_micros
from tests.helpers import (
    CALL,
    GPT4O,
    TENANT_KEY,
    burst,
    config_dict,
    keys,
    make_config,
    proxy_process,
    redis_int,
    reserved,
    wait_for,
)
from tests.redis_procs import RedisServer


def assert_budget_held(redis_url: str, costs: list[int], rejected: int) -> None:
    day, month = keys()
    spent = redis_int(redis_url, day)
    assert spent == sum(costs) == redis_int(redis_url, month)
    assert spent <= 10_000  # hard cap: 1.0 x 0.01 USD
    assert costs and rejected, "the budget should admit some calls and refuse others"
    assert reserved(redis_url) == 0




def tight_config(upstream_url: str, redis_url: str) -> dict[str, Any]:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    raw["tenants"]["acme"].update(daily_usd=0.01, monthly_usd=1)
    return raw


@pytest.mark.slow
@pytest.mark.counts_only
def test_200_concurrent_calls_never_pass_the_hard_cap(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    from guardproxy.config.settings import parse_config

    url = serve_proxy(parse_config(tight_config(upstream_url, redis_url), {}))
    costs, rejected = asyncio.run(burst([url], 200))
    assert_budget_held(redis_url, costs, rejected)
    assert len(costs) + rejected == 200




@pytest.mark.slow
@pytest.mark.counts_only
def test_two_processes_sharing_redis_never_pass_the_hard_cap(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    raw = tight_config(upstream_url, redis_url)
    with proxy_process(raw, tmp_path) as first, proxy_process(raw, tmp_path) as second:
        costs, rejected = asyncio.run(burst([first, second], 200))
    assert_budget_held(redis_url, costs, rejected)


def test_spend_survives_a_restart(upstream_url: str, redis_url: str, tmp_path: Path) -> None:
    raw = tight_config(upstream_url, redis_url)
    with proxy_process(raw, tmp_path) as url:
        costs, _ = asyncio.run(burst([url], 1))
    with proxy_process(raw, tmp_path) as url:
        raw_response = httpx.post(url + "/v1/chat/completions", json=CALL,
                                  headers={"authorization": f"Bearer {TENANT_KEY}"})
        assert raw_response.status_code == 200
        remaining = float(raw_response.headers["x-guardproxy-budget-remaining-usd"])
    assert remaining == pytest.approx((10_000 - costs[0]) / 1e6)


def test_store_down_fail_closed_is_503_and_fail_open_serves_then_charges(
    upstream_url: str, serve_proxy: Callable[..., str]
) -> None:
    server = RedisServer(persistent=True)  # restarted below: with its data, as in production
    server.start()
    try:
        closed = serve_proxy(make_config(upstream_url, store={"redis_url": server.url}))
        opened = serve_proxy(make_config(upstream_url, store={"redis_url": server.url, "on_unavailable": "fail_open"}))
        headers = {"authorization": f"Bearer {TENANT_KEY}"}
        server.stop()
        refused = httpx.post(closed + "/v1/chat/completions", json=CALL, headers=headers, timeout=30)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "budget_store_unavailable"
        assert httpx.get(closed + "/readyz", timeout=30).status_code == 503
        served = httpx.post(opened + "/v1/chat/completions", json=CALL, headers=headers, timeout=30)
        assert served.status_code == 200
        usage = served.json()["usage"]
        server.start()  # same port: the charge kept in the journal is written in the background
        again = httpx.post(opened + "/v1/chat/completions", json=CALL, headers=headers, timeout=30)
        assert again.status_code == 200
        one = cost_micros(Usage(usage["prompt_tokens"], usage["completion_tokens"]), GPT4O)
        wait_for(lambda: redis_int(server.url, keys()[0]) == 2 * one)
    finally:
        server.stop()
