"""What a call hears from the budget levels beside its tenant's day and month (``budget/levels.py``):
the 429 naming the level and window that refused it, and the 403 of a key that may not ask a model."""

from __future__ import annotations

from datetime import datetime

from guardproxy.budget import ratelimit
from guardproxy.budget.levels import KeyBudget, LevelCap
from guardproxy.budget.periods import iso_utc
from guardproxy.budget.pricing import format_usd
from guardproxy.budget.records import Admission
from guardproxy.errors import ErrorKind, GuardError

#: Names the budget level that refused a call: global, tenant, key, model (or job).
LEVEL_HEADER = "x-guardproxy-budget-level"
#: Names the window of that level: hour, day, week or month.
WINDOW_HEADER = "x-guardproxy-budget-window"
_ADJECTIVE = {"hour": "hourly", "day": "daily", "week": "weekly", "month": "monthly"}


def check_key_models(budget: KeyBudget | None, asked: str, model: str) -> None:
    """403 when the caller's key may ask only for other models (its ``models``); nothing is counted."""
    if budget is None or not budget.models or asked in budget.models or model in budget.models:
        return
    raise GuardError(
        ErrorKind.MODEL_NOT_ALLOWED,
        f"This API key may not use the model {asked[:64]!r}; it may use: {', '.join(budget.models)}.",
        param="model",
    )


def level_over_budget(tenant: str, cap: LevelCap, admission: Admission, now: datetime) -> GuardError:
    """The 429 of a call refused by ``cap``: which level, which window, its limit and when it resets."""
    budget = f"{_ADJECTIVE[cap.window]} budget (limit {format_usd(cap.limit)} USD for {cap.period})"
    if cap.level == "global":
        what = f"The proxy's global {budget}, shared by all tenants, is reached"
    elif cap.level == "tenant":
        what = f"Tenant {tenant!r} has reached its {budget}"
    elif cap.level == "key":
        what = f"This API key of tenant {tenant!r} has reached its own {budget}"
    else:
        what = f"Tenant {tenant!r} has reached its {budget} for the model {cap.model!r}, and no cheaper tier fits"
    headers = {"x-should-retry": "false", **ratelimit.headers(admission.rate), "x-guardproxy-tenant": tenant,
               LEVEL_HEADER: cap.level, WINDOW_HEADER: cap.window}
    resets = ""
    if cap.resets_at is not None:
        headers["retry-after"] = str(max(1, int((cap.resets_at - now).total_seconds() + 0.999)))
        resets = f"; it resets at {iso_utc(cap.resets_at)}"
    return GuardError(ErrorKind.LEVEL_OVER_BUDGET, f"{what} (level: {cap.level}){resets}.", headers=headers)
