"""The ASGI application: ``create_app(config)`` builds it, its lifespan builds what requests need."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route, request_response
from starlette.types import Receive, Scope, Send

from guardproxy.admin import preflight
from guardproxy.admin.api import admin_routes
from guardproxy.admin.external import external_routes
from guardproxy.admin.reload import SighupReloader, catch_early_sighup
from guardproxy.admin.store import store_routes
from guardproxy.budget import tokens
from guardproxy.budget.periods import utc_now
from guardproxy.config.settings import Config, hash_key, load_config
from guardproxy.errors import ErrorKind, GuardError, StoreUnavailable, error_body, new_request_id
from guardproxy.http import app_state, workers
from guardproxy.http.agent_api import agent_routes
from guardproxy.http.app_state import AppState
from guardproxy.http.auth import JobTenantResolver
from guardproxy.http.batches import BatchPoller
from guardproxy.http.cors import cors_middleware
from guardproxy.http.endpoints import BUDGETED
from guardproxy.http.errors import as_guard_error
from guardproxy.http.errors import error_response as error_response
from guardproxy.http.models import model_object
from guardproxy.http.models import retrieve as retrieve_model
from guardproxy.http.objects import LISTED, STORED_ANSWERS
from guardproxy.http.paths import EntryGuard
from guardproxy.http.runtime import Runtime
from guardproxy.http.services import Services
from guardproxy.observe.alerts import AlertSender
from guardproxy.observe.metrics import Metrics
from guardproxy.observe.state import listed_tenants, read_states
from guardproxy.servicetitan.resolver import ServiceTitanResolver
from guardproxy.store.health import PROBLEMS, StoreHealth
from guardproxy.store.journal import Journal
from guardproxy.store.keys import KeyRing
from guardproxy.store.ledger import Ledger
from guardproxy.store.redis import BudgetStore
from guardproxy.store.sweeper import Sweeper

log = logging.getLogger("guardproxy")

CONFIG_ENV = "GUARDPROXY_CONFIG"
#: Calls per tenant a scrape's projections are taken from (the admin API takes forecast.SAMPLE_CALLS).
METRICS_SAMPLE_CALLS = 20


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


class AnyMethod:
    """An endpoint as an ASGI app, so that its route matches every method (``only`` then decides)."""

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self.app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def only(methods: tuple[str, ...], request: Request) -> None:
    """405 in OpenAI's shape, with ``allow``, unless the request uses one of ``methods``."""
    if request.method not in methods:
        raise GuardError(ErrorKind.METHOD_NOT_ALLOWED, f"{request.method} is not supported on {request.url.path}.",
                         headers={"allow": ", ".join(methods)})


async def _store_problem(services: Services) -> str | None:
    try:
        await services.ledger.store.check_writable()
    except StoreUnavailable as exc:
        return str(exc) or "unreachable"
    return None


async def _journal_problem(services: Services) -> str | None:
    ledger = services.ledger
    problem = await ledger.journal_problem()
    if problem is not None:
        return problem
    if ledger.journal_growing():
        return f"{ledger.journal_pending()} settlements wait in the journal and the store refuses them"
    return None


async def _safety_problem(services: Services) -> str | None:
    health = services.ledger.health
    return health.refusal() if health is not None else None


#: What /readyz checks, each naming its problem or None: the store takes writes (a primary with its
#: replicas, every cluster slot served), the journal of unwritten charges can be written and is not growing,
#: and the store can be trusted with budgets (no evicting policy, no unacknowledged reset: ``store_health``).
READINESS_CHECKS: dict[str, Callable[[Services], Awaitable[str | None]]] = {
    "store": _store_problem, "journal": _journal_problem, "store_safety": _safety_problem,
}


async def readiness_problems(services: Services) -> dict[str, str]:
    """Why this replica should get no traffic now (empty when ready), by check name."""
    problems = {}
    for name, check in READINESS_CHECKS.items():
        problem = await check(services)
        if problem is not None:
            problems[name] = problem
    return problems


@contextlib.asynccontextmanager
async def lifespan(
    app: Starlette, *, config: Config, store: BudgetStore | None, jobs: JobTenantResolver | None,
    clock: Callable[[], datetime], config_path: str | Path | None,
) -> AsyncIterator[Mapping[str, AppState]]:
    """Builds what requests need, yields it as the lifespan state (``app_state``), and closes it all."""
    budget_store = store or BudgetStore.from_config(config.store)
    # An unwritable journal or a missing otel extra stops the start, saying how to fix it.
    preflight.check_local(config, journal=not budget_store.embedded)
    if budget_store.embedded:
        log.info("store: SQLite file %s (shared by the processes of this machine; docs/store.md says "
                 "when to move to Redis)", config.store.sqlite_path())
    for warning in config.warnings:
        log.warning("config: %s", warning)
    try:
        await budget_store.ping()
    except StoreUnavailable:
        log.error("store: the store is unreachable at start-up; /readyz answers 503 until it is back")
    await anyio.to_thread.run_sync(tokens.warm_up, list(config.models))
    metrics = Metrics()
    servicetitan = None
    if jobs is None and config.servicetitan is not None:
        lookups = metrics.servicetitan_lookups
        servicetitan = ServiceTitanResolver(
            config.servicetitan, budget_store, lambda result: lookups.labels(result).inc()
        )
    tracing = None
    if config.telemetry.enabled:
        from guardproxy.observe.telemetry import Tracing  # imports OpenTelemetry: only when configured

        tracing = Tracing(config.telemetry)
    journal = Journal(config.store.journal_path(), metrics.journal_pending.set)
    metrics.journal_pending.set(0)
    ledger = Ledger(budget_store, config, clock, journal, on_duplicate=metrics.duplicate_settlements.inc,
                    on_velocity=lambda tenant: metrics.velocity_alerts.labels(tenant).inc())
    runtime = Runtime(
        config, ledger=ledger, metrics=metrics, clock=clock,
        keyring=KeyRing(budget_store, clock), jobs=jobs or servicetitan, config_path=config_path, tracing=tracing,
    )
    for problem in PROBLEMS:
        metrics.store_problem.labels(problem).set(0)
    health: StoreHealth | contextlib.nullcontext[None] = contextlib.nullcontext()
    if not budget_store.embedded:
        ledger.health = health = StoreHealth(
            budget_store, marker_file=config.store.journal_path() / "store-marker",
            store_url=config.store.redis_url,
            refuse_evicting=lambda: runtime.current.services.config.store.on_evicting_policy == "refuse",
            on_problem=lambda problem, active: metrics.store_problem.labels(problem).set(int(active)),
        )
        with contextlib.suppress(StoreUnavailable):
            await budget_store.migrate_tenant_set()
    sweeper: Sweeper | contextlib.nullcontext[None] = contextlib.nullcontext()
    if not budget_store.embedded:
        sweeper = Sweeper(budget_store, lambda: runtime.current.services.config)
    reloads = SighupReloader(runtime)
    poller = BatchPoller(lambda: runtime.current.services)  # settles batches that ended
    counted = metrics.alerts
    # Follows the current config: webhooks and thresholds apply on reload, like budgets.
    alerts = AlertSender(budget_store, lambda: runtime.current.services.config,
                         lambda event, result: counted.labels(event, result).inc())
    try:
        # journal replay, lease renewal and a last drain on the way out; alert delivery
        async with (health.running() if isinstance(health, StoreHealth) else health), ledger.running(), \
                alerts.running(), (sweeper.running() if isinstance(sweeper, Sweeper) else sweeper), \
                poller.running():
            yield AppState(runtime, config).as_lifespan_state()
    finally:
        reloads.close()
        workers.withdraw()
        await runtime.aclose()
        if tracing is not None:
            await anyio.to_thread.run_sync(tracing.shutdown)
        if servicetitan is not None:
            await servicetitan.aclose()
        if store is None:
            await budget_store.aclose()


# --- Route handlers: each reads what it needs from the request's app state (``app_state.services``). ---


async def budgeted(path: str, request: Request) -> Response:
    """``/v1/<path>`` of a budgeted shape, every method: a budgeted path is never served by the passthrough."""
    if request.method == "GET" and path in LISTED:  # the stored chat completions' list
        return await stored(request)
    only(("POST", "GET") if path in LISTED else ("POST",), request)
    return await app_state.runtime(request).current.endpoints[path](request)


async def models(request: Request) -> Response:
    only(("GET", "HEAD"), request)
    services = app_state.services(request)
    await services.tenants.authenticate(request.headers)
    data = [model_object(name, m) for name, m in services.config.models.items()]
    return _json({"object": "list", "data": data})


async def model(request: Request) -> Response:
    only(("GET", "HEAD"), request)
    services = app_state.services(request)
    await services.tenants.authenticate(request.headers)
    return _json(retrieve_model(request.path_params["model"], services.config.models))


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    services = app_state.services(request)
    problems = await readiness_problems(services)
    warnings = services.ledger.health.warnings() if services.ledger.health is not None else {}
    extra = {"warnings": warnings} if warnings else {}
    if problems:
        return _json({"status": "unavailable", **problems, **extra}, 503)
    return _json({"status": "ready", **extra})


async def metrics(request: Request) -> Response:
    services = app_state.services(request)
    store = services.ledger.store
    try:
        tenants = await listed_tenants(store, services.config, services.config.server.metrics_max_tenants)
        states = await read_states(store, services.config, tenants, services.clock(),
                                   sample_calls=METRICS_SAMPLE_CALLS)
    except StoreUnavailable:
        log.warning("metrics: budget store unreachable; scrape has no budget gauges")
        states = []
    return Response(services.metrics.render(states), media_type="text/plain; version=0.0.4; charset=utf-8")


async def stored(request: Request) -> Response:
    return await app_state.runtime(request).current.unbudgeted.stored_answers(request)


async def unbudgeted(request: Request) -> Response:
    return await app_state.runtime(request).current.unbudgeted(request)


async def on_error(request: Request, exc: Exception) -> Response:
    """Every failure a handler meets, through ``errors.as_guard_error``: the one mapping."""
    error = as_guard_error(exc)
    assert error is not None  # registered only for the classes as_guard_error maps
    level = error.kind.value.log_level
    log.log(level, "%s %s -> %d %s", request.method, request.url.path, error.status, error.code)
    return error_response(error)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        error = GuardError(ErrorKind.METHOD_NOT_ALLOWED, f"{request.method} is not supported on "
                           f"{request.url.path}.", headers={"allow": allow} if allow else None)
    else:
        error = GuardError(ErrorKind.NOT_FOUND, f"Unknown request URL: {request.method} {request.url.path}.")
    return error_response(error)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    """A real bug: still OpenAI's shape, and the request id is in the log line to find it."""
    error = as_guard_error(exc)
    if error is not None:
        return await on_error(request, exc)
    request_id = new_request_id()
    log.exception("unexpected error on %s %s request_id=%s", request.method, request.url.path, request_id)
    body = error_body("The proxy hit an internal error.", "server_error", "internal_error")
    return Response(body, 500, media_type="application/json", headers={"x-request-id": request_id})


class RunningKeys:
    """What ``EntryGuard`` checks headers against, from the request's app state: the running config's
    keys (a reload changes them; hashed once per config) and routing headers. Before the lifespan has
    run, the keys of the config the app was made with."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._known = (config, _key_hashes(config))

    def key_hashes(self, scope: Scope) -> frozenset[str]:
        state = app_state.state_of(scope)
        running = state.runtime.current.services.config if state is not None else self.config
        if self._known[0] is not running:
            self._known = (running, _key_hashes(running))
        return self._known[1]

    def routing_headers(self, scope: Scope) -> frozenset[str]:
        state = app_state.state_of(scope)
        return state.runtime.current.services.tenants.routing_headers if state is not None else frozenset()


def create_app(
    config: Config,
    *,
    store: BudgetStore | None = None,
    jobs: JobTenantResolver | None = None,
    clock: Callable[[], datetime] = utc_now,
    config_path: str | Path | None = None,
) -> Starlette:
    """The proxy for ``config``. ``store``, ``jobs`` and ``clock`` are for tests.

    ``config_path``: the file ``config`` came from, re-read on SIGHUP and ``POST /admin/reload``.
    """
    keys = RunningKeys(config)
    app = Starlette(
        routes=[
            *(Route(f"/v1/{shape.path}", AnyMethod(functools.partial(budgeted, shape.path))) for shape in BUDGETED),
            Route("/v1/models", AnyMethod(models)),
            Route("/v1/models/{model:path}", AnyMethod(model)),
            *(Route(f"/v1/{path}/{{rest:path}}", AnyMethod(stored)) for path in sorted(STORED_ANSWERS)),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            *admin_routes(),
            *agent_routes(),
            *external_routes(),
            *store_routes(),
            Route("/v1/{path:path}", unbudgeted, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
        ],
        exception_handlers={GuardError: on_error, StoreUnavailable: on_error, ClientDisconnect: on_error,
                            HTTPException: on_http_error, Exception: on_unexpected},
        # CORS outermost (preflights answered first), then the entry checks, before any routing.
        middleware=[*cors_middleware(config.server), Middleware(EntryGuard, key_hashes=keys.key_hashes,
                                                                  routing_headers=keys.routing_headers)],
        lifespan=functools.partial(lifespan, config=config, store=store, jobs=jobs, clock=clock,
                                   config_path=config_path),
    )
    # /v1/chat/completions/ is refused as a non-canonical path, never redirected (to anywhere).
    app.router.redirect_slashes = False
    return app


def _key_hashes(config: Config) -> frozenset[str]:
    """Every guardproxy key of ``config``, in its ``sha256:`` form: tenant, service and admin keys
    (runtime keys are recognised by their shape, ``paths.carries_key``)."""
    hashes = {h for tenant in config.tenants.values() for h in tenant.key_hashes}
    hashes.update(config.auth.service_key_hashes)
    if config.admin_api_key:
        hashes.add(hash_key(config.admin_api_key))
    return frozenset(hashes)


def app_from_env() -> Starlette:
    """Factory for ``uvicorn --factory`` worker processes: the config path comes from the environment."""
    catch_early_sighup()  # a worker: a SIGHUP before its app is serving must not end it
    path = os.environ.get(CONFIG_ENV, "proxy.yaml")
    return create_app(load_config(path), config_path=path)
