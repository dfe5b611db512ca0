"""The ASGI application: ``create_app(config)`` builds it, its lifespan builds what requests need."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy import tokens
from guardproxy.admin import admin_routes
from guardproxy.agent_api import agent_routes
from guardproxy.auth import JobTenantResolver
from guardproxy.config import Config, load_config
from guardproxy.cors import cors_middleware
from guardproxy.endpoints import BUDGETED
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable, error_body
from guardproxy.external import external_routes
from guardproxy.journal import Journal
from guardproxy.keys import KeyRing
from guardproxy.ledger import Ledger
from guardproxy.metrics import Metrics
from guardproxy.periods import utc_now
from guardproxy.pipeline import Services
from guardproxy.reload import SighupReloader
from guardproxy.runtime import Runtime
from guardproxy.servicetitan.resolver import ServiceTitanResolver
from guardproxy.state import all_tenants, read_states
from guardproxy.store import BudgetStore

log = logging.getLogger("guardproxy")

CONFIG_ENV = "GUARDPROXY_CONFIG"


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def error_response(exc: GuardError) -> Response:
    headers = {"x-request-id": f"req_gp_{uuid.uuid4().hex}", **exc.headers}
    return Response(exc.body(), exc.status, headers=headers, media_type="application/json")


async def _store_problem(services: Services) -> str | None:
    try:
        await services.ledger.store.check_writable()
    except StoreUnavailable as exc:
        return str(exc) or "unreachable"
    return None


async def _journal_problem(services: Services) -> str | None:
    ledger = services.ledger
    if ledger.journal_growing():
        return f"{ledger.journal_pending()} settlements wait in the journal and the store refuses them"
    return None


#: What /readyz checks, each naming its problem or None: the store takes writes (a primary with its
#: replicas, every cluster slot served) and the journal of unwritten charges is not growing.
READINESS_CHECKS: dict[str, Callable[[Services], Awaitable[str | None]]] = {
    "store": _store_problem, "journal": _journal_problem,
}


async def readiness_problems(services: Services) -> dict[str, str]:
    """Why this replica should get no traffic now (empty when ready), by check name."""
    problems = {}
    for name, check in READINESS_CHECKS.items():
        problem = await check(services)
        if problem is not None:
            problems[name] = problem
    return problems


def create_app(
    config: Config,
    *,
    store: BudgetStore | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    jobs: JobTenantResolver | None = None,
    clock: Callable[[], datetime] = utc_now,
    config_path: str | Path | None = None,
) -> Starlette:
    """The proxy for ``config``. ``store``, ``upstream_transport``, ``jobs`` and ``clock`` are for tests.

    ``config_path``: the file ``config`` came from, re-read on SIGHUP and ``POST /admin/reload``.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        budget_store = store or BudgetStore.from_config(config.store)
        if budget_store.embedded:
            log.warning("store: embedded in-process store; spend is neither persisted nor shared between "
                        "processes. Set store.redis_url for production.")
        for warning in config.warnings:
            log.warning("config: %s", warning)
        try:
            await budget_store.ping()
        except StoreUnavailable:
            log.error("store: Redis is unreachable at start-up; /readyz answers 503 until it is back")
        await anyio.to_thread.run_sync(tokens.warm_up)
        servicetitan = None
        if jobs is None and config.servicetitan is not None:
            lookups = app.state.metrics.servicetitan_lookups
            servicetitan = ServiceTitanResolver(
                config.servicetitan, budget_store, lambda result: lookups.labels(result).inc()
            )
        tracing = None
        if config.telemetry.enabled:
            from guardproxy.telemetry import Tracing  # imports OpenTelemetry: only when configured

            tracing = Tracing(config.telemetry)
        metrics: Metrics = app.state.metrics
        journal = None if budget_store.embedded else Journal(config.store.journal_path(), metrics.journal_pending.set)
        metrics.journal_pending.set(0)
        ledger = Ledger(budget_store, config, clock, journal, on_duplicate=metrics.duplicate_settlements.inc)
        runtime = Runtime(
            config, ledger=ledger, metrics=metrics, clock=clock,
            keyring=KeyRing(budget_store, clock), jobs=jobs or servicetitan, upstream_transport=upstream_transport,
            config_path=config_path, tracing=tracing,
        )
        app.state.runtime = runtime
        reloads = SighupReloader(runtime)
        try:
            async with ledger.running():  # journal replay, lease renewal, and a last drain on the way out
                yield
        finally:
            reloads.close()
            await runtime.aclose()
            if tracing is not None:
                await anyio.to_thread.run_sync(tracing.shutdown)
            if servicetitan is not None:
                await servicetitan.aclose()
            if store is None:
                await budget_store.aclose()

    def budgeted(path: str) -> Route:
        async def endpoint(request: Request) -> Response:
            response: Response = await request.app.state.runtime.current.endpoints[path](request)
            return response

        return Route(f"/v1/{path}", endpoint, methods=["POST"])

    async def models(request: Request) -> Response:
        services: Services = request.app.state.runtime.current.services
        await services.tenants.authenticate(request.headers)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": m.upstream}
                for name, m in services.config.models.items()]
        return _json({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(request: Request) -> Response:
        problems = await readiness_problems(request.app.state.runtime.current.services)
        if problems:
            return _json({"status": "unavailable", **problems}, 503)
        return _json({"status": "ready"})

    async def metrics(request: Request) -> Response:
        services: Services = request.app.state.runtime.current.services
        store = services.ledger.store
        try:
            states = await read_states(store, services.config, await all_tenants(store, services.config), clock())
        except StoreUnavailable:
            log.warning("metrics: budget store unreachable; scrape has no budget gauges")
            states = []
        return Response(app.state.metrics.render(states), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def unbudgeted(request: Request) -> Response:
        response: Response = await request.app.state.runtime.current.unbudgeted(request)
        return response

    async def on_guard_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GuardError)
        level = exc.kind.value.log_level
        log.log(level, "%s %s -> %d %s", request.method, request.url.path, exc.status, exc.code)
        return error_response(exc)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = ErrorKind.METHOD_NOT_ALLOWED if exc.status_code == 405 else ErrorKind.NOT_FOUND
        message = f"{request.method} is not supported on {request.url.path}." if exc.status_code == 405 else \
            f"Unknown request URL: {request.method} {request.url.path}."
        return error_response(GuardError(kind, message))

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        body = error_body("The proxy hit an internal error.", "server_error", "internal_error")
        return Response(body, 500, media_type="application/json",
                        headers={"x-request-id": f"req_gp_{uuid.uuid4().hex}"})

    app = Starlette(
        routes=[
            *(budgeted(shape.path) for shape in BUDGETED),
            Route("/v1/models", models, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *admin_routes(),
            *agent_routes(),
            *external_routes(),
            Route("/v1/{path:path}", unbudgeted, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ],
        exception_handlers={GuardError: on_guard_error, HTTPException: on_http_error, Exception: on_unexpected},
        lifespan=lifespan,
        middleware=cors_middleware(config.server),
    )
    app.state.metrics = Metrics()
    app.state.config = config
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` worker processes: the config path comes from the environment."""
    path = os.environ.get(CONFIG_ENV, "proxy.yaml")
    return create_app(load_config(path), config_path=path)
