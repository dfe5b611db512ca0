"""A fake OpenAI upstream, shipped for tests, ``guardproxy demo`` and the benchmarks.

It speaks the wire shapes of openai-wire.md: chat completions, legacy completions, embeddings and
the Responses API, streamed (with the ``include_usage`` chunk, or named events) and whole, with
cached-token details and errors; the same endpoints under Azure OpenAI's paths
(``/openai/deployments/{deployment}/…?api-version=…``, ``/openai/responses?api-version=…`` and
``/openai/v1/…``), which require an ``api-key`` header; stored objects (files, uploads, batches,
vector stores, fine-tuning jobs, stored responses and chat completions: ``fake_objects``); and any
other ``/v1/*`` path, echoed back.
Requests steer it with headers, which the proxy forwards like any other client header:

- ``x-fake-completion-tokens: N`` — answer length (default 12; capped by the request's token limit)
- ``x-fake-cached-tokens: N`` — report N prompt tokens as cached
- ``x-fake-reasoning-tokens: N`` — report N completion tokens as reasoning (chat)
- ``x-fake-prompt-tokens: N`` — report N prompt tokens (instead of the fake's own count)
- ``x-fake-fail: 500|429|400|503`` — answer that OpenAI error instead
- ``x-fake-cut-after: N`` — stream N content chunks, then drop the connection
- ``x-fake-no-usage: 1`` — never report usage (a provider without usage)
- ``x-fake-chunk-delay-ms: N`` — pause between stream chunks
- ``x-fake-delay-ms: N`` — pause before answering at all
- ``x-fake-no-request-id: 1`` — answer without an ``x-request-id`` header (most OpenAI-compatible servers)

Chat completions record the usage they reported in ``FakeUpstreamState.billed`` (what a provider
would bill), so tests can compare the proxy's charges with it.

``FakeUpstreamState.fail_with`` makes every request fail with that status (a dead provider).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.testing.fake_apis import (
    DEFAULT_COMPLETION_TOKENS,
    WORD,
    Steering,
    UpstreamCut,
    chat_endpoint,
    completions_endpoint,
    embeddings_endpoint,
    error_response,
    responses_endpoint,
)
from guardproxy.testing.fake_objects import FakeObjects, collection_of_path, serve_object

_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")


@dataclass
class FakeUpstreamState:
    """What the fake received, for assertions: each request's JSON body, headers and path."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    #: How each stream ended: "completed", "cut" (on purpose) or "cancelled" (the proxy hung up).
    stream_endings: list[str] = field(default_factory=list)
    #: Each request's path and query string (``/v1/chat/completions``, ``/openai/responses?api-version=…``).
    paths: list[str] = field(default_factory=list)
    #: When set, every request is answered with this error status.
    fail_with: int | None = None
    #: ``(model, usage)`` of every chat completion answered in full: the usage object it reported.
    billed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: ``(model, usage)`` of every chat stream stopped before its end: the words generated until then.
    unfinished: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: Files, batches, vector stores… and the responses and chat completions it stored.
    objects: FakeObjects = field(default_factory=FakeObjects)


def create_fake_upstream(state: FakeUpstreamState | None = None) -> Starlette:
    """The fake as a Starlette app; pass ``state`` to inspect what it received."""
    state = state or FakeUpstreamState()
    handlers = {
        "chat/completions": chat_endpoint(state.stream_endings, state.billed, state.unfinished, state.objects),
        "completions": completions_endpoint(state.stream_endings),
        "embeddings": embeddings_endpoint(),
        "responses": responses_endpoint(state.stream_endings, state.objects),
    }

    async def receive(request: Request) -> tuple[dict[str, Any], Response | None]:
        """Record the request; an error response when it is to fail."""
        raw = await request.body()
        body = orjson.loads(raw) if raw else {}
        state.requests.append(body)
        state.headers.append(dict(request.headers))
        query = request.url.query
        state.paths.append(request.url.path + (f"?{query}" if query else ""))
        h = request.headers
        if "x-fake-delay-ms" in h:
            await asyncio.sleep(int(h["x-fake-delay-ms"]) / 1000)
        if state.fail_with is not None:
            return body, error_response(state.fail_with)
        if "x-fake-fail" in h:
            return body, error_response(int(h["x-fake-fail"]))
        return body, None

    def route(path: str, endpoint: str, *, azure: bool = False, api_version: bool = False) -> Route:
        async def serve(request: Request) -> Response:
            body, failure = await receive(request)
            if azure and not request.headers.get("api-key"):
                return error_response(401)
            if api_version and not request.query_params.get("api-version"):
                return error_response(404)  # what Azure answers for a path without api-version
            if failure is not None:
                return failure
            if "deployment" in request.path_params:
                body.setdefault("model", request.path_params["deployment"])
            response = await handlers[endpoint](body, Steering.from_headers(request.headers))
            if "x-fake-no-request-id" in request.headers:
                del response.headers["x-request-id"]
            response.headers.update(_PROVIDER_RATE_LIMITS)
            return response

        return Route(path, serve, methods=["POST"])

    async def models(request: Request) -> Response:
        data = [{"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"}]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def echo(request: Request) -> Response:
        """Stored objects (``fake_objects``); any other path: what arrived, so that pass-through can
        be checked."""
        objects = collection_of_path(request.url.path)
        if objects is not None:
            state.paths.append(request.url.path + (f"?{request.url.query}" if request.url.query else ""))
            state.headers.append(dict(request.headers))
            return await serve_object(state.objects, request, *objects)
        body, failure = await receive(request)
        answer = {"object": "fake.echo", "method": request.method, "path": request.url.path,
                  "query": request.url.query, "body": body}
        return failure or Response(orjson.dumps(answer), media_type="application/json",
                                   headers={"x-request-id": f"req_fake_{time.monotonic_ns()}"})

    routes: list[Route] = [route(f"/v1/{e}", e) for e in _ENDPOINTS]
    routes += [route(f"/openai/v1/{e}", e, azure=True) for e in _ENDPOINTS]
    routes += [route(f"/openai/deployments/{{deployment}}/{e}", e, azure=True, api_version=True)
               for e in _ENDPOINTS if e != "responses"]
    routes.append(route("/openai/responses", "responses", azure=True, api_version=True))
    routes.append(Route("/v1/models", models))
    routes.append(Route("/v1/{path:path}", echo, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]))
    app = Starlette(routes=routes)
    app.state.fake = state
    return app


# The provider's own limits, as OpenAI reports them on every answer (the proxy's replace them).
_PROVIDER_RATE_LIMITS = {
    "x-ratelimit-limit-requests": "10000", "x-ratelimit-remaining-requests": "9999",
    "x-ratelimit-reset-requests": "6ms", "x-ratelimit-limit-tokens": "30000000",
    "x-ratelimit-remaining-tokens": "29999000", "x-ratelimit-reset-tokens": "2ms",
}

# Re-exported: tests, the demo and the benchmarks steer the fake with these.
__all__ = ["DEFAULT_COMPLETION_TOKENS", "WORD", "FakeUpstreamState", "UpstreamCut", "create_fake_upstream"]
