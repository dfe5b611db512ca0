"""Where a tenant's spend is heading (pure): its recent burn rate, the spend projected at the end
of each period, and when the hard cap would be reached at that rate.

The burn rate comes from the tenant's call log (the settled calls the store keeps, each with its
time and cost), newest first, read up to ``SAMPLE_CALLS`` entries:

- when the sample reaches back past the last ``RECENT_WINDOW_S`` (an hour), it holds every call of
  that hour: the rate is the hour's spend / one hour;
- otherwise every sampled call is recent (the tenant began within the hour, or calls more often than
  the sample holds): the rate is the spend after the oldest sampled call / the time since it
  (``(n - 1)`` intervals for ``n`` calls, so a steady tenant's rate is not overstated by one call);
- fewer than two calls in the hour: the hour's spend / one hour.

Spend booked from elsewhere (``outcome: external``) counts in the spend but not in the rate: a
month's invoice booked at once is not a burn rate. Projection: spend so far + rate x time left in
the period. A tenant's spend follows its working hours, so a month projected at 10:00 from the
last hour runs high and one projected at night low; the day's projection is the steadier figure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from guardproxy.budget.periods import iso_utc
from guardproxy.budget.pricing import MICROS_PER_USD, micros_to_usd
from guardproxy.types import Micros

RECENT_WINDOW_S = 3600
SAMPLE_CALLS = 200


@dataclass(frozen=True)
class Spent:
    """One settled call of the log: when (server time, ms) and what it cost."""

    time_ms: int
    cost_micros: Micros


def burn_rate(calls: Sequence[Spent], now_ms: int, window_s: int = RECENT_WINDOW_S) -> float:
    """Recent spend in micro-USD per second, from ``calls`` (newest first; see the module's doc)."""
    start_ms = now_ms - window_s * 1000
    recent = [c for c in calls if c.time_ms > start_ms]
    if len(recent) < len(calls) or len(recent) < 2:
        return sum(c.cost_micros for c in recent) / window_s
    oldest = recent[-1]
    span_s = (now_ms - oldest.time_ms) / 1000
    if span_s <= 0:
        return sum(c.cost_micros for c in recent) / window_s
    return sum(c.cost_micros for c in recent[:-1]) / span_s


@dataclass(frozen=True)
class PeriodForecast:
    """The spend one period is heading for."""

    projected_micros: Micros
    #: When spend reaches the hard cap at the current rate; ``None`` if not within the period.
    hard_cap_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        return {"projected_usd": micros_to_usd(self.projected_micros),
                "hard_cap_at": iso_utc(self.hard_cap_at) if self.hard_cap_at else None}


def project(spent: Micros, hard: Micros, rate_per_s: float, now: datetime, resets_at: datetime) -> PeriodForecast:
    """Spend at ``resets_at`` if the rate holds, and when it would reach ``hard`` (now, if it has)."""
    left_s = max(0.0, (resets_at - now).total_seconds())
    projected = spent + math.ceil(rate_per_s * left_s)
    if spent >= hard:
        return PeriodForecast(projected, now)
    if rate_per_s <= 0:
        return PeriodForecast(projected, None)
    to_cap_s = (hard - spent) / rate_per_s
    return PeriodForecast(projected, now + timedelta(seconds=to_cap_s) if to_cap_s < left_s else None)


@dataclass(frozen=True)
class Forecast:
    """A tenant's burn rate and both periods' forecasts."""

    rate_per_s: float
    day: PeriodForecast
    month: PeriodForecast

    @property
    def usd_per_hour(self) -> float:
        return self.rate_per_s * 3600 / MICROS_PER_USD
