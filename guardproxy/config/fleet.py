"""``loop`` and ``velocity`` of ``budgets.defaults`` and of a tenant (``guardproxy.budget.fleet``'s values)."""

from __future__ import annotations

from decimal import Decimal

from guardproxy.budget.fleet import (
    LOOP_ACTIONS,
    MAX_BASELINE_HOURS,
    MAX_REPEATS_LIMIT,
    MAX_WINDOW_S,
    LoopPolicy,
    VelocityPolicy,
)
from guardproxy.budget.pricing import usd_to_micros
from guardproxy.config.validation import ConfigError, Fields


def parse_loop(f: Fields, key: str, base: LoopPolicy | None) -> LoopPolicy | None:
    """``loop`` of a defaults or tenant section: ``null`` turns it off; fields left out come from
    ``base`` (the defaults' loop), else from ``LoopPolicy``'s defaults."""
    if not f.has(key):
        return base
    if f.get(key) is None:
        return None
    s = f.section(key)
    start = base or LoopPolicy()
    out = LoopPolicy(
        max_repeats=s.integer("max_repeats", start.max_repeats, min_value=1, max_value=MAX_REPEATS_LIMIT),
        window_s=s.integer("window_s", start.window_s, min_value=1, max_value=MAX_WINDOW_S),
        action=s.text("action", start.action, choices=LOOP_ACTIONS),
    )
    s.done()
    return out


def parse_velocity(f: Fields, key: str, base: VelocityPolicy | None) -> VelocityPolicy | None:
    """``velocity`` of a defaults or tenant section: ``null`` turns it off; ``factor`` is required
    unless ``base`` has one."""
    if not f.has(key):
        return base
    if f.get(key) is None:
        return None
    s = f.section(key)
    if base is None and not s.has("factor"):
        raise ConfigError(s.at("factor"), "is required (the last hour's cost over the hourly average, e.g. 3)")
    factor = s.decimal("factor", base.factor if base else None, min_value=Decimal(1), max_value=Decimal(10_000))
    out = VelocityPolicy(
        factor=factor.quantize(Decimal("0.000001")),
        baseline_hours=s.integer("baseline_hours", base.baseline_hours if base else 24, min_value=1,
                                 max_value=MAX_BASELINE_HOURS),
        min_micros=usd_to_micros(s.decimal("min_usd", None, min_value=Decimal(0))) if s.has("min_usd")
        else (base.min_micros if base else VelocityPolicy.min_micros),
    )
    s.done()
    return out
