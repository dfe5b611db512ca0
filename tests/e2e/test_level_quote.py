"""An agent's quote (``POST /v1/guardproxy/quote``) knows every level its call belongs to: what is left
of each cap, the tightest, and the level that would refuse, and the admission that follows agrees
(the real ``openai`` SDK, a real Redis)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import redis

from guardproxy.config.settings import parse_config
from tests.helpers import ADMIN, ADMIN_KEY, HI, TENANT_KEY, config_dict, reserved


def quote(client: openai.OpenAI, request: dict[str, Any]) -> Any:
    return client.post("guardproxy/quote", cast_to=object,
                       body={"endpoint": "/v1/chat/completions", "request": request})


def add(redis_url: str, key: str, micros: int) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.incrby(key, micros)


def test_a_quote_names_the_tightest_cap_and_the_level_that_refuses_and_the_call_agrees(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str],
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY},
                      budgets={"global": {"daily_usd": 0.05}})
    raw["tenants"]["acme"].update(hourly_usd=0.04, models={"gpt-4o": {"daily_usd": 0.03}})
    url = serve_proxy(parse_config(raw, {}))
    made = httpx.post(f"{url}/admin/tenants/acme/keys", headers=ADMIN, json={"name": "agent", "daily_usd": "0.02"})
    assert made.status_code == 201, made.text
    agent = openai.OpenAI(base_url=url + "/v1", api_key=made.json()["key"], max_retries=0)
    owner = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0)
    request = {"model": "gpt-4o", "messages": HI, "max_tokens": 1000}  # worst case ~10,033 micro-USD
    try:
        first = quote(agent, request)
        assert first["allowed"] and first["model"] == "gpt-4o" and first["refused_by"] is None
        by_level = {(e["level"], e["window"]): e["remaining_usd"] for e in first["levels"]}
        assert by_level == {("tenant", "day"): 1.0, ("tenant", "month"): 20.0, ("global", "day"): 0.05,
                            ("tenant", "hour"): 0.04, ("key", "day"): 0.02, ("model", "day"): 0.03}
        assert first["tightest"] == {"level": "key", "window": "day", "limit_usd": 0.02, "remaining_usd": 0.02}
        # the owner's own key has no key cap: its tightest is the model's day
        assert quote(owner, request)["tightest"]["level"] == "model"

        # 49,500 spent by every tenant together: 500 left of the global day, less than either model needs
        add(redis_url, f"gp:{{_global}}:lvl:global:day:{datetime.now(UTC):%Y-%m-%d}", 49_500)
        refused = quote(agent, request)
        assert not refused["allowed"] and refused["reason"] == "level_budget_exhausted"
        assert refused["refused_by"] == {"level": "global", "window": "day"}
        assert refused["tightest"]["level"] == "global" and refused["tightest"]["remaining_usd"] == 0.0005
        assert reserved(redis_url) == 0  # a quote holds nothing
        try:
            agent.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=1000)
            raise AssertionError("the call the quote refused was admitted")
        except openai.RateLimitError as exc:
            assert exc.response.headers["x-guardproxy-budget-level"] == "global"
            assert exc.response.headers["x-guardproxy-budget-window"] == "day"
    finally:
        agent.close()
        owner.close()
