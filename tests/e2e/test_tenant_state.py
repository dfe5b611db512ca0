"""A tenant's state is the same wherever it shows: the 429 header, the admin JSON, the page,
``guardproxy status`` and /metrics; a tenant known only through its override is listed too."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest

from guardproxy.admin.status import render
from guardproxy.budget.periods import utc_now
from guardproxy.config.settings import parse_config
from guardproxy.observe.state import read_states
from guardproxy.store.redis import BudgetStore
from tests.helpers import ADMIN, ADMIN_KEY, HI, TENANT_KEY, config_dict, metric

AUTH = {"authorization": f"Bearer {TENANT_KEY}"}


def page_state(html: str, tenant: str) -> str:
    match = re.search(rf'data-tenant="{re.escape(tenant)}" data-state="(\w+)"', html)
    assert match, f"{tenant} is not on the page"
    return match.group(1)


@pytest.mark.anyio
async def test_a_tenant_whose_every_call_is_refused_is_blocked_everywhere(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    # 0.0005 USD a day: nothing has been spent, yet no call fits (every worst case is larger)
    raw["tenants"]["acme"].update(daily_usd=0.0005)
    config = parse_config(raw, {})
    url = serve_proxy(config)
    async with httpx.AsyncClient(timeout=30) as client:
        before = (await client.get(url + "/admin/tenants/acme", headers=ADMIN)).json()
        assert before["state"] == "active"
        refused = await client.post(url + "/v1/chat/completions", json={"model": "gpt-4o", "messages": HI},
                                    headers=AUTH)
        assert refused.status_code == 429
        assert refused.headers["x-guardproxy-budget-state"] == "blocked"
        assert "0.0005 USD" in refused.json()["error"]["message"]
        state = (await client.get(url + "/admin/tenants/acme", headers=ADMIN)).json()
        listed = (await client.get(url + "/admin/tenants", headers=ADMIN)).json()["data"]
        page = (await client.get(url + "/admin/", headers=ADMIN)).text
        scrape = (await client.get(url + "/metrics")).text
    assert state["state"] == "blocked"
    assert state["day"]["limit_usd"] == 0.0005 and state["day"]["spent_usd"] == 0
    assert {t["tenant"]: t["state"] for t in listed}["acme"] == "blocked"
    assert page_state(page, "acme") == "blocked"
    assert "$0.0005" in page
    assert metric(scrape, "guardproxy_budget_state", tenant="acme", state="blocked") == 1
    assert metric(scrape, "guardproxy_budget_state", tenant="acme", state="active") == 0
    assert metric(scrape, "guardproxy_budget_state", tenant="acme", state="downgrading") == 0
    assert metric(scrape, "guardproxy_budget_remaining_usd", tenant="acme", period="day") == 0.0005
    store = BudgetStore.from_config(config.store)
    try:
        table = render(await read_states(store, config, ["acme"], utc_now()))
    finally:
        await store.aclose()
    assert re.search(r"^acme\s+blocked\s", table, re.M), table
    assert "$0.0005" in table


def test_a_tenant_created_by_its_override_is_listed_everywhere(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    config = parse_config(config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY}), {})
    url = serve_proxy(config)
    put = httpx.put(url + "/admin/tenants/initech/budget", json={"daily_usd": 3, "rpm": 10}, headers=ADMIN)
    assert put.status_code == 200 and put.json()["rate_limits"]["rpm"] == 10
    listed = {t["tenant"]: t for t in httpx.get(url + "/admin/tenants", headers=ADMIN).json()["data"]}
    assert listed["initech"]["day"]["limit_usd"] == 3 and listed["initech"]["overridden"]
    page = httpx.get(url + "/admin/", headers=ADMIN).text
    assert page_state(page, "initech") == "active"
    assert "last minute: 0/10 requests" in page
    scrape = httpx.get(url + "/metrics").text
    assert metric(scrape, "guardproxy_budget_limit_usd", tenant="initech", period="day") == 3
    assert metric(scrape, "guardproxy_budget_state", tenant="initech", state="active") == 1
    assert metric(scrape, "guardproxy_budget_remaining_usd", tenant="initech", period="day") == 3


def test_an_override_ends_the_blocked_state(upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["acme"].update(daily_usd=0.0005)
    url = serve_proxy(parse_config(raw, {}))
    body = {"model": "gpt-4o", "messages": HI}
    assert httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH).status_code == 429
    assert httpx.get(url + "/admin/tenants/acme", headers=ADMIN).json()["state"] == "blocked"
    raised = httpx.put(url + "/admin/tenants/acme/budget", json={"daily_usd": 1}, headers=ADMIN).json()
    assert raised["state"] == "active"
    served = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH)
    assert served.status_code == 200 and served.headers["x-guardproxy-budget-state"] == "active"
