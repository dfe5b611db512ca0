"""Admin routes about the store itself (``store_health``): its state, and acknowledging a reset.

``GET /admin/store``: what the watcher knows (eviction policy, persistence, an unacknowledged reset).
``POST /admin/store/acknowledge-reset`` (JSON body, e.g. ``{}``): after the spend of the lost data was
rebuilt (docs/operations.md), every replica admits again within ``MARKER_CHECK_S``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.admin.auth import check_admin
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http import app_state
from guardproxy.http.services import Services
from guardproxy.store.health import StoreHealth


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def _health(request: Request) -> tuple[Services, StoreHealth]:
    services = app_state.services(request)
    check_admin(request, services)
    health = services.ledger.health
    if health is None:
        raise GuardError(ErrorKind.NOT_FOUND, "The embedded store is not watched: it lives in this process only.")
    return services, health


def health_json(health: StoreHealth) -> dict[str, Any]:
    return {
        "admitting": health.refusal() is None, "refusal": health.refusal(), "reset": health.reset,
        "evicting_policy": health.evicting, "no_persistence": health.unpersisted, "warnings": health.notes(),
        "marker": health.known_marker, "run_ids": health.run_ids,
    }


async def store_state(request: Request) -> Response:
    _, health = _health(request)
    return _json(health_json(health))


async def acknowledge(request: Request) -> Response:
    _, health = _health(request)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise GuardError(ErrorKind.INVALID_FIELD, "Send a JSON body (Content-Type: application/json), e.g. {}.")
    was = health.reset
    marker = await health.acknowledge_reset()
    await health.check()
    return _json({"acknowledged": was, "marker": marker, **health_json(health)})


def store_routes() -> list[Route]:
    return [
        Route("/admin/store", store_state, methods=["GET"]),
        Route("/admin/store/acknowledge-reset", acknowledge, methods=["POST"]),
    ]
