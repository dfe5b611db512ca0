"""What a tenant's agents can ask with the key they already hold (same auth as ``/v1``):

- ``GET /v1/guardproxy/budget``: the caller's own budget state (the admin API's shape);
- ``POST /v1/guardproxy/quote``: what admission would decide now for a request body, with nothing
  reserved and no upstream call. It runs the budgeted endpoint's own steps (parse, price, estimate,
  ``choice.choose``) with ``budget.decide`` on a read of the store in place of the admission script,
  so a quote and the admission that follows it agree unless other spend lands in between.

A tenant key only ever sees its own tenant: naming another one in the tenant header is a 403.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.budget import decision as budget
from guardproxy.budget.choice import Admit, reading, thresholds_in_force
from guardproxy.budget.decision import Thresholds
from guardproxy.budget.pricing import micros_to_usd
from guardproxy.budget.records import Admission
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.http.pipeline import BudgetedEndpoint, Quote, Services
from guardproxy.http.requests import parse_json_object, read_body
from guardproxy.http.runtime import Generation
from guardproxy.observe.state import read_states
from guardproxy.types import Micros

QUOTE_FIELDS = ("endpoint", "request")


def _json(payload: Any) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json", headers={"cache-control": "no-store"})


@contextlib.asynccontextmanager
async def _store_errors() -> AsyncIterator[None]:
    try:
        yield
    except StoreUnavailable:
        raise GuardError(ErrorKind.STORE_UNAVAILABLE, "The budget store is unavailable; try again shortly.",
                         headers={"retry-after": "1"}) from None


async def own_budget(request: Request) -> Response:
    """The caller's tenant state, as ``GET /admin/tenants/{tenant}`` shows it."""
    services: Services = request.app.state.runtime.current.services
    tenant = await services.tenants.resolve(request.headers)
    async with _store_errors():
        (state,) = await read_states(services.ledger.store, services.config, [tenant], services.clock())
    return _json(state.as_json())


async def quote(request: Request) -> Response:
    """``{"endpoint": "/v1/chat/completions", "request": {...}}`` -> the decision admission would take."""
    generation: Generation = request.app.state.runtime.current  # one config throughout, even across a reload
    services = generation.services
    tenant = await services.tenants.resolve(request.headers)
    body = parse_json_object(await read_body(request, services.config.server.max_body_bytes))
    unknown = sorted(set(body) - set(QUOTE_FIELDS))
    if unknown:
        raise GuardError(ErrorKind.INVALID_FIELD, f"Unknown field {unknown[0]!r}; a quote takes 'endpoint' and "
                         "'request'.", param=unknown[0])
    endpoint = _endpoint(generation.endpoints, body.get("endpoint"))
    call = body.get("request")
    if not isinstance(call, dict):
        raise GuardError(ErrorKind.INVALID_FIELD if call is not None else ErrorKind.MISSING_FIELD,
                         "'request' must be the JSON object the endpoint would be sent.", param="request")
    async with _store_errors():
        quoted = await endpoint.quote(tenant, orjson.dumps(call), _Reading(services))
    return _json(quote_json(tenant, quoted))


def _endpoint(endpoints: dict[str, BudgetedEndpoint], value: Any) -> BudgetedEndpoint:
    paths = ", ".join(f"/v1/{path}" for path in endpoints)
    if not isinstance(value, str):
        raise GuardError(ErrorKind.MISSING_FIELD if value is None else ErrorKind.INVALID_FIELD,
                         f"'endpoint' must name a budgeted endpoint: one of {paths}.", param="endpoint")
    endpoint = endpoints.get(value.removeprefix("/v1/"))
    if endpoint is None:
        raise GuardError(ErrorKind.INVALID_FIELD, f"Unknown endpoint {value[:100]!r}: quotes are for {paths}.",
                         param="endpoint")
    return endpoint


class _Reading:
    """An ``Admit`` that reads the tenant's spend once, when first asked (so a bad body never waits on
    the store), and decides like admit.v2.lua without writing anything."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.admit: Admit | None = None

    async def __call__(self, tenant: str, worst_cases: Sequence[Micros], provisional: bool) -> Admission:
        if self.admit is None:
            ledger = self.services.ledger
            (snapshot,) = await ledger.store.snapshots([(tenant, ledger.periods(tenant))])
            limits = thresholds_in_force(Thresholds.for_policy(self.services.config.policy_for(tenant)),
                                         snapshot.override)
            self.admit = reading(snapshot.day.spent + snapshot.day.reserved,
                                 snapshot.month.spent + snapshot.month.reserved, limits)
        return await self.admit(tenant, worst_cases, provisional)


def quote_json(tenant: str, quoted: Quote) -> dict[str, Any]:
    """The quote's answer: the decision, the model, the worst case, and what is left before the call."""
    choice = quoted.choice
    decision, limits = choice.first.decision, choice.first.limits
    sent = None if choice.index is None else quoted.chain[choice.index]
    return {
        "object": "guardproxy.quote",
        "tenant": tenant,
        "allowed": sent is not None,
        "model": sent.name if sent is not None else None,
        "requested_model": quoted.request.model,
        "downgraded_from": quoted.request.model if sent is not None and sent is not quoted.chain[0] else None,
        "clamped_max_tokens": choice.clamped_tokens,
        "worst_case_usd": micros_to_usd(choice.worst_case),
        "prompt_tokens": quoted.prompt_tokens,
        "remaining_usd": {
            "day": micros_to_usd(max(0, limits.hard_day - decision.used_day)),
            "month": micros_to_usd(max(0, limits.hard_month - decision.used_month)),
        },
        "state": budget.state_of(decision.used_day, decision.used_month, limits),
        "reason": choice.reason,
    }


def agent_routes() -> list[Route]:
    """The routes, to be placed before the ``/v1/{path}`` catch-all."""
    return [
        Route("/v1/guardproxy/budget", own_budget, methods=["GET"]),
        Route("/v1/guardproxy/quote", quote, methods=["POST"]),
    ]
