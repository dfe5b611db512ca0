"""A fake OpenAI upstream, shipped for tests, ``guardproxy demo`` and the benchmarks.

It speaks the wire shapes of openai-wire.md: chat completions with and without streaming, the
``include_usage`` chunk, cached-token details and errors. Requests steer it with headers, which the
proxy forwards like any other client header:

- ``x-fake-completion-tokens: N`` — answer length (default 12; capped by the request's token limit)
- ``x-fake-cached-tokens: N`` — report N prompt tokens as cached
- ``x-fake-fail: 500|429|400|503`` — answer that OpenAI error instead
- ``x-fake-cut-after: N`` — stream N content chunks, then drop the connection
- ``x-fake-no-usage: 1`` — never report usage (a provider without usage)
- ``x-fake-chunk-delay-ms: N`` — pause between stream chunks
- ``x-fake-delay-ms: N`` — pause before answering at all
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from guardproxy.tokens import TokenCounter

WORD = " hello"  # one token in both o200k_base and cl100k_base
DEFAULT_COMPLETION_TOKENS = 12


class UpstreamCut(Exception):
    """Raised inside a stream to make the server drop the connection mid-answer."""


@dataclass
class FakeUpstreamState:
    """What the fake received, for assertions: each request's JSON body and headers."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: How each stream ended: "completed", "cut" (on purpose) or "cancelled" (the proxy hung up).
    stream_endings: list[str] = field(default_factory=list)


def _error(status: int) -> Response:
    kinds = {
        400: ("invalid_request_error", "invalid_value", "Invalid value for 'messages'."),
        429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
        500: ("server_error", "server_error", "The server had an error while processing your request."),
        503: ("server_error", "overloaded", "The engine is currently overloaded."),
    }
    type_, code, message = kinds.get(status, kinds[500])
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Response(orjson.dumps(body), status, media_type="application/json",
                    headers={"x-request-id": f"req_fake_{time.monotonic_ns()}"})


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                      "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
    }


def create_fake_upstream(state: FakeUpstreamState | None = None) -> Starlette:
    """The fake as a Starlette app; pass ``state`` to inspect what it received."""
    state = state or FakeUpstreamState()

    async def chat_completions(request: Request) -> Response:
        body = orjson.loads(await request.body())
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        h = request.headers
        if "x-fake-delay-ms" in h:
            await asyncio.sleep(int(h["x-fake-delay-ms"]) / 1000)
        if "x-fake-fail" in h:
            return _error(int(h["x-fake-fail"]))
        model = body["model"]
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        wanted = int(h.get("x-fake-completion-tokens", DEFAULT_COMPLETION_TOKENS))
        completion = min(wanted, limit) if limit else wanted
        finish = "length" if limit and wanted > limit else "stop"
        prompt = TokenCounter(model).chat_prompt(body.get("messages", []))
        cached = min(int(h.get("x-fake-cached-tokens", 0)), prompt)
        usage = None if "x-fake-no-usage" in h else _usage(prompt, completion, cached)
        ident = f"chatcmpl-fake{time.monotonic_ns()}"
        created = int(time.time())
        headers = {"x-request-id": f"req_{ident}", "openai-processing-ms": "3",
                   "x-ratelimit-remaining-requests": "9999"}
        if not body.get("stream"):
            answer = {
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": WORD * completion,
                                                     "refusal": None},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage, "system_fingerprint": "fp_fake",
            }
            if usage is None:
                del answer["usage"]
            return Response(orjson.dumps(answer), media_type="application/json", headers=headers)

        include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and usage is not None
        cut_after = int(h["x-fake-cut-after"]) if "x-fake-cut-after" in h else None
        delay_s = int(h.get("x-fake-chunk-delay-ms", 0)) / 1000

        def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
            payload: dict[str, Any] = {
                "id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": "fp_fake",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
            }
            if include_usage:
                payload["usage"] = None
            return b"data: " + orjson.dumps(payload) + b"\n\n"

        async def stream() -> AsyncIterator[bytes]:
            ending = "cancelled"
            try:
                yield chunk({"role": "assistant", "content": "", "refusal": None}, None)
                for i in range(completion):
                    if cut_after is not None and i >= cut_after:
                        ending = "cut"
                        raise UpstreamCut("connection cut on purpose")
                    if delay_s:
                        await asyncio.sleep(delay_s)
                    yield chunk({"content": WORD}, None)
                yield chunk({}, finish)
                if include_usage:
                    final = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                             "system_fingerprint": "fp_fake", "choices": [], "usage": usage}
                    yield b"data: " + orjson.dumps(final) + b"\n\n"
                yield b"data: [DONE]\n\n"
                ending = "completed"
            finally:
                state.stream_endings.append(ending)

        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def models(request: Request) -> Response:
        data = [{"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"}]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models),
    ])
    app.state.fake = state
    return app
