"""The quote decides by admission's rule: job caps and per-minute limits count, and its ``state`` is the
one the budget endpoint and the 429 give. Real Redis, real sockets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from guardproxy.config.settings import parse_config
from tests.helpers import ADMIN, ADMIN_KEY, HI, TENANT_KEY, all_settled, config_dict

AUTH = {"authorization": f"Bearer {TENANT_KEY}"}
REQUEST = {"model": "gpt-4o", "messages": HI, "max_tokens": 50}


def start(serve_proxy: Callable[..., str], upstream_url: str, redis_url: str, **acme: Any) -> str:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["acme"].update(acme)
    return serve_proxy(parse_config(raw, {}))


def quote(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    answer = httpx.post(url + "/v1/guardproxy/quote", json={"endpoint": "/v1/chat/completions", "request": REQUEST},
                        headers={**AUTH, **(headers or {})})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def call(url: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=REQUEST, headers={**AUTH, **(headers or {})})


def test_a_quote_counts_the_jobs_cap(upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]) -> None:
    url = start(serve_proxy, upstream_url, redis_url, job_usd=0.00001)  # 10 micro-USD: nothing fits
    job = {"x-guardproxy-job": "wo-7"}
    quoted = quote(url, job)
    assert quoted["allowed"] is False and quoted["reason"] == "job_budget_exhausted"
    refused = call(url, job)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "job_budget_exceeded"
    assert quote(url)["allowed"] is True  # no job named: no job cap
    assert call(url).status_code == 200


def test_a_quote_counts_the_per_minute_limit(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    url = start(serve_proxy, upstream_url, redis_url, rpm=1)
    assert quote(url)["allowed"] is True
    assert call(url).status_code == 200
    quoted = quote(url)
    assert quoted["allowed"] is False and quoted["reason"] == "rate_limited_requests"
    limited = call(url)
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_refused_quote_says_blocked_as_the_429_and_the_budget_endpoint_do(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    url = start(serve_proxy, upstream_url, redis_url, daily_usd=0.001, soft_cap=0.8)
    # 990 of 1,000 micro-USD spent: past the soft cap, and no tier's worst case fits what is left
    booked = httpx.post(f"{url}/admin/tenants/acme/spend", headers=ADMIN,
                        json={"cost_micros": 990, "description": "batch", "idempotency_key": "q-1"})
    assert booked.status_code == 201
    quoted = quote(url)
    assert quoted["allowed"] is False and quoted["reason"] == "daily_budget_exhausted"
    refused = call(url)
    assert refused.status_code == 429
    assert quoted["state"] == refused.headers["x-guardproxy-budget-state"] == "blocked"
    own = httpx.get(url + "/v1/guardproxy/budget", headers=AUTH).json()
    assert own["state"] == "blocked" == quote(url)["state"]
    all_settled(redis_url)
