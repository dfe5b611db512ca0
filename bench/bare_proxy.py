"""The baseline of the benchmark: a bare Starlette + httpx pass-through, with no auth and no budget.

It does what any proxy in front of an OpenAI upstream must do, and nothing else: read the body, POST it
upstream over one pooled ``httpx.AsyncClient`` (the pool limits of ``guardproxy/upstream.py``) and stream
the answer back with the upstream's status and content type. guardproxy's overhead is measured against it.

Served by ``bench/run.py`` as ``uvicorn --factory bare_proxy:app_from_env --app-dir bench``, with the
upstream's base URL (``http://127.0.0.1:PORT/v1``) in ``BENCH_UPSTREAM_URL``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM_ENV = "BENCH_UPSTREAM_URL"


def create_bare_proxy(upstream_url: str) -> Starlette:
    """A pass-through of ``POST /v1/chat/completions`` to ``{upstream_url}/chat/completions``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        transport = None
        if os.environ.get("BENCH_TRANSPORT") == "aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=httpx.Limits(max_connections=1000, keepalive_expiry=30))
        app.state.client = httpx.AsyncClient(
            transport=transport,
            base_url=upstream_url.rstrip("/") + "/",
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30),
            follow_redirects=False,
        )
        try:
            yield
        finally:
            await app.state.client.aclose()

    async def chat_completions(request: Request) -> Response:
        client: httpx.AsyncClient = request.app.state.client
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        upstream = client.build_request("POST", "chat/completions", content=await request.body(), headers=headers)
        response = await client.send(upstream, stream=True)
        return StreamingResponse(
            response.aiter_raw(), response.status_code,
            media_type=response.headers.get("content-type"), background=BackgroundTask(response.aclose),
        )

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"])], lifespan=lifespan)


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory``: the upstream comes from ``BENCH_UPSTREAM_URL``."""
    return create_bare_proxy(os.environ[UPSTREAM_ENV])
