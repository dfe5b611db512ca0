"""The fake upstream's answers for each endpoint: chat, legacy completions, embeddings, responses.

Each handler takes the parsed body and the steering headers (see ``fake_upstream``) and answers in
OpenAI's wire shape, streamed or whole. Streams record how they ended in ``endings``.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.datastructures import Headers
from starlette.responses import Response, StreamingResponse

from guardproxy.budget.tokens import TokenCounter
from guardproxy.testing.fake_embedding import embed_text
from guardproxy.testing.fake_objects import FakeObjects

WORD = " hello"  # one token in both o200k_base and cl100k_base
DEFAULT_COMPLETION_TOKENS = 12
#: OpenAI's legacy completions default when the request sets no ``max_tokens``.
LEGACY_DEFAULT_MAX_TOKENS = 16
EMBEDDING_DIMENSIONS = 8

Handler = Callable[[dict[str, Any], "Steering"], Awaitable[Response]]


class UpstreamCut(Exception):
    """Raised inside a stream to make the server drop the connection mid-answer."""


@dataclass(frozen=True)
class Steering:
    """What the ``x-fake-*`` request headers ask of the answer."""

    completion_tokens: int
    cached_tokens: int
    #: Part of the completion to report as reasoning tokens (``completion_tokens_details``).
    reasoning_tokens: int
    #: Prompt tokens to report instead of the fake's own count (usage must win over the proxy's estimate).
    prompt_tokens: int | None
    cut_after: int | None
    chunk_delay_s: float
    no_usage: bool

    @classmethod
    def from_headers(cls, h: Headers) -> Steering:
        return cls(
            completion_tokens=int(h.get("x-fake-completion-tokens", DEFAULT_COMPLETION_TOKENS)),
            cached_tokens=int(h.get("x-fake-cached-tokens", 0)),
            reasoning_tokens=int(h.get("x-fake-reasoning-tokens", 0)),
            prompt_tokens=int(h["x-fake-prompt-tokens"]) if "x-fake-prompt-tokens" in h else None,
            cut_after=int(h["x-fake-cut-after"]) if "x-fake-cut-after" in h else None,
            chunk_delay_s=int(h.get("x-fake-chunk-delay-ms", 0)) / 1000,
            no_usage="x-fake-no-usage" in h,
        )

    def prompt(self, counted: int) -> int:
        return counted if self.prompt_tokens is None else self.prompt_tokens

    def length(self, limit: int | None) -> tuple[int, bool]:
        """Tokens to generate under ``limit``, and whether the limit cut the answer short."""
        if limit and self.completion_tokens > limit:
            return limit, True
        return self.completion_tokens, False

    async def words(self, count: int, endings: list[str]) -> AsyncIterator[int]:
        """Paces ``count`` streamed words; cuts the connection after ``cut_after`` of them."""
        for i in range(count):
            if self.cut_after is not None and i >= self.cut_after:
                endings.append("cut")
                raise UpstreamCut("connection cut on purpose")
            if self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            yield i


def error_response(status: int) -> Response:
    kinds = {
        400: ("invalid_request_error", "invalid_value", "Invalid value for 'messages'."),
        401: ("invalid_request_error", "invalid_api_key", "Access denied due to invalid subscription key."),
        404: ("invalid_request_error", "404", "Resource not found"),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
        500: ("server_error", "server_error", "The server had an error while processing your request."),
        503: ("server_error", "overloaded", "The engine is currently overloaded."),
    }
    type_, code, message = kinds.get(status, kinds[500])
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Response(orjson.dumps(body), status, media_type="application/json",
                    headers={"x-request-id": f"req_fake_{time.monotonic_ns()}"})


def chat_usage(prompt: int, completion: int, cached: int, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def _headers(ident: str) -> dict[str, str]:
    return {"x-request-id": f"req_{ident}", "openai-processing-ms": "3", "x-ratelimit-remaining-requests": "9999"}


def _json(payload: Any, ident: str) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json", headers=_headers(ident))


def _sse(frames: AsyncIterator[bytes], endings: list[str], ident: str) -> StreamingResponse:
    async def stream() -> AsyncIterator[bytes]:
        ended = False
        try:
            async for frame in frames:
                yield frame
            ended = True
            endings.append("completed")
        except UpstreamCut:
            ended = True
            raise
        finally:
            if not ended:
                endings.append("cancelled")

    return StreamingResponse(stream(), media_type="text/event-stream", headers=_headers(ident))


def chat_endpoint(
    endings: list[str], billed: list[tuple[str, dict[str, Any]]] | None = None,
    unfinished: list[tuple[str, dict[str, Any]]] | None = None, stored: FakeObjects | None = None,
) -> Handler:
    """``/v1/chat/completions``: one choice; streams with the ``include_usage`` chunk when asked.
    The usage of each answer given in full is added to ``billed``; that of each stream stopped before
    its end (the caller hung up), counting the words generated so far, to ``unfinished``; with
    ``store: true`` the completion is kept in ``stored``."""

    async def handle(body: dict[str, Any], steer: Steering) -> Response:
        model = body["model"]
        length, truncated = steer.length(body.get("max_completion_tokens") or body.get("max_tokens"))
        finish = "length" if truncated else "stop"
        prompt = steer.prompt(TokenCounter(model).chat_prompt(body.get("messages", [])))
        usage = None if steer.no_usage else chat_usage(prompt, length, min(steer.cached_tokens, prompt),
                                                          min(steer.reasoning_tokens, length))
        ident = f"chatcmpl-fake{time.monotonic_ns()}"
        base = {"id": ident, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                "system_fingerprint": "fp_fake"}
        message = {"role": "assistant", "content": WORD * length, "refusal": None}
        whole = {**base, "object": "chat.completion",
                 "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                 **({"usage": usage} if usage else {})}

        def bill() -> None:
            if billed is not None and usage is not None:
                billed.append((model, usage))
            if stored is not None and body.get("store") is True:
                stored.keep("chat/completions", whole)

        if not body.get("stream"):
            bill()
            return _json(whole, ident)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and usage is not None

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            payload = {**base, "choices": [choice], **({"usage": None} if include_usage else {})}
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        async def frames() -> AsyncIterator[bytes]:
            generated = 0
            try:
                yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
                async for _ in steer.words(length, endings):
                    generated += 1
                    yield chunk({"content": WORD}, None)
            finally:
                if generated < length and unfinished is not None and usage is not None:
                    unfinished.append((model, chat_usage(prompt, generated, min(steer.cached_tokens, prompt))))
            bill()
            yield chunk({}, finish)
            if include_usage:
                yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return _sse(frames(), endings, ident)

    return handle


def completions_endpoint(endings: list[str]) -> Handler:
    """Legacy ``/v1/completions``: ``choices[].text``; one completion per prompt and per ``n``."""

    async def handle(body: dict[str, Any], steer: Steering) -> Response:
        model, prompt = body["model"], body.get("prompt", "")
        counter = TokenCounter(model)
        prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        choices = prompts * (body.get("n") or 1)
        length, truncated = steer.length(body.get("max_tokens") or LEGACY_DEFAULT_MAX_TOKENS)
        finish = "length" if truncated else "stop"
        prompt_tokens = steer.prompt(counter.prompts(prompt) + counter.prompts(body.get("suffix")))
        usage = None if steer.no_usage else chat_usage(prompt_tokens, choices * length, 0)
        ident = f"cmpl-fake{time.monotonic_ns()}"
        base = {"id": ident, "object": "text_completion", "created": int(time.time()), "model": model,
                "system_fingerprint": "fp_fake"}
        if not body.get("stream"):
            texts = [{"text": WORD * length, "index": i, "logprobs": None, "finish_reason": finish}
                     for i in range(choices)]
            return _json({**base, "choices": texts, **({"usage": usage} if usage else {})}, ident)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and usage is not None

        def chunk(index: int, text: str, finish_reason: str | None) -> bytes:
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
            payload = {**base, "choices": [choice], **({"usage": None} if include_usage else {})}
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        async def frames() -> AsyncIterator[bytes]:
            for index in range(choices):
                async for _ in steer.words(length, endings):
                    yield chunk(index, WORD, None)
                yield chunk(index, "", finish)
            if include_usage:
                yield b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n"
            yield b"data: [DONE]\n\n"

        return _sse(frames(), endings, ident)

    return handle


def embeddings_endpoint() -> Handler:
    """``/v1/embeddings``: a deterministic vector per input (``fake_embedding``; ``dimensions`` long, default 8),
    as floats or base64 (the openai SDK's default)."""

    async def handle(body: dict[str, Any], steer: Steering) -> Response:
        model, value = body["model"], body["input"]
        inputs = value if isinstance(value, list) and value and not isinstance(value[0], int) else [value]
        prompt_tokens = steer.prompt(TokenCounter(model).prompts(value))
        dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS

        def encoded(text: Any) -> Any:
            # Text embeds deterministically (``fake_embedding``); token ids embed as their digits.
            vector = embed_text(text if isinstance(text, str) else str(text), dimensions)
            if body.get("encoding_format") == "base64":
                return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            return vector

        data = [{"object": "embedding", "index": i, "embedding": encoded(text)} for i, text in enumerate(inputs)]
        answer: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if not steer.no_usage:
            answer["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return _json(answer, f"emb-fake{time.monotonic_ns()}")

    return handle


def responses_endpoint(endings: list[str], stored: FakeObjects | None = None) -> Handler:
    """``/v1/responses``: one output message; streams as named events ending in ``response.completed``.
    Unless ``store: false``, the final response and its input items are kept in ``stored``."""

    async def handle(body: dict[str, Any], steer: Steering) -> Response:
        model, limit = body["model"], body.get("max_output_tokens")
        length, truncated = steer.length(limit)
        counter = TokenCounter(model)
        prompt_tokens = steer.prompt(counter.responses_prompt(body.get("input"), body.get("instructions"),
                                                              body.get("tools")))
        cached = min(steer.cached_tokens, prompt_tokens)
        usage = None if steer.no_usage else {
            "input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": length, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + length,
        }
        ident, item_id = f"resp_fake{time.monotonic_ns()}", f"msg_fake{time.monotonic_ns()}"
        final_status = "incomplete" if truncated else "completed"

        def response(status: str, text: str | None) -> dict[str, Any]:
            output = [] if text is None else [{
                "id": item_id, "type": "message", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }]
            return {
                "id": ident, "object": "response", "created_at": int(time.time()), "status": status,
                "background": False, "error": None,
                "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
                "instructions": body.get("instructions"), "max_output_tokens": limit, "model": model,
                "output": output, "parallel_tool_calls": True, "previous_response_id": None,
                "reasoning": {"effort": None, "summary": None}, "store": True, "temperature": 1.0,
                "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [], "top_p": 1.0,
                "truncation": "disabled", "usage": usage if status in ("completed", "incomplete") else None,
                "metadata": {},
            }

        def keep(final: dict[str, Any]) -> dict[str, Any]:
            if stored is not None and body.get("store") is not False:
                stored.keep("responses", final)
                given = body.get("input")
                items = ([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": given}]}]
                         if isinstance(given, str) else given)
                stored.inputs[ident] = [{"id": f"msg_in{i}", **item} for i, item in enumerate(items or [])]
            return final

        if body.get("background") and stored is not None:
            # Queued: it "runs" until the test calls ``FakeObjects.finish`` (then retrieve shows it done).
            keep(response(final_status, WORD * length))
            stored.later[ident] = stored.objects[ident]
            return _json(stored.keep("responses", {**response("queued", None), "background": True}), ident)
        if not body.get("stream"):
            return _json(keep(response(final_status, WORD * length)), ident)

        async def frames() -> AsyncIterator[bytes]:
            sequence = iter(range(1_000_000))

            def event(kind: str, **fields: Any) -> bytes:
                payload = {"type": kind, "sequence_number": next(sequence), **fields}
                return f"event: {kind}\n".encode() + b"data: " + orjson.dumps(payload) + b"\n\n"

            where = {"item_id": item_id, "output_index": 0, "content_index": 0}
            yield event("response.created", response=response("in_progress", None))
            yield event("response.in_progress", response=response("in_progress", None))
            yield event("response.output_item.added", output_index=0,
                        item={"id": item_id, "type": "message", "status": "in_progress", "role": "assistant",
                              "content": []})
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            async for _ in steer.words(length, endings):
                yield event("response.output_text.delta", **where, delta=WORD, logprobs=[])
            text = WORD * length
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            yield event("response.content_part.done", **where,
                        part={"type": "output_text", "text": text, "annotations": [], "logprobs": []})
            yield event("response.output_item.done", output_index=0, item=response(final_status, text)["output"][0])
            yield event(f"response.{final_status}", response=keep(response(final_status, text)))

        return _sse(frames(), endings, ident)

    return handle
