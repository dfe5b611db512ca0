"""What a tenant's agents can ask with the key they already hold (same auth as ``/v1``):

- ``GET /v1/guardproxy/budget``: the caller's own budget state (the admin API's shape);
- ``POST /v1/guardproxy/quote``: what admission would decide now for a request body, with nothing
  reserved and no upstream call. It runs the budgeted endpoint's own steps (parse, price, estimate,
  ``choice.choose``) with ``budget.decide`` on a read of the store in place of the admission script,
  so a quote and the admission that follows it agree unless other spend lands in between: the same
  job cap (the job named by the quote request's own job header), the same per-minute limits, and the
  same ``state`` as the budget endpoint and the 429 (``blocked`` when the budget refuses the call).

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
from guardproxy.budget.fleet import key_fingerprint
from guardproxy.budget.levels import KeyBudget
from guardproxy.budget.pricing import micros_to_usd
from guardproxy.budget.records import Admission, Snapshot
from guardproxy.config.settings import hash_key
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.http import app_state
from guardproxy.http.auth import presented_key
from guardproxy.http.pipeline import BudgetedEndpoint, Quote
from guardproxy.http.requests import parse_json_object, read_body
from guardproxy.http.services import Services
from guardproxy.observe.state import effective_policy, read_states
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
    services = app_state.services(request)
    tenant = await services.tenants.resolve(request.headers)
    async with _store_errors():
        (state,) = await read_states(services.ledger.store, services.config, [tenant], services.clock())
    return _json(state.as_json())


async def quote(request: Request) -> Response:
    """``{"endpoint": "/v1/chat/completions", "request": {...}}`` -> the decision admission would take."""
    generation = app_state.runtime(request).current  # one config throughout, even across a reload
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
    key = presented_key(request.headers)
    read = _Reading(services, services.tenants.job_of(request.headers),
                    key_fingerprint(hash_key(key) if key else None), services.tenants.key_budget(request.headers))
    async with _store_errors():
        quoted = await endpoint.quote(tenant, orjson.dumps(call), read.for_models)
    limited = None
    if quoted.choice.index is not None and read.snapshot is not None:
        # The admission script checks the per-minute windows of an admitted call: so does the quote.
        call_tokens = quoted.prompt_tokens + max(endpoint.shape.worst_output_tokens(quoted.request, m)
                                                 for m in quoted.chain)
        limited = rate_limited(read.policy_rpm_tpm, read.snapshot, call_tokens)
    return _json(quote_json(tenant, quoted, refused=read.snapshot.refused if read.snapshot else False,
                            rate_limited=limited))


def rate_limited(limits: tuple[int, int], snapshot: Snapshot, call_tokens: int) -> str | None:
    """``requests`` or ``tokens`` when a call of ``call_tokens`` would pass a per-minute limit now."""
    rpm, tpm = limits
    if rpm > 0 and snapshot.window_requests + 1 > rpm:
        return budget.REQUESTS
    if tpm > 0 and (call_tokens > tpm or snapshot.window_tokens + call_tokens > tpm):
        return budget.TOKENS
    return None


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
    the store), and decides like admit.v5.lua without writing anything: at every level the call
    belongs to (the global cap, the tenant's hour and week, the caller's key ``key_id`` with its
    ``key_budget``, the chain's models)."""

    def __init__(
        self, services: Services, job: str = "", key_id: str = "", key_budget: KeyBudget | None = None,
    ) -> None:
        self.services = services
        self.job = job
        self.key_id = key_id
        self.key_budget = key_budget
        self.models: Sequence[str] = ()
        self.admit: Admit | None = None
        self.snapshot: Snapshot | None = None
        self.policy_rpm_tpm = (0, 0)

    def for_models(self, models: Sequence[str]) -> Admit:
        """This reading, for a call whose downgrade chain is ``models``."""
        self.models = models
        return self

    async def __call__(self, tenant: str, worst_cases: Sequence[Micros], provisional: bool, tiers: Sequence[int]
                       ) -> Admission:
        if self.admit is None:
            ledger = self.services.ledger
            (snapshot,) = await ledger.store.snapshots([(tenant, ledger.periods(tenant))])
            base = self.services.config.policy_for(tenant)
            limits = thresholds_in_force(Thresholds.for_policy(base), snapshot.override)
            policy = effective_policy(base, snapshot.override)  # an override's job cap and limits win
            self.policy_rpm_tpm = (policy.rpm, policy.tpm)
            job_room = None
            if self.job and policy.job_micros is not None:
                job_room = max(0, policy.job_micros - await ledger.store.job_spent(tenant, self.job))
            self.snapshot = snapshot
            levels = ledger.level_args(tenant, self.models, self.key_id, self.key_budget, policy)
            used = [spent + held for spent, held in await ledger.store.level_usage(tenant, levels.caps)]
            self.admit = reading(snapshot.day.spent + snapshot.day.reserved,
                                 snapshot.month.spent + snapshot.month.reserved, limits, job_room,
                                 policy.job_micros if self.job else None, levels, used)
        return await self.admit(tenant, worst_cases, provisional, tiers)


def quote_json(tenant: str, quoted: Quote, *, refused: bool = False, rate_limited: str | None = None
               ) -> dict[str, Any]:
    """The quote's answer: the decision, the model, the worst case, and what is left before the call.

    ``refused``: the store's blocked flag (as the budget endpoint reads it); ``rate_limited``: the
    per-minute limit (``requests`` or ``tokens``) the call would pass."""
    choice = quoted.choice
    decision, limits = choice.first.decision, choice.first.limits
    sent = None if choice.index is None or rate_limited else quoted.chain[choice.index]
    budget_refused = choice.index is None and choice.deciding.decision.exhausted in ("day", "month")
    reason = f"rate_limited_{rate_limited}" if rate_limited else choice.reason
    # Every cap of the model it would be sent to (refused: the requested one), the tenant's day and month
    # included: what is left of each, the tightest, and the level that refuses the call.
    model = (sent or quoted.chain[0]).name
    caps = [("tenant", "day", limits.hard_day, decision.used_day),
            ("tenant", "month", limits.hard_month, decision.used_month),
            *((cap.level, cap.window, cap.hard, used) for cap, used in choice.first.levels if cap.binds(model))]
    levels = [{"level": level, "window": window, "limit_usd": micros_to_usd(hard),
               "remaining_usd": micros_to_usd(max(0, hard - used))} for level, window, hard, used in caps]
    tightest = levels[min(range(len(caps)), key=lambda i: caps[i][2] - caps[i][3])]
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
        # The budget refusing this call makes the tenant blocked, as the 429 says (budget.state_of).
        "levels": levels,
        "tightest": tightest,
        "refused_by": _refused_by(choice.deciding) if choice.index is None else None,
        "state": budget.state_of(decision.used_day, decision.used_month, limits, refused or budget_refused),
        "reason": reason,
    }


def _refused_by(admission: Admission) -> dict[str, str] | None:
    """The level and window that refuse the call (as the 429's ``x-guardproxy-budget-level`` names it)."""
    cap = admission.refused_by
    if cap is not None:
        return {"level": cap.level, "window": cap.window}
    exhausted = admission.decision.exhausted
    if exhausted == "job":
        return {"level": "job", "window": "job"}
    return {"level": "tenant", "window": exhausted or "day"}


def agent_routes() -> list[Route]:
    """The routes, to be placed before the ``/v1/{path}`` catch-all."""
    return [
        Route("/v1/guardproxy/budget", own_budget, methods=["GET"]),
        Route("/v1/guardproxy/quote", quote, methods=["POST"]),
    ]
