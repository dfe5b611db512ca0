"""The budgeted Batch API through the real openai SDK over sockets, against the fake upstream's
Batch API: the whole batch's worst case reserved at submission (429 before anything reaches the
upstream when it does not fit), the output's usage charged to the micro-USD at batch prices when
it ends (found by GET or by the poller), only what ran for a cancelled batch, and nothing lost or
doubled across a kill -9."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest

from guardproxy.budget.pricing import Price, Usage, cost_micros
from guardproxy.budget.tokens import TokenCounter
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import ProxyProcess, audit_log
from tests.helpers import OTHER_TENANT_KEY, TENANT_KEY, config_dict, keys, make_config, redis_int, reserved, wait_for

# Half of each model's price (test config: gpt-4o 2.50/1.25/10.00, gpt-4o-mini 0.15/0.075/0.60 USD per 1M).
BATCH_PRICES = {"gpt-4o": Price(1_250_000, 625_000, 5_000_000), "gpt-4o-mini": Price(75_000, 37_500, 300_000)}


def batch_lines(count: int, max_tokens: int = 50) -> bytes:
    lines = []
    for i in range(count):
        body = {"model": "gpt-4o" if i % 4 else "gpt-4o-mini", "max_tokens": max_tokens + i % 5,
                "messages": [{"role": "user", "content": f"Summarise work order {i} for the dispatcher."}]}
        lines.append(orjson.dumps({"custom_id": f"wo-{i}", "method": "POST", "url": "/v1/chat/completions",
                                   "body": body}))
    return b"\n".join(lines) + b"\n"


def worst_case(content: bytes) -> int:
    """Every line's prompt and its whole max_tokens, at the model's batch price."""
    total = 0
    for raw in content.splitlines():
        body = orjson.loads(raw)["body"]
        prompt = TokenCounter(body["model"]).chat_prompt(body["messages"])
        total += cost_micros(Usage(prompt, body["max_tokens"]), BATCH_PRICES[body["model"]])
    return total


def output_cost(content: bytes) -> tuple[int, int]:
    """What the output file's usage costs at batch prices, line by line; and how many lines."""
    total = lines = 0
    for raw in content.splitlines():
        body = orjson.loads(raw)["response"]["body"]
        usage = body["usage"]
        total += cost_micros(Usage(usage["prompt_tokens"], usage["completion_tokens"],
                                   usage["prompt_tokens_details"]["cached_tokens"]), BATCH_PRICES[body["model"]])
        lines += 1
    return total, lines


@pytest.fixture
def tenants() -> Iterator[Callable[[str], tuple[openai.OpenAI, openai.OpenAI]]]:
    opened: list[openai.OpenAI] = []

    def make(url: str) -> tuple[openai.OpenAI, openai.OpenAI]:
        opened.extend([openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0),
                       openai.OpenAI(base_url=url + "/v1", api_key=OTHER_TENANT_KEY, max_retries=0)])
        return opened[-2], opened[-1]

    yield make
    for client in opened:
        client.close()


def held(redis_url: str) -> int:
    """Micro-USD acme's reservations hold now."""
    return redis_int(redis_url, "gp:{acme}:reserved")


def spent(redis_url: str) -> int:
    return redis_int(redis_url, keys()[0])


def submit(client: openai.OpenAI, content: bytes) -> Any:
    data = client.files.create(file=("orders.jsonl", content), purpose="batch")
    return client.batches.create(input_file_id=data.id, endpoint="/v1/chat/completions", completion_window="24h")


def test_a_100_line_batch_is_charged_to_the_micro_usd_at_batch_prices(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
    tenants: Callable[[str], tuple[openai.OpenAI, openai.OpenAI]],
) -> None:
    # The default unbudgeted_paths: reject: files and batches are budgeted paths of their own.
    acme, globex = tenants(serve_proxy(make_config(upstream_url, store={"redis_url": redis_url})))
    content = batch_lines(100)
    batch = submit(acme, content)
    assert held(redis_url) == worst_case(content) > 0 and spent(redis_url) == 0
    fake_state.objects.run_batch(batch.id)
    done = acme.batches.retrieve(batch.id)  # seeing it ended settles it
    assert done.status == "completed" and done.output_file_id is not None
    output = acme.files.content(done.output_file_id).read()
    expected, lines = output_cost(output)
    assert lines == 100
    assert spent(redis_url) == expected > 0 and reserved(redis_url) == 0
    assert expected < worst_case(content)
    [entry] = audit_log(redis_url)
    assert entry["outcome"] == "batch_completed" and int(entry["cost_micros"]) == expected
    assert entry["request_id"] == batch.id
    acme.batches.retrieve(batch.id)  # seen again: settled once
    assert spent(redis_url) == expected and len(audit_log(redis_url)) == 1
    for call in (lambda: globex.batches.retrieve(batch.id), lambda: globex.files.content(done.output_file_id),
                 lambda: globex.batches.cancel(batch.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [b.id for b in acme.batches.list()] == [batch.id] and globex.batches.list().data == []


def test_a_batch_that_does_not_fit_is_refused_before_it_reaches_the_upstream(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
    tenants: Callable[[str], tuple[openai.OpenAI, openai.OpenAI]],
) -> None:
    acme, _ = tenants(serve_proxy(make_config(upstream_url, store={"redis_url": redis_url})))
    content = batch_lines(100, max_tokens=5000)  # worst case over acme's 1 USD a day
    assert worst_case(content) > 1_000_000
    data = acme.files.create(file=("big.jsonl", content), purpose="batch")
    with pytest.raises(openai.RateLimitError) as caught:
        acme.batches.create(input_file_id=data.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert not any(path.startswith("/v1/batches") for path in fake_state.paths)
    assert fake_state.objects.listing("batches", None, 10)["data"] == []
    assert reserved(redis_url) == 0 and spent(redis_url) == 0


def test_bad_batch_input_is_refused_and_reserves_nothing(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
    tenants: Callable[[str], tuple[openai.OpenAI, openai.OpenAI]],
) -> None:
    acme, globex = tenants(serve_proxy(make_config(upstream_url, store={"redis_url": redis_url})))
    unknown = orjson.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                            "body": {"model": "claude-9", "messages": [{"role": "user", "content": "x"}]}})
    with pytest.raises(openai.NotFoundError) as missing:
        submit(acme, unknown)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        submit(acme, batch_lines(3) + b"not json\n")
    assert bad.value.code == "invalid_field" and "line 4" in bad.value.message
    theirs = acme.files.create(file=("orders.jsonl", batch_lines(2)), purpose="batch")
    with pytest.raises(openai.NotFoundError):  # another tenant's input file
        globex.batches.create(input_file_id=theirs.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert not any(path.startswith("/v1/batches") for path in fake_state.paths)
    assert reserved(redis_url) == 0 and spent(redis_url) == 0


def test_a_cancelled_batch_is_charged_only_what_ran_and_the_poller_settles_it(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], fake_state: FakeUpstreamState,
    tenants: Callable[[str], tuple[openai.OpenAI, openai.OpenAI]],
) -> None:
    config = make_config(upstream_url, store={"redis_url": redis_url}, batches={"poll_s": 0.2})
    acme, _ = tenants(serve_proxy(config))
    content = batch_lines(100)
    batch = submit(acme, content)
    assert acme.batches.cancel(batch.id).status == "cancelling"
    assert held(redis_url) == worst_case(content)
    ended = fake_state.objects.run_batch(batch.id, lines=40, status="cancelled")
    expected, lines = output_cost(fake_state.objects.contents[ended["output_file_id"]])
    assert lines == 40
    wait_for(lambda: spent(redis_url) == expected and reserved(redis_url) == 0, timeout_s=10)
    [entry] = audit_log(redis_url)
    assert entry["outcome"] == "batch_cancelled"
    expired = submit(acme, batch_lines(10))
    fake_state.objects.run_batch(expired.id, lines=0, status="expired")  # nothing ran: nothing charged
    wait_for(lambda: len(audit_log(redis_url)) == 2 and reserved(redis_url) == 0, timeout_s=10)
    assert spent(redis_url) == expected and audit_log(redis_url)[1]["outcome"] == "batch_expired"


def test_a_batch_survives_a_kill_9_of_the_proxy_that_submitted_it(
    upstream_url: str, redis_url: str, fake_state: FakeUpstreamState,
    proxies: Callable[[dict[str, Any]], ProxyProcess],
    tenants: Callable[[str], tuple[openai.OpenAI, openai.OpenAI]],
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, batches={"poll_s": 0.2})
    first = proxies(raw)
    acme, _ = tenants(first.url)
    content = batch_lines(100)
    batch = submit(acme, content)
    first.kill()
    assert held(redis_url) == worst_case(content)  # held in the store, not by the dead process
    fake_state.objects.run_batch(batch.id)
    expected, _ = output_cost(fake_state.objects.contents[fake_state.objects.objects[batch.id]["output_file_id"]])
    second = proxies(raw)  # its poller finds the open batch and settles it
    wait_for(lambda: spent(redis_url) == expected and reserved(redis_url) == 0, timeout_s=15)
    acme2, _ = tenants(second.url)
    assert acme2.batches.retrieve(batch.id).status == "completed"
    assert spent(redis_url) == expected and len(audit_log(redis_url)) == 1
