"""The rest of the OpenAI surface over real sockets: responses, embeddings, legacy completions,
unbudgeted paths, and LangChain's streaming ChatOpenAI, each through the real client libraries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
import redis

from guardproxy.budget.pricing import Price, Usage, cost_micros
from guardproxy.config.settings import Config
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import (
    GPT4O,
    MINI,
    TENANT_KEY,
    Sdk,
    all_settled,
    config_dict,
    keys,
    make_config,
    redis_int,
    reserved,
    set_day_spend,
    settled,
)

EMBEDDING = Price(20_000, 20_000, 0)
INSTRUCT = Price(1_500_000, 1_500_000, 2_000_000)
# A prompt count the fake reports that no estimate would give: charges must come from the usage.
REPORTED = {"x-fake-prompt-tokens": "1234"}


def models(**extra: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = config_dict("http://unused")["models"]
    return {
        **base,
        "text-embedding-3-small": {"input": 0.02, "output": 0},
        "gpt-3.5-turbo-instruct": {"input": 1.50, "output": 2.00, "max_output_tokens": 500},
        **extra,
    }


@pytest.fixture
def config(upstream_url: str, redis_url: str) -> Config:
    return make_config(upstream_url, store={"redis_url": redis_url}, models=models())


@pytest.fixture
def proxy_url(config: Config, serve_proxy: Callable[..., str]) -> str:
    return serve_proxy(config)


@pytest.fixture
def client(proxy_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=proxy_url + "/v1", api_key=TENANT_KEY, max_retries=2) as sdk:
        yield sdk




def spend_keys(redis_url: str) -> list[str]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return sorted(str(key) for key in client.keys("*:spend:*"))
    finally:
        client.close()


# -- /v1/responses -------------------------------------------------------------------------------


def test_responses_non_streaming_is_charged_from_its_usage(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    raw = client.responses.with_raw_response.create(
        model="gpt-4o", instructions="Be brief.", input="Say hello to the dispatcher.",
        extra_headers={**REPORTED, "x-fake-cached-tokens": "1000"},
    )
    response = raw.parse()
    assert response.output_text == " hello" * 12
    assert response.usage is not None and response.usage.input_tokens == 1234
    usage = Usage(1234, response.usage.output_tokens, response.usage.input_tokens_details.cached_tokens)
    assert usage.cached_prompt_tokens == 1000
    day, month = keys()
    all_settled(redis_url)
    assert redis_int(redis_url, day) == cost_micros(usage, GPT4O) == redis_int(redis_url, month)
    assert reserved(redis_url) == 0
    assert raw.headers["x-guardproxy-model"] == "gpt-4o"
    assert raw.headers["x-request-id"].startswith("req_resp_fake")
    sent = fake_state.requests[-1]
    assert sent == {"model": "gpt-4o", "instructions": "Be brief.", "input": "Say hello to the dispatcher."}
    assert fake_state.paths[-1] == "/v1/responses"


def test_responses_stream_relays_named_events_and_charges_the_completed_usage(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    items: Any = [{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}]
    events = list(client.responses.create(model="gpt-4o", input=items, stream=True, extra_headers=REPORTED))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == " hello" * 12
    assert "stream_options" not in fake_state.requests[-1]  # responses always report usage: nothing added
    final = events[-1].response.usage
    assert final is not None and final.input_tokens == 1234
    settled(redis_url, keys()[0], cost_micros(Usage(1234, final.output_tokens), GPT4O))
    assert fake_state.stream_endings == ["completed"]


def test_responses_stream_bytes_pass_through_unchanged(proxy_url: str) -> None:
    body = {"model": "gpt-4o", "input": "hi", "stream": True}
    headers = {"authorization": f"Bearer {TENANT_KEY}", "x-fake-completion-tokens": "3"}
    with httpx.stream("POST", proxy_url + "/v1/responses", json=body, headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    frames = [f for f in raw.split("\n\n") if f]
    assert all(f.startswith("event: response.") and "\ndata: {" in f for f in frames)
    assert frames[-1].startswith("event: response.completed\n")
    assert "[DONE]" not in raw
    assert raw.count("event: response.output_text.delta\n") == 3


def test_responses_incomplete_is_charged_and_max_output_tokens_bounds_the_worst_case(
    sdk: Sdk, upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState
) -> None:
    # No soft cap, so only the worst case decides: 1000 output tokens of gpt-4o (0.01 USD) do not fit.
    tenants = {"acme": {"api_keys": [TENANT_KEY], "daily_usd": 1, "soft_cap": 1.0}}
    config = make_config(upstream_url, store={"redis_url": redis_url}, models=models(), tenants=tenants)
    client = sdk(serve_proxy(config))
    set_day_spend(redis_url, 995_000)
    unbounded = client.responses.with_raw_response.create(model="gpt-4o", input="hi")
    assert unbounded.headers["x-guardproxy-model"] == "gpt-4o-mini"
    unbounded_usage = unbounded.parse().usage
    assert unbounded_usage is not None
    bounded = client.responses.with_raw_response.create(
        model="gpt-4o", input="hi", max_output_tokens=5, extra_headers={"x-fake-completion-tokens": "50"}
    )
    assert bounded.headers["x-guardproxy-model"] == "gpt-4o"
    events = list(client.responses.create(model="gpt-4o", input="hi", max_output_tokens=5, stream=True,
                                          extra_headers={"x-fake-completion-tokens": "50"}))
    assert events[-1].type == "response.incomplete"
    usage = events[-1].response.usage
    assert usage is not None and usage.output_tokens == 5
    expected = 995_000 + cost_micros(Usage(unbounded_usage.input_tokens, 12), MINI)
    expected += 2 * cost_micros(Usage(usage.input_tokens, 5), GPT4O)
    settled(redis_url, keys()[0], expected)


def test_responses_downgrade_and_429_work_as_for_chat(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    set_day_spend(redis_url, 800_000)
    raw = client.responses.with_raw_response.create(model="gpt-4o", input="hi")
    assert raw.headers["x-guardproxy-model"] == "gpt-4o-mini"
    assert raw.headers["x-guardproxy-downgraded-from"] == "gpt-4o"
    assert fake_state.requests[-1]["model"] == "gpt-4o-mini"
    set_day_spend(redis_url, 999_990)
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="gpt-4o", input="hi", stream=True)
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(fake_state.requests) == 1


def test_responses_stream_cut_ends_with_an_error_event_and_charges_what_was_streamed(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    deltas = []
    with pytest.raises(openai.APIError) as caught:
        for event in client.responses.create(model="gpt-4o", input="Say hello to the dispatcher.", stream=True,
                                             extra_headers={"x-fake-cut-after": "3"}):
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
    assert caught.value.code == "upstream_unavailable"
    assert deltas == [" hello"] * 3
    # The proxy's own count: the input as it estimates it (3 of framing, 6 of text, 3 of primer) and the
    # 3 tokens streamed.
    settled(redis_url, keys()[0], cost_micros(Usage(12, 3), GPT4O))


def test_background_streams_are_refused(client: openai.OpenAI, fake_state: FakeUpstreamState) -> None:
    """A background stream outlives its connection; background responses are charged when they end
    (tests/e2e/test_dropin.py)."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model="gpt-4o", input="hi", background=True, stream=True)
    assert caught.value.param == "stream"
    assert fake_state.requests == []


# -- /v1/embeddings ------------------------------------------------------------------------------


def test_embeddings_are_charged_their_input_tokens(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    raw = client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["first document", "second one"], extra_headers=REPORTED
    )
    result = raw.parse()
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    assert result.usage.prompt_tokens == 1234
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == cost_micros(Usage(1234, 0), EMBEDDING)
    assert reserved(redis_url) == 0
    assert raw.headers["x-guardproxy-model"] == "text-embedding-3-small"
    client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]])
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == cost_micros(Usage(1234, 0), EMBEDDING) + cost_micros(
        Usage(5, 0), EMBEDDING
    )
    assert fake_state.paths == ["/v1/embeddings", "/v1/embeddings"]


def test_embeddings_worst_case_is_the_input_alone(
    sdk: Sdk, upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    tenants = {"acme": {"api_keys": [TENANT_KEY], "daily_usd": 1, "soft_cap": 1.0}}
    # An output price, so that any output allowance in the worst case would make it not fit.
    priced = models(**{"text-embedding-3-small": {"input": 0.02, "output": 10}})
    config = make_config(upstream_url, store={"redis_url": redis_url}, models=priced, tenants=tenants)
    client = sdk(serve_proxy(config))
    set_day_spend(redis_url, 999_999)  # one micro-USD left
    client.embeddings.create(model="text-embedding-3-small", input="hi")
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == 1_000_000


# -- /v1/completions (legacy) --------------------------------------------------------------------


def test_completions_stream_without_include_usage_hides_it_and_charges_it(
    client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say", stream=True,
                                            extra_headers=REPORTED))
    assert fake_state.requests[-1]["stream_options"] == {"include_usage": True}
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == " hello" * 12
    settled(redis_url, keys()[0], cost_micros(Usage(1234, 12), INSTRUCT))


def test_completions_stream_with_include_usage_shows_it(client: openai.OpenAI, redis_url: str) -> None:
    chunks = list(client.completions.create(model="gpt-3.5-turbo-instruct", prompt=["Say", "Tell"], n=2,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_headers=REPORTED))
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == 4 * 12  # two prompts, two completions each
    settled(redis_url, keys()[0], cost_micros(Usage(1234, 48), INSTRUCT))


def test_completions_non_streaming(client: openai.OpenAI, redis_url: str, fake_state: FakeUpstreamState) -> None:
    answer = client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say", max_tokens=5,
                                       extra_headers=REPORTED)
    assert answer.choices[0].text == " hello" * 5 and answer.choices[0].finish_reason == "length"
    all_settled(redis_url)
    assert redis_int(redis_url, keys()[0]) == cost_micros(Usage(1234, 5), INSTRUCT)
    assert "stream_options" not in fake_state.requests[-1]


# -- other /v1 paths -----------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/images/generations"), ("GET", "/v1/vector_stores"),
                                              ("POST", "/v1/audio/speech"), ("DELETE", "/v1/assistants/asst-1")])
def test_unbudgeted_paths_are_refused_by_default(
    proxy_url: str, fake_state: FakeUpstreamState, redis_url: str, method: str, path: str
) -> None:
    response = httpx.request(method, proxy_url + path, json={"model": "dall-e-3"} if method == "POST" else None,
                             headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json" and response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "unknown_url"
    assert "unbudgeted_paths" in error["message"]
    assert fake_state.requests == []
    assert spend_keys(redis_url) == []


def test_unbudgeted_paths_pass_through_when_configured_and_charge_nothing(
    sdk: Sdk, upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState
) -> None:
    config = make_config(upstream_url, store={"redis_url": redis_url}, unbudgeted_paths="passthrough")
    url = serve_proxy(config)
    client = sdk(url)
    echoed = client.post("/moderations?probe=1", body={"input": "hi"}, cast_to=httpx.Response).json()
    assert echoed == {"object": "fake.echo", "method": "POST", "path": "/v1/moderations", "query": "probe=1",
                      "body": {"input": "hi"}}
    assert fake_state.headers[-1]["authorization"] == "Bearer sk-upstream-secret"
    listing = httpx.get(url + "/v1/audio/voices", params={"language": "en"},
                        headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert listing.status_code == 200 and listing.json()["method"] == "GET"
    assert listing.headers["x-guardproxy-unbudgeted"] == "true" and listing.headers["x-guardproxy-tenant"] == "acme"
    assert fake_state.paths == ["/v1/moderations?probe=1", "/v1/audio/voices?language=en"]
    assert httpx.get(url + "/v1/audio/voices", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert len(fake_state.requests) == 2
    assert spend_keys(redis_url) == []
    metrics = httpx.get(url + "/metrics").text
    assert 'guardproxy_unbudgeted_requests_total{endpoint="audio",tenant="acme"} 1.0' in metrics


# -- LangChain -----------------------------------------------------------------------------------


def test_langchain_streaming_chat_is_charged_the_upstream_usage(
    proxy_url: str, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    llm = ChatOpenAI(model="gpt-4o", base_url=proxy_url + "/v1", api_key=SecretStr(TENANT_KEY), streaming=True,
                     default_headers=REPORTED, max_retries=0)
    chunks = list(llm.stream("Say hello to the dispatcher."))
    assert fake_state.requests[-1]["stream_options"] == {"include_usage": True}  # added by the proxy
    assert "".join(str(c.content) for c in chunks) == " hello" * 12
    assert all(c.usage_metadata is None for c in chunks)  # LangChain did not ask, so it sees no usage chunk
    settled(redis_url, keys()[0], cost_micros(Usage(1234, 12), GPT4O))
