"""The baselines of the benchmark: bare Starlette pass-throughs, with no auth, no budget and no logging.

They do what any proxy in front of an OpenAI upstream must do, and nothing else: read the body, POST it
upstream over one pooled client (the pool limits of ``guardproxy/http/upstream.py``) and stream the answer back
with the upstream's status and content type. guardproxy's overhead is measured against them.

``BENCH_CLIENT`` picks the upstream client:

- ``httpx-aiohttp`` (default): ``httpx.AsyncClient`` over the ``httpx-aiohttp`` transport, as guardproxy
  calls its upstreams today: the like-for-like baseline of the issue's goals;
- ``aiohttp``: ``aiohttp.ClientSession`` directly, without httpx's API layer on top: what guardproxy would
  gain by calling aiohttp itself;
- ``httpx``: ``httpx.AsyncClient`` on its own pool (httpcore), for reference.

The upstream path comes from the ``x-bench-route`` request header (``plain``, ``stream`` or ``slow``): the
canned nginx upstream of ``bench/run.py`` serves each kind of answer under ``/<route>/v1/``. The route
``pystream`` goes to the Python upstream (``bench/py_upstream.py``, root URL in ``BENCH_PY_UPSTREAM_URL``):
with ``BENCH_CLIENT=aiohttp`` this is the bare chunk-by-chunk streaming relay (Starlette's
``StreamingResponse`` over aiohttp's ``iter_any()``, nothing else) that guardproxy's time to first byte is
measured against.

Served by ``bench/run.py`` as ``uvicorn --factory bare_proxy:app_from_env --app-dir bench``, with the
upstream's root URL (``http://127.0.0.1:PORT``) in ``BENCH_UPSTREAM_URL``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

UPSTREAM_ENV = "BENCH_UPSTREAM_URL"
PY_UPSTREAM_ENV = "BENCH_PY_UPSTREAM_URL"
CLIENT_ENV = "BENCH_CLIENT"
CLIENTS = ("httpx-aiohttp", "aiohttp", "httpx")
ROUTES = frozenset({"plain", "stream", "slow", "pystream"})


def _route(request: Request) -> str:
    route = request.headers.get("x-bench-route", "plain")
    return route if route in ROUTES else "plain"


def create_bare_proxy(upstream_url: str, client: str = "httpx-aiohttp", py_upstream_url: str | None = None,
                      ) -> Starlette:
    """A pass-through of ``POST /v1/chat/completions`` to ``{upstream_url}/<route>/v1/chat/completions``
    (the ``pystream`` route to ``{py_upstream_url}/pystream/v1/chat/completions``)."""
    if client not in CLIENTS:
        raise ValueError(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")
    roots = {route: upstream_url.rstrip("/") for route in ROUTES}
    roots["pystream"] = (py_upstream_url or upstream_url).rstrip("/")

    def upstream_of(request: Request) -> str:
        route = _route(request)
        return f"{roots[route]}/{route}/v1/chat/completions"
    handler: Callable[[Request], Awaitable[Response]]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if client == "aiohttp":
            app.state.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1000, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=600, connect=10), auto_decompress=False,
            )
            try:
                yield
            finally:
                await app.state.session.close()
            return
        transport = None
        if client == "httpx-aiohttp":
            from httpx_aiohttp import AiohttpTransport

            transport = AiohttpTransport(limits=httpx.Limits(max_connections=1000, keepalive_expiry=30))
        app.state.client = httpx.AsyncClient(
            transport=transport, timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200, keepalive_expiry=30),
            follow_redirects=False,
        )
        try:
            yield
        finally:
            await app.state.client.aclose()

    async def via_httpx(request: Request) -> Response:
        http: httpx.AsyncClient = request.app.state.client
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        url = upstream_of(request)
        upstream = http.build_request("POST", url, content=await request.body(), headers=headers)
        response = await http.send(upstream, stream=True)
        return StreamingResponse(
            response.aiter_raw(), response.status_code,
            media_type=response.headers.get("content-type"), background=BackgroundTask(response.aclose),
        )

    async def via_aiohttp(request: Request) -> Response:
        session: aiohttp.ClientSession = request.app.state.session
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        url = upstream_of(request)
        response = await session.post(url, data=await request.body(), headers=headers)
        return StreamingResponse(
            response.content.iter_any(), response.status,
            media_type=response.headers.get("content-type"), background=BackgroundTask(response.release),
        )

    handler = via_aiohttp if client == "aiohttp" else via_httpx
    return Starlette(routes=[Route("/v1/chat/completions", handler, methods=["POST"])], lifespan=lifespan)


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory``: the upstream from ``BENCH_UPSTREAM_URL``, the client from ``BENCH_CLIENT``."""
    return create_bare_proxy(os.environ[UPSTREAM_ENV], os.environ.get(CLIENT_ENV, "httpx-aiohttp"),
                             os.environ.get(PY_UPSTREAM_ENV))
