"""The admin API (contract §5): budget state, runtime overrides and the per-call audit log.

Behind ``admin.api_key``, sent as ``Authorization: Bearer <key>``, as the password of HTTP Basic
auth (any user name; what a browser sends for the page at ``/admin/``) or as the ``guardproxy_admin``
cookie: every /admin path is 404 while no key is configured, and 401 with a wrong or missing key.
The cookie and Basic auth, which a browser sends by itself, open the GET routes only; what changes
state takes the key in a header and refuses what a browser can send cross-site (``guardproxy.admin.csrf``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from guardproxy.admin.auth import check_admin
from guardproxy.admin.export import export_routes
from guardproxy.admin.keys import key_routes
from guardproxy.admin.page import render_page
from guardproxy.admin.reload import reload_routes
from guardproxy.budget.periods import iso_utc
from guardproxy.budget.policy import BudgetPolicy
from guardproxy.budget.pricing import micros_to_usd
from guardproxy.budget.records import JobUsage
from guardproxy.config.settings import TENANT_ID, merge_policy
from guardproxy.config.validation import ConfigError, Fields
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http import app_state
from guardproxy.http.auth import valid_tenant
from guardproxy.http.requests import parse_json_object, read_body
from guardproxy.http.services import Services
from guardproxy.observe.alerts import event_json
from guardproxy.observe.state import OVERRIDE_FIELDS, TenantState, all_tenants, override_record, read_states
from guardproxy.types import Micros

MAX_CALLS = 1000


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


async def tenant_state(services: Services, tenant: str) -> TenantState:
    store = services.ledger.store
    (state,) = await read_states(store, services.config, [tenant], services.clock())
    return state


def _services(request: Request) -> Services:
    services = app_state.services(request)
    check_admin(request, services)
    return services


async def list_tenants(request: Request) -> Response:
    services = _services(request)
    tenants = await all_tenants(services.ledger.store, services.config)
    states = await read_states(services.ledger.store, services.config, tenants, services.clock())
    return _json({"object": "list", "data": [s.as_json() for s in states]})


async def status_page(request: Request) -> Response:
    """Every tenant's budget as a self-refreshing HTML page (``guardproxy.admin.page``)."""
    services = _services(request)
    tenants = await all_tenants(services.ledger.store, services.config)
    now = services.clock()
    states = await read_states(services.ledger.store, services.config, tenants, now)
    semantic = await services.ledger.store.semantic_stats([s.tenant for s in states])
    return HTMLResponse(render_page(states, now, semantic), headers={"cache-control": "no-store"})


async def get_tenant(request: Request) -> Response:
    services = _services(request)
    return _json((await tenant_state(services, valid_tenant(request.path_params["tenant"]))).as_json())


async def put_budget(request: Request) -> Response:
    """Override any of ``OVERRIDE_FIELDS`` (daily_usd, monthly_usd, hourly_usd, weekly_usd, soft_cap,
    hard_cap, rpm, tpm, job_usd); the rest stays as it is."""
    services = _services(request)
    tenant = valid_tenant(request.path_params["tenant"])
    body = parse_json_object(await read_body(request, 64 * 1024))
    unknown = sorted(set(body) - set(OVERRIDE_FIELDS))
    if unknown:
        allowed = ", ".join(OVERRIDE_FIELDS)
        raise GuardError(ErrorKind.INVALID_FIELD, f"Unknown field {unknown[0]!r}; allowed: {allowed}.",
                         param=unknown[0])
    _check_own_windows(body, services.config.policy_for(tenant), tenant)
    current = await tenant_state(services, tenant)
    try:
        policy = merge_policy(Fields(body, ""), current.policy)
    except ConfigError as exc:
        raise GuardError(ErrorKind.INVALID_FIELD, f"Invalid budget: {exc}", param=exc.path or None) from None
    # Re-arms the period's alerts and lists the tenant (a tenant may exist only through its override).
    await services.ledger.store.set_override(tenant, override_record(policy), services.ledger.periods(tenant))
    return _json((await tenant_state(services, tenant)).as_json())


def _check_own_windows(body: dict[str, object], configured: BudgetPolicy, tenant: str) -> None:
    """``hourly_usd`` and ``weekly_usd`` change a cap proxy.yaml gives the tenant (only then is that
    window's spend counted): a number, for a window the config caps."""
    for field, limit in (("hourly_usd", configured.hourly_micros), ("weekly_usd", configured.weekly_micros)):
        if field not in body:
            continue
        if limit is None:
            raise GuardError(ErrorKind.INVALID_FIELD, f"Invalid budget: {field} can be overridden only for a tenant "
                             f"whose proxy.yaml caps that window (budgets.defaults.{field} or "
                             f"tenants.{tenant}.{field}): only then is its spend counted.", param=field)
        if body[field] is None:
            raise GuardError(ErrorKind.INVALID_FIELD, f"Invalid budget: {field} must be a number of USD (>= 0); "
                             "DELETE the override to go back to proxy.yaml's.", param=field)


async def delete_budget(request: Request) -> Response:
    """Drop the runtime override: the tenant is back on proxy.yaml's budget."""
    services = _services(request)
    tenant = valid_tenant(request.path_params["tenant"])
    await services.ledger.store.clear_override(tenant, services.ledger.periods(tenant))
    return _json((await tenant_state(services, tenant)).as_json())


async def list_calls(request: Request) -> Response:
    """The tenant's last settled calls, newest first: the audit trail for a disputed bill."""
    services = _services(request)
    tenant = valid_tenant(request.path_params["tenant"])
    raw_limit = request.query_params.get("limit", "50")
    if not (raw_limit.isascii() and raw_limit.isdigit()) or not 1 <= int(raw_limit) <= MAX_CALLS:
        raise GuardError(ErrorKind.INVALID_FIELD, f"limit must be a whole number from 1 to {MAX_CALLS}.", param="limit")
    calls = await services.ledger.store.recent_calls(tenant, int(raw_limit))
    return _json({"object": "list", "tenant": tenant, "data": [_call_json(c) for c in calls]})


async def list_alerts(request: Request) -> Response:
    """The latest alert events of every tenant, newest first, with how their delivery stands."""
    services = _services(request)
    raw_limit = request.query_params.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_CALLS:
        raise GuardError(ErrorKind.INVALID_FIELD, f"limit must be a whole number from 1 to {MAX_CALLS}.", param="limit")
    store = services.ledger.store
    records = await store.recent_alerts(await all_tenants(store, services.config), int(raw_limit))
    data = []
    for r in records:
        delivery: dict[str, Any] = {"state": r.state, "attempts": r.attempts, "last_error": r.error or None}
        if r.state in ("pending", "retrying") and r.next_attempt_ms is not None:
            delivery["next_attempt_at"] = iso_utc(datetime.fromtimestamp(r.next_attempt_ms / 1000, UTC))
        event = event_json(r.fields, services.config.policy_for(r.tenant).zone)
        data.append({"id": r.id, **event, "delivery": delivery})
    return _json({"object": "list", "data": data})


async def get_job(request: Request) -> Response:
    """What one job (work order) has cost: calls, tokens, USD, per model, first and last call."""
    services = _services(request)
    tenant = valid_tenant(request.path_params["tenant"])
    job = request.path_params["job"]
    if not TENANT_ID.fullmatch(job):
        raise GuardError(ErrorKind.INVALID_JOB_ID, "Job ids follow the tenant-id rule.", param="job")
    usage = await services.ledger.store.job_usage(tenant, job)
    if usage is None:
        raise GuardError(ErrorKind.NOT_FOUND, f"Tenant {tenant!r} has no calls for job {job!r} on record.")
    state = await tenant_state(services, tenant)
    return _json(job_json(tenant, usage, state.policy.job_micros))


async def list_jobs(request: Request) -> Response:
    """The tenant's most recently active jobs, newest first."""
    services = _services(request)
    tenant = valid_tenant(request.path_params["tenant"])
    raw_limit = request.query_params.get("limit", "50")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_CALLS:
        raise GuardError(ErrorKind.INVALID_FIELD, f"limit must be a whole number from 1 to {MAX_CALLS}.", param="limit")
    jobs = await services.ledger.store.recent_jobs(tenant, int(raw_limit))
    cap = (await tenant_state(services, tenant)).policy.job_micros
    return _json({"object": "list", "tenant": tenant, "data": [job_json(tenant, j, cap) for j in jobs]})


def job_json(tenant: str, usage: JobUsage, cap: Micros | None) -> dict[str, Any]:
    def at(ms: int) -> str:
        return iso_utc(datetime.fromtimestamp(ms / 1000, UTC))

    return {
        "job": usage.job, "tenant": tenant, "calls": usage.calls, "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens, "cost_micros": usage.cost_micros,
        "cost_usd": micros_to_usd(usage.cost_micros),
        "first_at": at(usage.first_at_ms), "last_at": at(usage.last_at_ms),
        "by_model": {
            model: {"calls": c.get("calls", 0), "prompt_tokens": c.get("prompt_tokens", 0),
                    "completion_tokens": c.get("completion_tokens", 0),
                    "cost_usd": micros_to_usd(c.get("cost_micros", 0))}
            for model, c in sorted(usage.by_model.items())
        },
        "job_usd": None if cap is None else micros_to_usd(cap),
    }


def _call_json(call: dict[str, str]) -> dict[str, Any]:
    cost = int(call.get("cost_micros", 0))
    return {
        "time": iso_utc(datetime.fromtimestamp(int(call["time_ms"]) / 1000, UTC)),
        "request_id": call.get("request_id"),
        "requested_model": call.get("requested_model"),
        "model": call.get("model"),
        "prompt_tokens": int(call.get("prompt_tokens", 0)),
        "completion_tokens": int(call.get("completion_tokens", 0)),
        "cached_tokens": int(call.get("cached_tokens", 0)),
        "cost_micros": cost,
        "cost_usd": micros_to_usd(cost),
        "outcome": call.get("outcome"),
        "job": call.get("job"),
        # Spend booked from elsewhere (``outcome: external``) says what it was.
        **({"description": call["description"]} if "description" in call else {}),
        # The embedding that found a semantic-cache hit says so, and what the hit saved.
        **({"cache": call["cache"], "similarity": float(call.get("similarity", 0)),
            "saved_usd": micros_to_usd(int(call.get("saved_micros", 0)))} if "cache" in call else {}),
    }


def admin_routes() -> list[Route]:
    return [
        *key_routes(),
        *export_routes(),
        *reload_routes(),
        *(
            Route(path, endpoint, methods=[method])
            for path, endpoint, method in (
                ("/admin", status_page, "GET"),
                ("/admin/", status_page, "GET"),
                ("/admin/tenants", list_tenants, "GET"),
                ("/admin/tenants/{tenant}", get_tenant, "GET"),
                ("/admin/tenants/{tenant}/budget", put_budget, "PUT"),
                ("/admin/tenants/{tenant}/budget", delete_budget, "DELETE"),
                ("/admin/tenants/{tenant}/calls", list_calls, "GET"),
                ("/admin/tenants/{tenant}/jobs", list_jobs, "GET"),
                ("/admin/tenants/{tenant}/jobs/{job}", get_job, "GET"),
                ("/admin/alerts", list_alerts, "GET"),
            )
        ),
    ]
