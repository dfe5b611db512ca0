"""The other ``/v1/*`` paths (files, images, audio, moderations…), which the proxy does not budget.

``unbudgeted_paths: reject`` (the default) answers 404 in OpenAI's shape, so nothing spends money
unseen. ``passthrough`` forwards them, for an authenticated tenant, to ``unbudgeted_upstream`` and
relays the answer as it arrives; nothing is reserved or charged, and they are only counted in
``guardproxy_unbudgeted_requests_total``. Paths of stored objects (files, batches, vector stores…)
are scoped to the tenant that created each object (``object_routes``).
"""

from __future__ import annotations

import logging
from urllib.parse import unquote

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.endpoints import BUDGETED
from guardproxy.http.object_routes import ScopedObjects
from guardproxy.http.objects import ALWAYS_SCOPED, object_path
from guardproxy.http.openai_resources import resource_label
from guardproxy.http.requests import read_body
from guardproxy.http.services import Services
from guardproxy.http.upstream import UpstreamResponse, response_headers

log = logging.getLogger("guardproxy.passthrough")


class UnbudgetedPaths:
    """Handles ``/v1/{path}`` for every path that has no route of its own."""

    def __init__(self, services: Services) -> None:
        self.s = services
        #: Files, batches, stored responses…: each tenant sees only the objects it created.
        self.objects = ScopedObjects(services, PassthroughRelay)

    async def stored_answers(self, request: Request) -> Response:
        """``/v1/responses/{id}…`` and ``/v1/chat/completions/{id}…`` (and the stored chat completions'
        list): the budgeted endpoints' stored answers, scoped, whatever ``unbudgeted_paths`` says."""
        return await self(request)

    async def __call__(self, request: Request) -> Response:
        path = sent_path(request)
        where = object_path(path)
        if where is not None and where.collection in ALWAYS_SCOPED:
            return await self.objects(request, path, where)
        if self.s.config.unbudgeted_paths != "passthrough":
            budgeted = ", ".join(f"/v1/{shape.path}" for shape in BUDGETED)
            raise GuardError(
                ErrorKind.NOT_FOUND,
                f"Unknown request URL: {request.method} {request.url.path}. This proxy budgets {budgeted} and "
                "serves /v1/models; other paths are refused so that nothing spends money unseen "
                "(unbudgeted_paths: reject).",
            )
        if loose_spelling(path) in _BUDGETED_PATHS:
            # A lenient upstream (case-insensitive, or trimming trailing dots and spaces as Windows
            # servers do) would serve /v1/Chat/Completions. as the budgeted endpoint.
            raise GuardError(ErrorKind.INVALID_PATH, f"Invalid request path: {request.url.path} names a budgeted "
                             "endpoint in another spelling.")
        if where is not None:
            return await self.objects(request, path, where)
        tenant = await self.s.tenants.resolve(request.headers)
        upstream = self.s.upstreams[self.s.config.unbudgeted_upstream]
        target = upstream.passthrough_path(path, request.scope.get("query_string", b"").decode("latin-1"))
        body = await read_body(request, self.s.config.server.max_body_bytes)
        headers = upstream.request_headers(request.headers.items(), self.s.tenants.routing_headers, tenant)
        response = await upstream.send(target, body, headers, method=request.method)
        self.s.metrics.unbudgeted_requests.labels(tenant, resource_label(path)).inc()
        log.info("unbudgeted passthrough tenant=%s %s /v1/%s -> %s %d", tenant, request.method, path, upstream.name,
                 response.status_code)
        headers_out = {**response_headers(response.headers), "x-guardproxy-tenant": tenant,
                       "x-guardproxy-unbudgeted": "true"}
        return PassthroughRelay(upstream.name, response, headers_out)


_BUDGETED_PATHS = frozenset(shape.path for shape in BUDGETED)


def loose_spelling(path: str) -> str:
    """``path`` as the most lenient server would read it: decoded, lower case, segments trimmed."""
    return "/".join(segment.lower().rstrip(". ") for segment in unquote(path).split("/"))


def sent_path(request: Request) -> str:
    """The path below ``/v1/`` as the client sent it (percent-escapes kept; already canonical)."""
    raw: bytes = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    return raw.split(b"?", 1)[0].decode("ascii", "replace").removeprefix("/v1/")


class PassthroughRelay(Response):
    """Relays an upstream answer as it arrives; the upstream request is closed whatever happens.

    When the upstream fails after the head was sent, an event stream ends with an OpenAI error frame
    (as budgeted streams do); any other body is left unfinished, so the client sees a truncated
    transfer rather than a complete-looking one.
    """

    def __init__(self, upstream: str, response: UpstreamResponse, headers: dict[str, str]) -> None:
        # Not Response.__init__: it would declare a content-length for the empty body it is given.
        self.status_code = response.status_code
        self.background = None
        self.raw_headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.upstream = upstream
        self.response = response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            try:
                async for chunk in self.response.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            except GuardError as exc:
                log.warning("passthrough from upstream %s ended early: %s", self.upstream, exc.message)
                if "text/event-stream" not in self.response.headers.get("content-type", ""):
                    return
                error = GuardError(ErrorKind.UPSTREAM_UNAVAILABLE, f"The upstream stream ended early: {exc.message}")
                await send({"type": "http.response.body", "body": b"data: " + error.body() + b"\n\n",
                            "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:
            log.info("passthrough client went away before the answer from %s was relayed", self.upstream)
        finally:
            with anyio.CancelScope(shield=True):
                await self.response.aclose()
