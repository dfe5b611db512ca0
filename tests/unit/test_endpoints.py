"""The non-chat endpoints' pure parts: request parsing, prompt counting, worst cases, usage, streams."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.budget.pricing import Price, Usage
from guardproxy.budget.tokens import TokenCounter
from guardproxy.config.settings import ModelConfig
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.endpoints import CHAT, COMPLETIONS, EMBEDDINGS, RESPONSES
from guardproxy.http.relay import ChatStreamWatcher, completion_texts
from guardproxy.http.requests import parse_completions_request, parse_embeddings_request, parse_responses_request
from guardproxy.http.responses_stream import ResponsesStreamWatcher, output_texts, responses_usage
from guardproxy.http.sse import SSEParser

MODEL = ModelConfig("m", "openai", Price(1, 1, 1), max_output_tokens=1000)
COUNTER = TokenCounter("gpt-4o")


def encoded(**body: Any) -> bytes:
    return json.dumps(body).encode()


def refused(parse: Any, raw: bytes) -> GuardError:
    with pytest.raises(GuardError) as info:
        parse(raw)
    return info.value


# -- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "n", "best_of", "outputs"),
    [("x", None, None, 1), (["a", "b", "c"], None, None, 3), ([1, 2, 3], 2, None, 2), ([[1], [2]], 2, 3, 6),
     ("x", 2, 5, 5)],
)
def test_completions_outputs_multiply_by_prompts_and_best_of(
    prompt: Any, n: int | None, best_of: int | None, outputs: int
) -> None:
    request = parse_completions_request(encoded(model="m", prompt=prompt, n=n, best_of=best_of, max_tokens=7))
    assert request.choices == outputs and request.max_output_tokens == 7
    assert COMPLETIONS.worst_output_tokens(request, MODEL) == 7 * outputs


def test_completions_without_max_tokens_reserve_the_model_maximum() -> None:
    request = parse_completions_request(encoded(model="m", prompt="x", stream=True))
    assert request.stream and not request.wants_usage
    assert COMPLETIONS.worst_output_tokens(request, MODEL) == 1000


@pytest.mark.parametrize(
    ("parse", "body", "param", "kind"),
    [
        (parse_completions_request, {"prompt": "x"}, "model", ErrorKind.MISSING_FIELD),
        (parse_completions_request, {"model": "m"}, "prompt", ErrorKind.MISSING_FIELD),
        (parse_completions_request, {"model": "m", "prompt": []}, "prompt", ErrorKind.INVALID_FIELD),
        (parse_completions_request, {"model": "m", "prompt": [1, "a"]}, "prompt", ErrorKind.INVALID_FIELD),
        (parse_completions_request, {"model": "m", "prompt": [True]}, "prompt", ErrorKind.INVALID_FIELD),
        (parse_completions_request, {"model": "m", "prompt": "x", "best_of": 0}, "best_of", ErrorKind.INVALID_FIELD),
        (parse_completions_request, {"model": "m", "prompt": "x", "max_tokens": "9"}, "max_tokens",
         ErrorKind.INVALID_FIELD),
        (parse_embeddings_request, {"model": "m"}, "input", ErrorKind.MISSING_FIELD),
        (parse_embeddings_request, {"model": "m", "input": {"text": "x"}}, "input", ErrorKind.INVALID_FIELD),
        (parse_embeddings_request, {"model": "", "input": "x"}, "model", ErrorKind.INVALID_FIELD),
        (parse_responses_request, {"input": "x"}, "model", ErrorKind.MISSING_FIELD),
        (parse_responses_request, {"model": "m", "input": 3}, "input", ErrorKind.INVALID_FIELD),
        (parse_responses_request, {"model": "m", "instructions": ["x"]}, "instructions", ErrorKind.INVALID_FIELD),
        (parse_responses_request, {"model": "m", "max_output_tokens": 0}, "max_output_tokens",
         ErrorKind.INVALID_FIELD),
        (parse_responses_request, {"model": "m", "stream": "yes"}, "stream", ErrorKind.INVALID_FIELD),
        (parse_responses_request, {"model": "m", "input": "x", "background": True, "stream": True}, "stream",
         ErrorKind.INVALID_FIELD),
    ],
)
def test_invalid_bodies_name_the_field(parse: Any, body: dict[str, Any], param: str, kind: ErrorKind) -> None:
    error = refused(parse, encoded(**body))
    assert error.param == param and error.kind is kind and error.status == 400


def test_embeddings_have_no_output() -> None:
    request = parse_embeddings_request(encoded(model="m", input=["a", "b"], stream=True))
    assert request.stream is False  # embeddings never stream
    assert EMBEDDINGS.worst_output_tokens(request, MODEL) == 0
    assert not EMBEDDINGS.asks_for_usage


def test_responses_request() -> None:
    request = parse_responses_request(encoded(model="m", input="x", stream=True, max_output_tokens=40))
    assert request.stream and request.max_output_tokens == 40
    assert RESPONSES.worst_output_tokens(request, MODEL) == 40
    assert not RESPONSES.asks_for_usage and CHAT.asks_for_usage and COMPLETIONS.asks_for_usage
    assert RESPONSES.worst_output_tokens(parse_responses_request(encoded(model="m", input="x")), MODEL) == 1000


# -- prompt counting -----------------------------------------------------------------------------


def test_prompts_count_text_and_token_ids() -> None:
    assert COUNTER.prompts("hello world") == 2
    assert COUNTER.prompts(["hello world", "hello"]) == 3
    assert COUNTER.prompts([5, 6, 7]) == 3
    assert COUNTER.prompts([[5, 6], [7]]) == 3
    assert COUNTER.prompts(None) == 0 and COUNTER.prompts([]) == 0


def test_responses_prompt_counts_like_chat_messages() -> None:
    text = "Say hello to the dispatcher."
    as_chat = COUNTER.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}])
    items = [{"role": "user", "content": [{"type": "input_text", "text": text}]}]
    # The same as chat, but for the "system" role that instructions do not spell out.
    assert COUNTER.responses_prompt(items, "Be brief.") == as_chat - 1
    assert COUNTER.responses_prompt(text) == 3 + 6 + 3
    assert COUNTER.responses_prompt(text, "Be brief.") == COUNTER.responses_prompt(text) + 3 + 3
    with_image = [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]
    assert COUNTER.responses_prompt(with_image) > 765
    assert COUNTER.responses_prompt(None) == 3
    tools = [{"type": "function", "name": "lookup_job", "parameters": {"type": "object"}}]
    assert COUNTER.responses_prompt(text, tools=tools) > COUNTER.responses_prompt(text)


def test_prompt_estimates_by_shape() -> None:
    assert COMPLETIONS.prompt_tokens(COUNTER, {"prompt": "hello world", "suffix": "hello"}) == 3
    assert EMBEDDINGS.prompt_tokens(COUNTER, {"input": [[1, 2], [3]]}) == 3
    assert RESPONSES.prompt_tokens(COUNTER, {"input": "hello"}) == 7


# -- answers -------------------------------------------------------------------------------------


def test_responses_usage() -> None:
    usage = {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 7,
             "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 37}
    # reasoning is a part of output_tokens, not added (kept apart for the chargeback export)
    assert responses_usage(usage) == Usage(30, 7, 10, reasoning_tokens=5)
    assert responses_usage({"input_tokens": 3}) == Usage(3, 0)
    for bad in (None, {}, {"prompt_tokens": 3}, {"input_tokens": "x"}, {"input_tokens": -1}, [1]):
        assert responses_usage(bad) is None


def test_answer_texts() -> None:
    response = {"output": [
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "think"}]},
        {"type": "message", "content": [{"type": "output_text", "text": "Hi"}, {"type": "refusal", "refusal": "no"}]},
        {"type": "function_call", "name": "f", "arguments": "{\"a\":1}"},
        "garbage", {"type": "message", "content": ["x", None]},
    ]}
    assert output_texts(response) == ["think", "Hi", "no", "{\"a\":1}"]
    assert output_texts(None) == [] and output_texts({"output": "x"}) == []
    assert RESPONSES.answer_usage({"usage": {"input_tokens": 1, "output_tokens": 2}, **response})[0] == Usage(1, 2)
    assert COMPLETIONS.answer_usage({"choices": [{"text": "a"}, {"text": "b"}], "usage": {"prompt_tokens": 1}}) == (
        Usage(1, 0), ["a", "b"]
    )
    assert EMBEDDINGS.answer_usage({"usage": {"prompt_tokens": 9, "total_tokens": 9}}) == (Usage(9, 0), [])
    assert CHAT.answer_usage(None) == (None, [])
    assert completion_texts([{"text": 3}, {"text": "ok"}, "x"], "text") == ["ok"]


# -- streams -------------------------------------------------------------------------------------


def event(kind: str, seq: int, **fields: Any) -> bytes:
    payload = {"type": kind, "sequence_number": seq, **fields}
    return f"event: {kind}\ndata: ".encode() + orjson.dumps(payload) + b"\n\n"


def responses_stream(final: str = "response.completed", usage: Any = None) -> list[bytes]:
    usage = usage or {"input_tokens": 20, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 2}
    return [
        event("response.created", 0, response={"id": "r", "status": "in_progress", "usage": None}),
        event("response.output_text.delta", 1, item_id="m", output_index=0, content_index=0, delta="Hel"),
        event("response.function_call_arguments.delta", 2, item_id="f", output_index=1, delta="{}"),
        event("response.audio.delta", 3, delta="AAAA"),
        event("response.output_text.done", 4, text="Hel{}"),
        event(final, 5, response={"id": "r", "status": final.split(".")[1], "usage": usage}),
    ]


@pytest.mark.parametrize("final", ["response.completed", "response.incomplete", "response.failed"])
def test_responses_watcher_passes_every_byte_and_reads_the_terminal_usage(final: str) -> None:
    watcher = ResponsesStreamWatcher()
    raw = b"".join(responses_stream(final))
    out = b"".join(watcher.process(frame) for frame in SSEParser().feed(raw))
    assert out == raw
    assert watcher.done and watcher.usage == Usage(20, 2, 4)
    assert watcher.texts == ["Hel", "{}"] and watcher.first_token_at is not None


@given(st.lists(st.integers(min_value=1, max_value=4000), max_size=20))
def test_responses_watcher_is_indifferent_to_chunk_boundaries(cuts: list[int]) -> None:
    raw = b"".join(responses_stream())
    watcher, parser, out, start = ResponsesStreamWatcher(), SSEParser(), b"", 0
    for cut in sorted({min(c, len(raw)) for c in cuts}):
        out += b"".join(watcher.process(f) for f in parser.feed(raw[start:cut]))
        start = cut
    out += b"".join(watcher.process(f) for f in parser.feed(raw[start:]) + parser.close())
    assert out == raw and watcher.usage == Usage(20, 2, 4) and watcher.texts == ["Hel", "{}"]


def test_cut_responses_stream_is_not_done_and_the_error_event_is_what_the_sdks_raise_on() -> None:
    watcher = ResponsesStreamWatcher()
    for frame in SSEParser().feed(b"".join(responses_stream()[:3]) + b": keep-alive\n\n" + b"data: {oops\n\n"):
        watcher.process(frame)
    assert not watcher.done and watcher.usage is None
    error = GuardError(ErrorKind.UPSTREAM_UNAVAILABLE, "The upstream stream ended early.")
    (frame,) = SSEParser().feed(watcher.error_frame(error))
    assert frame.event == "error"
    payload = json.loads(frame.data or b"")
    assert payload["type"] == "error" and payload["sequence_number"] == 3
    assert payload["code"] == "upstream_unavailable" and payload["message"] == error.message
    assert payload["error"] == {"message": error.message, "type": "server_error", "param": None,
                                "code": "upstream_unavailable"}


def test_legacy_completion_stream_hides_the_usage_chunk() -> None:
    chunk = {"id": "c", "object": "text_completion", "choices": [{"text": " hi", "index": 0}], "usage": None}
    final = {"id": "c", "object": "text_completion", "choices": [], "usage": {"prompt_tokens": 3,
                                                                            "completion_tokens": 1}}
    raw = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in (chunk, final)) + b"data: [DONE]\n\n"
    watcher = ChatStreamWatcher(client_wants_usage=False, text_key="text")
    out = [watcher.process(f) for f in SSEParser().feed(raw)]
    assert json.loads(out[0][6:]) == {"id": "c", "object": "text_completion", "choices": [{"text": " hi", "index": 0}]}
    assert out[1] == b"" and out[2] == b"data: [DONE]\n\n"
    assert watcher.texts == [" hi"] and watcher.usage == Usage(3, 1) and watcher.done
