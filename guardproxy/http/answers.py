"""An upstream's answer, to the client and into the books: a stream relayed as it arrives and settled
when the relay closes; a whole answer settled once it has been sent (``SettledAfterSending``); a
background response whose reservation is kept until it ends (``defer``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from guardproxy.budget.cost import COST_HEADER, add_usage_cost, usd_text
from guardproxy.budget.levels import booked_caps
from guardproxy.budget.pricing import cost_micros
from guardproxy.budget.records import Outcome
from guardproxy.errors import GuardError, StoreUnavailable
from guardproxy.http import background, cache, objects, settlement
from guardproxy.http.cached_answers import CacheMiss, keep_answer, keep_semantic
from guardproxy.http.endpoints import ApiShape
from guardproxy.http.plan import Plan
from guardproxy.http.progress import StreamProgress
from guardproxy.http.relay import ChatStreamWatcher, RelayResult, StreamRelay
from guardproxy.http.responses_stream import ResponsesStreamWatcher
from guardproxy.http.services import Services
from guardproxy.http.settlement import Ending, charge_of, observe_timing
from guardproxy.http.upstream import UpstreamResponse, response_headers

log = logging.getLogger("guardproxy.pipeline")


async def respond(
    s: Services, shape: ApiShape, plan: Plan, response: UpstreamResponse, started: float,
    cached: CacheMiss | None = None,
) -> Response:
    """Relay the answer (streamed as it arrives, or whole) and settle what it cost; a ``cached``
    miss keeps the complete answer for the next identical request."""
    upstream = s.upstreams[plan.sent.upstream]
    # The upstream's id when it sent one, else our own: the client and the audit log share it.
    request_id = response.headers.get("x-request-id") or plan.own_request_id
    headers = {**response_headers(response.headers), "x-request-id": request_id, **plan.headers()}
    if cached is not None:
        headers[cache.CACHE_HEADER] = cached.result
    if plan.request.stream and response.status_code == 200:
        watcher = shape.watcher(plan.request)
        if s.config.server.usage_cost and isinstance(watcher, ChatStreamWatcher | ResponsesStreamWatcher):
            price = plan.sent.price
            watcher.cost_of = lambda usage: cost_micros(usage, price)
        capture = None
        if cached is not None:
            capture = cache.CapturingWatcher(watcher, shape.path, s.config.cache.max_entry_bytes)
            watcher = capture

        # Checkpointed while it runs, and noted before each batch it relays, so that a crash still
        # charges what it relayed.
        ledger, reservation_id = s.ledger, plan.reservation.id
        ledger.track(reservation_id, StreamProgress(plan, watcher, request_id))

        async def on_close(result: RelayResult) -> None:
            s.ledger.untrack(plan.reservation.id)
            watcher = result.watcher
            observe_timing(s, plan, result.duration_s, watcher.first_token_at, started)
            ending = Ending(result.outcome, produced=True, usage=watcher.usage, texts=watcher.texts)
            await settlement.settle(s, shape.path, plan, ending, request_id)
            if cached is not None and capture is not None and result.outcome is Outcome.COMPLETED:
                entry = await keep_answer(s, shape, plan, cached, capture.answer())
                if entry is not None:
                    await keep_semantic(s, cached, entry)

        on_object = None
        if objects.stores_answer(shape.path, plan.request.body):
            async def on_object(object_id: str) -> None:
                await objects.record(s.ledger.store, plan.tenant, shape.path, [object_id], plan.sent.upstream)

        return StreamRelay(upstream.name, response, headers, watcher, on_close,  # type: ignore[return-value]
                           on_object, before_send=lambda: ledger.relaying(reservation_id))
    ending = Ending(Outcome.CLIENT_DISCONNECTED)
    # The semantic entry is written once the answer is on its way (off the latency path), before
    # the settlement, so that a caller who waits for the settlement finds the entry.
    stored: cache.Entry | None = None

    async def settle(duration_s: float) -> None:
        observe_timing(s, plan, duration_s, None, started)
        if stored is not None and cached is not None:
            await keep_semantic(s, cached, stored)
        await settlement.settle(s, shape.path, plan, ending, request_id)

    try:
        content = await response.read()
        if 200 <= response.status_code < 300:
            answer = json_or_none(content)
            usage, texts = shape.answer_usage(answer)
            ending = Ending(Outcome.COMPLETED, produced=True, usage=usage, texts=texts)
            if cached is not None and response.status_code == 200:
                stored = await keep_answer(s, shape, plan, cached, answer)
            stored_id = objects.stored_answer_id(shape.path, plan.request.body, answer)
            if stored_id is not None:  # before the client has the id, so that it can be retrieved at once
                await objects.record(s.ledger.store, plan.tenant, shape.path, [stored_id], plan.sent.upstream)
            later = background.pending(shape.path, plan.request.body, answer)
            if later is not None:  # runs on upstream: charged when it ends, its reservation kept till then
                observe_timing(s, plan, time.monotonic() - started, None, started)
                await defer(s, plan, later, request_id)
                return Response(content, response.status_code, headers=headers)
            charge = charge_of(plan, ending)[1]
            if s.config.server.usage_cost and add_usage_cost(answer, charge):
                content = orjson.dumps(answer)
        else:
            ending = Ending(Outcome.UPSTREAM_ERROR)
            charge = 0
        headers[COST_HEADER] = usd_text(charge)
    except BaseException as exc:  # a read error, or cancelled while reading: nothing is sent, settle now
        if isinstance(exc, GuardError):
            exc.headers["x-request-id"] = request_id
            ending = Ending(Outcome.of_failure(exc))
        with anyio.CancelScope(shield=True):
            await settle(time.monotonic() - started)
        raise
    duration_s = time.monotonic() - started
    if plan.admission.unbudgeted or s.ledger.journal_pending():
        # The store is failing: the charge goes to the journal, fsynced before the client has its
        # answer, so that a crash right after the answer still loses nothing.
        with anyio.CancelScope(shield=True):
            await settle(duration_s)
        return Response(content, response.status_code, headers=headers)
    # The store's round trip leaves the latency path: the answer is sent first, then settled.
    return SettledAfterSending(content, response.status_code, headers, lambda: settle(duration_s))


async def defer(s: Services, plan: Plan, object_id: str, request_id: str) -> None:
    """Keep a background response's reservation in the store, for whichever process sees the
    response end to settle (``background``); a store that cannot keep it gets the worst case
    charged now, so that nothing is lost."""
    reservation = plan.reservation
    fields: dict[str, str | int] = {
        "kind": "response", "reservation": reservation.id, "day": reservation.day, "month": reservation.month,
        "reserved_micros": reservation.amount, "job": reservation.job, "upstream": plan.sent.upstream,
        "model": plan.sent.name, "requested_model": plan.request.model, "prompt_tokens": plan.prompt_tokens,
        "request_id": request_id, "state": "open", "submitted_ms": int(time.time() * 1000),
    }
    if reservation.levels:  # served unbudgeted (fail_open): the levels its charge goes to, kept with it
        fields["levels"] = orjson.dumps(booked_caps(reservation.levels)).decode()
    s.metrics.requests.labels(plan.tenant, plan.requested.name, "downgraded" if plan.downgraded else "allowed").inc()
    with anyio.CancelScope(shield=True):
        try:
            await s.ledger.store.open_deferred(plan.tenant, object_id, fields)
            await s.ledger.hold(reservation, background.BACKGROUND_LEASE_MS)
        except StoreUnavailable:
            log.error("background response %s of tenant=%s could not be kept for later; charging its worst "
                      "case, %d micro-USD, now", object_id, plan.tenant, reservation.amount)
            await s.ledger.settle(reservation, reservation.amount, {
                "request_id": request_id, "requested_model": plan.request.model, "model": plan.sent.name,
                "prompt_tokens": plan.prompt_tokens, "completion_tokens": 0, "cached_tokens": 0,
                "cost_micros": reservation.amount, "outcome": "background_worst_case"})
            return
    log.info("background response %s of tenant=%s: %d micro-USD held until it ends", object_id, plan.tenant,
             reservation.amount)


class SettledAfterSending(Response):
    """A complete answer whose attempt is settled once the answer has been handed to the server, so
    the client does not wait on the store. ``settle`` runs exactly once whatever the sending meets
    (client gone, cancelled), shielded; until it has run the reservation holds, so admission stays
    conservative. uvicorn finishes it before the lifespan's shutdown (which drains the journal)."""

    def __init__(
        self, content: bytes, status_code: int, headers: dict[str, str], settle: Callable[[], Awaitable[None]]
    ) -> None:
        super().__init__(content, status_code, headers=headers)
        self.settle = settle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.settle()


def json_or_none(content: bytes) -> Any:
    """An upstream's body as JSON, ``None`` when it is not JSON."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
