"""A tenant's budget periods: its local day and month, and when each resets."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class Periods:
    """The day (``2026-11-22``) and month (``2026-11``) a moment falls in, in one timezone."""

    day: str
    month: str
    day_resets_at: datetime
    month_resets_at: datetime

    def seconds_until_reset(self, period: str, now: datetime) -> int:
        resets_at = self.day_resets_at if period == "day" else self.month_resets_at
        return max(1, int((resets_at - now).total_seconds() + 0.999))


def periods_at(now: datetime, tz: ZoneInfo) -> Periods:
    """Periods of the aware datetime ``now`` in ``tz``; reset times are in UTC."""
    return _periods_of(now.astimezone(tz).date(), tz)


@functools.lru_cache(maxsize=1024)
def _periods_of(local_day: date, tz: ZoneInfo) -> Periods:
    # Asked at every admission: the same few days and zones, computed once each.
    next_day = local_day + timedelta(days=1)
    next_month = date(local_day.year + local_day.month // 12, local_day.month % 12 + 1, 1)
    return Periods(
        day=local_day.isoformat(),
        month=f"{local_day.year:04d}-{local_day.month:02d}",
        day_resets_at=_local_midnight_utc(next_day, tz),
        month_resets_at=_local_midnight_utc(next_month, tz),
    )


def _local_midnight_utc(day: date, tz: ZoneInfo) -> datetime:
    return datetime.combine(day, time(0), tzinfo=tz).astimezone(UTC)


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
