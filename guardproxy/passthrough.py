"""The other ``/v1/*`` paths (files, images, audio, moderations…), which the proxy does not budget.

``unbudgeted_paths: reject`` (the default) answers 404 in OpenAI's shape, so nothing spends money
unseen. ``passthrough`` forwards them, for an authenticated tenant, to ``unbudgeted_upstream`` and
relays the answer as it arrives; nothing is reserved or charged, and they are only counted in
``guardproxy_unbudgeted_requests_total``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from guardproxy.endpoints import BUDGETED
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.pipeline import Services
from guardproxy.requests import read_body
from guardproxy.upstream import aiter_translated, response_headers

log = logging.getLogger("guardproxy.passthrough")

# The metric's endpoint label is the path's first segment when it looks like an API name.
_ENDPOINT_LABEL = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


class UnbudgetedPaths:
    """Handles ``/v1/{path}`` for every path that has no route of its own."""

    def __init__(self, services: Services) -> None:
        self.s = services

    async def __call__(self, request: Request) -> Response:
        path: str = request.path_params["path"]
        if self.s.config.unbudgeted_paths != "passthrough":
            budgeted = ", ".join(f"/v1/{shape.path}" for shape in BUDGETED)
            raise GuardError(
                ErrorKind.NOT_FOUND,
                f"Unknown request URL: {request.method} {request.url.path}. This proxy budgets {budgeted} and "
                "serves /v1/models; other paths are refused so that nothing spends money unseen "
                "(unbudgeted_paths: reject).",
            )
        tenant = await self.s.tenants.resolve(request.headers)
        body = await read_body(request, self.s.config.server.max_body_bytes)
        upstream = self.s.upstreams[self.s.config.unbudgeted_upstream]
        headers = upstream.request_headers(request.headers.items(), self.s.tenants.routing_headers, tenant)
        response = await upstream.send(
            upstream.passthrough_path(path, request.url.query), body, headers, method=request.method
        )
        endpoint = path.split("/", 1)[0]
        label = endpoint if _ENDPOINT_LABEL.match(endpoint) else "other"
        self.s.metrics.unbudgeted_requests.labels(tenant, label).inc()
        log.info("unbudgeted passthrough tenant=%s %s /v1/%s -> %s %d", tenant, request.method, path, upstream.name,
                 response.status_code)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in aiter_translated(upstream.name, response):
                    yield chunk
            finally:
                with anyio.CancelScope(shield=True):
                    await response.aclose()

        return StreamingResponse(
            relay(), response.status_code,
            headers={**response_headers(response.headers), "x-guardproxy-tenant": tenant,
                     "x-guardproxy-unbudgeted": "true"},
        )
