"""Per-tenant rate limits end to end: held across replicas, answered the way OpenAI answers them,
and retried by the real openai SDK until the window admits the call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from guardproxy.config.settings import parse_config
from tests.helpers import ADMIN, ADMIN_KEY, HI, TENANT_KEY, config_dict, metric, proxy_process

AUTH = {"authorization": f"Bearer {TENANT_KEY}"}


def limited_config(upstream_url: str, redis_url: str, **limits: int) -> dict[str, Any]:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["acme"].update(limits)
    return raw


async def burst(urls: list[str], count: int, **extra: Any) -> list[httpx.Response]:
    """``count`` concurrent chat calls spread over ``urls``, every answer kept."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        body = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 20, **extra}
        return await asyncio.gather(*(
            client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body, headers=AUTH) for i in range(count)
        ))


@pytest.mark.slow
def test_rpm_holds_exactly_with_200_concurrent_calls_over_two_processes(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    raw = limited_config(upstream_url, redis_url, rpm=50)
    with proxy_process(raw, tmp_path) as first, proxy_process(raw, tmp_path) as second:
        answers = asyncio.run(burst([first, second], 200))
        scrape = httpx.get(first + "/metrics").text + httpx.get(second + "/metrics").text
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert len(ok) == 50 and len(refused) == 150
    for answer in refused:
        error = answer.json()["error"]
        assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
        assert "x-should-retry" not in answer.headers  # meant to be retried
        assert 1 <= int(answer.headers["retry-after"]) <= 60
        assert 0 < int(answer.headers["retry-after-ms"]) <= 60_000
        assert answer.headers["x-ratelimit-limit-requests"] == "50"
        assert answer.headers["x-ratelimit-remaining-requests"] == "0"
    remaining = sorted(int(a.headers["x-ratelimit-remaining-requests"]) for a in ok)
    assert remaining == list(range(50))  # each admission saw the window one fuller
    counted = sum(float(line.rsplit(" ", 1)[1]) for line in scrape.splitlines()
                  if line.startswith('guardproxy_rate_limited_total{kind="requests",tenant="acme"}'))
    assert counted == 150


@pytest.mark.slow
def test_tpm_holds_within_one_call_over_two_replicas(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    config = parse_config(limited_config(upstream_url, redis_url, tpm=1000), {})
    urls = [serve_proxy(config), serve_proxy(config)]
    answers = asyncio.run(burst(urls, 200, max_tokens=100))
    ok = [a for a in answers if a.status_code == 200]
    refused = [a for a in answers if a.status_code == 429]
    assert ok and refused and len(ok) + len(refused) == 200
    assert {a.json()["error"]["type"] for a in refused} == {"tokens"}
    used = [a.json()["usage"]["total_tokens"] for a in ok]
    one_call = max(used)
    # worst cases are counted at admission and corrected at settlement: never more than one call over
    assert sum(used) <= 1000 + one_call
    state = httpx.get(urls[0] + "/admin/tenants/acme", headers=ADMIN).json()["rate_limits"]
    assert state["tpm"] == 1000 and state["rpm"] is None
    assert 0 < state["tokens_in_window"] <= 1000


def test_the_openai_sdk_retries_a_rate_limited_call_until_the_window_admits_it(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    url = serve_proxy(parse_config(limited_config(upstream_url, redis_url, rpm=2), {}))
    # Two requests admitted 58.5 s ago fill the window; the older leaves it in about 1.5 s (a second of it
    # may pass before the call is sent, on a loaded machine).
    store = redis.Redis.from_url(redis_url)
    try:
        now_s, now_us = store.time()
        now_ms = now_s * 1000 + now_us // 1000
        store.zadd("gp:{acme}:rl:req", {"earlier-1": now_ms - 58_500, "earlier-2": now_ms - 58_400})
    finally:
        store.close()
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY)  # the SDK's default retries (2)
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI, max_tokens=5)
    elapsed = time.monotonic() - started
    assert raw.parse().choices[0].message.content
    assert 0.5 < elapsed < 10  # waited for the window, as told by retry-after-ms
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert int(raw.headers["x-ratelimit-remaining-requests"]) <= 1
    scrape = httpx.get(url + "/metrics").text
    assert metric(scrape, "guardproxy_rate_limited_total", tenant="acme", kind="requests") >= 1


def test_guardproxy_headers_replace_the_upstreams_only_for_configured_limits(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    limited = serve_proxy(parse_config(limited_config(upstream_url, redis_url, rpm=7), {}))
    answer = httpx.post(limited + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                        headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-limit-requests"] == "7"
    assert answer.headers["x-ratelimit-remaining-requests"] == "6"
    assert answer.headers["x-ratelimit-reset-requests"].endswith("s")
    # no tpm configured: the provider's own token headers pass through
    assert answer.headers["x-ratelimit-limit-tokens"] == "30000000"
    unlimited = serve_proxy(parse_config(limited_config(upstream_url, redis_url), {}))
    plain = httpx.post(unlimited + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                       headers=AUTH)
    assert plain.headers["x-ratelimit-limit-requests"] == "10000"


def test_budget_429_names_a_sub_cent_limit_with_its_digits(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    raw = limited_config(upstream_url, redis_url)
    raw["tenants"]["acme"].update(daily_usd=0.0005)
    url = serve_proxy(parse_config(raw, {}))
    answer = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": HI}, headers=AUTH)
    assert answer.status_code == 429
    assert "limit 0.0005 USD" in answer.json()["error"]["message"]
    assert answer.headers["x-guardproxy-budget-state"] == "blocked"
