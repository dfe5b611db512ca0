"""Spend made elsewhere (a batch job, another provider), booked against a tenant's budget:
``POST /admin/tenants/{tenant}/spend``.

The charge goes through the settle script like a call's, as a settlement of the id
``ext:<sha256 of the idempotency key>`` with nothing reserved: it lands on the tenant's current day
and month and in its call log (``outcome: external``) in one atomic step, and the script's
settled-marker makes a second booking of the same key charge nothing. The marker lives under the
day of the booking, so the day a key was first booked on is remembered beside it (as long as the
marker, 40 days): a replay on a later day finds the first day's marker and charges nothing either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.admin.api import tenant_state
from guardproxy.admin.auth import check_admin
from guardproxy.budget.pricing import MICROS_PER_USD, Usage, lookup_model, micros_to_usd
from guardproxy.budget.records import Outcome, Reservation
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable
from guardproxy.http import app_state
from guardproxy.http.auth import valid_tenant
from guardproxy.http.requests import read_body
from guardproxy.http.services import Services
from guardproxy.store.ledger import CallRecord
from guardproxy.types import Micros

#: One booking may not exceed a billion USD (and stays exact in the scripts' Lua numbers).
MAX_COST_MICROS = 10**15
MAX_TOKENS = 10**12
MAX_BODY_BYTES = 64 * 1024
FIELDS = ("cost_usd", "cost_micros", "description", "idempotency_key", "model", "prompt_tokens",
          "completion_tokens")
#: The metrics' model label of spend whose model is not one this proxy prices.
EXTERNAL_MODEL_LABEL = "external"
_PLAIN_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]+)?$")


@dataclass(frozen=True)
class ExternalSpend:
    """One validated booking."""

    cost_micros: Micros
    description: str
    idempotency_key: str
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def reservation_id(self) -> str:
        """The id the settle script marks as settled: one per idempotency key (and tenant)."""
        return "ext:" + hashlib.sha256(self.idempotency_key.encode()).hexdigest()

    @property
    def request_id(self) -> str:
        """The booking's id in the call log."""
        return "ext_" + self.reservation_id[4:36]


def parse_external_spend(raw: bytes) -> ExternalSpend:
    """Validate a booking body. Money is read as exact decimals (never a binary float) and a
    ``cost_usd`` is rounded up to whole micro-USD, as prices are."""
    try:
        body = json.loads(raw, parse_float=Decimal, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise GuardError(ErrorKind.INVALID_JSON, "The body must be a JSON object.") from None
    if not isinstance(body, dict):
        raise GuardError(ErrorKind.INVALID_JSON, "The body must be a JSON object.")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise _invalid(unknown[0], f"Unknown field {unknown[0]!r}; allowed: {', '.join(FIELDS)}.")
    if ("cost_usd" in body) == ("cost_micros" in body):
        raise GuardError(ErrorKind.MISSING_FIELD, "Give the amount as exactly one of 'cost_usd' or 'cost_micros'.",
                         param="cost_usd")
    cost = _cost_micros(body["cost_usd"]) if "cost_usd" in body else _whole(body, "cost_micros", MAX_COST_MICROS)
    return ExternalSpend(
        cost_micros=cost,
        description=_text(body, "description", 1000, required=True) or "",
        idempotency_key=_text(body, "idempotency_key", 255, required=True) or "",
        model=_text(body, "model", 200, required=False),
        prompt_tokens=_whole(body, "prompt_tokens", MAX_TOKENS, default=0),
        completion_tokens=_whole(body, "completion_tokens", MAX_TOKENS, default=0),
    )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _cost_micros(value: Any) -> Micros:
    if isinstance(value, str) and _PLAIN_DECIMAL.match(value.strip()):
        value = Decimal(value.strip())
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise _invalid("cost_usd", "'cost_usd' must be a number of US dollars, e.g. 0.25.")
    try:
        micros = (Decimal(value) * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING)
    except ArithmeticError:  # decimal's Overflow and InvalidOperation
        raise _invalid("cost_usd", "'cost_usd' must be a finite number.") from None
    if not 0 <= micros <= MAX_COST_MICROS:
        raise _invalid("cost_usd", f"'cost_usd' must be from 0 to {MAX_COST_MICROS // MICROS_PER_USD}.")
    return int(micros)


def _whole(body: dict[str, Any], name: str, maximum: int, default: int | None = None) -> int:
    value = body.get(name)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise _invalid(name, f"'{name}' must be a whole number from 0 to {maximum}.")
    return value


def _text(body: dict[str, Any], name: str, max_length: int, *, required: bool) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > max_length:
        raise GuardError(ErrorKind.MISSING_FIELD if value is None else ErrorKind.INVALID_FIELD,
                         f"'{name}' must be a non-empty string of at most {max_length} characters.", param=name)
    return value


def _invalid(name: str, message: str) -> GuardError:
    return GuardError(ErrorKind.INVALID_FIELD, message, param=name)


@contextlib.asynccontextmanager
async def _store_errors() -> AsyncIterator[None]:
    try:
        yield
    except StoreUnavailable:
        # Nothing is journalled: the caller retries with the same key, and is charged once.
        raise GuardError(ErrorKind.STORE_UNAVAILABLE, "The budget store is unavailable; nothing was booked. "
                         "Retry with the same idempotency_key.", headers={"retry-after": "1"}) from None


async def post_spend(request: Request) -> Response:
    """Book spend made elsewhere: 201 when charged, 200 for a replay of an idempotency key (charged
    before, nothing changed), 409 when a replay names a different amount."""
    services = app_state.services(request)
    check_admin(request, services)
    tenant = valid_tenant(request.path_params["tenant"])
    spend = parse_external_spend(await read_body(request, MAX_BODY_BYTES))
    async with _store_errors():
        charged, replayed, day = await _book(services, tenant, spend)
        state = await tenant_state(services, tenant)
    if replayed and charged is not None and charged != spend.cost_micros:
        raise GuardError(ErrorKind.IDEMPOTENCY_CONFLICT,
                         f"This idempotency_key was already used for {charged} micro-USD, not "
                         f"{spend.cost_micros}; nothing was booked.", param="idempotency_key")
    if not replayed:
        entry = lookup_model(spend.model, services.config.models) if spend.model else None
        label = entry.name if entry is not None else EXTERNAL_MODEL_LABEL
        usage = Usage(spend.prompt_tokens, spend.completion_tokens)
        services.metrics.record_settled(tenant, label, usage, spend.cost_micros)
    payload = {
        "object": "guardproxy.external_spend", "tenant": tenant, "request_id": spend.request_id,
        "replayed": replayed, "charged_micros": charged, "charged_usd": None if charged is None else
        micros_to_usd(charged), "day": day, "budget": state.as_json(),
    }
    return Response(orjson.dumps(payload), 200 if replayed else 201, media_type="application/json")


async def _book(services: Services, tenant: str, spend: ExternalSpend) -> tuple[Micros | None, bool, str]:
    """Charge ``spend`` once: (what its key was charged, whether this was a replay, the day charged).
    The charge of a replay is ``None`` if its marker has gone."""
    store, periods = services.ledger.store, services.ledger.periods(tenant)
    rid = spend.reservation_id
    await store.register_tenant(tenant)
    first_day = await store.booking_day(tenant, rid, periods.day)
    if first_day != periods.day:
        earlier = await store.settled_charge(tenant, first_day, rid)
        if earlier is not None:
            return earlier, True, first_day
        # Remembered, but never settled on that day (the booking failed midway): book it today.
        await store.move_booking_day(tenant, rid, periods.day)
    record: CallRecord = {
        "request_id": spend.request_id, "requested_model": spend.model or "", "model": spend.model or "",
        "prompt_tokens": spend.prompt_tokens, "completion_tokens": spend.completion_tokens, "cached_tokens": 0,
        "cost_micros": spend.cost_micros, "outcome": Outcome.EXTERNAL.value, "description": spend.description,
        "day": periods.day,  # the budget day charged, for the chargeback export
    }
    # Its threshold alerts fire like a call's: external spend counts towards the same budget.
    # Every level it belongs to is charged too (global, the tenant's hour and week, its model's caps).
    entry = lookup_model(spend.model, services.config.models) if spend.model else None
    levels = services.ledger.charge_levels(tenant, entry.name if entry is not None else "")
    settlement = await store.settle(Reservation(rid, tenant, periods.day, periods.month, 0, levels=levels),
                                    spend.cost_micros, record, services.ledger.alert_args(tenant))
    if settlement.applied:
        return spend.cost_micros, False, periods.day
    return await store.settled_charge(tenant, periods.day, rid), True, periods.day


def external_routes() -> list[Route]:
    return [Route("/admin/tenants/{tenant}/spend", post_spend, methods=["POST"])]
