"""The budget decision (contract §4), as pure functions.

The store runs the very same decision inside one Lua script (``lua/admit.v5.lua``) so that reading
the spend and reserving happen atomically; this module is its reference, tested exhaustively, and
a differential test runs both on the same inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal

from guardproxy.budget.levels import LevelCap
from guardproxy.budget.policy import BudgetPolicy
from guardproxy.types import Micros

ACTIVE, DOWNGRADING, BLOCKED = "active", "downgrading", "blocked"
STATES = (ACTIVE, DOWNGRADING, BLOCKED)
#: The rate-limit window: requests and tokens admitted in the last minute (a sliding log).
WINDOW_MS = 60_000
#: Kinds of rate limit a call can hit (OpenAI's error ``type`` for them).
REQUESTS, TOKENS = "requests", "tokens"


@dataclass(frozen=True)
class Thresholds:
    """A tenant's caps in micro-USD: at ``soft_*`` spend downgrades, past ``hard_*`` it is refused."""

    soft_day: Micros
    hard_day: Micros
    soft_month: Micros
    hard_month: Micros

    @classmethod
    def from_limits(
        cls, daily_micros: Micros, monthly_micros: Micros, soft_cap: Decimal, hard_cap: Decimal
    ) -> Thresholds:
        # soft: used/limit >= soft_cap  <=>  used >= ceil(soft_cap*limit), for integer `used`.
        # hard: used + worst <= hard_cap*limit  <=>  used + worst <= floor(hard_cap*limit).
        return cls(
            soft_day=int((soft_cap * daily_micros).to_integral_value(rounding=ROUND_CEILING)),
            hard_day=int((hard_cap * daily_micros).to_integral_value(rounding=ROUND_FLOOR)),
            soft_month=int((soft_cap * monthly_micros).to_integral_value(rounding=ROUND_CEILING)),
            hard_month=int((hard_cap * monthly_micros).to_integral_value(rounding=ROUND_FLOOR)),
        )

    @classmethod
    def for_policy(cls, policy: BudgetPolicy) -> Thresholds:
        return _thresholds_for(policy)


@functools.lru_cache(maxsize=1024)
def _thresholds_for(policy: BudgetPolicy) -> Thresholds:
    # Policies are immutable and few; the Decimal arithmetic need not run on every request.
    return Thresholds.from_limits(policy.daily_micros, policy.monthly_micros, policy.soft_cap, policy.hard_cap)


@dataclass(frozen=True)
class Decision:
    """``index`` into the candidate chain of the model to send, or ``None`` when refused."""

    index: int | None
    used_day: Micros
    used_month: Micros
    #: The period that refused the call (``day`` or ``month``), when refused.
    exhausted: str | None = None

    @property
    def admitted(self) -> bool:
        return self.index is not None


def decide(
    used_day: Micros, used_month: Micros, limits: Thresholds, worst_cases: Sequence[Micros],
    job_room: Micros | None = None,
) -> Decision:
    """Pick the model to send from ``worst_cases`` (the requested model first, then its downgrades).

    - The requested model's worst case fits under both hard caps: send it, unless spend has reached
      a soft cap, then send its ``downgrade_to`` when that fits (one tier).
    - It does not fit: the first cheaper tier that fits; none fits: refuse.

    ``job_room``: what the call's job may still spend (its cap minus its spend and live
    reservations), ``None`` for no cap; "fits" then also means within it. A call that only the
    job's cap refuses is refused with ``exhausted == "job"``.
    """

    def fits_tenant(worst: Micros) -> bool:
        return used_day + worst <= limits.hard_day and used_month + worst <= limits.hard_month

    def fits(worst: Micros) -> bool:
        return fits_tenant(worst) and (job_room is None or worst <= job_room)

    if fits(worst_cases[0]):
        soft = used_day >= limits.soft_day or used_month >= limits.soft_month
        index = 1 if soft and len(worst_cases) > 1 and fits(worst_cases[1]) else 0
        return Decision(index, used_day, used_month)
    for index in range(1, len(worst_cases)):
        if fits(worst_cases[index]):
            return Decision(index, used_day, used_month)
    if job_room is not None and any(fits_tenant(w) for w in worst_cases):
        return Decision(None, used_day, used_month, "job")
    cheapest = worst_cases[-1]
    exhausted = "month" if used_month + cheapest > limits.hard_month else "day"
    return Decision(None, used_day, used_month, exhausted)


def decide_levels(
    used_day: Micros, used_month: Micros, limits: Thresholds, worst_cases: Sequence[Micros],
    models: Sequence[str], caps: Sequence[LevelCap], caps_used: Sequence[Micros], job_room: Micros | None = None,
) -> tuple[Decision, int | None]:
    """``decision.decide`` with every level's caps: the decision and the index in ``caps`` of the
    cap that refused the call (``None``: admitted, or refused by the tenant's day or month or the
    job, as ``decide`` says). ``admit.v5.lua`` runs the same decision atomically."""

    def fits_v4(worst: Micros) -> bool:
        return (used_day + worst <= limits.hard_day and used_month + worst <= limits.hard_month
                and (job_room is None or worst <= job_room))

    def refusing(i: int) -> int | None:
        return next((c for c, cap in enumerate(caps)
                     if cap.binds(models[i]) and caps_used[c] + worst_cases[i] > cap.hard), None)

    def fits(i: int) -> bool:
        return fits_v4(worst_cases[i]) and refusing(i) is None

    if fits(0):
        soft = (used_day >= limits.soft_day or used_month >= limits.soft_month
                or any(cap.binds(models[0]) and caps_used[c] >= cap.soft for c, cap in enumerate(caps)))
        index = 1 if soft and len(worst_cases) > 1 and fits(1) else 0
        return Decision(index, used_day, used_month), None
    for index in range(1, len(worst_cases)):
        if fits(index):
            return Decision(index, used_day, used_month), None
    for i in range(len(worst_cases)):
        if fits_v4(worst_cases[i]):
            return Decision(None, used_day, used_month, "level"), refusing(i)
    return decide(used_day, used_month, limits, worst_cases, job_room), None


def state_of(used_day: Micros, used_month: Micros, limits: Thresholds, refused: bool = False) -> str:
    """``blocked`` once a hard cap is reached or while the period's last admission was refused
    (``refused``: the store's flag, set by a budget 429 and cleared by the next admitted call),
    ``downgrading`` at a soft cap, else ``active``."""
    if refused or used_day >= limits.hard_day or used_month >= limits.hard_month:
        return BLOCKED
    if used_day >= limits.soft_day or used_month >= limits.soft_month:
        return DOWNGRADING
    return ACTIVE


def remaining(used_day: Micros, used_month: Micros, limits: Thresholds) -> Micros:
    """What is left before the nearer hard cap (never negative)."""
    return max(0, min(limits.hard_day - used_day, limits.hard_month - used_month))


@dataclass(frozen=True)
class RateLimits:
    """Requests and tokens per minute a tenant may use; 0 means no limit."""

    rpm: int = 0
    tpm: int = 0


@dataclass(frozen=True)
class RateVerdict:
    """Why a call over a per-minute limit is refused: ``kind`` (``requests`` or ``tokens``), and
    ``wait_ms`` until the window admits it (``None``: never, the call alone exceeds ``tpm``)."""

    kind: str
    wait_ms: int | None


def rate_verdict(
    limits: RateLimits, now_ms: int, requests_at_ms: Sequence[int], tokens_at_ms: Sequence[tuple[int, int]],
    call_tokens: int,
) -> RateVerdict | None:
    """``None`` if a call of ``call_tokens`` fits the sliding windows, else why not.

    ``requests_at_ms``: when each request in the window was admitted, oldest first;
    ``tokens_at_ms``: (admitted at, tokens) of each call in it, oldest first (entries older than
    ``WINDOW_MS`` have left the window). Requests are checked before tokens.
    """
    requests = [t for t in requests_at_ms if t > now_ms - WINDOW_MS]
    if limits.rpm > 0 and len(requests) + 1 > limits.rpm:
        # the (len + 1 - rpm)-th oldest request has to leave the window first
        return RateVerdict(REQUESTS, max(1, requests[len(requests) - limits.rpm] + WINDOW_MS - now_ms))
    if limits.tpm > 0:
        window = [(t, n) for t, n in tokens_at_ms if t > now_ms - WINDOW_MS]
        used = sum(n for _, n in window)
        if call_tokens > limits.tpm:
            return RateVerdict(TOKENS, None)
        if used + call_tokens > limits.tpm:
            freed = 0
            for at_ms, n in window:
                freed += n
                if used - freed + call_tokens <= limits.tpm:
                    return RateVerdict(TOKENS, max(1, at_ms + WINDOW_MS - now_ms))
    return None
