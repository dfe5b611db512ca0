"""The response cache, pure: which requests it serves, their key, and answers to and from streams.

A request is cached when its tenant has ``cache: true``, its endpoint is chat, Responses or
embeddings, and it is deterministic: ``temperature: 0`` or the request header
``x-guardproxy-cache: use`` (embeddings always are), and never with ``n > 1``. Its key is a digest
of the endpoint and the canonical body (keys sorted; ``stream``, ``stream_options``, ``user`` and
``metadata`` left out, so a streamed and a whole request share one entry). The store keeps one
complete answer per key (``BudgetStore.cached_response``), under the tenant's hash tag.

A miss stores the complete answer: a whole one as it came, a streamed one assembled from its frames
(``ChatAssembler``: chat chunks -> a ``chat.completion``; ``ResponsesAssembler``: the
``response.completed`` event's response). An answer that calls tools (finish_reason
``tool_calls``, a Responses ``*_call`` item) or did not complete is never stored. A hit is
replayed in the shape the client asked for: the object itself, or as SSE (``replay_stream``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from guardproxy.budget.pricing import Usage
from guardproxy.errors import GuardError
from guardproxy.http.relay import StreamWatcher
from guardproxy.http.sse import Frame, json_object

#: The endpoints (``ApiShape.path``) whose answers are cached.
CACHED_PATHS = frozenset({"chat/completions", "responses", "embeddings"})
#: Request fields that do not change the answer (or only its framing).
IGNORED_FIELDS = ("stream", "stream_options", "user", "metadata")
#: Request header: ``use`` caches a request that is not ``temperature: 0``.
CACHE_HEADER = "x-guardproxy-cache"
#: The entry's format; a new format changes every key, so old entries are never misread.
FORMAT = "v1"


def deterministic(path: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> bool:
    """Whether the request may be answered from the cache (and its answer stored)."""
    if path not in CACHED_PATHS:
        return False
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        return False
    if path == "embeddings" or headers.get(CACHE_HEADER, "").strip().lower() == "use":
        return True
    temperature = body.get("temperature")
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0


def skips_lookup(headers: Mapping[str, str]) -> bool:
    """``Cache-Control: no-cache`` asks for a fresh answer (which is then stored)."""
    directives = {d.strip().lower() for d in headers.get("cache-control", "").split(",")}
    return "no-cache" in directives or "no-store" in directives


def canonical_body(body: Mapping[str, Any]) -> bytes:
    """The request as the key sees it: sorted keys, without the fields that do not change the answer."""
    kept = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    return orjson.dumps(kept, option=orjson.OPT_SORT_KEYS)


def digest(path: str, body: Mapping[str, Any]) -> str:
    """The cache key of a request to ``path`` (the tenant is in the store key around it)."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}\n{path}\n".encode())
    h.update(canonical_body(body))
    return h.hexdigest()


def storable(path: str, answer: Any) -> bool:
    """A complete answer worth replaying: not an error, no tool call, not cut short by a filter."""
    if not isinstance(answer, dict) or answer.get("error") is not None:
        return False
    if path == "chat/completions":
        choices = answer.get("choices")
        return isinstance(choices, list) and bool(choices) and all(
            isinstance(c, dict) and c.get("finish_reason") in ("stop", "length") for c in choices
        )
    if path == "responses":
        output = answer.get("output")
        return answer.get("status") == "completed" and isinstance(output, list) and not any(
            isinstance(item, dict) and str(item.get("type", "")).endswith("_call") for item in output
        )
    return isinstance(answer.get("data"), list)


@dataclass(frozen=True)
class Entry:
    """What the store keeps for one key: the answer and the configured model that produced it."""

    model: str
    answer: dict[str, Any]

    def to_bytes(self) -> bytes:
        return orjson.dumps({"model": self.model, "answer": self.answer})

    @classmethod
    def from_bytes(cls, raw: bytes) -> Entry | None:
        """``None`` for anything that is not an entry (never an error: a bad entry is a miss)."""
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("answer"), dict):
            return None
        return cls(str(value.get("model", "")), value["answer"])


# -- streams -> answers ------------------------------------------------------------------------


@dataclass
class ChatAssembler:
    """Builds the ``chat.completion`` a chat stream amounts to, chunk by chunk."""

    head: dict[str, Any] = field(default_factory=dict)
    choices: dict[int, dict[str, Any]] = field(default_factory=dict)
    usage: Any = None
    done: bool = False

    def feed(self, frame: Frame) -> None:
        if frame.data == b"[DONE]":
            self.done = True
            return
        chunk = json_object(frame)
        if chunk is None:
            return
        for name in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if name in chunk and name not in self.head:
                self.head[name] = chunk[name]
        if chunk.get("usage") is not None:
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict):
                self._merge(choice)

    def _merge(self, choice: dict[str, Any]) -> None:
        index = int(choice.get("index") or 0)
        into = self.choices.setdefault(index, {"index": index, "message": {"role": "assistant", "content": None},
                                               "logprobs": None, "finish_reason": None})
        message = into["message"]
        delta = choice.get("delta") or {}
        if isinstance(delta.get("role"), str):
            message["role"] = delta["role"]
        for name in ("content", "refusal"):
            if isinstance(delta.get(name), str):
                message[name] = (message.get(name) or "") + delta[name]
        for call in delta.get("tool_calls") or ():
            calls = message.setdefault("tool_calls", [])
            at = int(call.get("index") or 0)
            while len(calls) <= at:
                calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            target = calls[at]
            for name in ("id", "type"):
                if call.get(name):
                    target[name] = call[name]
            function = call.get("function") or {}
            for name in ("name", "arguments"):
                if isinstance(function.get(name), str):
                    target["function"][name] += function[name]
        if choice.get("finish_reason") is not None:
            into["finish_reason"] = choice["finish_reason"]

    def answer(self) -> dict[str, Any] | None:
        """The whole answer, once the stream ended properly; else ``None``."""
        if not self.done or not self.choices:
            return None
        answer: dict[str, Any] = {"id": self.head.get("id"), "object": "chat.completion",
                                  "created": self.head.get("created"), "model": self.head.get("model"),
                                  "choices": [self.choices[i] for i in sorted(self.choices)]}
        for name in ("system_fingerprint", "service_tier"):
            if name in self.head:
                answer[name] = self.head[name]
        answer["usage"] = self.usage
        return answer


@dataclass
class ResponsesAssembler:
    """A Responses stream amounts to the response its ``response.completed`` event carries."""

    response: dict[str, Any] | None = None

    def feed(self, frame: Frame) -> None:
        event = json_object(frame)
        if event is not None and (event.get("type") or frame.event) == "response.completed":
            response = event.get("response")
            self.response = response if isinstance(response, dict) else None

    def answer(self) -> dict[str, Any] | None:
        return self.response


def assembler(path: str) -> ChatAssembler | ResponsesAssembler:
    return ResponsesAssembler() if path == "responses" else ChatAssembler()


class CapturingWatcher:
    """A ``StreamWatcher`` that also assembles the answer for the cache (up to ``max_bytes`` of frames)."""

    def __init__(self, inner: StreamWatcher, path: str, max_bytes: int) -> None:
        self.inner = inner
        self.assembler = assembler(path)
        self.room_bytes = max_bytes

    def process(self, frame: Frame) -> bytes:
        self.room_bytes -= len(frame.raw)
        if self.room_bytes >= 0:
            self.assembler.feed(frame)
        return self.inner.process(frame)

    def error_frame(self, error: GuardError) -> bytes:
        return self.inner.error_frame(error)

    def answer(self) -> dict[str, Any] | None:
        """The assembled answer, ``None`` when the stream did not end properly or was too large."""
        return self.assembler.answer() if self.room_bytes >= 0 else None

    @property
    def usage(self) -> Usage | None:
        return self.inner.usage

    @usage.setter
    def usage(self, value: Usage | None) -> None:
        self.inner.usage = value

    @property
    def texts(self) -> list[str]:
        return self.inner.texts

    @texts.setter
    def texts(self, value: list[str]) -> None:
        self.inner.texts = value

    @property
    def done(self) -> bool:
        return self.inner.done

    @done.setter
    def done(self, value: bool) -> None:
        self.inner.done = value

    @property
    def first_token_at(self) -> float | None:
        return self.inner.first_token_at

    @first_token_at.setter
    def first_token_at(self, value: float | None) -> None:
        self.inner.first_token_at = value


# -- answers -> streams ------------------------------------------------------------------------


def replay_stream(path: str, answer: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    """A cached answer as the SSE stream a streaming client expects."""
    if path == "responses":
        yield from _responses_events(answer)
        return
    yield from _chat_chunks(answer, include_usage)


def _data(value: Any) -> bytes:
    return b"data: " + orjson.dumps(value) + b"\n\n"


def _chat_chunks(answer: dict[str, Any], include_usage: bool) -> Iterator[bytes]:
    head = {"id": answer.get("id"), "object": "chat.completion.chunk", "created": answer.get("created"),
            "model": answer.get("model")}
    for name in ("system_fingerprint", "service_tier"):
        if name in answer:
            head[name] = answer[name]
    extra = {"usage": None} if include_usage else {}
    for choice in answer.get("choices") or ():
        message = dict(choice.get("message") or {})
        delta: dict[str, Any] = {"role": message.get("role", "assistant"), "content": message.get("content")}
        if message.get("refusal") is not None:
            delta["refusal"] = message["refusal"]
        yield _data({**head, "choices": [{"index": choice.get("index", 0), "delta": delta, "logprobs": None,
                                          "finish_reason": None}], **extra})
        yield _data({**head, "choices": [{"index": choice.get("index", 0), "delta": {}, "logprobs": None,
                                          "finish_reason": choice.get("finish_reason")}], **extra})
    if include_usage:
        yield _data({**head, "choices": [], "usage": answer.get("usage")})
    yield b"data: [DONE]\n\n"


def _responses_events(response: dict[str, Any]) -> Iterator[bytes]:
    sequence = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": next(sequence), **fields}
        return f"event: {kind}\n".encode() + _data(payload)

    started = {**response, "status": "in_progress", "output": [], "usage": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for index, item in enumerate(response.get("output") or ()):
        parts = item.get("content") if item.get("type") == "message" else None
        if not isinstance(parts, list):
            yield event("response.output_item.added", output_index=index, item=item)
            yield event("response.output_item.done", output_index=index, item=item)
            continue
        yield event("response.output_item.added", output_index=index,
                    item={**item, "status": "in_progress", "content": []})
        for part_index, part in enumerate(parts):
            where = {"item_id": item.get("id"), "output_index": index, "content_index": part_index}
            if part.get("type") != "output_text":
                yield event("response.content_part.added", **where, part=part)
                yield event("response.content_part.done", **where, part=part)
                continue
            text = part.get("text", "")
            yield event("response.content_part.added", **where, part={**part, "text": ""})
            yield event("response.output_text.delta", **where, delta=text, logprobs=[])
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where, part=part)
        yield event("response.output_item.done", output_index=index, item=item)
    yield event("response.completed", response=response)
