"""Runtime overrides of the tenant's hour and week (``PUT /admin/tenants/{t}/budget`` with
``hourly_usd`` / ``weekly_usd``): admission holds the new cap (the 429 names it), the tenant state
shows it, ``DELETE`` goes back to proxy.yaml's; a window proxy.yaml does not cap, or a null, is a
clear 400 that changes nothing. Real Redis, the real ``openai`` SDK."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai

from guardproxy.config.settings import parse_config
from tests.helpers import ADMIN, ADMIN_KEY, HI, TENANT_KEY, all_settled, config_dict


def hour_of(state: dict[str, object]) -> dict[str, object]:
    levels = state["levels"]
    assert isinstance(levels, list)
    [hour] = [entry for entry in levels if entry["level"] == "tenant" and entry["window"] == "hour"]
    assert isinstance(hour, dict)
    return hour


def test_an_hourly_override_is_held_by_admission_shown_and_dropped(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str],
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["acme"].update(hourly_usd=0.5, weekly_usd=5)
    url = serve_proxy(parse_config(raw, {}))
    budget = f"{url}/admin/tenants/acme/budget"
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0)
    try:
        reply = httpx.put(budget, headers=ADMIN, json={"hourly_usd": "0.0001", "weekly_usd": 4})
        assert reply.status_code == 200, reply.text
        assert hour_of(reply.json())["limit_usd"] == 0.0001
        try:  # a worst case of 602 micro-USD, over the hour's 100 (and well within proxy.yaml's 500,000)
            client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1000)
            raise AssertionError("a call over the overridden hourly cap was admitted")
        except openai.RateLimitError as exc:
            assert exc.response.headers["x-guardproxy-budget-level"] == "tenant"
            assert exc.response.headers["x-guardproxy-budget-window"] == "hour"
            assert "limit 0.0001 USD" in exc.message
        assert httpx.delete(budget, headers=ADMIN).status_code == 200
        assert hour_of(httpx.get(f"{url}/admin/tenants/acme", headers=ADMIN).json())["limit_usd"] == 0.5
        assert client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=1000).choices
        all_settled(redis_url)
    finally:
        client.close()


def test_an_override_of_a_window_the_config_does_not_cap_or_a_null_is_a_clear_400(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str],
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["acme"].update(hourly_usd=0.5)
    url = serve_proxy(parse_config(raw, {}))
    before = httpx.get(f"{url}/admin/tenants/acme", headers=ADMIN).json()
    for body, param, words in (({"weekly_usd": 3}, "weekly_usd", "proxy.yaml caps that window"),
                               ({"hourly_usd": None}, "hourly_usd", "must be a number"),
                               ({"hourly_usd": -1}, "hourly_usd", ""),
                               ({"yearly_usd": 1}, "yearly_usd", "allowed:")):
        reply = httpx.put(f"{url}/admin/tenants/acme/budget", headers=ADMIN, json=body)
        assert reply.status_code == 400, (body, reply.text)
        error = reply.json()["error"]
        assert error["param"] == param and words in error["message"], error
    assert httpx.get(f"{url}/admin/tenants/acme", headers=ADMIN).json() == before
