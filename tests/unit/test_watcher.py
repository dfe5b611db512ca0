"""ChatStreamWatcher, usage_from and completion_texts on realistic OpenAI (and Azure) chunks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guardproxy.budget.pricing import Price, Usage, cost_micros
from guardproxy.http.relay import ChatStreamWatcher, completion_texts, usage_from
from guardproxy.http.sse import Frame, SSEParser

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000, "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_1"}
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
         "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
         "completion_tokens_details": {"reasoning_tokens": 0}}


def chunk(delta: dict[str, Any] | None = None, *, finish: str | None = None, usage: Any = "absent",
          choices: list[Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = dict(BASE)
    if choices is None:
        choices = [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]
    body["choices"] = choices
    if usage != "absent":
        body["usage"] = usage
    return body


def frame(body: Any) -> Frame:
    raw = b"data: " + json.dumps(body).encode() + b"\n\n"
    (parsed,) = SSEParser().feed(raw)
    return parsed


def openai_stream(*, usage_field: bool) -> list[dict[str, Any]]:
    """What OpenAI sends for "Hello!" with include_usage (usage_field) or without."""
    extra: dict[str, Any] = {"usage": None} if usage_field else {}
    chunks = [
        chunk({"role": "assistant", "content": "", "refusal": None}, **extra),
        chunk({"content": "Hel"}, **extra),
        chunk({"content": "lo!"}, **extra),
        chunk({}, finish="stop", **extra),
    ]
    if usage_field:
        chunks.append(chunk(choices=[], usage=USAGE))
    return chunks


def run(watcher: ChatStreamWatcher, frames: list[Frame]) -> list[bytes]:
    return [watcher.process(f) for f in frames]


def decoded(out: bytes) -> Any:
    assert out.startswith(b"data: ")
    assert out.endswith(b"\n\n")
    return json.loads(out[len(b"data: "):])


# --- the client did not ask for usage --------------------------------------------------------


def test_hidden_usage_chunk_dropped_and_usage_null_stripped() -> None:
    upstream = openai_stream(usage_field=True)
    frames = [frame(c) for c in upstream] + SSEParser().feed(b"data: [DONE]\n\n")
    watcher = ChatStreamWatcher(client_wants_usage=False)
    out = run(watcher, frames)
    assert out[4] == b""  # the usage chunk is not sent
    assert out[5] == b"data: [DONE]\n\n"
    # every other chunk is what OpenAI would have sent without include_usage: same keys, same order
    expected = openai_stream(usage_field=False)
    for sent, want in zip(out[:4], expected, strict=True):
        body = decoded(sent)
        assert body == want
        assert "usage" not in body
        assert list(body) == list(want)
    assert watcher.usage == Usage(prompt_tokens=12, completion_tokens=3, cached_prompt_tokens=4)
    assert "".join(watcher.texts) == "Hello!"
    assert watcher.done
    assert watcher.first_token_at is not None


def test_chunks_without_usage_key_pass_byte_for_byte() -> None:
    watcher = ChatStreamWatcher(client_wants_usage=False)
    raw = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi"}}]}\r\n\r\n'
    (f,) = SSEParser().feed(raw)
    assert watcher.process(f) == raw
    assert watcher.texts == ["hi"]


def test_usage_on_a_content_chunk_is_recorded_and_stripped_but_the_chunk_kept() -> None:
    # Some providers put the usage on the last content chunk instead of a separate one.
    watcher = ChatStreamWatcher(client_wants_usage=False)
    out = watcher.process(frame(chunk({"content": "end"}, finish="stop", usage=USAGE)))
    body = decoded(out)
    assert "usage" not in body
    assert body["choices"][0]["delta"] == {"content": "end"}
    assert watcher.usage == Usage(12, 3, 4)


def test_azure_early_empty_choices_chunk_passes_and_is_not_usage() -> None:
    azure_first = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
                   "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}
    for wants in (False, True):
        watcher = ChatStreamWatcher(client_wants_usage=wants)
        f = frame(azure_first)
        assert watcher.process(f) == f.raw
        assert watcher.usage is None
        assert not watcher.done


def test_azure_early_chunk_with_usage_null_is_not_dropped() -> None:
    watcher = ChatStreamWatcher(client_wants_usage=False)
    out = watcher.process(frame({"choices": [], "prompt_filter_results": [], "usage": None}))
    assert decoded(out) == {"choices": [], "prompt_filter_results": []}
    assert watcher.usage is None


# --- the client asked for usage --------------------------------------------------------------


def test_client_wants_usage_everything_passes_unchanged() -> None:
    frames = [frame(c) for c in openai_stream(usage_field=True)]
    frames += SSEParser().feed(b"data: [DONE]\n\n")
    watcher = ChatStreamWatcher(client_wants_usage=True)
    out = run(watcher, frames)
    assert out == [f.raw for f in frames]
    assert watcher.usage == Usage(12, 3, 4)
    assert watcher.done


def test_null_usage_does_not_erase_recorded_usage() -> None:
    watcher = ChatStreamWatcher(client_wants_usage=True)
    watcher.process(frame(chunk(choices=[], usage=USAGE)))
    watcher.process(frame(chunk({"content": "x"}, usage=None)))
    assert watcher.usage == Usage(12, 3, 4)


def test_malformed_usage_keeps_previous() -> None:
    watcher = ChatStreamWatcher(client_wants_usage=False)
    watcher.process(frame(chunk(choices=[], usage=USAGE)))
    out = watcher.process(frame(chunk(choices=[], usage={"completion_tokens": 2})))
    assert out == b""
    assert watcher.usage == Usage(12, 3, 4)


# --- other frames ----------------------------------------------------------------------------


def test_done_sets_done_and_passes() -> None:
    watcher = ChatStreamWatcher(client_wants_usage=False)
    (f,) = SSEParser().feed(b"data: [DONE]\n\n")
    assert not watcher.done
    assert watcher.process(f) == b"data: [DONE]\n\n"
    assert watcher.done


@pytest.mark.parametrize("raw", [b": keep-alive\n\n", b"data: not json\n\n", b"data: [1, 2]\n\n",
                                 b"data: \"text\"\n\n", b"event: ping\n\n"])
def test_non_chunk_frames_pass_unchanged(raw: bytes) -> None:
    watcher = ChatStreamWatcher(client_wants_usage=False)
    (f,) = SSEParser().feed(raw)
    assert watcher.process(f) == raw
    assert watcher.texts == []
    assert not watcher.done


def test_error_frame_passes() -> None:
    watcher = ChatStreamWatcher(client_wants_usage=False)
    f = frame({"error": {"message": "boom", "type": "server_error", "param": None, "code": None}})
    assert watcher.process(f) == f.raw


def test_tool_call_text_is_collected() -> None:
    watcher = ChatStreamWatcher(client_wants_usage=False)
    first = {"role": "assistant", "content": None, "tool_calls": [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}
    watcher.process(frame(chunk(first, usage=None)))
    more = {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}
    watcher.process(frame(chunk(more, usage=None)))
    watcher.process(frame(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]})))
    assert "".join(watcher.texts) == "get_weather{\"city\":\"Paris\"}"


def test_first_token_at_only_on_non_empty_text() -> None:
    watcher = ChatStreamWatcher(client_wants_usage=False)
    watcher.process(frame(chunk({"role": "assistant", "content": ""})))
    assert watcher.first_token_at is None
    watcher.process(frame(chunk({"content": "a"})))
    first = watcher.first_token_at
    assert first is not None
    watcher.process(frame(chunk({"content": "b"})))
    assert watcher.first_token_at == first


# --- completion_texts ------------------------------------------------------------------------


def test_completion_texts_message_and_delta() -> None:
    choices = [
        {"index": 0, "message": {"role": "assistant", "content": "one", "refusal": None}},
        {"index": 1, "message": {"role": "assistant", "content": None, "refusal": "no",
                                 "tool_calls": [{"id": "c", "type": "function",
                                                 "function": {"name": "f", "arguments": "{}"}}]}},
        {"index": 2, "message": {"reasoning_content": "think"}},
    ]
    assert completion_texts(choices, "message") == ["one", "no", "f", "{}", "think"]
    assert completion_texts(choices, "delta") == []


@pytest.mark.parametrize("choices", [None, "x", {}, [None, 1, "s", {"delta": "x"}, {"delta": {"tool_calls": [None]}}]])
def test_completion_texts_garbage(choices: Any) -> None:
    assert completion_texts(choices, "delta") == []


# --- usage_from ------------------------------------------------------------------------------


def test_usage_from_full() -> None:
    assert usage_from(USAGE) == Usage(12, 3, 4)


def test_usage_from_without_details() -> None:
    assert usage_from({"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}) == Usage(7, 2, 0)


@pytest.mark.parametrize("details", [None, {}, {"cached_tokens": None}, "x", []])
def test_usage_from_missing_or_odd_details(details: Any) -> None:
    assert usage_from({"prompt_tokens": 7, "completion_tokens": 2, "prompt_tokens_details": details}) == Usage(7, 2)


def test_usage_from_reasoning_tokens_not_added() -> None:
    value = {"prompt_tokens": 5, "completion_tokens": 100, "completion_tokens_details": {"reasoning_tokens": 80}}
    assert usage_from(value) == Usage(5, 100, reasoning_tokens=80)
    assert cost_micros(usage_from(value) or Usage(0, 0), Price(1_000_000, 0, 1_000_000)) == 105


def test_usage_from_missing_completion_tokens_is_zero() -> None:
    # embeddings-style usage
    assert usage_from({"prompt_tokens": 8, "total_tokens": 8}) == Usage(8, 0)


@pytest.mark.parametrize(
    "value",
    [None, "usage", 5, [], {}, {"completion_tokens": 1}, {"prompt_tokens": "many"}, {"prompt_tokens": None},
     {"prompt_tokens": -1, "completion_tokens": 0}, {"prompt_tokens": 1, "completion_tokens": "x"},
     {"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": "x"}}, {"prompt_tokens": [1]}],
)
def test_usage_from_garbage_is_none(value: Any) -> None:
    assert usage_from(value) is None
