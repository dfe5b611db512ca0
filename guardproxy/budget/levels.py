"""Budget levels and windows beyond the tenant's day and month (pure).

A call belongs to up to four levels: ``global`` (every tenant together: the operator's bill, in UTC
periods), its ``tenant``, the caller's ``key`` and the ``model`` it is sent to. Each level may cap
spend per ``hour``, ``day``, ``week`` (ISO week) and ``month``. The tenant's day and month are the
``Thresholds`` of ``decision.py``; every other cap is a ``LevelCap`` checked in the same atomic
admission (``store/lua/admit.v5.lua``; ``decision.decide_levels`` is its reference): a call is
admitted only if its worst case fits every cap of every level it belongs to, and a refusal names
the first cap that refused it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from guardproxy.types import Micros

LEVELS = ("global", "tenant", "key", "model")
WINDOWS = ("hour", "day", "week", "month")
#: The ``*_usd`` field of each window in the config and the admin API.
WINDOW_FIELDS = {"hour": "hourly_usd", "day": "daily_usd", "week": "weekly_usd", "month": "monthly_usd"}
#: How long a window's spend counter is kept after its last charge (for status and history).
WINDOW_TTL_S = {"hour": 2 * 86400, "day": 40 * 86400, "week": 60 * 86400, "month": 400 * 86400}
NO_RATIO = Decimal(1)


@dataclass(frozen=True)
class WindowCaps:
    """Caps in micro-USD per window (``None``: no cap in that window)."""

    hour: Micros | None = None
    day: Micros | None = None
    week: Micros | None = None
    month: Micros | None = None

    def items(self) -> list[tuple[str, Micros]]:
        """(window, cap) of every window with a cap, in ``WINDOWS`` order."""
        return [(w, c) for w, c in ((w, getattr(self, w)) for w in WINDOWS) if c is not None]

    def __bool__(self) -> bool:
        return bool(self.items())

    def as_json(self) -> dict[str, str | None]:
        return {WINDOW_FIELDS[w]: None if (c := getattr(self, w)) is None else _usd(c) for w in WINDOWS}


@dataclass(frozen=True)
class KeyBudget:
    """A key's own budget: caps per window and the models it may ask for (empty: any)."""

    caps: WindowCaps = WindowCaps()
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class LevelCap:
    """One cap checked at admission: ``scope``'s spend in ``window`` (the period ``period``) plus its
    live reservations, plus the call's worst case, must stay within ``hard``; at ``soft`` the call
    goes to its cheaper tier when that fits. ``model``: the cap binds only the candidate of that
    model (``""``: every candidate). ``limit`` is the configured cap (messages and alerts)."""

    level: str
    scope: str
    window: str
    period: str
    hard: Micros
    soft: Micros
    limit: Micros
    model: str = ""
    resets_at: datetime | None = None

    def binds(self, model: str) -> bool:
        return self.model in ("", model)


@dataclass(frozen=True)
class LevelArgs:
    """The caps one admission checks beside the tenant's day and month, and the model of each
    candidate (the requested model, then its downgrade chain), which model caps bind."""

    caps: tuple[LevelCap, ...] = ()
    models: tuple[str, ...] = ()

    def for_tiers(self, tiers: Sequence[int]) -> LevelArgs:
        """The same caps for candidates that are the chain's ``tiers`` (a clamped admission offers
        only some): each candidate's model is its tier's."""
        if not self.models or tuple(tiers) == tuple(range(len(self.models))):
            return self
        return LevelArgs(self.caps, tuple(self.models[i] for i in tiers))


NO_LEVELS = LevelArgs()


@dataclass(frozen=True)
class WindowIds:
    """The id of each window a moment falls in, in one timezone, and when each resets (UTC)."""

    hour: str
    day: str
    week: str
    month: str
    resets_at: dict[str, datetime]

    def of(self, window: str) -> str:
        return str(getattr(self, window))


def window_ids(now: datetime, tz: tzinfo) -> WindowIds:
    """Hour ``2026-12-07T14``, day ``2026-12-07``, ISO week ``2026-W50``, month ``2026-12`` of ``now``
    in ``tz``."""
    # Asked at every admission: computed once per hour and zone (every zone's hours start on a UTC
    # quarter hour).
    utc = now.astimezone(UTC)
    return _window_ids(utc.replace(minute=utc.minute - utc.minute % 15, second=0, microsecond=0), tz)


@functools.lru_cache(maxsize=1024)
def _window_ids(now: datetime, tz: tzinfo) -> WindowIds:
    local = now.astimezone(tz)
    hour_start = local.replace(minute=0, second=0, microsecond=0)
    day = local.date()
    iso = day.isocalendar()
    week_start = day - timedelta(days=day.weekday())
    next_month = day.replace(year=day.year + day.month // 12, month=day.month % 12 + 1, day=1)

    def midnight(d: date) -> datetime:
        return datetime(d.year, d.month, d.day, tzinfo=tz).astimezone(UTC)

    return WindowIds(
        hour=hour_start.strftime("%Y-%m-%dT%H"), day=day.isoformat(), week=f"{iso.year:04d}-W{iso.week:02d}",
        month=f"{day.year:04d}-{day.month:02d}",
        resets_at={
            "hour": (hour_start + timedelta(hours=1)).astimezone(UTC), "day": midnight(day + timedelta(days=1)),
            "week": midnight(week_start + timedelta(days=7)), "month": midnight(next_month),
        },
    )


def caps_of(
    level: str, scope: str, caps: WindowCaps, ids: WindowIds, soft_cap: Decimal = NO_RATIO,
    hard_cap: Decimal = NO_RATIO, model: str = "",
) -> list[LevelCap]:
    """The ``LevelCap`` of each window ``caps`` caps (soft and hard as ``Thresholds.from_limits``)."""
    return [
        LevelCap(level, scope, window, ids.of(window), *bounds(limit, soft_cap, hard_cap),
                 limit=limit, model=model, resets_at=ids.resets_at[window])
        for window, limit in caps.items()
    ]


def bounds(limit: Micros, soft_cap: Decimal = NO_RATIO, hard_cap: Decimal = NO_RATIO) -> tuple[Micros, Micros]:
    """(hard, soft) of a cap of ``limit`` (rounded as ``Thresholds.from_limits`` rounds them)."""
    return (int((hard_cap * limit).to_integral_value(rounding=ROUND_FLOOR)),
            int((soft_cap * limit).to_integral_value(rounding=ROUND_CEILING)))


def booked_caps(caps: tuple[LevelCap, ...]) -> list[list[str | int]]:
    """What a charge no admission booked keeps of its caps (``Reservation.levels``) to settle later: the
    journal's and a deferred call's record (JSON)."""
    return [[c.level, c.scope, c.window, c.period, c.limit, c.model] for c in caps]


def caps_booked(data: object) -> tuple[LevelCap, ...]:
    """``booked_caps``' caps back (``ValueError``/``TypeError`` for anything else; ``None``: none)."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise TypeError("levels must be a list")
    return tuple(LevelCap(str(level), str(scope), str(window), str(period), int(limit), int(limit), int(limit),
                          model=str(model))
                 for level, scope, window, period, limit, model in data)


def _usd(micros: Micros) -> str:
    return str(Decimal(micros) / 1_000_000)
