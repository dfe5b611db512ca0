"""Prometheus metrics (contract §6), in a registry of the app's own so apps can coexist in a test.

Counters and histograms live in the process; under ``guardproxy serve --workers N`` they are kept
in prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``, made and removed by the
CLI) and summed at scrape time. Budget gauges are not kept at all: they are read from the store at
scrape time, so every replica reports the same global figures.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values
from prometheus_client.multiprocess import MultiProcessCollector

from guardproxy.budget.decision import STATES
from guardproxy.budget.pricing import Usage, micros_to_usd
from guardproxy.budget.records import Admission
from guardproxy.observe.state import TenantState
from guardproxy.store.compat import require
from guardproxy.types import Micros

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)

# `_created` series double the scrape for no use here.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


#: The prometheus-client releases ``after_fork``'s reach into ``prometheus_client.values`` was tested on.
PROMETHEUS_TESTED = ">=0.20,<1"


def check_internals() -> None:
    """``after_fork`` sets ``values.ValueClass`` from ``values.get_value_class()``, module names that are
    not documented API: a release without them stops ``serve`` here, naming the library (compat.py)."""
    require("prometheus-client", PROMETHEUS_TESTED, values=(values, ("ValueClass", "get_value_class")))


def after_fork() -> None:
    """In a worker forked by ``serve --workers``: keep counters in the multiprocess files.

    prometheus-client picks in-process values or ``PROMETHEUS_MULTIPROC_DIR``'s files once, when it is
    imported; the supervisor imported it before the CLI set that directory, and a forked worker inherits
    the choice. Chosen again here (the function the import runs), before any metric exists."""
    check_internals()
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


class Metrics:
    """The proxy's counters and histograms. Model labels are configured model names only."""

    def count_budget_refusal(self, tenant: str, admission: Admission) -> None:
        """One budget 429, by the level and window that refused it."""
        cap, exhausted = admission.refused_by, admission.decision.exhausted
        if cap is not None:
            self.budget_refusals.labels(tenant, cap.level, cap.window).inc()
        elif exhausted == "job":
            self.budget_refusals.labels(tenant, "job", "none").inc()
        else:
            self.budget_refusals.labels(tenant, "tenant", exhausted or "day").inc()

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "guardproxy_requests", "Budgeted requests by outcome.", ["tenant", "model", "outcome"], registry=r
        )
        self.spend = Counter("guardproxy_spend_usd", "Settled spend in USD.", ["tenant", "model"], registry=r)
        self.tokens = Counter("guardproxy_tokens", "Settled tokens.", ["tenant", "model", "type"], registry=r)
        self.downgrades = Counter(
            "guardproxy_downgrades", "Calls sent to a cheaper model than asked.",
            ["tenant", "from_model", "to_model"], registry=r,
        )
        self.clamped = Counter(
            "guardproxy_clamped", "Calls sent with a lowered output limit because their worst case did not fit.",
            ["tenant", "model"], registry=r,
        )
        self.budget_refusals = Counter(
            "guardproxy_budget_refusals", "Calls refused by a budget, by the level (global, tenant, key, model, "
            "job) and window (hour, day, week, month; job: none) that refused them.",
            ["tenant", "level", "window"], registry=r,
        )
        self.servicetitan_lookups = Counter(
            "guardproxy_servicetitan_lookups", "ServiceTitan job -> tenant lookups by result.", ["result"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "guardproxy_upstream_request_duration_seconds", "Upstream call duration, to the last byte.",
            ["upstream", "model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_token = Histogram(
            "guardproxy_time_to_first_token_seconds", "Time from the upstream call to the first streamed token.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )
        self.fallbacks = Counter(
            "guardproxy_fallbacks", "Calls sent to a fallback model because an upstream failed.",
            ["tenant", "from_model", "to_model"], registry=r,
        )
        # Each process keeps its own breakers: across workers, the worst state of the live ones.
        self.breaker_state = Gauge(
            "guardproxy_upstream_breaker_state", "Circuit breaker per upstream: 0 closed, 1 half-open, 2 open.",
            ["upstream"], registry=r, multiprocess_mode="livemax",
        )
        # Settlements waiting on this host's disk for the store; across workers, the sum of the live ones.
        self.journal_pending = Gauge(
            "guardproxy_journal_pending", "Settlements kept in the on-disk journal until the store takes them.",
            registry=r, multiprocess_mode="livesum",
        )
        # 1 while the store has the problem (store_health.PROBLEMS); across workers, the worst of the live ones.
        self.store_problem = Gauge(
            "guardproxy_store_problem", "1 while the budget store has this problem: evicting_policy "
            "(maxmemory-policy is not noeviction), reset (its data was lost; admissions refused until "
            "acknowledged), no_persistence (neither AOF nor RDB).", ["problem"], registry=r,
            multiprocess_mode="livemax",
        )
        self.duplicate_settlements = Counter(
            "guardproxy_duplicate_settlements", "Settlements the store ignored: their reservation id had already "
            "settled (a retry after a lost reply, or a journal replay).", registry=r,
        )
        self.rate_limited = Counter(
            "guardproxy_rate_limited", "Calls refused by a tenant's per-minute limit, by kind (requests, tokens).",
            ["tenant", "kind"], registry=r,
        )
        self.alerts = Counter(
            "guardproxy_alerts", "Alert deliveries by event and result (delivered, failed: retried later, "
            "dropped: given up).", ["event", "result"], registry=r,
        )
        # -- response cache --
        self.cache_requests = Counter(
            "guardproxy_cache_requests", "Cacheable requests by result (hit, miss, bypass: Cache-Control: no-cache).",
            ["tenant", "result"], registry=r,
        )
        self.cache_saved = Counter(
            "guardproxy_cache_saved_usd", "What the answers served from the cache would have cost upstream.",
            ["tenant"], registry=r,
        )
        # -- semantic cache --
        self.semantic_requests = Counter(
            "guardproxy_semantic_cache_requests", "Chat questions the semantic cache was asked, by result (hit, "
            "miss, skipped: the embedding would not pay for itself, error: no embedding).", ["tenant", "result"],
            registry=r,
        )
        self.semantic_saved = Counter(
            "guardproxy_semantic_cache_saved_usd", "What the answers served by the semantic cache would have cost "
            "upstream (their embeddings are charged, and counted in guardproxy_spend_usd).", ["tenant"], registry=r,
        )
        self.semantic_entries = Gauge(
            "guardproxy_semantic_cache_entries", "Entries in this process's index of a tenant's semantic cache.",
            ["tenant"], registry=r, multiprocess_mode="livemax",
        )
        self.semantic_index_bytes = Gauge(
            "guardproxy_semantic_cache_index_bytes", "Memory held by this process's semantic cache indexes "
            "(bounded: per active tenant, max_entries * (dimensions * 4 + 24) bytes plus ~400 bytes an entry).",
            registry=r, multiprocess_mode="livesum",
        )
        # -- fleet brakes (``http/brakes.py``, ``store/velocity.py``) --
        self.loops_detected = Counter(
            "guardproxy_loops_detected", "Requests repeated more than loop.max_repeats times within loop.window_s "
            "by one key and job, by action (refuse: answered 429 loop_detected; alert: let through).",
            ["tenant", "action"], registry=r,
        )
        self.velocity_alerts = Counter(
            "guardproxy_velocity_alerts", "Hours in which a tenant's last hour first cost more than velocity.factor "
            "times its trailing hourly average.", ["tenant"], registry=r,
        )
        self.unbudgeted_requests = Counter(
            "guardproxy_unbudgeted_requests", "Requests passed through unbudgeted (unbudgeted_paths: passthrough).",
            ["tenant", "endpoint"], registry=r,
        )

    def record_settled(self, tenant: str, model: str, usage: Usage, cost: Micros) -> None:
        self.spend.labels(tenant, model).inc(micros_to_usd(cost))
        self.tokens.labels(tenant, model, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(tenant, model, "completion").inc(usage.completion_tokens)
        self.tokens.labels(tenant, model, "cached_prompt").inc(usage.cached_prompt_tokens)

    def render(self, states: Sequence[TenantState] = ()) -> bytes:
        """The scrape: this process's (or every worker's) counters, plus budget gauges from ``states``."""
        directory = os.environ.get(MULTIPROC_ENV)
        if directory:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        else:
            registry = self.registry
        return generate_latest(registry) + budget_gauges(states)


#: The budget gauges: name, help, labels (``tenant`` first).
_GAUGES = (
    ("guardproxy_budget_spent_usd", "Settled spend in the current period.", "period"),
    ("guardproxy_budget_limit_usd", "Budget of the current period.", "period"),
    ("guardproxy_budget_utilization_ratio", "Settled spend / limit.", "period"),
    ("guardproxy_budget_remaining_usd", "What is left before the period's hard cap, live reservations counted.",
     "period"),
    ("guardproxy_budget_state", "The tenant's budget state (the one its responses carry).", "state"),
    ("guardproxy_budget_projected_usd", "Spend projected at the end of the period from the recent burn rate.",
     "period"),
    ("guardproxy_budget_level_spent_usd", "Settled spend of a budget level beside the tenant's day and month "
     "(level: global, tenant, model; scope: which one; period: hour, day, week, month). Global levels carry "
     'tenant="" once.', "level"),
    ("guardproxy_budget_level_limit_usd", "Cap of that level and window.", "level"),
)


def _value(number: float) -> str:
    return repr(float(number))


def _escaped(label: str) -> str:
    """A label value in the text format (model names come from the config and may hold anything)."""
    return label.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def budget_gauges(states: Sequence[TenantState]) -> bytes:
    """The budget gauges of ``states`` in the text exposition format, written directly: through
    prometheus-client's collector they cost ~40 us a sample, most of a scrape with many tenants.
    Labels in name order, as prometheus-client writes them; tenant ids are ``config.TENANT_ID``-shaped,
    so they need no escaping."""
    lines: dict[str, list[str]] = {name: [] for name, _, _ in _GAUGES}
    spent, limit, utilization, remaining, budget_state, projected, level_spent, level_limit = lines.values()
    seen_global: set[tuple[str, str]] = set()
    for state in states:
        t = state.tenant
        for level in state.levels:
            cap = level.cap
            if cap.level == "global":
                if (cap.scope, cap.window) in seen_global:
                    continue
                seen_global.add((cap.scope, cap.window))
            labels = (f'{{level="{cap.level}",period="{cap.window}",scope="{_escaped(cap.scope)}",'
                      f'tenant="{"" if cap.level == "global" else t}"}}')
            level_spent.append(f"{labels} {_value(micros_to_usd(level.spent))}")
            level_limit.append(f"{labels} {_value(micros_to_usd(cap.limit))}")
        for name, period in (("day", state.day), ("month", state.month)):
            spent.append(f'{{period="{name}",tenant="{t}"}} {_value(micros_to_usd(period.spent))}')
            limit.append(f'{{period="{name}",tenant="{t}"}} {_value(micros_to_usd(period.limit))}')
            utilization.append(f'{{period="{name}",tenant="{t}"}} {_value(period.utilization)}')
            remaining.append(f'{{period="{name}",tenant="{t}"}} {_value(micros_to_usd(period.remaining))}')
        # 1 for the tenant's current state and 0 for the others, as prometheus-client's Enum does.
        for name in STATES:
            budget_state.append(f'{{state="{name}",tenant="{t}"}} {"1.0" if state.state == name else "0.0"}')
        if state.forecast is not None:
            for name, forecast in (("day", state.forecast.day), ("month", state.forecast.month)):
                value = _value(micros_to_usd(forecast.projected_micros))
                projected.append(f'{{period="{name}",tenant="{t}"}} {value}')
    out = []
    for name, help_text, _ in _GAUGES:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
        out.extend(f"{name}{sample}\n" for sample in lines[name])
    return "".join(out).encode()
