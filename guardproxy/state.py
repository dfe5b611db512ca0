"""Tenants' budget state as operators see it: admin API, /metrics gauges, ``guardproxy status``.

Read from the store in one pipelined round trip, so every replica reports the same global figures.
Runtime overrides (``PUT /admin/tenants/{t}/budget``) live in the store too: the raw fields for
display, and the thresholds in micro-USD that the admission script applies.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from guardproxy import budget
from guardproxy.budget import Thresholds
from guardproxy.config import BudgetPolicy, Config
from guardproxy.periods import Periods, iso_utc, periods_at
from guardproxy.pricing import micros_to_usd
from guardproxy.store import BudgetStore, PeriodSpend
from guardproxy.types import Micros

OVERRIDE_FIELDS = ("daily_usd", "monthly_usd", "soft_cap", "hard_cap")


@dataclass(frozen=True)
class PeriodState:
    period: str
    limit: Micros
    spent: Micros
    reserved: Micros
    resets_at: datetime

    @property
    def utilization(self) -> float:
        if self.limit == 0:
            return 1.0 if self.spent else 0.0
        return self.spent / self.limit

    def as_json(self) -> dict[str, Any]:
        return {
            "period": self.period, "limit_usd": micros_to_usd(self.limit), "spent_usd": micros_to_usd(self.spent),
            "reserved_usd": micros_to_usd(self.reserved), "utilization": round(self.utilization, 7),
            "resets_at": iso_utc(self.resets_at),
        }


@dataclass(frozen=True)
class TenantState:
    tenant: str
    state: str
    day: PeriodState
    month: PeriodState
    policy: BudgetPolicy
    overridden: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant, "state": self.state, "day": self.day.as_json(), "month": self.month.as_json(),
            "soft_cap": float(self.policy.soft_cap), "hard_cap": float(self.policy.hard_cap),
            "timezone": self.policy.timezone, "overridden": self.overridden,
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
    )


def override_record(policy: BudgetPolicy) -> dict[str, str]:
    """What the store keeps for an override: the policy, and the thresholds admit.v1.lua reads."""
    limits = Thresholds.for_policy(policy)
    return {
        "daily_micros": str(policy.daily_micros), "monthly_micros": str(policy.monthly_micros),
        "soft_cap": str(policy.soft_cap), "hard_cap": str(policy.hard_cap),
        "soft_day": str(limits.soft_day), "hard_day": str(limits.hard_day),
        "soft_month": str(limits.soft_month), "hard_month": str(limits.hard_month),
    }


async def all_tenants(store: BudgetStore, config: Config) -> list[str]:
    """Configured tenants and every tenant the store has seen (service keys, job lookups)."""
    return sorted(set(config.tenants) | await store.known_tenants())


async def read_states(
    store: BudgetStore, config: Config, tenants: Sequence[str], now: datetime
) -> list[TenantState]:
    periods = [periods_at(now, config.policy_for(t).zone) for t in tenants]
    snapshots = await store.snapshots(list(zip(tenants, periods, strict=True)))
    return [
        _state(tenant, config.policy_for(tenant), p, snap.day, snap.month, snap.override)
        for tenant, p, snap in zip(tenants, periods, snapshots, strict=True)
    ]


def _state(
    tenant: str, base: BudgetPolicy, periods: Periods, day: PeriodSpend, month: PeriodSpend,
    override: Mapping[str, str],
) -> TenantState:
    policy = effective_policy(base, override)
    limits = Thresholds.for_policy(policy)
    return TenantState(
        tenant=tenant,
        state=budget.state_of(day.spent + day.reserved, month.spent + month.reserved, limits),
        day=PeriodState(periods.day, policy.daily_micros, day.spent, day.reserved, periods.day_resets_at),
        month=PeriodState(periods.month, policy.monthly_micros, month.spent, month.reserved,
                          periods.month_resets_at),
        policy=policy,
        overridden=bool(override),
    )
