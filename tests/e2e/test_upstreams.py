"""Several upstreams over real sockets: Azure OpenAI's paths and key, provider headers, model
fallbacks when an upstream fails, and the circuit breaker that stops calling a dead one."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from guardproxy.budget.pricing import Price, Usage, cost_micros
from guardproxy.config.settings import Config, parse_config
from guardproxy.testing.fake_upstream import FakeUpstreamState, create_fake_upstream
from tests.helpers import (
    GPT4O,
    HI,
    HI_PROMPT_TOKENS,
    Sdk,
    all_settled,
    config_dict,
    keys,
    redis_int,
    reserved,
    set_day_spend,
    settled,
)
from tests.servers import free_port, serve_in_thread

GROK = Price(3_000_000, 3_000_000, 15_000_000)


@pytest.fixture
def backup_state() -> FakeUpstreamState:
    return FakeUpstreamState()


@pytest.fixture
def backup_url(backup_state: FakeUpstreamState) -> Iterator[str]:
    with serve_in_thread(create_fake_upstream(backup_state)) as url:
        yield url


def two_upstreams(primary_url: str, backup_url: str, redis_url: str, **primary: Any) -> Config:
    """gpt-4o on ``primary`` falling back to grok-2 on ``backup`` (which has its own key)."""
    raw = config_dict(primary_url, store={"redis_url": redis_url})
    raw["upstreams"] = {
        "primary": {"base_url": f"{primary_url}/v1", "api_key": "sk-primary", **primary},
        "backup": {"base_url": f"{backup_url}/v1", "api_key": "xai-backup"},
    }
    raw["models"]["gpt-4o"].update(upstream="primary", fallbacks=["grok-2"])
    raw["models"]["gpt-4o-mini"]["upstream"] = "primary"
    raw["models"]["grok-2"] = {"upstream": "backup", "input": 3.0, "output": 15.0, "max_output_tokens": 1000}
    return parse_config(raw, {})


def breaker_state(url: str, upstream: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'guardproxy_upstream_breaker_state{{upstream="{upstream}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no breaker gauge for {upstream}")


# -- Azure OpenAI --------------------------------------------------------------------------------


def test_azure_deployment_paths_with_api_key_and_api_version(
    sdk: Sdk, upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    raw["upstreams"] = {"azure": {"base_url": upstream_url, "kind": "azure", "api_key": "az-secret",
                                  "api_version": "2024-10-21"}}
    raw["models"]["gpt-4o"]["deployment"] = "prod-4o"
    raw["models"]["gpt-4o-mini"]["deployment"] = "prod-mini"
    client = sdk(serve_proxy(parse_config(raw, {})))

    answer = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    assert fake_state.paths[-1] == "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
    sent = fake_state.headers[-1]
    assert sent["api-key"] == "az-secret" and "authorization" not in sent
    assert fake_state.requests[-1]["model"] == "prod-4o"
    assert answer.headers["x-guardproxy-model"] == "gpt-4o"  # priced as the configured model, not the deployment
    day = keys()[0]
    all_settled(redis_url)
    assert redis_int(redis_url, day) == cost_micros(Usage(HI_PROMPT_TOKENS, 12), GPT4O)

    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HI, stream=True))
    assert all(c.usage is None for c in chunks)
    assert fake_state.paths[-1].startswith("/openai/deployments/prod-4o/chat/completions?")
    settled(redis_url, day, 2 * cost_micros(Usage(HI_PROMPT_TOKENS, 12), GPT4O))

    client.responses.create(model="gpt-4o", input="hi")
    assert fake_state.paths[-1] == "/openai/responses?api-version=2024-10-21"
    assert fake_state.requests[-1]["model"] == "prod-4o"
    client.embeddings.create(model="gpt-4o-mini", input="hi")
    assert fake_state.paths[-1] == "/openai/deployments/prod-mini/embeddings?api-version=2024-10-21"


def test_azure_v1_surface_when_no_api_version(
    sdk: Sdk, upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    raw["upstreams"] = {"azure": {"base_url": f"{upstream_url}/openai/v1/", "kind": "azure", "api_key": "az"}}
    raw["models"]["gpt-4o"]["deployment"] = "prod-4o"
    client = sdk(serve_proxy(parse_config(raw, {})))
    events = list(client.responses.create(model="gpt-4o", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert fake_state.paths[-1] == "/openai/v1/responses"
    assert fake_state.requests[-1]["model"] == "prod-4o"
    assert fake_state.headers[-1]["api-key"] == "az"


def test_provider_headers_and_tenant_id_header(
    sdk: Sdk, upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    raw["upstreams"]["openai"].update(headers={"Helicone-Auth": "Bearer hk"}, tenant_header="Helicone-User-Id")
    client = sdk(serve_proxy(parse_config(raw, {})))
    client.chat.completions.create(model="gpt-4o", messages=HI, extra_headers={"Helicone-User-Id": "spoofed"})
    sent = fake_state.headers[-1]
    assert sent["helicone-auth"] == "Bearer hk"
    assert sent["helicone-user-id"] == "acme"
    assert sent["authorization"] == "Bearer sk-upstream-secret"


# -- fallbacks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [500, 503, 429, "connection refused"])
def test_failing_upstream_falls_back_to_the_next_model_at_its_price(
    sdk: Sdk, upstream_url: str, backup_url: str, redis_url: str, serve_proxy: Callable[..., str],
    fake_state: FakeUpstreamState,
    backup_state: FakeUpstreamState, failure: int | str,
) -> None:
    primary = f"http://127.0.0.1:{free_port()}" if failure == "connection refused" else upstream_url
    fake_state.fail_with = failure if isinstance(failure, int) else None
    url = serve_proxy(two_upstreams(primary, backup_url, redis_url))
    raw = sdk(url).chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    assert raw.parse().choices[0].message.content == " hello" * 12
    assert raw.headers["x-guardproxy-model"] == "grok-2"
    assert raw.headers["x-guardproxy-fallback-from"] == "gpt-4o"
    assert len(fake_state.requests) == (0 if failure == "connection refused" else 1)
    assert backup_state.requests[-1]["model"] == "grok-2"
    assert backup_state.headers[-1]["authorization"] == "Bearer xai-backup"
    # Charged once, at grok-2's price; the failed attempt's reservation is released.
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == cost_micros(Usage(HI_PROMPT_TOKENS, 12), GROK)
    assert reserved(redis_url) == 0
    metrics = httpx.get(url + "/metrics").text
    assert 'guardproxy_fallbacks_total{from_model="gpt-4o",tenant="acme",to_model="grok-2"} 1.0' in metrics
    assert 'guardproxy_requests_total{model="gpt-4o",outcome="allowed",tenant="acme"} 1.0' in metrics
    assert 'outcome="error"' not in metrics


def test_streams_fall_back_too(
    sdk: Sdk, upstream_url: str, backup_url: str, redis_url: str, serve_proxy: Callable[..., str],
    fake_state: FakeUpstreamState, backup_state: FakeUpstreamState,
) -> None:
    fake_state.fail_with = 502
    url = serve_proxy(two_upstreams(upstream_url, backup_url, redis_url))
    events = list(sdk(url).responses.create(model="gpt-4o", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    usage = events[-1].response.usage
    assert usage is not None
    settled(redis_url, keys()[0], cost_micros(Usage(usage.input_tokens, usage.output_tokens), GROK))
    assert backup_state.stream_endings == ["completed"]


def test_client_errors_do_not_fall_back(
    sdk: Sdk, upstream_url: str, backup_url: str, redis_url: str, serve_proxy: Callable[..., str],
    fake_state: FakeUpstreamState, backup_state: FakeUpstreamState,
) -> None:
    fake_state.fail_with = 400
    url = serve_proxy(two_upstreams(upstream_url, backup_url, redis_url))
    with pytest.raises(openai.BadRequestError):
        sdk(url).chat.completions.create(model="gpt-4o", messages=HI)
    assert backup_state.requests == []
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == 0


def test_when_every_model_fails_the_last_failure_passes_through(
    sdk: Sdk, upstream_url: str, backup_url: str, redis_url: str, serve_proxy: Callable[..., str],
    fake_state: FakeUpstreamState, backup_state: FakeUpstreamState,
) -> None:
    fake_state.fail_with, backup_state.fail_with = 500, 503
    url = serve_proxy(two_upstreams(upstream_url, backup_url, redis_url))
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(url).chat.completions.create(model="gpt-4o", messages=HI, stream=True)
    assert caught.value.status_code == 503 and caught.value.code == "overloaded"
    assert caught.value.response.headers["x-guardproxy-model"] == "grok-2"
    assert len(fake_state.requests) == len(backup_state.requests) == 1
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == 0
    metrics = httpx.get(url + "/metrics").text
    assert 'guardproxy_requests_total{model="gpt-4o",outcome="error",tenant="acme"} 1.0' in metrics


def test_a_fallback_over_budget_is_skipped_and_the_upstream_failure_returned(
    sdk: Sdk, upstream_url: str, backup_url: str, redis_url: str, serve_proxy: Callable[..., str],
    fake_state: FakeUpstreamState, backup_state: FakeUpstreamState,
) -> None:
    fake_state.fail_with = 500
    config = two_upstreams(upstream_url, backup_url, redis_url)
    # gpt-4o's cheapest tier fits, grok-2 (no cheaper tier, 15 USD/1M output) does not.
    set_day_spend(redis_url, 990_000)
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(serve_proxy(config)).chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.status_code == 500
    assert backup_state.requests == []
    assert reserved(redis_url) == 0


# -- circuit breaker -----------------------------------------------------------------------------


def test_breaker_stops_calling_a_dead_upstream_then_probes_it_after_the_cooldown(
    sdk: Sdk, upstream_url: str, backup_url: str, redis_url: str, serve_proxy: Callable[..., str],
    fake_state: FakeUpstreamState, backup_state: FakeUpstreamState,
) -> None:
    fake_state.fail_with = 500
    config = two_upstreams(upstream_url, backup_url, redis_url, breaker={"failures": 2, "cooldown_s": 1.0})
    url = serve_proxy(config)
    client = sdk(url)
    assert breaker_state(url, "primary") == 0
    for _ in range(4):
        answer = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
        assert answer.headers["x-guardproxy-model"] == "grok-2"
    assert len(fake_state.requests) == 2  # opened after two failures: the other two never left the proxy
    assert len(backup_state.requests) == 4
    assert breaker_state(url, "primary") == 2 and breaker_state(url, "backup") == 0
    all_settled(redis_url)

    time.sleep(1.1)  # cool-down over: one probe goes out, fails, and the circuit opens again
    client.chat.completions.create(model="gpt-4o", messages=HI)
    assert len(fake_state.requests) == 3
    client.chat.completions.create(model="gpt-4o", messages=HI)
    assert len(fake_state.requests) == 3
    assert breaker_state(url, "primary") == 2

    fake_state.fail_with = None  # the provider is back
    time.sleep(1.1)
    answer = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    assert answer.headers["x-guardproxy-model"] == "gpt-4o"
    assert breaker_state(url, "primary") == 0
    client.chat.completions.create(model="gpt-4o", messages=HI)
    assert len(fake_state.requests) == 5 and len(backup_state.requests) == 6


def test_open_breaker_without_fallback_answers_502_at_once(
    sdk: Sdk, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    raw = config_dict(dead, store={"redis_url": redis_url})
    raw["upstreams"]["openai"]["breaker"] = {"failures": 1, "cooldown_s": 60}
    url = serve_proxy(parse_config(raw, {}))
    client = sdk(url)
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert "unreachable" in caught.value.message
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HI)
    assert caught.value.status_code == 502 and "circuit breaker is open" in caught.value.message
    assert time.monotonic() - started < 0.5
    assert breaker_state(url, "openai") == 2
    assert reserved(redis_url) == 0
