"""Tenants' budget state as operators see it: admin API, /metrics gauges, ``guardproxy status``.

Read from the store in one pipelined round trip, so every replica reports the same global figures.
Runtime overrides (``PUT /admin/tenants/{t}/budget``) live in the store too: the raw fields for
display, and the thresholds in micro-USD that the admission script applies.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from guardproxy.budget import decision as budget
from guardproxy.budget.decision import Thresholds
from guardproxy.budget.forecast import SAMPLE_CALLS, Forecast, Spent, burn_rate, project
from guardproxy.budget.levels import LevelCap, bounds
from guardproxy.budget.periods import Periods, iso_utc, periods_at
from guardproxy.budget.policy import BudgetPolicy
from guardproxy.budget.pricing import micros_to_usd
from guardproxy.budget.records import Outcome, Snapshot
from guardproxy.config.settings import Config
from guardproxy.store.ledger import level_caps
from guardproxy.store.protocol import Store
from guardproxy.types import Micros

OVERRIDE_FIELDS = ("daily_usd", "monthly_usd", "hourly_usd", "weekly_usd", "soft_cap", "hard_cap", "rpm", "tpm",
                   "job_usd")


@dataclass(frozen=True)
class PeriodState:
    period: str
    limit: Micros
    spent: Micros
    reserved: Micros
    resets_at: datetime
    #: What is left before this period's hard cap, live reservations counted (never negative).
    remaining: Micros = 0

    @property
    def utilization(self) -> float:
        if self.limit == 0:
            return 1.0 if self.spent else 0.0
        return self.spent / self.limit

    def as_json(self) -> dict[str, Any]:
        return {
            "period": self.period, "limit_usd": micros_to_usd(self.limit), "spent_usd": micros_to_usd(self.spent),
            "reserved_usd": micros_to_usd(self.reserved), "remaining_usd": micros_to_usd(self.remaining),
            "utilization": round(self.utilization, 7),
            "resets_at": iso_utc(self.resets_at),
        }


@dataclass(frozen=True)
class LevelState:
    """One cap of a level beside the tenant's day and month (``budget/levels.py``) and its use now."""

    cap: LevelCap
    spent: Micros
    held: Micros

    def as_json(self) -> dict[str, Any]:
        c = self.cap
        return {
            "level": c.level, "scope": c.scope, "window": c.window, "period": c.period,
            "limit_usd": micros_to_usd(c.limit), "spent_usd": micros_to_usd(self.spent),
            "reserved_usd": micros_to_usd(self.held),
            "remaining_usd": micros_to_usd(max(0, c.hard - self.spent - self.held)),
            "utilization": round(self.spent / c.limit, 7) if c.limit else (1.0 if self.spent else 0.0),
            "resets_at": iso_utc(c.resets_at) if c.resets_at else None,
        }


@dataclass(frozen=True)
class TenantState:
    tenant: str
    #: ``budget.state_of``: the same rule the 429 and the ``x-guardproxy-budget-state`` header use.
    state: str
    day: PeriodState
    month: PeriodState
    policy: BudgetPolicy
    overridden: bool
    #: What is left before the nearer hard cap, live reservations counted.
    remaining: Micros = 0
    #: Requests and tokens counted in the last minute's window.
    window_requests: int = 0
    window_tokens: int = 0
    #: Where spend is heading (``forecast.py``); ``None`` without a call log to take the rate from.
    forecast: Forecast | None = None
    #: The other levels and windows that cap the tenant's calls (global, its hour and week, its models).
    levels: tuple[LevelState, ...] = ()

    def as_json(self) -> dict[str, Any]:
        no_forecast = {"projected_usd": None, "hard_cap_at": None}
        return {
            "tenant": self.tenant, "state": self.state,
            "day": {**self.day.as_json(), **(self.forecast.day.as_json() if self.forecast else no_forecast)},
            "month": {**self.month.as_json(), **(self.forecast.month.as_json() if self.forecast else no_forecast)},
            "remaining_usd": micros_to_usd(self.remaining),
            "soft_cap": float(self.policy.soft_cap), "hard_cap": float(self.policy.hard_cap),
            "timezone": self.policy.timezone, "overridden": self.overridden,
            "job_usd": None if self.policy.job_micros is None else micros_to_usd(self.policy.job_micros),
            "rate_limits": {
                "rpm": self.policy.rpm or None, "tpm": self.policy.tpm or None,
                "window_s": budget.WINDOW_MS // 1000,
                "requests_in_window": self.window_requests, "tokens_in_window": self.window_tokens,
            },
            "burn_rate_usd_per_hour": round(self.forecast.usd_per_hour, 6) if self.forecast else None,
            "levels": [level.as_json() for level in self.levels],
        }


def effective_policy(base: BudgetPolicy, override: Mapping[str, str]) -> BudgetPolicy:
    """``base`` with the runtime override applied (fields kept as exact decimal strings)."""
    if not override:
        return base
    return dataclasses.replace(
        base,
        daily_micros=int(override.get("daily_micros", base.daily_micros)),
        monthly_micros=int(override.get("monthly_micros", base.monthly_micros)),
        soft_cap=Decimal(override.get("soft_cap", base.soft_cap)),
        hard_cap=Decimal(override.get("hard_cap", base.hard_cap)),
        rpm=int(override.get("rpm", base.rpm)),
        tpm=int(override.get("tpm", base.tpm)),
        job_micros=_job_micros(override["job_micros"]) if "job_micros" in override else base.job_micros,
        hourly_micros=int(override["hourly_micros"]) if "hourly_micros" in override else base.hourly_micros,
        weekly_micros=int(override["weekly_micros"]) if "weekly_micros" in override else base.weekly_micros,
    )


def _job_micros(value: str) -> Micros | None:
    """An override's job cap: ``-1`` is none."""
    micros = int(value)
    return None if micros < 0 else micros


def override_record(policy: BudgetPolicy) -> dict[str, str]:
    """What the store keeps for an override: the policy, and the thresholds and limits admit.v5.lua reads
    (the tenant's hour and week as ``hourly_micros``, ``hard_hour``, ``soft_hour`` and the same for week)."""
    limits = Thresholds.for_policy(policy)
    own: dict[str, str] = {}
    for window, field, limit in (("hour", "hourly_micros", policy.hourly_micros),
                                 ("week", "weekly_micros", policy.weekly_micros)):
        if limit is not None:
            hard, soft = bounds(limit, policy.soft_cap, policy.hard_cap)
            own |= {field: str(limit), f"hard_{window}": str(hard), f"soft_{window}": str(soft)}
    return {
        "daily_micros": str(policy.daily_micros), "monthly_micros": str(policy.monthly_micros),
        "rpm": str(policy.rpm), "tpm": str(policy.tpm),
        "soft_cap": str(policy.soft_cap), "hard_cap": str(policy.hard_cap),
        "soft_day": str(limits.soft_day), "hard_day": str(limits.hard_day),
        "soft_month": str(limits.soft_month), "hard_month": str(limits.hard_month),
        "job_micros": str(-1 if policy.job_micros is None else policy.job_micros),
        **own,
    }


async def all_tenants(store: Store, config: Config) -> list[str]:
    """Configured tenants and every tenant the store has seen (service keys, job lookups, overrides)."""
    return sorted(set(config.tenants) | await store.known_tenants())


async def listed_tenants(store: Store, config: Config, limit: int) -> list[str]:
    """For ``/metrics``: the configured tenants and the most recently active others, at most ``limit``
    (a scrape must not read every tenant the store has seen)."""
    configured = sorted(config.tenants)[:limit]
    known = set(configured)
    recent = [t for t in await store.recent_tenants(limit) if t not in known]
    return configured + recent[: limit - len(configured)]


async def read_states(
    store: Store, config: Config, tenants: Sequence[str], now: datetime, *, sample_calls: int = SAMPLE_CALLS,
) -> list[TenantState]:
    """The tenants' states; forecasts from each one's last ``sample_calls`` logged calls."""
    periods = [periods_at(now, config.policy_for(t).zone) for t in tenants]
    snapshots = await store.snapshots(list(zip(tenants, periods, strict=True)))
    states = [
        _state(tenant, config.policy_for(tenant), p, snap)
        for tenant, p, snap in zip(tenants, periods, snapshots, strict=True)
    ]
    if config.global_caps or any(_has_levels(config.policy_for(t)) for t in tenants):
        found = await asyncio.gather(*(_levels(store, config, state.tenant, now, state.policy) for state in states))
        states = [dataclasses.replace(state, levels=levels) for state, levels in zip(states, found, strict=True)]
    if not store.calls_kept or not tenants:
        return states
    now_ms, logs = await store.call_costs(tenants, sample_calls)
    return [dataclasses.replace(state, forecast=_forecast(state, log, now_ms, now))
            for state, log in zip(states, logs, strict=True)]


def _has_levels(policy: BudgetPolicy) -> bool:
    return policy.hourly_micros is not None or policy.weekly_micros is not None or bool(policy.model_caps)


async def _levels(
    store: Store, config: Config, tenant: str, now: datetime, policy: BudgetPolicy,
) -> tuple[LevelState, ...]:
    caps = level_caps(config, tenant, now, policy=policy)
    usage = await store.level_usage(tenant, caps)
    return tuple(LevelState(cap, spent, held) for cap, (spent, held) in zip(caps, usage, strict=True))


def _forecast(state: TenantState, log: Sequence[tuple[int, Micros, str]], now_ms: int, now: datetime) -> Forecast:
    calls = [Spent(time_ms, cost) for time_ms, cost, outcome in log if outcome != Outcome.EXTERNAL.value]
    rate = burn_rate(calls, now_ms)
    limits = Thresholds.for_policy(state.policy)
    return Forecast(
        rate_per_s=rate,
        day=project(state.day.spent, limits.hard_day, rate, now, state.day.resets_at),
        month=project(state.month.spent, limits.hard_month, rate, now, state.month.resets_at),
    )


def _state(tenant: str, base: BudgetPolicy, periods: Periods, snap: Snapshot) -> TenantState:
    day, month, override = snap.day, snap.month, snap.override
    policy = effective_policy(base, override)
    limits = Thresholds.for_policy(policy)
    used_day, used_month = day.spent + day.reserved, month.spent + month.reserved
    return TenantState(
        tenant=tenant,
        state=budget.state_of(used_day, used_month, limits, snap.refused),
        remaining=budget.remaining(used_day, used_month, limits),
        window_requests=snap.window_requests, window_tokens=snap.window_tokens,
        day=PeriodState(periods.day, policy.daily_micros, day.spent, day.reserved, periods.day_resets_at,
                        max(0, limits.hard_day - used_day)),
        month=PeriodState(periods.month, policy.monthly_micros, month.spent, month.reserved,
                          periods.month_resets_at, max(0, limits.hard_month - used_month)),
        policy=policy,
        overridden=bool(override),
    )
