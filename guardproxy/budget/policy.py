"""One tenant's budget policy: its limits and caps, as the decision reads them (``proxy.yaml``'s
``budgets.defaults`` merged with the tenant's own entry, by ``guardproxy.config.settings``)."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

from guardproxy.budget.fleet import LoopPolicy, VelocityPolicy
from guardproxy.budget.levels import WindowCaps
from guardproxy.types import Micros


@dataclass(frozen=True)
class BudgetPolicy:
    """Limits of one tenant, merged from ``budgets.defaults`` and its own entry."""

    daily_micros: Micros
    monthly_micros: Micros
    soft_cap: Decimal
    hard_cap: Decimal
    timezone: str
    #: Requests per minute (0: no limit).
    rpm: int = 0
    #: Tokens per minute, prompt plus worst-case output at admission, real usage once settled (0: no limit).
    tpm: int = 0
    #: The most one job (work order) may cost, worst case included (``None``: no cap).
    job_micros: Micros | None = None
    #: Serve repeated deterministic requests from the response cache.
    cache: bool = False
    #: ``cache: semantic``: the exact cache, and near-duplicate chat questions too (``http/semantic.py``).
    semantic_cache: bool = False
    #: When no tier's worst case fits, send the call with a lowered output limit that fits instead
    #: of refusing it, if each output can still have ``min_completion_tokens``.
    clamp_max_tokens: bool = False
    min_completion_tokens: int = 256
    #: The runaway-agent brake (``budget/fleet.py``); ``None``: off.
    loop: LoopPolicy | None = None
    #: The spend-velocity alert (``budget/fleet.py``); ``None``: off.
    velocity: VelocityPolicy | None = None
    #: Caps of the tenant's local hour and ISO week (``None``: none), beside day and month.
    hourly_micros: Micros | None = None
    weekly_micros: Micros | None = None
    #: ``models``: caps of one model's spend inside the tenant, by model name.
    model_caps: tuple[tuple[str, WindowCaps], ...] = ()

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)
