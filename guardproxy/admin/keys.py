"""The admin API for runtime tenant keys: create (shown once), list (never the key), revoke."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.admin.auth import check_admin
from guardproxy.budget.levels import WINDOW_FIELDS
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http import app_state
from guardproxy.http.auth import valid_tenant
from guardproxy.http.requests import parse_json_object, read_body
from guardproxy.http.services import Services
from guardproxy.store.keys import NAME_MAX, KeyRing, key_budget_from_json, parse_expiry


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json",
                    headers={"cache-control": "no-store"})


def _ring(request: Request) -> tuple[KeyRing, Services, str]:
    runtime = app_state.runtime(request)
    services = runtime.current.services
    check_admin(request, services)
    return runtime.keyring, services, valid_tenant(request.path_params["tenant"])


async def create_key(request: Request) -> Response:
    """``{"name": ..., "expires_at": optional ISO 8601, "hourly_usd" / "daily_usd" / "weekly_usd" /
    "monthly_usd": optional caps of the key's own spend, "models": optional allowed model ids}`` -> 201
    with the key, which is never shown again."""
    ring, services, tenant = _ring(request)
    body = parse_json_object(await read_body(request, 16 * 1024))
    allowed = ("name", "expires_at", *WINDOW_FIELDS.values(), "models")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise GuardError(ErrorKind.INVALID_FIELD, f"Unknown field {unknown[0]!r}; allowed: {', '.join(allowed)}.",
                         param=unknown[0])
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        raise GuardError(ErrorKind.MISSING_FIELD, "name is required: a label for the key, e.g. the contractor.",
                         param="name")
    if len(name.strip()) > NAME_MAX:
        raise GuardError(ErrorKind.INVALID_FIELD, f"name must be at most {NAME_MAX} characters.", param="name")
    try:
        expires_at = parse_expiry(body.get("expires_at"), services.clock())
    except ValueError as exc:
        raise GuardError(ErrorKind.INVALID_FIELD, str(exc), param="expires_at") from None
    try:
        budget = key_budget_from_json(body)
    except ValueError as exc:
        raise GuardError(ErrorKind.INVALID_FIELD, str(exc), param=str(exc).split(" ", 1)[0]) from None
    unknown_models = [m for m in (budget.models if budget else ()) if m not in services.config.models]
    if unknown_models:
        raise GuardError(ErrorKind.INVALID_FIELD, f"models: {unknown_models[0][:64]!r} is not a configured model.",
                         param="models")
    key, info = await ring.create(tenant, name.strip(), expires_at, budget)
    return _json({"key": key, **info.as_json()}, 201)


async def list_keys(request: Request) -> Response:
    ring, _, tenant = _ring(request)
    return _json({"object": "list", "tenant": tenant, "data": [k.as_json() for k in await ring.list(tenant)]})


async def revoke_key(request: Request) -> Response:
    ring, _, tenant = _ring(request)
    key_id = request.path_params["key_id"]
    info = await ring.revoke(tenant, key_id)
    if info is None:
        raise GuardError(ErrorKind.NOT_FOUND, f"Tenant {tenant!r} has no key {key_id[:64]!r}.")
    return _json({**info.as_json(), "revoked": True})


def key_routes() -> list[Route]:
    return [
        Route("/admin/tenants/{tenant}/keys", create_key, methods=["POST"]),
        Route("/admin/tenants/{tenant}/keys", list_keys, methods=["GET"]),
        Route("/admin/tenants/{tenant}/keys/{key_id}", revoke_key, methods=["DELETE"]),
    ]
