"""The response cache through the real openai SDK over a real socket, on a real redis-server: a
repeated deterministic call is answered without the upstream and charges nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
import redis
from pydantic import BaseModel

from guardproxy.config.settings import Config, parse_config
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import HI, TENANT_KEY, Sdk, all_settled, config_dict, keys, reserved, spent, wait_for
from tests.helpers import metric as admin_metric

AUTH = {"authorization": f"Bearer {TENANT_KEY}"}


def cache_config(upstream_url: str, redis_url: str, ttl_s: int = 3600, **acme: Any) -> Config:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, cache={"ttl_s": ttl_s})
    raw["tenants"]["acme"].update(cache=True, **acme)
    return parse_config(raw, {})




def metric(url: str, name: str, **labels: str) -> float:
    return admin_metric(httpx.get(url + "/metrics").text, name, **labels)


@pytest.fixture
def proxy(upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]) -> str:
    return serve_proxy(cache_config(upstream_url, redis_url))


def uncosted(usage: BaseModel | None) -> dict[str, Any]:
    """A usage object without its ``cost`` (the charge: a hit's is 0)."""
    assert usage is not None
    return usage.model_dump(exclude={"cost"})


def cost_of(usage: BaseModel | None) -> float:
    assert usage is not None and usage.model_extra is not None
    cost: float = usage.model_extra["cost"]
    return cost


def test_a_repeated_temperature_0_chat_is_a_hit_that_reaches_no_upstream_and_charges_nothing(
    proxy: str, sdk: Sdk, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    client = sdk(proxy)
    first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0,
                                                               max_tokens=20)
    assert first.headers["x-guardproxy-cache"] == "miss"
    all_settled(redis_url)
    charged = spent(redis_url)
    assert charged > 0 and len(fake_state.requests) == 1
    second = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0,
                                                                max_tokens=20)
    assert second.headers["x-guardproxy-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert uncosted(second.parse().usage) == uncosted(first.parse().usage)
    # a hit costs nothing, and says so (usage.cost, x-guardproxy-cost-usd)
    assert cost_of(second.parse().usage) == 0 < cost_of(first.parse().usage)
    assert second.headers["x-guardproxy-cost-usd"] == "0.000000"
    # the same request streamed (the key ignores stream and stream_options): replayed as SSE, usage included
    stream = client.chat.completions.create(model="gpt-4o", messages=HI, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first.parse().choices[0].message.content
    assert uncosted(chunks[-1].usage) == uncosted(first.parse().usage) and cost_of(chunks[-1].usage) == 0
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert len(fake_state.requests) == 1, "a hit must not reach the upstream"
    assert spent(redis_url) == charged and reserved(redis_url) == 0
    assert metric(proxy, "guardproxy_cache_requests_total", tenant="acme", result="hit") == 2
    saved = metric(proxy, "guardproxy_cache_saved_usd_total", tenant="acme")
    assert round(saved * 1e6) == 2 * charged


def test_a_streamed_miss_is_assembled_and_replayed_whole_and_streamed(
    proxy: str, sdk: Sdk, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    client = sdk(proxy)
    messages: Any = [{"role": "user", "content": "Stream this once."}]
    stored_before = cached_entries(redis_url)
    streamed = list(client.chat.completions.create(model="gpt-4o", messages=messages, temperature=0,
                                                   max_tokens=10, stream=True))
    # the miss is stored once the stream has ended and settled: the client may ask again before that
    wait_for(lambda: cached_entries(redis_url) > stored_before, timeout_s=5)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text and all(c.usage is None for c in streamed)  # the client did not ask for usage
    charged = spent(redis_url)
    whole = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=messages, temperature=0,
                                                               max_tokens=10)
    assert whole.headers["x-guardproxy-cache"] == "hit"
    answer = whole.parse()
    assert answer.choices[0].message.content == text and answer.object == "chat.completion"
    assert answer.usage is not None and answer.usage.completion_tokens == 10
    again = list(client.chat.completions.create(model="gpt-4o", messages=messages, temperature=0,
                                                max_tokens=10, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in again if c.choices) == text
    assert all(c.usage is None for c in again)
    assert len(fake_state.requests) == 1 and spent(redis_url) == charged


def test_temperature_07_always_misses_and_no_cache_skips_the_lookup(
    proxy: str, sdk: Sdk, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    client = sdk(proxy)
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0.7,
                                                                 max_tokens=5)
        assert "x-guardproxy-cache" not in raw.headers
    assert len(fake_state.requests) == 2
    client.chat.completions.create(model="gpt-4o", messages=HI, temperature=0, max_tokens=5)
    fresh = client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=HI, temperature=0, max_tokens=5, extra_headers={"cache-control": "no-cache"})
    assert fresh.headers["x-guardproxy-cache"] == "bypass"
    assert len(fake_state.requests) == 4
    # n > 1 is never cached; the header opts a non-zero temperature in
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o", messages=HI, temperature=0, n=2, max_tokens=5)
    assert len(fake_state.requests) == 6
    for _ in range(2):
        client.chat.completions.create(model="gpt-4o", messages=HI, temperature=0.5, max_tokens=5,
                                       extra_headers={"x-guardproxy-cache": "use"})
    assert len(fake_state.requests) == 7
    assert "x-guardproxy-cache" not in fake_state.headers[-1]  # steering headers stay here


def test_responses_and_embeddings_are_cached(
    proxy: str, sdk: Sdk, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    client = sdk(proxy)
    first = client.responses.create(model="gpt-4o", input="Cache me.", temperature=0, max_output_tokens=50)
    charged = spent(redis_url)
    whole = client.responses.with_raw_response.create(model="gpt-4o", input="Cache me.", temperature=0,
                                                      max_output_tokens=50)
    assert whole.headers["x-guardproxy-cache"] == "hit"
    assert whole.parse().output_text == first.output_text and uncosted(whole.parse().usage) == uncosted(first.usage)
    events = list(client.responses.create(model="gpt-4o", input="Cache me.", temperature=0, max_output_tokens=50,
                                          stream=True))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == first.output_text
    assert events[-1].type == "response.completed" and uncosted(events[-1].response.usage) == uncosted(first.usage)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # a streamed Responses miss stores the response.completed event's response (once the stream has
    # ended and settled: the client may ask again before that, so wait for the entry)
    stored_before = cached_entries(redis_url)
    list(client.responses.create(model="gpt-4o", input="Streamed first.", temperature=0, max_output_tokens=50,
                                 stream=True))
    wait_for(lambda: cached_entries(redis_url) > stored_before, timeout_s=5)
    after_stream = client.responses.with_raw_response.create(model="gpt-4o", input="Streamed first.",
                                                             temperature=0, max_output_tokens=50)
    assert after_stream.headers["x-guardproxy-cache"] == "hit"
    for _ in range(2):
        vectors = client.embeddings.create(model="gpt-4o-mini", input="embed me")
        assert vectors.data[0].embedding
    assert len(fake_state.requests) == 3
    assert spent(redis_url) > charged  # the misses were charged; the hits were not


def test_entries_expire_and_a_hit_is_served_past_the_hard_cap(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState
) -> None:
    client = sdk(serve_proxy(cache_config(upstream_url, redis_url, ttl_s=1)))
    client.chat.completions.create(model="gpt-4o", messages=HI, temperature=0, max_tokens=5)
    with redis.Redis.from_url(redis_url) as r:
        entries = r.keys("gp:{acme}:rc:*")
        assert len(entries) == 1
        assert 0 < r.pttl(entries[0]) <= 1000
        # past the hard cap: the hit costs nothing, so it is served; a miss is refused
        r.set(keys()[0], 10**9)
    hit = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0, max_tokens=5)
    assert hit.headers["x-guardproxy-cache"] == "hit"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=HI, temperature=0, max_tokens=6)
    time.sleep(1.1)
    with pytest.raises(openai.RateLimitError):  # expired: a miss again, refused by the budget
        client.chat.completions.create(model="gpt-4o", messages=HI, temperature=0, max_tokens=5)
    with redis.Redis.from_url(redis_url) as r:
        r.delete(keys()[0])
    miss = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0,
                                                              max_tokens=5)
    assert miss.headers["x-guardproxy-cache"] == "miss"
    assert len(fake_state.requests) == 2


def test_a_tenant_without_cache_is_never_cached(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    client = sdk(serve_proxy(parse_config(raw, {})))
    for _ in range(2):
        raw_response = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0,
                                                                         max_tokens=5)
        assert "x-guardproxy-cache" not in raw_response.headers
    assert len(fake_state.requests) == 2


def test_replicas_share_the_cache_and_a_hit_leaves_no_call_or_job_trace(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState
) -> None:
    config = cache_config(upstream_url, redis_url)
    first, second = sdk(serve_proxy(config)), sdk(serve_proxy(config))
    job = {"x-guardproxy-job": "ticket-9"}
    first.chat.completions.create(model="gpt-4o", messages=HI, temperature=0, max_tokens=5, extra_headers=job)
    hit = second.chat.completions.with_raw_response.create(model="gpt-4o", messages=HI, temperature=0, max_tokens=5,
                                                            extra_headers=job)
    assert hit.headers["x-guardproxy-cache"] == "hit" and len(fake_state.requests) == 1
    all_settled(redis_url)
    with redis.Redis.from_url(redis_url) as r:
        assert r.xlen("gp:{acme}:calls") == 1
        assert int(r.hget("gp:{acme}:job:ticket-9", "calls") or 0) == 1


def cached_entries(redis_url: str, tenant: str = "acme") -> int:
    """How many answers the response cache holds for ``tenant``."""
    with redis.Redis.from_url(redis_url) as client:
        return len(client.keys(f"gp:{{{tenant}}}:rc:*"))
