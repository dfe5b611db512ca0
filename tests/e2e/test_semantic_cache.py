"""The semantic cache through the real openai SDK over real sockets, on a real redis-server: a
paraphrase is answered from the store for the price of one embedding, a near-miss (another order id)
is not, and entries written through one replica are found through another."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import redis

from guardproxy.admin import status
from guardproxy.budget.pricing import format_usd
from guardproxy.config.settings import Config, parse_config
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import ADMIN, ADMIN_KEY, TENANT_KEY, Sdk, all_settled, config_dict, reserved, spent
from tests.helpers import metric as admin_metric

BENCH = Path(__file__).resolve().parents[2] / "bench"
PAIRS = Path(__file__).resolve().parents[1] / "data" / "semantic_pairs.jsonl"
SYSTEM: Any = {"role": "system", "content": "You are Acme's support agent."}
EMBEDDINGS_MODEL = "text-embedding-3-small"


def semantic_config(upstream_url: str, redis_url: str, **semantic: Any) -> Config:
    raw = config_dict(upstream_url, store={"redis_url": redis_url},
                      cache={"ttl_s": 3600, "semantic": {"embeddings_model": EMBEDDINGS_MODEL, **semantic}})
    raw["models"][EMBEDDINGS_MODEL] = {"input": 0.02}
    raw["tenants"]["acme"].update(cache="semantic")
    return parse_config(raw, {})


def ask(client: openai.OpenAI, text: str, model: str = "gpt-4o", **extra: Any) -> Any:
    messages: Any = [SYSTEM, {"role": "user", "content": text}]
    return client.chat.completions.with_raw_response.create(
        model=model, messages=messages, temperature=0, max_tokens=20, **extra)


def metric(url: str, name: str, **labels: str) -> float:
    return admin_metric(httpx.get(url + "/metrics").text, name, **labels)


def calls(redis_url: str, tenant: str = "acme") -> list[dict[str, str]]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        entries: Any = client.xrange(f"gp:{{{tenant}}}:calls")
        return [dict(fields) for _, fields in entries]
    finally:
        client.close()


def endpoints(fake: FakeUpstreamState, since: int = 0) -> list[str]:
    return [path.removeprefix("/v1/") for path in fake.paths[since:]]


@pytest.fixture
def proxy(upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]) -> str:
    return serve_proxy(semantic_config(upstream_url, redis_url))


def test_a_paraphrase_hits_for_one_embedding_and_a_near_miss_goes_upstream(
    proxy: str, sdk: Sdk, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    client = sdk(proxy)
    first = ask(client, "Where is order 10452?")
    assert first.headers["x-guardproxy-cache"] == "miss"
    assert endpoints(fake_state) == ["embeddings", "chat/completions"]  # a miss: one embedding plus the call
    all_settled(redis_url)
    before, logged = spent(redis_url), len(calls(redis_url))

    hit = ask(client, "where's order 10452")
    assert hit.headers["x-guardproxy-cache"] == "semantic-hit"
    assert float(hit.headers["x-guardproxy-cache-similarity"]) >= 0.92
    assert hit.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert endpoints(fake_state, 2) == ["embeddings"], "a hit reaches the upstream for its embedding only"
    all_settled(redis_url)
    # exactly one call was charged: the embedding, logged with the hit it found
    new = calls(redis_url)[logged:]
    assert [c["model"] for c in new] == [EMBEDDINGS_MODEL]
    charge = int(new[0]["cost_micros"])
    assert charge > 0 and spent(redis_url) - before == charge
    assert new[0]["cache"] == "semantic-hit" and new[0]["similarity"] == hit.headers["x-guardproxy-cache-similarity"]
    saved = int(new[0]["saved_micros"])
    assert saved > charge
    assert metric(proxy, "guardproxy_semantic_cache_requests_total", tenant="acme", result="hit") == 1
    assert round(metric(proxy, "guardproxy_semantic_cache_saved_usd_total", tenant="acme") * 1e6) == saved

    # the same paraphrase streamed: replayed as SSE like an exact hit, usage included when asked
    paraphrase: Any = [SYSTEM, {"role": "user", "content": "where is order 10452"}]
    seen = len(fake_state.paths)
    stream = client.chat.completions.create(
        model="gpt-4o", messages=paraphrase,
        temperature=0, max_tokens=20, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        first.parse().choices[0].message.content
    replayed, original = chunks[-1].usage, first.parse().usage
    assert replayed is not None and original is not None
    # the same tokens; the completion costs nothing on a hit (usage.cost 0), the miss cost what it was charged
    assert replayed.model_dump(exclude={"cost"}) == original.model_dump(exclude={"cost"})
    assert replayed.model_extra == {"cost": 0.0} and original.model_extra and original.model_extra["cost"] > 0
    assert endpoints(fake_state, seen) == ["embeddings"]

    # a near-miss: another order id is never the same question, however close the words
    seen = len(fake_state.paths)
    near = ask(client, "Where is order 10453?")
    assert near.headers["x-guardproxy-cache"] == "miss"
    assert "x-guardproxy-cache-similarity" not in near.headers
    assert endpoints(fake_state, seen) == ["embeddings", "chat/completions"]
    all_settled(redis_url)
    assert reserved(redis_url) == 0
    assert metric(proxy, "guardproxy_semantic_cache_requests_total", tenant="acme", result="miss") == 2
    assert metric(proxy, "guardproxy_semantic_cache_entries", tenant="acme") == 2
    assert metric(proxy, "guardproxy_semantic_cache_index_bytes") > 2000 * 256 * 4


def test_what_the_semantic_cache_leaves_alone(
    proxy: str, sdk: Sdk, redis_url: str, fake_state: FakeUpstreamState
) -> None:
    client = sdk(proxy)
    # a short prompt to a cheap model: the embedding would not pay for itself, so none is made
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi?"}], temperature=0,
                                   max_tokens=5)
    assert endpoints(fake_state) == ["chat/completions"]
    assert metric(proxy, "guardproxy_semantic_cache_requests_total", tenant="acme", result="skipped") == 1
    # tools, n > 1 and a non-zero temperature: no embedding, no semantic entry
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    ask(client, "Where is order 10452?", tools=[tool])
    ask(client, "Where is order 10452?", n=2)
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Where is order 10452?"}],
                                   temperature=0.7, max_tokens=5)
    assert endpoints(fake_state, 1) == ["chat/completions"] * 3
    # a conversation longer than max_messages (4)
    history: Any = [SYSTEM, {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"},
               {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Sure."},
               {"role": "user", "content": "Where is order 10452?"}]
    client.chat.completions.create(model="gpt-4o", messages=history, temperature=0, max_tokens=5)
    assert endpoints(fake_state, 4) == ["chat/completions"]
    all_settled(redis_url)


def test_entries_written_through_one_replica_are_found_through_another(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, fake_state: FakeUpstreamState
) -> None:
    config = semantic_config(upstream_url, redis_url)
    first, second = serve_proxy(config), serve_proxy(config)
    a, b = sdk(first), sdk(second)
    # b's index is brought up to date before the entry exists, so it must notice the new one
    assert ask(b, "How do I reset my password?").headers["x-guardproxy-cache"] == "miss"
    stored = ask(a, "Where is my order?")
    assert stored.headers["x-guardproxy-cache"] == "miss"
    all_settled(redis_url)  # a whole answer's entry is written after it is sent, before it settles
    found = ask(b, "where's my order please")
    assert found.headers["x-guardproxy-cache"] == "semantic-hit"
    assert found.parse().choices[0].message.content == stored.parse().choices[0].message.content
    # and the other way round, into an index that already holds entries
    all_settled(redis_url)
    assert ask(a, "how can I reset my password").headers["x-guardproxy-cache"] == "semantic-hit"
    assert [p for p in endpoints(fake_state) if p == "chat/completions"] == ["chat/completions"] * 2
    all_settled(redis_url)


def test_the_admin_api_and_status_show_the_hits(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], sdk: Sdk, tmp_path: Path
) -> None:
    config = semantic_config(upstream_url, redis_url)
    url = serve_proxy(dataclasses.replace(config, admin_api_key=ADMIN_KEY))
    client = sdk(url)
    ask(client, "What are your opening hours?")
    all_settled(redis_url)
    ask(client, "what are your opening hours please")
    all_settled(redis_url)
    logged = httpx.get(url + "/admin/tenants/acme/calls?limit=5", headers=ADMIN).json()["data"]
    assert [c["model"] for c in logged] == [EMBEDDINGS_MODEL, "gpt-4o", EMBEDDINGS_MODEL]  # newest first
    hit = logged[0]
    assert hit["cache"] == "semantic-hit" and hit["similarity"] >= 0.92 and hit["saved_usd"] > hit["cost_usd"]
    assert all("cache" not in c for c in logged[1:])
    page = httpx.get(url + "/admin", headers=ADMIN).text
    assert f"<li>acme: 1 hit, ${format_usd(round(hit['saved_usd'] * 1e6))} saved</li>" in page
    out = io.StringIO()
    assert status.main(config, "acme", out) == 0
    assert f"semantic cache: 1 hit, ${format_usd(round(hit['saved_usd'] * 1e6))} saved" in out.getvalue()


def test_the_calibration_tool_embeds_the_set_through_the_proxy(
    proxy: str, redis_url: str, fake_state: FakeUpstreamState, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = importlib.util.spec_from_file_location("bench_semantic_calibrate", BENCH / "semantic_calibrate.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    pairs = [orjson.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines()]
    with httpx.Client(base_url=proxy + "/v1/", headers={"authorization": f"Bearer {TENANT_KEY}"}) as client:
        scored = tool.embed_pairs(client, EMBEDDINGS_MODEL, 256, pairs)
    assert len(scored) == len(pairs) == len([p for p in fake_state.paths if p == "/v1/embeddings"])
    all_settled(redis_url)
    assert spent(redis_url) > 0  # charged to the tenant like any embeddings call
    tool.report(pairs, scored, 0.92)
    out = capsys.readouterr().out
    assert "threshold alone: lowest safe threshold 0.8974" in out and "at 0.92: 0 false hits" in out
