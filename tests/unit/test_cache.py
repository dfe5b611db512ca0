"""The response cache's pure part: which requests it serves, their key, and answers to and from SSE
streams however the bytes are split on the wire."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from guardproxy.http import cache
from guardproxy.http.sse import SSEParser

TEXT = st.text(st.characters(codec="utf-8"), max_size=40)


def chat_answer(contents: list[str], finish: str = "stop") -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": i, "message": {"role": "assistant", "content": c}, "logprobs": None,
                     "finish_reason": finish} for i, c in enumerate(contents)],
        "system_fingerprint": "fp_1",
        "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
    }


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(len(data), c) for c in cuts})
    pieces, start = [], 0
    for p in points:
        pieces.append(data[start:p])
        start = p
    return [*pieces, data[start:]]


def assemble(path: str, stream: bytes, cuts: list[int]) -> dict[str, Any] | None:
    parser, into = SSEParser(), cache.assembler(path)
    for piece in split(stream, cuts):
        for frame in parser.feed(piece):
            into.feed(frame)
    for frame in parser.close():
        into.feed(frame)
    return into.answer()


@settings(max_examples=150, deadline=None)
@given(contents=st.lists(TEXT, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 4000), max_size=30),
       usage=st.booleans())
def test_a_chat_answer_replayed_as_a_stream_and_split_anywhere_assembles_back(
    contents: list[str], cuts: list[int], usage: bool
) -> None:
    answer = chat_answer(contents)
    stream = b"".join(cache.replay_stream("chat/completions", answer, include_usage=usage))
    expected = {**answer, "usage": answer["usage"] if usage else None}
    assert assemble("chat/completions", stream, cuts) == expected


@settings(max_examples=100, deadline=None)
@given(deltas=st.lists(TEXT, min_size=1, max_size=8), cuts=st.lists(st.integers(0, 3000), max_size=20))
def test_an_upstream_chat_stream_with_tool_calls_and_usage_assembles_into_one_answer(
    deltas: list[str], cuts: list[int]
) -> None:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m"}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        body = {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return b"data: " + orjson.dumps(body) + b"\r\n\r\n"

    frames = [chunk({"role": "assistant", "content": ""})]
    frames += [chunk({"content": d}) for d in deltas]
    frames += [chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                      "function": {"name": "look", "arguments": ""}}]}),
               chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]}),
               chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
               chunk({}, "tool_calls"),
               b"data: " + orjson.dumps({**head, "choices": [], "usage": {"prompt_tokens": 3}}) + b"\n\n",
               b"data: [DONE]\n\n"]
    answer = assemble("chat/completions", b"".join(frames), cuts)
    assert answer is not None
    message = answer["choices"][0]["message"]
    assert message["content"] == "".join(deltas)
    assert message["tool_calls"] == [{"id": "call_1", "type": "function",
                                      "function": {"name": "look", "arguments": '{"a":1}'}}]
    assert answer["usage"] == {"prompt_tokens": 3} and answer["object"] == "chat.completion"
    assert not cache.storable("chat/completions", answer)  # it calls a tool


def test_a_stream_without_its_end_assembles_nothing() -> None:
    stream = b"".join(cache.replay_stream("chat/completions", chat_answer(["hi"]), include_usage=True))
    assert assemble("chat/completions", stream.replace(b"data: [DONE]\n\n", b""), []) is None


def responses_answer(texts: list[str]) -> dict[str, Any]:
    return {
        "id": "resp_1", "object": "response", "created_at": 1, "status": "completed", "model": "gpt-4o", "error": None,
        "output": [{"id": f"msg_{i}", "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": t, "annotations": []}]} for i, t in enumerate(texts)],
        "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7},
    }


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 5000), max_size=30))
def test_a_responses_answer_replayed_and_split_anywhere_assembles_back(texts: list[str], cuts: list[int]) -> None:
    answer = responses_answer(texts)
    stream = b"".join(cache.replay_stream("responses", answer, include_usage=False))
    assert assemble("responses", stream, cuts) == answer
    parser = SSEParser()
    events = [orjson.loads(f.data or b"") for f in parser.feed(stream)]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == "".join(texts)


def test_the_key_ignores_framing_fields_and_key_order_but_not_the_request() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
    same = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "user": "u1",
            "metadata": {"a": "b"}, "messages": [{"content": "hi", "role": "user"}], "model": "gpt-4o"}
    key = cache.digest("chat/completions", body)
    assert cache.digest("chat/completions", same) == key
    assert cache.digest("responses", body) != key
    assert cache.digest("chat/completions", {**body, "model": "gpt-4o-mini"}) != key
    assert cache.digest("chat/completions", {**body, "max_tokens": 5}) != key


def test_which_requests_are_deterministic() -> None:
    chat = "chat/completions"
    assert cache.deterministic(chat, {"temperature": 0}, {})
    assert cache.deterministic(chat, {"temperature": 0.0}, {})
    assert not cache.deterministic(chat, {"temperature": 0.7}, {})
    assert not cache.deterministic(chat, {}, {})
    assert not cache.deterministic(chat, {"temperature": False}, {})
    assert cache.deterministic(chat, {"temperature": 1}, {"x-guardproxy-cache": "use"})
    assert not cache.deterministic(chat, {"temperature": 0, "n": 2}, {})
    assert cache.deterministic("embeddings", {}, {})
    assert not cache.deterministic("completions", {"temperature": 0}, {})
    assert cache.skips_lookup({"cache-control": "max-age=0, no-cache"})
    assert not cache.skips_lookup({"cache-control": "max-age=0"})


def test_what_is_stored() -> None:
    assert cache.storable("chat/completions", chat_answer(["a"]))
    assert cache.storable("chat/completions", chat_answer(["a"], finish="length"))
    assert not cache.storable("chat/completions", chat_answer(["a"], finish="tool_calls"))
    assert not cache.storable("chat/completions", chat_answer(["a"], finish="content_filter"))
    assert not cache.storable("chat/completions", {"error": {"message": "x"}})
    assert cache.storable("responses", responses_answer(["a"]))
    assert not cache.storable("responses", {**responses_answer(["a"]), "status": "incomplete"})
    called = responses_answer(["a"])
    called["output"].append({"type": "function_call", "name": "f", "arguments": "{}"})
    assert not cache.storable("responses", called)
    assert cache.storable("embeddings", {"object": "list", "data": []})
    entry = cache.Entry("gpt-4o", chat_answer(["a"]))
    assert cache.Entry.from_bytes(entry.to_bytes()) == entry
    assert cache.Entry.from_bytes(b"not json") is None
