"""Drop-in to the last call, through the real openai SDK over sockets against the fake upstream:
models retrieved as OpenAI does, OpenAI's error for an unknown model, and the cost of every call
(``x-guardproxy-cost-usd`` and ``usage.cost``), exactly what the ledger charges."""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal

import httpx
import openai
import pytest

from guardproxy.budget.pricing import Usage, cost_micros
from guardproxy.config.settings import Config
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import audit_log
from tests.helpers import (
    GPT4O,
    HI,
    TENANT_KEY,
    Sdk,
    all_settled,
    config_dict,
    keys,
    make_config,
    redis_int,
    settled,
    wait_for,
)

AUTH = {"authorization": f"Bearer {TENANT_KEY}"}


@pytest.fixture
def config(upstream_url: str, redis_url: str) -> Config:
    return make_config(upstream_url, store={"redis_url": redis_url})


@pytest.fixture
def url(config: Config, serve_proxy: Callable[..., str]) -> str:
    return serve_proxy(config)


def charged(redis_url: str) -> int:
    return redis_int(redis_url, keys()[0])


# -- GET /v1/models/{id} -------------------------------------------------------------------------


def test_every_configured_model_is_retrieved_in_openais_shape(url: str, sdk: Sdk, config: Config) -> None:
    client = sdk(url)
    for name in config.models:
        model = client.models.retrieve(name)
        assert (model.id, model.object, model.owned_by) == (name, "model", "openai")
        assert model.model_dump() == next(m for m in client.models.list().data if m.id == name).model_dump()
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-9-imaginary")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert caught.value.response.json()["error"]["message"] == (
        "The model `gpt-9-imaginary` does not exist or you do not have access to it.")
    # A dated snapshot is priced as its base model but is not one of the configured ids.
    assert httpx.get(url + "/v1/models/gpt-4o-2024-08-06", headers=AUTH).status_code == 404
    assert httpx.get(url + "/v1/models/gpt-4o").status_code == 401
    refused = httpx.delete(url + "/v1/models/gpt-4o", headers=AUTH)
    assert refused.status_code == 405 and refused.json()["error"]["code"] == "method_not_supported"


# -- an unknown model ----------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["chat", "responses", "embeddings"])
def test_an_unknown_model_is_openais_404_and_the_log_names_the_configured_ones(
    url: str, sdk: Sdk, redis_url: str, fake_state: FakeUpstreamState, caplog: pytest.LogCaptureFixture,
    endpoint: str,
) -> None:
    client = sdk(url)
    calls: dict[str, Callable[[], object]] = {
        "chat": lambda: client.chat.completions.create(model="claude-9", messages=HI),
        "responses": lambda: client.responses.create(model="claude-9", input="hi"),
        "embeddings": lambda: client.embeddings.create(model="claude-9", input="hi"),
    }
    with caplog.at_level(logging.INFO, logger="guardproxy.models"), pytest.raises(openai.NotFoundError) as caught:
        calls[endpoint]()
    answer = caught.value.response
    assert answer.status_code == 404 and answer.headers["x-request-id"]
    assert answer.json() == {"error": {
        "message": "The model `claude-9` does not exist or you do not have access to it.",
        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    assert "gpt-4o" not in answer.text
    assert "configured models: gpt-4o, gpt-4o-mini" in caplog.text
    assert fake_state.requests == [] and charged(redis_url) == 0


# -- the cost of every call ----------------------------------------------------------------------


def usd(micros: int) -> float:
    return float(Decimal(micros) / 1_000_000)


def test_a_non_streamed_answer_carries_its_exact_charge_in_header_and_body(url: str, sdk: Sdk, redis_url: str) -> None:
    raw = sdk(url).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI, extra_headers={"x-fake-cached-tokens": "4", "x-fake-completion-tokens": "37"})
    answer = raw.parse()
    assert answer.usage is not None
    expected = cost_micros(Usage(answer.usage.prompt_tokens, 37, 4), GPT4O)
    all_settled(redis_url)
    assert charged(redis_url) == expected > 0
    assert raw.headers["x-guardproxy-cost-usd"] == f"{Decimal(expected) / 1_000_000:.6f}"
    assert answer.usage.model_extra == {"cost": usd(expected)}
    [entry] = audit_log(redis_url)
    assert int(entry["cost_micros"]) == expected


def test_a_stream_with_usage_carries_the_cost_in_its_final_chunk(url: str, sdk: Sdk, redis_url: str) -> None:
    stream = sdk(url).chat.completions.create(model="gpt-4o", messages=HI, stream=True,
                                              stream_options={"include_usage": True})
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert all(chunk.usage is None for chunk in chunks[:-1])
    expected = cost_micros(Usage(usage.prompt_tokens, usage.completion_tokens), GPT4O)
    settled(redis_url, keys()[0], expected)
    assert usage.model_extra == {"cost": usd(expected)}


def test_responses_whole_and_streamed_carry_the_cost(url: str, sdk: Sdk, redis_url: str) -> None:
    client = sdk(url)
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="hi", max_output_tokens=9)
    whole = raw.parse()
    assert whole.usage is not None
    first = cost_micros(Usage(whole.usage.input_tokens, whole.usage.output_tokens), GPT4O)
    assert whole.usage.model_extra == {"cost": usd(first)}
    assert raw.headers["x-guardproxy-cost-usd"] == f"{Decimal(first) / 1_000_000:.6f}"
    events = list(client.responses.create(model="gpt-4o", input="hi again", stream=True))
    completed = events[-1]
    assert completed.type == "response.completed" and completed.response.usage is not None
    streamed = completed.response.usage
    second = cost_micros(Usage(streamed.input_tokens, streamed.output_tokens), GPT4O)
    assert streamed.model_extra == {"cost": usd(second)}
    settled(redis_url, keys()[0], first + second)


def test_embeddings_carry_their_cost(url: str, sdk: Sdk, redis_url: str, config: Config) -> None:
    raw = sdk(url).embeddings.with_raw_response.create(model="gpt-4o-mini", input=["one", "two"])
    answer = raw.parse()
    expected = cost_micros(Usage(answer.usage.prompt_tokens, 0), config.models["gpt-4o-mini"].price)
    all_settled(redis_url)
    assert charged(redis_url) == expected
    assert raw.headers["x-guardproxy-cost-usd"] == f"{Decimal(expected) / 1_000_000:.6f}"
    assert answer.usage.model_extra == {"cost": usd(expected)}


def test_a_cache_hit_costs_zero_and_says_so(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk
) -> None:
    tenants = config_dict(upstream_url)["tenants"]
    tenants["acme"]["cache"] = True
    client = sdk(serve_proxy(make_config(upstream_url, store={"redis_url": redis_url}, tenants=tenants)))
    miss = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0)
    hit = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0)
    assert hit.headers["x-guardproxy-cache"] == "hit" and hit.headers["x-guardproxy-cost-usd"] == "0.000000"
    assert miss.headers["x-guardproxy-cost-usd"] != "0.000000"
    hit_usage = hit.parse().usage
    assert hit_usage is not None and hit_usage.model_extra == {"cost": 0.0}
    stream = client.chat.completions.create(model="gpt-4o", messages=HI, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.usage is not None and last.usage.model_extra == {"cost": 0.0}


def test_usage_cost_can_be_turned_off_for_strict_clients(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState
) -> None:
    config = make_config(upstream_url, store={"redis_url": redis_url}, server={"usage_cost": False})
    client = sdk(serve_proxy(config))
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI)
    usage = raw.parse().usage
    assert usage is not None and not usage.model_extra
    assert float(raw.headers["x-guardproxy-cost-usd"]) > 0
    chunks = list(client.chat.completions.create(model="gpt-4o", messages=HI, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and not chunks[-1].usage.model_extra
    events = list(client.responses.create(model="gpt-4o", input="hi", stream=True))
    final = events[-1]
    assert final.type == "response.completed" and final.response.usage is not None
    assert not final.response.usage.model_extra


def test_an_upstream_error_costs_zero(url: str, redis_url: str) -> None:
    answer = httpx.post(url + "/v1/chat/completions", headers={**AUTH, "x-fake-fail": "400"},
                        json={"model": "gpt-4o", "messages": HI})
    assert answer.status_code == 400 and answer.headers["x-guardproxy-cost-usd"] == "0.000000"
    all_settled(redis_url)
    assert charged(redis_url) == 0


# -- background responses ------------------------------------------------------------------------


def held(redis_url: str) -> int:
    return redis_int(redis_url, "gp:{acme}:reserved")


def test_a_background_response_holds_its_worst_case_until_it_ends_then_charges_its_usage(
    url: str, sdk: Sdk, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    client = sdk(url)
    queued = client.responses.create(model="gpt-4o", input="Plan tomorrow's routes.", background=True,
                                     max_output_tokens=300)
    assert queued.status == "queued" and queued.usage is None
    worst = cost_micros(Usage(queued_prompt(fake_state), 300), GPT4O)
    wait_for(lambda: held(redis_url) == worst)  # the answer is sent; the reservation stays
    assert charged(redis_url) == 0
    assert client.responses.retrieve(queued.id).status == "queued"
    assert held(redis_url) == worst and charged(redis_url) == 0
    fake_state.objects.finish(queued.id)
    done = client.responses.retrieve(queued.id)  # seeing it end settles it
    assert done.status == "completed" and done.usage is not None
    expected = cost_micros(Usage(done.usage.input_tokens, done.usage.output_tokens), GPT4O)
    assert charged(redis_url) == expected > 0 and held(redis_url) == 0
    client.responses.retrieve(queued.id)
    [entry] = audit_log(redis_url)
    assert entry["outcome"] == "background_completed" and int(entry["cost_micros"]) == expected


def queued_prompt(fake_state: FakeUpstreamState) -> int:
    from guardproxy.budget.tokens import TokenCounter

    body = fake_state.requests[-1]
    return TokenCounter("gpt-4o").responses_prompt(body["input"], body.get("instructions"), body.get("tools"))


def test_the_poller_settles_background_responses_and_a_cancelled_one_costs_what_it_reports(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState
) -> None:
    client = sdk(serve_proxy(make_config(upstream_url, store={"redis_url": redis_url}, batches={"poll_s": 0.2})))
    first = client.responses.create(model="gpt-4o", input="one", background=True)
    second = client.responses.create(model="gpt-4o", input="two", background=True)
    done = fake_state.objects.finish(first.id)
    expected = cost_micros(Usage(done["usage"]["input_tokens"], done["usage"]["output_tokens"]), GPT4O)
    assert client.responses.cancel(second.id).status == "cancelled"  # queued, never ran: costs nothing
    wait_for(lambda: charged(redis_url) == expected and held(redis_url) == 0, timeout_s=10)
    assert sorted(e["outcome"] for e in audit_log(redis_url)) == ["background_cancelled", "background_completed"]
