"""Forwarding one attempt upstream: the body sent (the caller's own bytes unless the model, the usage
option or a clamped output limit changes), the upstream's answer head, and a failed attempt
released (nothing charged), kept as what the client gets if no other model answers."""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import orjson
from starlette.datastructures import Headers
from starlette.responses import Response

from guardproxy.budget.cost import COST_HEADER, usd_text
from guardproxy.budget.records import Outcome
from guardproxy.errors import GuardError
from guardproxy.http.endpoints import ApiShape
from guardproxy.http.plan import Plan
from guardproxy.http.services import Services
from guardproxy.http.settlement import Ending, observe_timing, settle
from guardproxy.http.upstream import UpstreamResponse, response_headers

log = logging.getLogger("guardproxy.pipeline")


def fails_over(status: int) -> bool:
    """An upstream answer worth trying the next model for: the provider failed or is rate-limiting."""
    return status == 429 or status >= 500


async def forward(s: Services, shape: ApiShape, plan: Plan, incoming: Headers) -> UpstreamResponse | GuardError:
    """The upstream's answer head, or why there is none (unreachable, timed out, breaker open)."""
    upstream = s.upstreams[plan.sent.upstream]
    headers = upstream.request_headers(incoming.items(), s.tenants.routing_headers, plan.tenant)
    try:
        return await upstream.send(
            upstream.endpoint_path(shape.path, plan.upstream_model), outgoing_body(shape, plan), headers
        )
    except GuardError as exc:
        return exc


def outgoing_body(shape: ApiShape, plan: Plan) -> bytes:
    """The request body for upstream; the caller's own bytes when nothing needs to change."""
    call = plan.request
    changes: dict[str, Any] = {}
    if plan.upstream_model != call.model:
        changes["model"] = plan.upstream_model
    if shape.asks_for_usage and call.stream and not call.wants_usage:
        changes["stream_options"] = {**(call.body.get("stream_options") or {}), "include_usage": True}
    if plan.clamped_tokens is not None:
        changes.update(shape.lowered_limit(call.body, plan.clamped_tokens, (plan.sent.name, plan.upstream_model)))
    return orjson.dumps({**call.body, **changes}) if changes else call.raw


async def failed(
    s: Services, shape: ApiShape, plan: Plan, answer: UpstreamResponse | GuardError, started: float
) -> Response | GuardError:
    """Release a failed attempt (nothing charged) and keep what the client gets if no other answers."""
    upstream = s.upstreams[plan.sent.upstream]
    failure: Response | GuardError | None = None
    request_id = plan.own_request_id
    try:
        if isinstance(answer, GuardError):
            failure = answer
        else:
            request_id = answer.headers.get("x-request-id") or request_id
            headers = {**response_headers(answer.headers), "x-request-id": request_id, **plan.headers(),
                       COST_HEADER: usd_text(0)}  # a failed attempt is charged nothing
            failure = Response(await answer.read(), answer.status_code, headers=headers)
    except GuardError as exc:
        failure = exc
    finally:
        ending = Ending(Outcome.CLIENT_DISCONNECTED)  # cancelled while reading the error body
        if isinstance(failure, GuardError):
            failure.headers["x-request-id"] = request_id
            ending = Ending(Outcome.of_failure(failure))
        elif failure is not None:
            ending = Ending(Outcome.UPSTREAM_ERROR)
        with anyio.CancelScope(shield=True):
            observe_timing(s, plan, time.monotonic() - started, None, started)
            await settle(s, shape.path, plan, ending, request_id, counted=False)
    reason = failure.message if isinstance(failure, GuardError) else f"HTTP {failure.status_code}"
    log.warning("upstream failed tenant=%s model=%s upstream=%s: %s", plan.tenant, plan.sent.name,
                upstream.name, reason)
    return failure
