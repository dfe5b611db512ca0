"""Spend that reaches the ledger outside a call's own admission counts at every level it belongs to:
external spend booked through the admin API, a batch (reserved and settled at the global cap, the
tenant's hour, the caller's key and its model's caps), and a call served unbudgeted under
``fail_open`` (charged at every level once the store is back). Real Redis, real sockets, the real
``openai`` SDK."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import openai
import orjson

from guardproxy.budget.fleet import key_fingerprint
from guardproxy.config.settings import hash_key, parse_config
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import (
    ADMIN,
    ADMIN_KEY,
    HI,
    OTHER_TENANT_KEY,
    TENANT_KEY,
    all_settled,
    config_dict,
    make_config,
    redis_int,
    wait_for,
)
from tests.redis_procs import RedisServer


def now_ids() -> dict[str, str]:
    now = datetime.now(UTC)
    return {"hour": now.strftime("%Y-%m-%dT%H"), "day": now.strftime("%Y-%m-%d"), "month": now.strftime("%Y-%m")}


def global_day(redis_url: str) -> int:
    return redis_int(redis_url, f"gp:{{_global}}:lvl:global:day:{now_ids()['day']}")


def test_external_spend_counts_at_the_global_cap_the_tenants_hour_and_its_models_cap(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str],
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY},
                      budgets={"global": {"daily_usd": 0.02}})
    raw["tenants"]["acme"].update(hourly_usd=0.5, models={"gpt-4o-mini": {"daily_usd": 0.5}})
    url = serve_proxy(parse_config(raw, {}))
    body = {"cost_micros": 19_800, "idempotency_key": "nightly-1", "model": "gpt-4o-mini",
            "description": "nightly summaries"}
    for expected in (201, 200):  # booked, then a replay that charges nothing
        reply = httpx.post(f"{url}/admin/tenants/acme/spend", headers=ADMIN, json=body)
        assert reply.status_code == expected, reply.text
    ids = now_ids()
    assert global_day(redis_url) == 19_800
    assert redis_int(redis_url, f"gp:{{acme}}:spend:hour:{ids['hour']}") == 19_800
    assert redis_int(redis_url, f"gp:{{acme}}:lvl:model:gpt-4o-mini:day:{ids['day']}") == 19_800
    # the global day has 200 left: globex's call fits neither gpt-4o nor gpt-4o-mini (worst case 602)
    globex = httpx.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {OTHER_TENANT_KEY}"},
                        json={"model": "gpt-4o", "messages": HI, "max_tokens": 1000})
    assert globex.status_code == 429, globex.text
    assert globex.headers["x-guardproxy-budget-level"] == "global"


def batch_file(lines: int, model: str = "gpt-4o-mini", max_tokens: int = 50) -> bytes:
    return b"\n".join(orjson.dumps({
        "custom_id": f"wo-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": f"Order {i}."}]},
    }) for i in range(lines)) + b"\n"


def submit(client: openai.OpenAI, content: bytes) -> Any:
    data = client.files.create(file=("orders.jsonl", content), purpose="batch")
    return client.batches.create(input_file_id=data.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_batch_is_held_and_charged_at_its_keys_cap_and_one_over_the_cap_is_refused(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
) -> None:
    url = serve_proxy(make_config(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY},
                                  budgets={"global": {"monthly_usd": 100}}))
    made = httpx.post(f"{url}/admin/tenants/acme/keys", headers=ADMIN, json={"name": "night", "daily_usd": "0.001"})
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    fingerprint = key_fingerprint(hash_key(key))
    ids = now_ids()
    key_day = f"gp:{{acme}}:lvl:key:{fingerprint}:day:{ids['day']}"
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
    try:
        # 40 lines of up to 50 output tokens at gpt-4o-mini's batch price: over 600 micro-USD worst case
        batch = submit(client, batch_file(40))
        held = redis_int(redis_url, f"gp:{{acme}}:lvl:key:{fingerprint}:held")
        assert 500 < held <= 1_000
        # a second one does not fit the key's 1,000 beside the first: refused at the key level
        data = client.files.create(file=("more.jsonl", batch_file(40)), purpose="batch")
        try:
            client.batches.create(input_file_id=data.id, endpoint="/v1/chat/completions", completion_window="24h")
            raise AssertionError("a batch over the key's daily cap was admitted")
        except openai.RateLimitError as exc:
            assert exc.response.headers["x-guardproxy-budget-level"] == "key"
        fake_state.objects.run_batch(batch.id)
        assert client.batches.retrieve(batch.id).status == "completed"  # seeing it ended settles it
        for _ in range(2):
            client.batches.retrieve(batch.id)  # seen again: settled once
    finally:
        client.close()
    charged = redis_int(redis_url, f"gp:{{acme}}:spend:day:{ids['day']}")
    assert 0 < charged <= held
    assert redis_int(redis_url, key_day) == charged
    assert redis_int(redis_url, f"gp:{{_global}}:lvl:global:month:{ids['month']}") == charged
    assert redis_int(redis_url, f"gp:{{acme}}:lvl:key:{fingerprint}:held") == 0


def test_a_batch_mixing_a_capped_model_with_another_is_refused_and_reserves_nothing(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    raw["tenants"]["acme"]["models"] = {"gpt-4o": {"daily_usd": 0.5}}
    url = serve_proxy(parse_config(raw, {}))
    mixed = batch_file(2) + batch_file(2, model="gpt-4o")
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0)
    try:
        data = client.files.create(file=("mixed.jsonl", mixed), purpose="batch")
        try:
            client.batches.create(input_file_id=data.id, endpoint="/v1/chat/completions", completion_window="24h")
            raise AssertionError("a mixed batch with a capped model was admitted")
        except openai.BadRequestError as exc:
            assert "gpt-4o" in exc.message and exc.param == "input_file_id"
    finally:
        client.close()
    assert redis_int(redis_url, "gp:{acme}:reserved") == 0
    assert not any(path.startswith("/v1/batches") for path in fake_state.paths)


def test_a_call_served_unbudgeted_under_fail_open_is_charged_at_every_level_once_the_store_is_back(
    upstream_url: str, serve_proxy: Callable[..., str],
) -> None:
    server = RedisServer(persistent=True)  # restarted below with its data, as in production
    server.start()
    try:
        raw = config_dict(upstream_url, store={"redis_url": server.url, "on_unavailable": "fail_open"},
                          budgets={"global": {"daily_usd": 50}})
        raw["tenants"]["acme"].update(hourly_usd=0.5, models={"gpt-4o": {"daily_usd": 0.5}})
        url = serve_proxy(parse_config(raw, {}))
        headers = {"authorization": f"Bearer {TENANT_KEY}"}
        server.stop()
        served = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=30,
                            json={"model": "gpt-4o", "messages": HI, "max_tokens": 20})
        assert served.status_code == 200, served.text
        server.start()  # same port: the charge kept in the journal is written in the background
        ids = now_ids()
        day = f"gp:{{acme}}:spend:day:{ids['day']}"
        wait_for(lambda: redis_int(server.url, day) > 0, timeout_s=15)
        all_settled(server.url)
        charged = redis_int(server.url, day)
        assert global_day(server.url) == charged
        assert redis_int(server.url, f"gp:{{acme}}:spend:hour:{ids['hour']}") == charged
        assert redis_int(server.url, f"gp:{{acme}}:lvl:model:gpt-4o:day:{ids['day']}") == charged
    finally:
        server.stop()
