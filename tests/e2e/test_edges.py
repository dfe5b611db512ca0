"""Trust at the edges, over real sockets with a real redis-server and the fake upstream: job ids in
one spelling, keys in routing headers reported, keys stripped in every spelling, bounded metric
labels, clamped answers kept out of the cache, and the output limit reasoning models take."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from guardproxy.config.settings import Config, parse_config
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import DAILY_MICROS, HI, SERVICE_KEY, TENANT_KEY, Sdk, all_settled, config_dict, metric, spend

ADMIN_KEY = "adm-edges-secret"
TENANT = {"authorization": f"Bearer {TENANT_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}
CALL = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5}
RUNTIME_KEY = "gp-" + "A" * 43


def edge_config(upstream_url: str, redis_url: str, **top: Any) -> dict[str, Any]:
    return config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY}, **top)


# -- 10: ServiceTitan job ids are integers -------------------------------------------------------


def test_servicetitan_job_ids_with_leading_zeros_are_one_job_under_one_cap(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    raw = edge_config(upstream_url, redis_url)
    raw["budgets"] = {"defaults": {"job_usd": 0.000004}}  # room for one call (3 micro-USD), not two
    url = serve_proxy(parse_config(raw, {}))
    statuses = []
    for spelling in ("123", "0123", "00123"):
        response = httpx.post(url + "/v1/chat/completions", json={**CALL, "max_tokens": 1},
                              headers={**TENANT, "x-servicetitan-job-id": spelling})
        statuses.append(response.status_code)
        all_settled(redis_url)
    # the first call fits the cap; the same job under other spellings is over it
    assert statuses == [200, 429, 429]
    report = httpx.get(url + "/admin/tenants/acme/jobs/123", headers=ADMIN).json()
    assert report["calls"] == 1 and report["job"] == "123"
    assert httpx.get(url + "/admin/tenants/acme/jobs/0123", headers=ADMIN).status_code == 404


# -- 11: a routing header that carries a key ------------------------------------------------------


@pytest.mark.parametrize("header", ["x-guardproxy-job", "x-tenant-id", "x-servicetitan-job-id"])
@pytest.mark.parametrize("value", [RUNTIME_KEY, TENANT_KEY])
def test_a_routing_header_shaped_like_a_key_is_a_clear_400(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
    header: str, value: str,
) -> None:
    url = serve_proxy(parse_config(edge_config(upstream_url, redis_url), {}))
    auth = {"authorization": f"Bearer {SERVICE_KEY}", "x-tenant-id": "acme"} if header != "x-tenant-id" else {
        "authorization": f"Bearer {SERVICE_KEY}"}
    response = httpx.post(url + "/v1/chat/completions", json=CALL, headers={**auth, header: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "key_in_routing_header" and error["param"] == header
    assert "looks like an API key" in error["message"] and value not in response.text
    assert fake_state.requests == []


# -- 12: keys in every spelling stay home ---------------------------------------------------------


def spellings(key: str) -> list[str]:
    return [
        "Basic " + base64.b64encode(f"user:{key}".encode()).decode(),
        "Basic " + base64.b64encode(f"{key}:".encode()).decode().rstrip("="),
        f"{key}.", f"<{key}>", f"({key})", f"key%3D{key}", f"token={key}, (see <{key}>).",
    ]


@pytest.mark.parametrize("key", [TENANT_KEY, ADMIN_KEY, RUNTIME_KEY])
def test_a_key_in_any_spelling_is_not_forwarded_in_headers_or_the_query_string(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState, key: str,
) -> None:
    url = serve_proxy(parse_config(edge_config(upstream_url, redis_url, unbudgeted_paths="passthrough"), {}))
    with httpx.Client(base_url=url, timeout=10) as client:
        for i, spelled in enumerate(spellings(key)):
            headers = {**TENANT, "x-custom-auth": spelled, "proxy-authorization": spelled}
            assert client.post("/v1/chat/completions", json=CALL, headers=headers).status_code == 200
            assert client.get("/v1/files", headers=headers).status_code == 200
            query = {"api_key": key, "purpose": "batch", "note": f"k{i}"}
            assert client.get("/v1/files", headers=TENANT, params=query).status_code == 200
    sent = repr(fake_state.headers) + repr(fake_state.paths) + repr(fake_state.requests)
    encoded = base64.b64encode(f"user:{key}".encode()).decode()
    assert key not in sent and encoded not in sent
    queries = [p for p in fake_state.paths if "purpose" in p]
    assert len(queries) == len(spellings(key)) and all("api_key" not in p and "purpose=batch" in p for p in queries)


# -- 13: bounded passthrough labels ---------------------------------------------------------------


def test_passthrough_metric_labels_are_openai_resources_or_other(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    url = serve_proxy(parse_config(edge_config(upstream_url, redis_url, unbudgeted_paths="passthrough"), {}))
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(40):
            client.get(f"/v1/x{uuid.uuid4().hex[:12]}", headers=TENANT)
        client.get("/v1/files", headers=TENANT)
        client.get("/v1/vector_stores", headers=TENANT)
        scrape = client.get("/metrics").text
    series = [line for line in scrape.splitlines() if line.startswith("guardproxy_unbudgeted_requests_total{")]
    endpoints = {line.split('endpoint="', 1)[1].split('"', 1)[0] for line in series}
    assert endpoints == {"files", "vector_stores", "other"}
    assert metric(scrape, "guardproxy_unbudgeted_requests_total", tenant="acme", endpoint="other") == 40


# -- 14: a clamped answer is not cached -----------------------------------------------------------


def test_a_clamped_answer_is_not_cached_and_a_raised_budget_gets_the_full_answer(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState,
) -> None:
    raw = edge_config(upstream_url, redis_url)
    raw["tenants"]["acme"].update(daily_usd=DAILY_MICROS / 1e6, clamp_max_tokens=True, min_completion_tokens=100,
                                  cache=True)
    url = serve_proxy(parse_config(raw, {}))
    spend(redis_url, 19_600)
    client = sdk(url)
    ask: dict[str, Any] = {"model": "gpt-4o-mini", "messages": HI, "temperature": 0, "max_tokens": 900,
                           "extra_headers": {"x-fake-completion-tokens": "900"}}
    clamped = client.chat.completions.with_raw_response.create(**ask)
    assert clamped.headers["x-guardproxy-clamped-max-tokens"] == "663"
    assert clamped.parse().choices[0].finish_reason == "length"
    all_settled(redis_url)
    raised = httpx.put(url + "/admin/tenants/acme/budget", json={"daily_usd": 10}, headers=ADMIN)
    assert raised.status_code == 200
    full = client.chat.completions.with_raw_response.create(**ask)
    assert full.headers["x-guardproxy-cache"] == "miss" and "x-guardproxy-clamped-max-tokens" not in full.headers
    usage = full.parse().usage
    assert usage is not None and usage.completion_tokens == 900 and len(fake_state.requests) == 2
    all_settled(redis_url)
    again = client.chat.completions.with_raw_response.create(**ask)
    assert again.headers["x-guardproxy-cache"] == "hit"  # an unclamped answer still is


# -- 17: the output limit reasoning models take ---------------------------------------------------


def reasoning_config(upstream_url: str, redis_url: str) -> Config:
    raw = edge_config(upstream_url, redis_url)
    for name in ("o4-mini", "gpt-5-mini"):
        raw["models"][name] = {"input": 0.15, "cached_input": 0.075, "output": 0.60, "max_output_tokens": 1000}
    raw["tenants"]["acme"].update(daily_usd=DAILY_MICROS / 1e6, clamp_max_tokens=True, min_completion_tokens=100)
    return parse_config(raw, {})


@pytest.mark.parametrize("model", ["o4-mini", "gpt-5-mini"])
@pytest.mark.parametrize("field", ["max_completion_tokens", None])
def test_clamping_a_reasoning_model_writes_max_completion_tokens(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState,
    model: str, field: str | None,
) -> None:
    url = serve_proxy(reasoning_config(upstream_url, redis_url))
    spend(redis_url, 19_600)
    raw = sdk(url).chat.completions.with_raw_response.create(
        model=model, messages=HI, extra_headers={"x-fake-completion-tokens": "5000"},
        extra_body={field: 900} if field else {},
    )
    assert raw.headers["x-guardproxy-clamped-max-tokens"] == "663"
    sent = fake_state.requests[-1]
    assert sent["max_completion_tokens"] == 663 and "max_tokens" not in sent
