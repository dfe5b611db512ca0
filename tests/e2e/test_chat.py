"""End to end over real sockets: the openai SDK -> guardproxy (uvicorn) -> fake upstream, Redis real."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import openai
import pytest
import redis

from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.config.settings import Config
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import (
    GPT4O,
    HI,
    HI_PROMPT_TOKENS,
    MINI,
    OTHER_TENANT_KEY,
    SERVICE_KEY,
    TENANT_KEY,
    all_settled,
    keys,
    make_config,
    redis_int,
    reserved,
    settled,
    wait_for,
)


@pytest.fixture
def config(upstream_url: str, redis_url: str) -> Config:
    return make_config(upstream_url, store={"redis_url": redis_url})


@pytest.fixture
def client(config: Config, serve_proxy: Callable[..., str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=serve_proxy(config) + "/v1", api_key=TENANT_KEY, max_retries=2)


def test_non_streaming_is_relayed_and_charged_exactly(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI, extra_headers={"x-fake-cached-tokens": "4"}
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == " hello" * 12
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    usage = Usage(answer.usage.prompt_tokens, answer.usage.completion_tokens, 4)
    expected = cost_micros(usage, GPT4O)
    day, month = keys()
    all_settled(redis_url)
    assert redis_int(redis_url, day) == expected == redis_int(redis_url, month)
    assert raw.headers["x-guardproxy-tenant"] == "acme"
    assert raw.headers["x-guardproxy-model"] == "gpt-4o"
    assert raw.headers["x-guardproxy-budget-state"] == "active"
    assert raw.headers["x-request-id"].startswith("req_chatcmpl-fake")
    assert raw.headers["openai-processing-ms"] == "3"
    assert "x-guardproxy-downgraded-from" not in raw.headers
    sent = fake_state.headers[-1]
    assert sent["authorization"] == "Bearer sk-upstream-secret"
    assert "stream_options" not in fake_state.requests[-1]


def test_stream_without_include_usage_hides_the_usage_chunk(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HI, stream=True))
    assert fake_state.requests[-1]["stream_options"] == {"include_usage": True}
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == " hello" * 12
    assert chunks[-1].choices[0].finish_reason == "stop"
    settled(redis_url, keys()[0], cost_micros(Usage(HI_PROMPT_TOKENS, 12), GPT4O))
    assert fake_state.stream_endings == ["completed"]


def test_stream_with_include_usage_shows_it(client: openai.OpenAI, redis_url: str) -> None:
    chunks = list(client.chat.completions.create(
        model="gpt-4o", messages=HI, stream=True, stream_options={"include_usage": True}
    ))
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    usage = Usage(final.usage.prompt_tokens, final.usage.completion_tokens)
    settled(redis_url, keys()[0], cost_micros(usage, GPT4O))


def test_soft_cap_downgrades_to_the_cheaper_tier(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    day, _ = keys()
    redis.Redis.from_url(redis_url).set(day, 800_000)  # acme: 1 USD a day, soft cap 0.8
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    assert raw.headers["x-guardproxy-model"] == "gpt-4o-mini"
    assert raw.headers["x-guardproxy-downgraded-from"] == "gpt-4o"
    assert raw.headers["x-guardproxy-budget-state"] == "downgrading"
    assert fake_state.requests[-1]["model"] == "gpt-4o-mini"
    usage = raw.parse().usage
    assert usage is not None
    all_settled(redis_url)
    assert redis_int(redis_url, day) == 800_000 + cost_micros(Usage(usage.prompt_tokens, usage.completion_tokens), MINI)


def test_dated_snapshot_is_priced_as_its_base_model_and_sent_unchanged(
    client: openai.OpenAI, fake_state: FakeUpstreamState
) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-2024-08-06", messages=HI)
    assert raw.headers["x-guardproxy-model"] == "gpt-4o"
    assert fake_state.requests[-1]["model"] == "gpt-4o-2024-08-06"


def test_hard_cap_answers_429_that_the_sdk_does_not_retry(
    config: Config, serve_proxy: Callable[..., str], redis_url: str, fake_state: FakeUpstreamState
) -> None:
    url = serve_proxy(config)
    day, month = keys()
    with redis.Redis.from_url(redis_url) as r:
        r.set(day, 999_990)
    with openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=2) as client, \
            pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    error = caught.value
    assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
    assert "acme" in error.message and "daily" in error.message
    headers = error.response.headers
    assert headers["x-should-retry"] == "false"
    seconds_to_midnight = 86400 - (int(time.time()) % 86400)
    assert abs(int(headers["retry-after"]) - seconds_to_midnight) <= 2
    assert headers["x-request-id"].startswith("req_gp_")
    assert fake_state.requests == []
    metrics = httpx.get(url + "/metrics").text
    assert 'guardproxy_requests_total{model="gpt-4o",outcome="rejected",tenant="acme"} 1.0' in metrics
    assert redis_int(redis_url, day) == 999_990 and redis_int(redis_url, month) == 0


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b"{not json", {}, 400, "invalid_json"),
        (b"[1, 2]", {}, 400, "invalid_json"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', {}, 400, "missing_field"),
        (b'{"model": "gpt-4o", "messages": "hi"}', {}, 400, "invalid_field"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user"}], "max_tokens": -1}', {}, 400, "invalid_field"),
        (b'{"model": "claude-9", "messages": [{"role": "user", "content": "x"}]}', {}, 404, "model_not_found"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}', {"authorization": ""}, 401,
         "invalid_api_key"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}',
         {"authorization": "Bearer nope"}, 401, "invalid_api_key"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}', {"x-tenant-id": "globex"}, 403,
         "tenant_mismatch"),
        (b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "' + b"x" * 70000 + b'"}]}', {}, 413,
         "request_too_large"),
    ],
)
def test_bad_input_gets_an_openai_error_and_changes_no_counter(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
    body: bytes, headers: dict[str, str], status: int, code: str,
) -> None:
    config = make_config(upstream_url, store={"redis_url": redis_url}, server={"max_body_bytes": 65536})
    url = serve_proxy(config)
    sent = {"authorization": f"Bearer {TENANT_KEY}", "content-type": "application/json", **headers}
    response = httpx.post(url + "/v1/chat/completions", content=body, headers=sent)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert fake_state.requests == []
    client = redis.Redis.from_url(redis_url)
    # only the store's marker (written once at start-up, store_health.py), no money and no tenant
    assert [k for k in client.keys("*") if b"{gp-store}" not in k] == []


def test_service_key_with_tenant_header_charges_that_tenant(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    url = serve_proxy(config)
    client = openai.OpenAI(base_url=url + "/v1", api_key=SERVICE_KEY, default_headers={"X-Tenant-Id": "shop-42"})
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=HI)
    assert raw.headers["x-guardproxy-tenant"] == "shop-42"
    all_settled(redis_url, "shop-42")
    assert redis_int(redis_url, keys("shop-42")[0]) > 0
    no_tenant = openai.OpenAI(base_url=url + "/v1", api_key=SERVICE_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        no_tenant.chat.completions.create(model="gpt-4o-mini", messages=HI)
    assert caught.value.code == "missing_tenant"
    with pytest.raises(openai.BadRequestError) as caught:
        no_tenant.chat.completions.create(model="gpt-4o-mini", messages=HI, extra_headers={"X-Tenant-Id": "a b"})
    assert caught.value.code == "invalid_tenant"


def test_tenant_timezone_decides_the_day_key(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    client = openai.OpenAI(base_url=serve_proxy(config) + "/v1", api_key=OTHER_TENANT_KEY)
    client.chat.completions.create(model="gpt-4o-mini", messages=HI)
    day, month = keys("globex", "America/Chicago")
    all_settled(redis_url, "globex")
    assert redis_int(redis_url, day) > 0 and redis_int(redis_url, month) == redis_int(redis_url, day)


def test_upstream_error_passes_through_and_charges_nothing(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client.with_options(max_retries=0).chat.completions.create(
            model="gpt-4o", messages=HI, extra_headers={"x-fake-fail": "500"}
        )
    assert caught.value.code == "server_error"
    assert caught.value.response.headers["x-request-id"].startswith("req_fake_")
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == 0
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=HI, stream=True, extra_headers={"x-fake-fail": "400"})
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == 0


def test_upstream_unreachable_is_502_and_slow_upstream_is_504(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    from tests.servers import free_port

    dead = make_config(f"http://127.0.0.1:{free_port()}", store={"redis_url": redis_url})
    with openai.OpenAI(base_url=serve_proxy(dead) + "/v1", api_key=TENANT_KEY, max_retries=0) as client, \
            pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.status_code == 502 and caught.value.code == "upstream_unavailable"

    slow = make_config(upstream_url, store={"redis_url": redis_url},
                       upstreams={"openai": {"base_url": f"{upstream_url}/v1", "timeout_s": 0.3}})
    with openai.OpenAI(base_url=serve_proxy(slow) + "/v1", api_key=TENANT_KEY, max_retries=0) as client, \
            pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HI, extra_headers={"x-fake-delay-ms": "2000"})
    assert caught.value.status_code == 504 and caught.value.code == "upstream_timeout"
    assert redis_int(redis_url, keys()[0]) == 0 and reserved(redis_url) == 0


def test_an_upstream_without_api_key_gets_no_credential_at_all(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState
) -> None:
    config = make_config(upstream_url, store={"redis_url": redis_url},
                         upstreams={"openai": {"base_url": f"{upstream_url}/v1", "headers": {"Helicone-Auth": "h"}}})
    with openai.OpenAI(base_url=serve_proxy(config) + "/v1", api_key=TENANT_KEY) as client:
        client.chat.completions.create(model="gpt-4o", messages=HI, extra_headers={"X-Tenant-Id": "acme"})
    sent = fake_state.headers[-1]
    # The tenant's guardproxy key never leaves: a keyless upstream (vLLM, Ollama) gets no credential.
    assert "authorization" not in sent and "api-key" not in sent
    assert all(TENANT_KEY not in value for value in sent.values())
    assert sent["helicone-auth"] == "h"
    assert "x-tenant-id" not in sent


def test_upstream_cut_mid_stream_charges_what_was_streamed(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(
            model="gpt-4o", messages=HI, stream=True, extra_headers={"x-fake-cut-after": "3"}
        ):
            received.append(chunk)
    assert caught.value.code == "upstream_unavailable"
    assert "".join(c.choices[0].delta.content or "" for c in received) == " hello" * 3
    settled(redis_url, keys()[0], cost_micros(Usage(HI_PROMPT_TOKENS, 3), GPT4O))


def test_client_disconnect_cancels_upstream_and_charges_what_was_produced(
    config: Config, serve_proxy: Callable[..., str], redis_url: str, fake_state: FakeUpstreamState
) -> None:
    url = serve_proxy(config)
    body = {"model": "gpt-4o", "messages": HI, "stream": True}
    headers = {"authorization": f"Bearer {TENANT_KEY}", "x-fake-completion-tokens": "500",
               "x-fake-chunk-delay-ms": "20"}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.count("hello")
            if seen >= 5:
                break
    wait_for(lambda: reserved(redis_url) == 0 and fake_state.stream_endings == ["cancelled"])
    spent = redis_int(redis_url, keys()[0])
    # Charged from the text relayed before the hang-up: at least what the client saw, far from all 500.
    assert cost_micros(Usage(HI_PROMPT_TOKENS, 5), GPT4O) <= spent < cost_micros(Usage(HI_PROMPT_TOKENS, 100), GPT4O)


def test_a_client_leaving_a_stalled_stream_ends_it_at_once(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    """The client's hang-up is noticed while the upstream is silent, not at its next chunk."""
    from tests.e2e.books import audit_log  # books imports this module

    url = serve_proxy(config)
    body = {"model": "gpt-4o", "messages": HI, "stream": True}
    headers = {"authorization": f"Bearer {TENANT_KEY}", "x-fake-chunk-delay-ms": "20000"}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        next(response.iter_raw())
    left = time.monotonic()
    wait_for(lambda: reserved(redis_url) == 0, timeout_s=10)
    assert time.monotonic() - left < 5
    [entry] = audit_log(redis_url)
    assert entry["outcome"] == "client_disconnected"


def test_models_health_ready_and_unknown_paths(config: Config, serve_proxy: Callable[..., str]) -> None:
    url = serve_proxy(config)
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY)
    assert sorted(m.id for m in client.models.list()) == ["gpt-4o", "gpt-4o-mini"]
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(url + "/readyz").status_code == 200
    missing = httpx.post(url + "/v1/images/generations", json={}, headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    assert httpx.get(url + "/v1/models").status_code == 401
