"""Spend made elsewhere, booked with ``POST /admin/tenants/{tenant}/spend``: charged once per
idempotency key (also when posted concurrently, or again on a later day), in the call log and in
the metrics, and bad bodies change nothing."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from guardproxy.budget.periods import periods_at
from guardproxy.config.settings import Config
from tests.helpers import ADMIN, ADMIN_KEY, HI, TENANT_KEY, all_settled, keys, make_config, metric, redis_int


@pytest.fixture
def config(upstream_url: str, redis_url: str) -> Config:
    return make_config(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})


def book(url: str, body: dict[str, Any], tenant: str = "acme") -> httpx.Response:
    return httpx.post(f"{url}/admin/tenants/{tenant}/spend", headers=ADMIN, json=body)


BATCH = {"cost_usd": 0.0123456, "description": "nightly batch: 1,200 summaries", "idempotency_key": "batch-2026-11-22",
         "model": "gpt-4o-mini", "prompt_tokens": 50_000, "completion_tokens": 9_000}


def test_spend_posted_twice_with_one_key_is_charged_once_and_shows_in_the_log_and_metrics(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    url = serve_proxy(config)
    openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY).chat.completions.create(model="gpt-4o", messages=HI)
    day, month = keys()
    all_settled(redis_url)
    before = redis_int(redis_url, day)

    first = book(url, BATCH)
    assert first.status_code == 201, first.text
    booked = first.json()
    # 0.0123456 USD is 12,345.6 micro-USD, rounded up as prices are.
    assert booked["charged_micros"] == 12_346 and booked["replayed"] is False
    assert booked["budget"]["day"]["spent_usd"] == (before + 12_346) / 1e6
    assert redis_int(redis_url, day) == redis_int(redis_url, month) == before + 12_346

    again = book(url, BATCH)
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["charged_micros"] == 12_346 and again.json()["request_id"] == booked["request_id"]
    assert redis_int(redis_url, day) == redis_int(redis_url, month) == before + 12_346

    conflict = book(url, {**BATCH, "cost_usd": 0.5})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"
    assert redis_int(redis_url, day) == before + 12_346

    calls = httpx.get(url + "/admin/tenants/acme/calls", headers=ADMIN).json()["data"]
    assert [c["outcome"] for c in calls] == ["external", "completed"]
    external = calls[0]
    assert external["cost_micros"] == 12_346 and external["description"] == BATCH["description"]
    assert external["model"] == "gpt-4o-mini" and external["request_id"] == booked["request_id"]
    assert (external["prompt_tokens"], external["completion_tokens"]) == (50_000, 9_000)
    assert "description" not in calls[1]
    assert sum(c["cost_micros"] for c in calls) == redis_int(redis_url, day)

    scrape = httpx.get(url + "/metrics").text
    assert metric(scrape, "guardproxy_spend_usd_total", tenant="acme", model="gpt-4o-mini") == 0.012346
    assert metric(scrape, "guardproxy_tokens_total", tenant="acme", model="gpt-4o-mini", type="prompt") == 50_000

    # A model this proxy does not price is counted under "external"; cost_micros is taken as is.
    other = book(url, {"cost_micros": 5, "description": "embeddings elsewhere", "idempotency_key": "k2",
                       "model": "text-embedding-3-small"})
    assert other.status_code == 201 and other.json()["charged_micros"] == 5
    scrape = httpx.get(url + "/metrics").text
    assert metric(scrape, "guardproxy_spend_usd_total", tenant="acme", model="external") == 0.000005


def test_one_key_posted_concurrently_is_charged_once(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    url = serve_proxy(config)
    body = {"cost_micros": 1_000, "description": "retry storm", "idempotency_key": "same-key"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: book(url, body), range(16)))
    assert sorted(a.status_code for a in answers) == [200] * 15 + [201]
    assert redis_int(redis_url, keys()[0]) == 1_000
    calls = httpx.get(url + "/admin/tenants/acme/calls", headers=ADMIN).json()["data"]
    assert len(calls) == 1


def test_a_replay_on_a_later_day_charges_nothing(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    now = [datetime.now(UTC)]
    url = serve_proxy(config, clock=lambda: now[0])
    body = {"cost_usd": "2.5", "description": "invoice 1182", "idempotency_key": "inv-1182"}
    first = book(url, body)
    assert first.status_code == 201 and first.json()["charged_micros"] == 2_500_000
    first_day = periods_at(now[0], config.policy_for("acme").zone)
    now[0] += timedelta(days=1)
    later = book(url, body)
    assert later.status_code == 200 and later.json()["replayed"] is True and later.json()["day"] == first_day.day
    next_day = periods_at(now[0], config.policy_for("acme").zone)
    assert redis_int(redis_url, f"gp:{{acme}}:spend:day:{first_day.day}") == 2_500_000
    assert redis_int(redis_url, f"gp:{{acme}}:spend:day:{next_day.day}") == 0
    # A new key on the new day is charged to the new day.
    assert book(url, {**body, "idempotency_key": "inv-1183"}).json()["day"] == next_day.day
    assert redis_int(redis_url, f"gp:{{acme}}:spend:day:{next_day.day}") == 2_500_000


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"description": "x", "idempotency_key": "k"}, "cost_usd"),
        ({"cost_usd": 1, "cost_micros": 1, "description": "x", "idempotency_key": "k"}, "cost_usd"),
        ({"cost_usd": -0.01, "description": "x", "idempotency_key": "k"}, "cost_usd"),
        ({"cost_usd": "1e3", "description": "x", "idempotency_key": "k"}, "cost_usd"),
        ({"cost_usd": True, "description": "x", "idempotency_key": "k"}, "cost_usd"),
        ({"cost_usd": 1e12, "description": "x", "idempotency_key": "k"}, "cost_usd"),
        ({"cost_micros": 1.5, "description": "x", "idempotency_key": "k"}, "cost_micros"),
        ({"cost_micros": -1, "description": "x", "idempotency_key": "k"}, "cost_micros"),
        ({"cost_micros": 1, "idempotency_key": "k"}, "description"),
        ({"cost_micros": 1, "description": " ", "idempotency_key": "k"}, "description"),
        ({"cost_micros": 1, "description": "x"}, "idempotency_key"),
        ({"cost_micros": 1, "description": "x", "idempotency_key": "k" * 256}, "idempotency_key"),
        ({"cost_micros": 1, "description": "x", "idempotency_key": "k", "model": 4}, "model"),
        ({"cost_micros": 1, "description": "x", "idempotency_key": "k", "prompt_tokens": -3}, "prompt_tokens"),
        ({"cost_micros": 1, "description": "x", "idempotency_key": "k", "tenant": "globex"}, "tenant"),
    ],
)
def test_bad_bookings_are_refused_and_change_nothing(
    config: Config, serve_proxy: Callable[..., str], redis_url: str, body: dict[str, Any], param: str
) -> None:
    url = serve_proxy(config)
    answer = book(url, body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    assert redis_int(redis_url, keys()[0]) == 0


def test_booking_needs_the_admin_key_a_valid_tenant_and_json(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    url = serve_proxy(config)
    body = {"cost_micros": 1, "description": "x", "idempotency_key": "k"}
    assert httpx.post(url + "/admin/tenants/acme/spend", json=body).status_code == 401
    tenant_key = {"authorization": f"Bearer {TENANT_KEY}"}
    assert httpx.post(url + "/admin/tenants/acme/spend", json=body, headers=tenant_key).status_code == 401
    assert book(url, body, tenant="bad tenant!").status_code in (400, 404)
    for raw in (b"{", b"[]", b'{"cost_usd": NaN, "description": "x", "idempotency_key": "k"}'):
        answer = httpx.post(url + "/admin/tenants/acme/spend", content=raw,
                            headers={**ADMIN, "content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json", raw
    assert redis_int(redis_url, keys()[0]) == 0
