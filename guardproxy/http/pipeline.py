"""The budgeted request pipeline, the same for every budgeted endpoint, top to bottom:

tenant → body → estimate → decision → reserve → forward → relay → settle.

``BudgetedEndpoint`` serves one ``ApiShape`` (``endpoints.py``: chat, completions, embeddings,
responses). When an upstream fails before anything reached the client (unreachable, timed out,
5xx, 429, or skipped by its open circuit breaker), the next model of the route is tried: the
requested model, then its ``fallbacks``, each admitted and reserved for its own price. Each
attempt's reservation is settled in exactly one place: the failure branch, the complete answer's
response once it has been sent (``SettledAfterSending``), or the relay's close callback for streams,
so no path leaves money reserved.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from guardproxy.budget.choice import Admit, Choice
from guardproxy.budget.cost import COST_HEADER, add_usage_cost, usd_text
from guardproxy.budget.fleet import key_fingerprint
from guardproxy.budget.levels import booked_caps
from guardproxy.budget.pricing import cost_micros
from guardproxy.budget.records import Outcome
from guardproxy.config.settings import ModelConfig, hash_key
from guardproxy.errors import GuardError, StoreUnavailable
from guardproxy.http import (
    admission,
    background,
    brakes,
    cache,
    cached_answers,
    forwarding,
    objects,
    settlement,
)
from guardproxy.http.auth import presented_key
from guardproxy.http.cached_answers import CacheMiss, keep_answer, keep_semantic
from guardproxy.http.endpoints import EMBEDDINGS, ApiShape
from guardproxy.http.forwarding import fails_over
from guardproxy.http.levels import check_key_models
from guardproxy.http.plan import Plan
from guardproxy.http.progress import StreamProgress
from guardproxy.http.relay import ChatStreamWatcher, RelayResult, StreamRelay
from guardproxy.http.requests import ApiRequest, read_body
from guardproxy.http.responses_stream import ResponsesStreamWatcher
from guardproxy.http.services import Services
from guardproxy.http.settlement import Ending, charge_of, observe_timing, settle
from guardproxy.http.upstream import UpstreamResponse, response_headers
from guardproxy.observe.calls import CallContext

log = logging.getLogger("guardproxy.pipeline")


class BudgetedEndpoint:
    """``POST /v1/<shape.path>`` with the budget enforced."""

    def __init__(self, services: Services, shape: ApiShape) -> None:
        self.s = services
        self.shape = shape

    async def __call__(self, request: Request) -> Response:
        tenant = await self.s.tenants.resolve(request.headers)
        job = self.s.tenants.job_of(request.headers)  # X-Guardproxy-Job, else the ServiceTitan job header
        key = presented_key(request.headers)
        context = CallContext.of(request.headers, job, key_fingerprint(hash_key(key) if key else None))
        call = self.shape.parse(await read_body(request, self.s.config.server.max_body_bytes))
        # A request may continue or read only the tenant's own objects (previous_response_id, file_id…).
        await objects.check_references(self.s.ledger.store, tenant, call.raw, call.body)
        requested = admission.priced(self.s.config, call.model)
        key_budget = self.s.tenants.key_budget(request.headers)
        check_key_models(key_budget, call.model, requested.name)
        # The runaway-agent brake, once the request is known to be valid and before anything is reserved
        # or answered (from the cache too): a looping agent's refusals cost nothing.
        await brakes.check_loop(self.s.ledger.store, self.s.config, self.s.metrics, tenant, context.key_id, job,
                                self.shape.path, call.body)
        # The response cache: a hit answers here, with no upstream call and no charge.
        cached = await cached_answers.lookup(self.s, self.shape, tenant, call, request.headers)
        if isinstance(cached, Response):
            return cached
        if cached is not None and cached.result == "miss":
            # The semantic cache: an embedding charged like any call, then a hit answers here.
            semantic_answer = await cached_answers.semantic_lookup(
                self.s, self.shape, cached, call, request.headers, context, job,
                embed=BudgetedEndpoint(self.s, EMBEDDINGS).call_within)
            if isinstance(semantic_answer, Response):
                return semantic_answer
            cached = semantic_answer
        prompt_tokens = await admission.estimate(self.shape, call)
        route = self.s.config.route(requested)
        failure: Response | GuardError | None = None
        for attempt in route:
            plan = await admission.admit_attempt(self.s, self.shape, tenant, call, requested, attempt, prompt_tokens,
                                                 context, job, key_budget)
            if plan is None:
                continue
            started = time.monotonic()
            try:
                answer = await forwarding.forward(self.s, self.shape, plan, request.headers)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await settle(self.s, self.shape.path, plan, Ending(Outcome.CLIENT_DISCONNECTED),
                                 plan.own_request_id)
                raise
            if isinstance(answer, UpstreamResponse) and (attempt is route[-1] or not fails_over(answer.status_code)):
                return await self._respond(plan, answer, started, cached)
            failure = await forwarding.failed(self.s, self.shape, plan, answer, started)
        # Every attempt failed (or no fallback fitted the budget): the client gets the last failure.
        self.s.metrics.requests.labels(tenant, requested.name, "error").inc()
        if isinstance(failure, GuardError):
            raise failure
        assert failure is not None
        return failure

    async def quote(self, tenant: str, raw: bytes, admit_for: Callable[[Sequence[str]], Admit]) -> Quote:
        """What admission would decide for the request body ``raw`` now, through the same steps as a
        call (parse, price, estimate, choose), with ``admit_for(models of the chain)`` reading the spend
        (at every level of those models) instead of reserving."""
        call = self.shape.parse(raw)
        requested = admission.priced(self.s.config, call.model)
        prompt_tokens = await admission.estimate(self.shape, call)
        chain = self.s.config.downgrade_chain(requested)
        choice = await admission.choose_model(self.s, self.shape, tenant, call, chain, prompt_tokens,
                                              admit_for([m.name for m in chain]))
        return Quote(call, chain, prompt_tokens, choice)

    async def _respond(
        self, plan: Plan, response: UpstreamResponse, started: float, cached: CacheMiss | None = None
    ) -> Response:
        """Relay the answer (streamed as it arrives, or whole) and settle what it cost; a ``cached``
        miss keeps the complete answer for the next identical request."""
        upstream = self.s.upstreams[plan.sent.upstream]
        # The upstream's id when it sent one, else our own: the client and the audit log share it.
        request_id = response.headers.get("x-request-id") or plan.own_request_id
        headers = {**response_headers(response.headers), "x-request-id": request_id, **plan.headers()}
        if cached is not None:
            headers[cache.CACHE_HEADER] = cached.result
        if plan.request.stream and response.status_code == 200:
            watcher = self.shape.watcher(plan.request)
            if self.s.config.server.usage_cost and isinstance(watcher, ChatStreamWatcher | ResponsesStreamWatcher):
                price = plan.sent.price
                watcher.cost_of = lambda usage: cost_micros(usage, price)
            capture = None
            if cached is not None:
                capture = cache.CapturingWatcher(watcher, self.shape.path, self.s.config.cache.max_entry_bytes)
                watcher = capture

            # Checkpointed while it runs, and noted before each batch it relays, so that a crash still
            # charges what it relayed.
            ledger, reservation_id = self.s.ledger, plan.reservation.id
            ledger.track(reservation_id, StreamProgress(plan, watcher, request_id))

            async def on_close(result: RelayResult) -> None:
                self.s.ledger.untrack(plan.reservation.id)
                watcher = result.watcher
                observe_timing(self.s, plan, result.duration_s, watcher.first_token_at, started)
                ending = Ending(result.outcome, produced=True, usage=watcher.usage, texts=watcher.texts)
                await settlement.settle(self.s, self.shape.path, plan, ending, request_id)
                if cached is not None and capture is not None and result.outcome is Outcome.COMPLETED:
                    entry = await keep_answer(self.s, self.shape, plan, cached, capture.answer())
                    if entry is not None:
                        await keep_semantic(self.s, cached, entry)

            on_object = None
            if objects.stores_answer(self.shape.path, plan.request.body):
                async def on_object(object_id: str) -> None:
                    await objects.record(self.s.ledger.store, plan.tenant, self.shape.path, [object_id],
                                         plan.sent.upstream)

            return StreamRelay(upstream.name, response, headers, watcher, on_close,  # type: ignore[return-value]
                               on_object, before_send=lambda: ledger.relaying(reservation_id))
        ending = Ending(Outcome.CLIENT_DISCONNECTED)
        # The semantic entry is written once the answer is on its way (off the latency path), before
        # the settlement, so that a caller who waits for the settlement finds the entry.
        stored: cache.Entry | None = None

        async def settle(duration_s: float) -> None:
            observe_timing(self.s, plan, duration_s, None, started)
            if stored is not None and cached is not None:
                await keep_semantic(self.s, cached, stored)
            await settlement.settle(self.s, self.shape.path, plan, ending, request_id)

        try:
            content = await response.read()
            if 200 <= response.status_code < 300:
                answer = _json_or_none(content)
                usage, texts = self.shape.answer_usage(answer)
                ending = Ending(Outcome.COMPLETED, produced=True, usage=usage, texts=texts)
                if cached is not None and response.status_code == 200:
                    stored = await keep_answer(self.s, self.shape, plan, cached, answer)
                stored_id = objects.stored_answer_id(self.shape.path, plan.request.body, answer)
                if stored_id is not None:  # before the client has the id, so that it can be retrieved at once
                    await objects.record(self.s.ledger.store, plan.tenant, self.shape.path, [stored_id],
                                         plan.sent.upstream)
                later = background.pending(self.shape.path, plan.request.body, answer)
                if later is not None:  # runs on upstream: charged when it ends, its reservation kept till then
                    observe_timing(self.s, plan, time.monotonic() - started, None, started)
                    await self._defer(plan, later, request_id)
                    return Response(content, response.status_code, headers=headers)
                charge = charge_of(plan, ending)[1]
                if self.s.config.server.usage_cost and add_usage_cost(answer, charge):
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
        if plan.admission.unbudgeted or self.s.ledger.journal_pending():
            # The store is failing: the charge goes to the journal, fsynced before the client has its
            # answer, so that a crash right after the answer still loses nothing.
            with anyio.CancelScope(shield=True):
                await settle(duration_s)
            return Response(content, response.status_code, headers=headers)
        # The store's round trip leaves the latency path: the answer is sent first, then settled.
        return SettledAfterSending(content, response.status_code, headers, lambda: settle(duration_s))

    async def call_within(
        self, tenant: str, raw: bytes, context: CallContext, job: str, incoming: Headers,
        use: Callable[[Any], Awaitable[dict[str, str | int]]],
    ) -> None:
        """Make a call of this endpoint on the proxy's own behalf, charged to ``tenant`` like a client's
        (admitted, reserved, settled once): the requested model only, no fallback. ``use`` sees the
        complete answer before it is settled; what it returns is added to the call's log entry.
        Admission's refusals raise ``GuardError``; an upstream failure is settled and ends the call."""
        call = self.shape.parse(raw)
        requested = admission.priced(self.s.config, call.model)
        key_budget = self.s.tenants.key_budget(incoming)
        check_key_models(key_budget, call.model, requested.name)
        plan = await admission.admit_attempt(self.s, self.shape, tenant, call, requested, requested,
                                             await admission.estimate(self.shape, call), context, job, key_budget)
        assert plan is not None  # the requested model is refused by raising, never skipped
        started = time.monotonic()
        ending = Ending(Outcome.CLIENT_DISCONNECTED)
        request_id = plan.own_request_id
        try:
            answer = await forwarding.forward(self.s, self.shape, plan, incoming)
            if isinstance(answer, GuardError):
                ending = Ending(Outcome.of_failure(answer))
                return
            request_id = answer.headers.get("x-request-id") or request_id
            content = await answer.read()
            if answer.status_code != 200:
                ending = Ending(Outcome.UPSTREAM_ERROR)
                return
            body = _json_or_none(content)
            usage, texts = self.shape.answer_usage(body)
            ending = Ending(Outcome.COMPLETED, produced=True, usage=usage, texts=texts)
            note = await use(body)
            ending = dataclasses.replace(ending, note=tuple(note.items()))
        except GuardError as exc:
            if not ending.produced:
                ending = Ending(Outcome.of_failure(exc))
        finally:
            with anyio.CancelScope(shield=True):
                observe_timing(self.s, plan, time.monotonic() - started, None, started)
                await settlement.settle(self.s, self.shape.path, plan, ending, request_id)

    async def _defer(self, plan: Plan, object_id: str, request_id: str) -> None:
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
        self.s.metrics.requests.labels(plan.tenant, plan.requested.name,
                                       "downgraded" if plan.downgraded else "allowed").inc()
        with anyio.CancelScope(shield=True):
            try:
                await self.s.ledger.store.open_deferred(plan.tenant, object_id, fields)
                await self.s.ledger.hold(reservation, background.BACKGROUND_LEASE_MS)
            except StoreUnavailable:
                log.error("background response %s of tenant=%s could not be kept for later; charging its worst "
                          "case, %d micro-USD, now", object_id, plan.tenant, reservation.amount)
                await self.s.ledger.settle(reservation, reservation.amount, {
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


@dataclass(frozen=True)
class Quote:
    """What admission would decide for one request now (``BudgetedEndpoint.quote``)."""

    request: ApiRequest
    #: The requested model and its downgrade chain, in order.
    chain: Sequence[ModelConfig]
    prompt_tokens: int
    choice: Choice


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
