"""Serving the scoped collections (``objects.py``): files, batches, vector stores, uploads,
fine-tuning jobs, stored responses and chat completions…, each tenant seeing only its own.

``ScopedObjects`` serves ``/v1/<collection>[/<id>[/…]]`` for passthrough, and always the stored
answers of the budgeted endpoints (``/v1/responses/{id}…``, ``/v1/chat/completions/{id}…`` and the
stored chat completions' list) and the files and batches of the budgeted Batch API. Batches are
reserved and charged (``batches.py``); creating a fine-tuning job, which no budget sees, is refused
unless the operator allows it (``unbudgeted_allow_paid``); the rest costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http import objects
from guardproxy.http.batches import Batches
from guardproxy.http.objects import ObjectPath
from guardproxy.http.requests import read_body
from guardproxy.http.services import Services
from guardproxy.http.upstream import Upstream, UpstreamResponse, response_headers
from guardproxy.types import JSONObject

log = logging.getLogger("guardproxy.objects")

Relay = Callable[[str, UpstreamResponse, dict[str, str]], Response]


class ScopedObjects:
    """One request to a scoped collection, for the tenant the request authenticates as."""

    def __init__(self, services: Services, relay: Relay) -> None:
        self.s = services
        #: How an answer that is not JSON (a file's content, an event stream) is relayed as it arrives.
        self.relay = relay
        self.batches = Batches(services)

    async def __call__(self, request: Request, path: str, where: ObjectPath) -> Response:
        tenant = await self.s.tenants.resolve(request.headers)
        store = self.s.ledger.store
        method = request.method
        creating = where.object_id is None and method == "POST"
        allowed = self.s.config.unbudgeted_allow_paid
        if creating and where.collection in objects.PAID and where.collection not in allowed:
            raise GuardError(
                ErrorKind.PAID_PATH_REFUSED,
                f"POST /v1/{where.collection} spends money that no budget of this proxy sees, so it is refused "
                f"(allow it with unbudgeted_allow_paid: [{where.collection}]).",
            )
        if where.object_id is None and method not in ("GET", "POST"):
            raise GuardError(ErrorKind.METHOD_NOT_ALLOWED, f"{method} is not supported on /v1/{path}.",
                             headers={"allow": "GET, POST"})
        upstream = self.s.upstreams[self.s.config.unbudgeted_upstream]
        if where.object_id is not None:
            [holder] = await store.object_upstreams(tenant, [where.object_id])
            if holder is None or holder not in self.s.upstreams:
                log.info("tenant=%s asked for object %r of /v1/%s that is not its own", tenant,
                         where.object_id[:100], where.collection)
                raise objects.not_found(where.object_id)
            upstream = self.s.upstreams[holder]
        body = await read_body(request, self.s.config.server.max_body_bytes)
        if body and objects.json_answer(request.headers.get("content-type", "")):
            await objects.check_references(store, tenant, body, _json_or_none(body))
        headers = upstream.request_headers(request.headers.items(), self.s.tenants.routing_headers, tenant)
        query = objects.request_query(request)
        out = {"x-guardproxy-tenant": tenant, "x-guardproxy-unbudgeted": "true"}
        self.s.metrics.unbudgeted_requests.labels(tenant, where.collection.split("/", 1)[0]).inc()
        if where.object_id is None and method == "GET":
            return await self._list(upstream, path, query, headers, tenant, out)
        if creating and where.collection in objects.BUDGETED_CREATION:
            return await self.batches.submit(tenant, body, headers, out, request.headers)
        response = await upstream.send(upstream.passthrough_path(path, query), body, headers, method=method)
        log.info("scoped object tenant=%s %s /v1/%s -> %s %d", tenant, method, path, upstream.name,
                 response.status_code)
        if not objects.json_answer(response.headers.get("content-type", "")):
            return self.relay(upstream.name, response, {**response_headers(response.headers), **out})
        content = await response.read()
        answer = _json_or_none(content)
        if 200 <= response.status_code < 300:
            made = [answer["id"]] if creating and isinstance(answer, dict) and isinstance(answer.get("id"), str) else []
            await objects.record(store, tenant, where.collection, [*made, *objects.derived_ids(answer)],
                                 upstream.name)
            if method == "DELETE" and not where.rest and where.object_id is not None:
                await store.forget_object(tenant, where.object_id)
            if where.collection in ("batches", "responses") and where.object_id is not None:
                # an ended batch or background response is settled as it is seen
                await self.batches.observe(tenant, answer)
        return Response(content, response.status_code, headers={**response_headers(response.headers), **out})

    async def _list(
        self, upstream: Upstream, path: str, query: str, headers: list[tuple[str, str]], tenant: str,
        out: dict[str, str],
    ) -> Response:
        """The upstream's list with only the tenant's objects, reading on while other tenants' fill a page."""
        limit = objects.list_limit(query)
        after = None
        kept: list[JSONObject] = []
        first: JSONObject | None = None
        more = False
        response: UpstreamResponse | None = None
        for _ in range(objects.MAX_LIST_PAGES):
            sent = query if after is None else objects.list_query(query, after)
            response = await upstream.send(upstream.passthrough_path(path, sent), b"", headers, method="GET")
            content = await response.read()
            answer = _json_or_none(content)
            if response.status_code != 200 or not objects.is_list_page(answer):
                # An error (or not a list at all): nothing of another tenant's is in it to hide.
                return Response(content, response.status_code, headers={**response_headers(response.headers), **out})
            first = first or answer
            data: list[JSONObject] = answer["data"]
            owners = await self.s.ledger.store.object_upstreams(tenant, [item["id"] for item in data])
            kept.extend(item for item, owner in zip(data, owners, strict=True) if owner is not None)
            more = bool(answer.get("has_more")) and bool(data)
            if not more or len(kept) >= limit:
                break
            after = data[-1]["id"]
        assert first is not None and response is not None
        return objects.json_response(objects.scoped_page(first, kept, limit, more), 200,
                                     {**response_headers(response.headers), **out})


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
