"""The config of budget levels and windows (``guardproxy.budget.levels``' values): ``budgets.global``,
a tenant's ``models`` caps and ``api_key_budgets``."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from decimal import Decimal

from guardproxy.budget.levels import WINDOW_FIELDS, WINDOWS, KeyBudget, WindowCaps
from guardproxy.budget.pricing import usd_to_micros
from guardproxy.config.validation import ConfigError, Fields, describe, join
from guardproxy.types import Micros

_HASHED_KEY = re.compile(r"sha256:[0-9a-f]{64}")


def _cap(f: Fields, key: str) -> Micros | None:
    if f.get(key) is None:
        return None
    return usd_to_micros(f.decimal(key, None, min_value=Decimal(0)))


def parse_window_caps(f: Fields, extra: tuple[str, ...] = ()) -> WindowCaps:
    """``hourly_usd``, ``daily_usd``, ``weekly_usd``, ``monthly_usd`` (each optional, null: none);
    unknown fields are refused unless in ``extra`` (read by the caller)."""
    caps = WindowCaps(**{w: _cap(f, WINDOW_FIELDS[w]) for w in WINDOWS})
    for name in extra:
        f.get(name)
    f.done()
    return caps


def parse_model_caps(
    f: Fields, key: str, base: tuple[tuple[str, WindowCaps], ...],
) -> tuple[tuple[str, WindowCaps], ...]:
    """``models: {<model>: {daily_usd: ...}}`` of a defaults or tenant section (left out: ``base``)."""
    if not f.has(key):
        return base
    section = f.section(key)
    out = []
    for model in list(section.raw):
        out.append((model, parse_window_caps(section.section(model))))
    section.done()
    return tuple(out)


def parse_key_budgets(f: Fields, tenant_keys: tuple[str, ...]) -> Mapping[str, KeyBudget]:
    """``api_key_budgets: {<key or sha256:...>: {hourly_usd, daily_usd, weekly_usd, monthly_usd, models}}``:
    a budget per config key; each key must be one of the tenant's ``api_keys``."""
    out: dict[str, KeyBudget] = {}
    for i, name in enumerate(list(f.raw)):
        digest = name if _HASHED_KEY.fullmatch(name) else "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        if digest not in tenant_keys:
            # named by position: the entry may be a plain key, which no message may show
            raise ConfigError(f"{f.path}[{i}]", "is not one of this tenant's api_keys (write the key as in "
                              "api_keys, or its sha256: form)")
        entry = f.section(name)
        models = entry.text_list("models")
        out[digest] = KeyBudget(parse_window_caps(entry, ("models",)), tuple(models))
    f.done()
    return out


def check_model_names(path: str, names: list[str], models: Mapping[str, object]) -> None:
    """Each of ``names`` must be a configured model."""
    for name in names:
        if name not in models:
            raise ConfigError(join(path, name), f"is not a configured model (have: {describe(sorted(models))})")
