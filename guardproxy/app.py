"""The ASGI application: ``create_app(config)`` builds it, its lifespan builds what requests need."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
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
from guardproxy.auth import JobTenantResolver, TenantResolver
from guardproxy.config import Config, load_config
from guardproxy.endpoints import BUDGETED
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable, error_body
from guardproxy.ledger import Ledger
from guardproxy.metrics import Metrics
from guardproxy.passthrough import UnbudgetedPaths
from guardproxy.periods import utc_now
from guardproxy.pipeline import BudgetedEndpoint, Services
from guardproxy.servicetitan.resolver import ServiceTitanResolver
from guardproxy.state import all_tenants, read_states
from guardproxy.store import BudgetStore
from guardproxy.upstream import build_upstreams

log = logging.getLogger("guardproxy")

CONFIG_ENV = "GUARDPROXY_CONFIG"


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


def error_response(exc: GuardError) -> Response:
    headers = {"x-request-id": f"req_gp_{uuid.uuid4().hex}", **exc.headers}
    return Response(exc.body(), exc.status, headers=headers, media_type="application/json")


def create_app(
    config: Config,
    *,
    store: BudgetStore | None = None,
    upstream_transport: httpx.AsyncBaseTransport | None = None,
    jobs: JobTenantResolver | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> Starlette:
    """The proxy for ``config``. ``store``, ``upstream_transport``, ``jobs`` and ``clock`` are for tests."""

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
        await anyio.to_thread.run_sync(tokens.warm_up, list(config.models))
        breaker_state = app.state.metrics.breaker_state
        upstreams = build_upstreams(
            config.upstreams, upstream_transport, lambda name, state: breaker_state.labels(name).set(state)
        )
        for name in upstreams:
            breaker_state.labels(name).set(0)
        servicetitan = None
        if jobs is None and config.servicetitan is not None:
            lookups = app.state.metrics.servicetitan_lookups
            servicetitan = ServiceTitanResolver(
                config.servicetitan, budget_store, lambda result: lookups.labels(result).inc()
            )
        services = Services(
            config=config, ledger=Ledger(budget_store, config, clock), upstreams=upstreams,
            tenants=TenantResolver(config, jobs or servicetitan), metrics=app.state.metrics, clock=clock,
        )
        app.state.services = services
        app.state.endpoints = {shape.path: BudgetedEndpoint(services, shape) for shape in BUDGETED}
        app.state.unbudgeted = UnbudgetedPaths(services)
        try:
            yield
        finally:
            for upstream in upstreams.values():
                await upstream.aclose()
            if servicetitan is not None:
                await servicetitan.aclose()
            if store is None:
                await budget_store.aclose()

    def budgeted(path: str) -> Route:
        async def endpoint(request: Request) -> Response:
            response: Response = await request.app.state.endpoints[path](request)
            return response

        return Route(f"/v1/{path}", endpoint, methods=["POST"])

    async def models(request: Request) -> Response:
        request.app.state.services.tenants.authenticate(request.headers)
        data = [{"id": name, "object": "model", "created": 0, "owned_by": m.upstream}
                for name, m in config.models.items()]
        return _json({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return _json({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await request.app.state.services.ledger.store.ping()
        except StoreUnavailable:
            return _json({"status": "unavailable", "store": "unreachable"}, 503)
        return _json({"status": "ready"})

    async def metrics(request: Request) -> Response:
        services: Services = request.app.state.services
        store = services.ledger.store
        try:
            states = await read_states(store, config, await all_tenants(store, config), clock())
        except StoreUnavailable:
            log.warning("metrics: budget store unreachable; scrape has no budget gauges")
            states = []
        return Response(app.state.metrics.render(states), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def unbudgeted(request: Request) -> Response:
        response: Response = await request.app.state.unbudgeted(request)
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
            Route("/v1/{path:path}", unbudgeted, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ],
        exception_handlers={GuardError: on_guard_error, HTTPException: on_http_error, Exception: on_unexpected},
        lifespan=lifespan,
    )
    app.state.metrics = Metrics()
    app.state.config = config
    return app


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` worker processes: the config path comes from the environment."""
    return create_app(load_config(os.environ.get(CONFIG_ENV, "proxy.yaml")))
