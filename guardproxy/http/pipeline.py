"""The budgeted request pipeline, the same for every budgeted endpoint, top to bottom:

tenant → body → estimate → decision → reserve → forward → relay → settle.

``BudgetedEndpoint`` serves one ``ApiShape`` (``endpoints.py``: chat, completions, embeddings,
responses). When an upstream fails before anything reached the client (unreachable, timed out,
5xx, 429, or skipped by its open circuit breaker), the next model of the route is tried: the
requested model, then its ``fallbacks``, each admitted and reserved for its own price. Each
attempt's reservation is settled in exactly one place: the failure branch, the complete answer's
response once it has been sent (``SettledAfterSending``), or the relay's close callback for streams,
so no path leaves money reserved.

Each step lives in a module of its own: ``admission`` (price, estimate, decide and reserve),
``cached_answers`` (the response and semantic caches), ``forwarding`` (to the upstream, and a failed
attempt), ``answers`` (relay or send, then settle) and ``settlement`` (what is charged, booked once).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from guardproxy.budget.choice import Admit, Choice
from guardproxy.budget.fleet import key_fingerprint
from guardproxy.budget.records import Outcome
from guardproxy.config.settings import ModelConfig, hash_key
from guardproxy.errors import GuardError
from guardproxy.http import admission, answers, brakes, cached_answers, forwarding, objects
from guardproxy.http.answers import json_or_none
from guardproxy.http.auth import presented_key
from guardproxy.http.endpoints import EMBEDDINGS, ApiShape
from guardproxy.http.forwarding import fails_over
from guardproxy.http.levels import check_key_models
from guardproxy.http.requests import ApiRequest, read_body
from guardproxy.http.services import Services
from guardproxy.http.settlement import Ending, observe_timing, settle
from guardproxy.http.upstream import UpstreamResponse
from guardproxy.observe.calls import CallContext


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
                return await answers.respond(self.s, self.shape, plan, answer, started, cached)
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
            body = json_or_none(content)
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
                await settle(self.s, self.shape.path, plan, ending, request_id)


@dataclass(frozen=True)
class Quote:
    """What admission would decide for one request now (``BudgetedEndpoint.quote``)."""

    request: ApiRequest
    #: The requested model and its downgrade chain, in order.
    chain: Sequence[ModelConfig]
    prompt_tokens: int
    choice: Choice
