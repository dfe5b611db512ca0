"""Budget levels through the real ``openai`` SDK on a real Redis: a key's own daily cap refuses with
``x-guardproxy-budget-level: key``, a key's ``models`` list refuses other models with a 403 that counts
nothing, and a tenant's cap on one model moves the downgrade chain on."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from guardproxy.budget.fleet import key_fingerprint
from guardproxy.config.settings import Config, hash_key, parse_config
from tests.helpers import HI, TENANT_KEY, all_settled, config_dict, guardproxy, make_config, redis_int

ADMIN_KEY = "adm-levels-secret"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CALLS_MAX = 60


@pytest.fixture
def config(upstream_url: str, redis_url: str) -> Config:
    return make_config(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})


def make_key(url: str, **budget: object) -> dict[str, str]:
    reply = httpx.post(f"{url}/admin/tenants/acme/keys", headers=ADMIN, json={"name": "dispatcher", **budget})
    assert reply.status_code == 201, reply.text
    made: dict[str, str] = reply.json()
    return made


def test_a_keys_daily_cap_refuses_with_the_level_header_and_the_tenants_other_keys_go_on(
    config: Config, serve_proxy: Callable[..., str], redis_url: str,
) -> None:
    url = serve_proxy(config)
    made = make_key(url, daily_usd="0.0001")  # 100 micro-USD: a handful of small calls
    assert made["daily_usd"] == "0.0001" and made["hourly_usd"] is None
    client = openai.OpenAI(base_url=url + "/v1", api_key=made["key"], max_retries=0)
    try:
        refusal = None
        for _ in range(CALLS_MAX):
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=20)
            except openai.RateLimitError as exc:
                refusal = exc
                break
            all_settled(redis_url)
    finally:
        client.close()
    assert refusal is not None, f"the key's cap refused nothing in {CALLS_MAX} calls"
    assert refusal.response.headers["x-guardproxy-budget-level"] == "key"
    assert refusal.response.headers["x-guardproxy-budget-window"] == "day"
    assert "API key" in refusal.message and "daily budget" in refusal.message and "(level: key)" in refusal.message
    assert refusal.code == "insufficient_quota"
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    spent = redis_int(redis_url, f"gp:{{acme}}:lvl:key:{key_fingerprint(hash_key(made['key']))}:day:{day}")
    assert 0 < spent <= 100  # never over the key's cap
    # the tenant's own key has no such cap: it goes on
    other = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0)
    try:
        assert other.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=20).choices
    finally:
        other.close()
    metrics = httpx.get(url + "/metrics").text
    assert 'guardproxy_budget_refusals_total{level="key",tenant="acme",window="day"} 1.0' in metrics


def test_a_key_limited_to_some_models_gets_a_403_for_another_and_nothing_is_counted(
    config: Config, serve_proxy: Callable[..., str], redis_url: str,
) -> None:
    url = serve_proxy(config)
    made = make_key(url, models=["gpt-4o-mini"], hourly_usd=1)
    month_key = "gp:{acme}:spend:month:" + datetime.now(UTC).strftime("%Y-%m")
    before = redis_int(redis_url, month_key)
    client = openai.OpenAI(base_url=url + "/v1", api_key=made["key"], max_retries=0)
    try:
        with pytest.raises(openai.PermissionDeniedError) as denied:
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20)
        assert denied.value.code == "model_not_allowed" and "gpt-4o-mini" in denied.value.message
        assert redis_int(redis_url, month_key) == before
        assert client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=20).choices
    finally:
        client.close()
    listed = httpx.get(f"{url}/admin/tenants/acme/keys", headers=ADMIN).json()["data"]
    assert listed[0]["models"] == ["gpt-4o-mini"] and listed[0]["hourly_usd"] == "1"


def test_the_admin_api_refuses_a_bad_key_budget(config: Config, serve_proxy: Callable[..., str]) -> None:
    url = serve_proxy(config)
    for body, param in (({"daily_usd": "lots"}, "daily_usd"), ({"models": ["no-such-model"]}, "models"),
                        ({"models": "gpt-4o"}, "models"), ({"yearly_usd": 5}, "yearly_usd")):
        reply = httpx.post(f"{url}/admin/tenants/acme/keys", headers=ADMIN, json={"name": "x", **body})
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"]["param"] == param, reply.text


def test_a_tenants_cap_on_one_model_moves_the_chain_on(
    upstream_url: str, serve_proxy: Callable[..., str], redis_url: str,
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    raw["tenants"]["acme"]["models"] = {"gpt-4o": {"daily_usd": 0}, "gpt-4o-mini": {"daily_usd": 0}}
    url = serve_proxy(parse_config(raw, {}))
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0)
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20)
    finally:
        client.close()
    assert refused.value.response.headers["x-guardproxy-budget-level"] == "model"
    assert "gpt-4o" in refused.value.message

    raw["tenants"]["acme"]["models"] = {"gpt-4o": {"daily_usd": 0}}
    url = serve_proxy(parse_config(raw, {}))
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0)
    try:
        answer = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, max_tokens=20)
    finally:
        client.close()
    assert answer.parse().model.startswith("gpt-4o-mini")


def test_status_and_metrics_show_every_level_and_window(
    upstream_url: str, serve_proxy: Callable[..., str], redis_url: str,
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["budgets"] = {"global": {"daily_usd": 50}}
    raw["tenants"]["acme"].update(hourly_usd=2, weekly_usd=10, models={"gpt-4o-mini": {"monthly_usd": 5}})
    url = serve_proxy(parse_config(raw, {}))
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0)
    try:
        client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=20)
    finally:
        client.close()
    all_settled(redis_url)
    levels = httpx.get(f"{url}/admin/tenants/acme", headers=ADMIN).json()["levels"]
    assert [(lv["level"], lv["window"], lv["limit_usd"]) for lv in levels] == [
        ("global", "day", 50.0), ("tenant", "hour", 2.0), ("tenant", "week", 10.0), ("model", "month", 5.0)]
    day = redis_int(redis_url, "gp:{acme}:spend:day:" + datetime.now(UTC).strftime("%Y-%m-%d"))
    assert day > 0 and all(round(lv["spent_usd"] * 1e6) == day and lv["reserved_usd"] == 0 for lv in levels)
    metrics = httpx.get(url + "/metrics").text
    gauge = "guardproxy_budget_level_limit_usd"
    assert gauge + '{level="tenant",period="week",scope="tenant",tenant="acme"} 10.0' in metrics
    assert gauge + '{level="global",period="day",scope="global",tenant=""} 50.0' in metrics
    page = httpx.get(f"{url}/admin", headers=ADMIN)
    assert page.status_code == 200
    assert '<li data-level="tenant" data-window="week">tenant week: ' in page.text
    assert '<li data-level="global" data-window="day">global day: ' in page.text


def test_keys_create_takes_the_budget_flags(
    upstream_url: str, serve_proxy: Callable[..., str], tmp_path: Path,
) -> None:
    store = {"url": f"sqlite://{tmp_path}/spend.db"}
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config_dict(upstream_url, store=store)))
    made = guardproxy("keys", "create", "acme", "--name", "van 7", "--hourly-usd", "0.5", "--daily-usd", "2",
                      "--models", "gpt-4o-mini", "--config", str(path))
    assert made.returncode == 0, made.stderr
    assert re.search(r"^hourly_usd: +0\.5$", made.stdout, re.M)
    assert re.search(r"^models: +gpt-4o-mini$", made.stdout, re.M)
    key = re.search(r"^key:\s+(gp-\S+)$", made.stdout, re.M)
    assert key
    url = serve_proxy(make_config(upstream_url, store=store))
    denied = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key.group(1)}"},
                        json={"model": "gpt-4o", "messages": HI, "max_tokens": 20})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "model_not_allowed"
    bad = guardproxy("keys", "create", "acme", "--name", "x", "--daily-usd", "lots", "--config", str(path))
    assert bad.returncode == 2 and "daily_usd must be a number" in bad.stderr
    unknown = guardproxy("keys", "create", "acme", "--name", "x", "--models", "gpt-9", "--config", str(path))
    assert unknown.returncode == 2 and "'gpt-9' is not a configured model" in unknown.stderr
