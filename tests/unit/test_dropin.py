"""The pure parts of the drop-in work: cost amounts, object paths and references, batch pricing."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.budget.cost import add_usage_cost, usd_number, usd_text
from guardproxy.budget.pricing import Price, Usage, cost_micros
from guardproxy.config.models import ModelConfig
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.batches import charge_output, plan_batch
from guardproxy.http.endpoints import CHAT
from guardproxy.http.objects import ObjectPath, derived_ids, object_path, referenced_ids, scoped_page

MODELS = {
    "gpt-4o": ModelConfig("gpt-4o", "openai", Price(2_500_000, 1_250_000, 10_000_000), 1000),
    "mini": ModelConfig("mini", "openai", Price(150_000, 75_000, 600_000), 500,
                        batch=Price(100_000, 50_000, 400_000)),
}


@given(st.integers(min_value=0, max_value=10**15))
def test_usd_text_is_the_exact_amount(micros: int) -> None:
    text = usd_text(micros)
    assert Decimal(text) * 1_000_000 == micros and len(text.split(".")[1]) == 6
    assert abs(usd_number(micros) - micros / 1_000_000) <= 1e-9 * max(1, micros / 1_000_000)


def test_usage_cost_goes_only_where_there_is_usage() -> None:
    answer = {"usage": {"prompt_tokens": 1}}
    assert add_usage_cost(answer, 1500) and answer["usage"]["cost"] == 0.0015
    assert not add_usage_cost({"usage": None}, 1) and not add_usage_cost([], 1)


@pytest.mark.parametrize(("path", "expected"), [
    ("files", ObjectPath("files", None, "")),
    ("files/file-1/content", ObjectPath("files", "file-1", "content")),
    ("fine_tuning/jobs/ftjob-1/events", ObjectPath("fine_tuning/jobs", "ftjob-1", "events")),
    ("chat/completions/chatcmpl-1", ObjectPath("chat/completions", "chatcmpl-1", "")),
    ("responses/input_tokens", None),
    ("fine_tuning/checkpoints/x", None),
    ("moderations", None),
    ("images/generations", None),
])
def test_object_paths(path: str, expected: ObjectPath | None) -> None:
    assert object_path(path) == expected


@pytest.mark.parametrize("path", ["Files/file-1", "files./file-1", "FILES", "Fine_Tuning/jobs", "batches /b"])
def test_another_spelling_of_a_collection_is_refused(path: str) -> None:
    with pytest.raises(GuardError) as caught:
        object_path(path)
    assert caught.value.kind is ErrorKind.INVALID_PATH


def test_references_are_found_at_any_depth_and_only_under_their_names() -> None:
    body = {"input": [{"content": [{"type": "input_file", "file_id": "file-a"}]}],
            "tools": [{"type": "file_search", "vector_store_ids": ["vs_1", 3]}], "previous_response_id": "resp_p",
            "conversation": {"id": "conv_1"}, "text": "file_id file-z", "metadata": {"note": "resp_q"}}
    assert sorted(referenced_ids(body)) == ["conv_1", "file-a", "resp_p", "vs_1"]
    assert derived_ids({"output_file_id": "file-o", "error_file_id": None, "file": {"id": "file-u"},
                        "result_files": ["file-r"]}) == ["file-o", "file-r", "file-u"]


def test_a_scoped_page_sets_its_cursors_to_what_it_holds() -> None:
    kept = [{"id": f"o{i}"} for i in range(3)]
    page = scoped_page({"object": "list", "data": [], "has_more": False}, kept, 2, False)
    assert [o["id"] for o in page["data"]] == ["o0", "o1"]
    assert (page["first_id"], page["last_id"], page["has_more"]) == ("o0", "o1", True)
    assert scoped_page({"object": "list"}, [], 5, False) == {"object": "list", "data": [], "first_id": None,
                                                            "last_id": None, "has_more": False}


def line(i: int, model: str, max_tokens: int | None = None, **extra: object) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": f"order {i}"}], **extra}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_a_batch_is_priced_line_by_line_at_batch_prices() -> None:
    content = b"\n".join([line(0, "gpt-4o", 100), line(1, "mini"), b"", line(2, "gpt-4o-2024-08-06", 7)])
    plan = plan_batch(content, "/v1/chat/completions", MODELS, "openai")
    half = Price(1_250_000, 625_000, 5_000_000)
    prompt = CHAT.prompt_tokens  # the same count a call gets
    from guardproxy.budget.tokens import TokenCounter

    def worst(i: int, model: str, out: int, price: Price) -> int:
        tokens = prompt(TokenCounter(model), {"messages": [{"role": "user", "content": f"order {i}"}]})
        return cost_micros(Usage(tokens, out), price)

    assert plan.lines == 3 and plan.models == ("gpt-4o", "mini")
    assert plan.worst_micros == (worst(0, "gpt-4o", 100, half) + worst(1, "mini", 500, Price(100_000, 50_000, 400_000))
                                 + worst(2, "gpt-4o-2024-08-06", 7, half))


@pytest.mark.parametrize(("content", "endpoint", "code"), [
    (b"not json", "/v1/chat/completions", "invalid_field"),
    (line(0, "gpt-4o", 5), "/v1/embeddings", "invalid_field"),
    (line(0, "gpt-4o", 5), "/v1/images/generations", "invalid_field"),
    (line(0, "claude", 5), "/v1/chat/completions", "model_not_found"),
    (line(0, "gpt-4o", 5, stream=True), "/v1/chat/completions", "invalid_field"),
    (line(0, "gpt-4o", -5), "/v1/chat/completions", "invalid_field"),
    (b"\n\n", "/v1/chat/completions", "invalid_field"),
])
def test_a_bad_batch_is_refused_naming_what_is_wrong(content: bytes, endpoint: str, code: str) -> None:
    with pytest.raises(GuardError) as caught:
        plan_batch(content, endpoint, MODELS, "openai")
    assert caught.value.code == code


def test_a_batch_on_another_upstream_is_refused() -> None:
    with pytest.raises(GuardError) as caught:
        plan_batch(line(0, "gpt-4o", 5), "/v1/chat/completions", MODELS, "azure")
    assert "upstream" in caught.value.message


def test_the_output_is_charged_from_each_answered_line() -> None:
    def out(model: str, prompt: int, completion: int, cached: int = 0, status: int = 200) -> bytes:
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        body = {"model": model, "usage": usage, "choices": []}
        return orjson.dumps({"custom_id": "x", "response": {"status_code": status, "body": body}})

    content = b"\n".join([out("gpt-4o", 10, 20, 4), out("mini", 3, 3), out("gpt-4o", 99, 99, status=500),
                          out("retired-model", 1, 1), b"garbage"])
    charge = charge_output(content, CHAT, MODELS, MODELS["gpt-4o"])
    half = Price(1_250_000, 625_000, 5_000_000)
    assert charge.micros == (cost_micros(Usage(10, 20, 4), half)
                             + cost_micros(Usage(3, 3), Price(100_000, 50_000, 400_000))
                             + cost_micros(Usage(1, 1), half))
    assert charge.lines == 3 and charge.usage == Usage(14, 24, 4)
