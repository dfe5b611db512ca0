"""Clamp instead of refuse: the largest output limit whose worst case still fits (pure).

A call's worst case is its prompt plus every output as long as its limit (``choices`` outputs of
``limit`` tokens). When no tier of its downgrade chain fits at that worst case, a shorter answer
may: for each tier, the largest per-output limit ``t`` with

    used + ceil((prompt * input + choices * t * output) / 1e6) <= hard      (day and month)

and the tiers where ``t`` reaches ``min_completion_tokens`` become the candidates of a second
admission (``choice.choose``), which checks and reserves them atomically like any other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from guardproxy.budget.decision import Thresholds
from guardproxy.budget.pricing import TOKENS_PER_PRICE_UNIT, Price, Usage, cost_micros
from guardproxy.types import Micros


@dataclass(frozen=True)
class Tier:
    """One model of a downgrade chain, as the clamp sees it."""

    price: Price
    #: The per-output limit the call has on this tier: the request's own, else the model's.
    limit_tokens: int


@dataclass(frozen=True)
class Candidate:
    """A tier the call fits on with a lowered output limit."""

    #: Position of the tier in the downgrade chain.
    index: int
    #: The lowered per-output limit (``max_tokens`` and its kin) sent upstream.
    max_tokens: int
    #: The worst case at that limit: what the second admission reserves.
    worst_case: Micros


def room(used_day: Micros, used_month: Micros, limits: Thresholds) -> Micros:
    """What a call may still cost under both hard caps (negative once past one)."""
    return min(limits.hard_day - used_day, limits.hard_month - used_month)


def largest_output_tokens(room_micros: Micros, prompt_tokens: int, choices: int, tier: Tier) -> int | None:
    """The largest per-output limit, at most ``tier.limit_tokens``, whose worst case costs at most
    ``room_micros``; ``None`` when not even the prompt fits."""
    # cost_micros rounds up: ceil(x / U) <= room  <=>  x <= room * U, for integers x >= 0.
    left = room_micros * TOKENS_PER_PRICE_UNIT - prompt_tokens * tier.price.input
    if room_micros < 0 or left < 0:
        return None
    per_token = choices * tier.price.output
    if per_token == 0:
        return tier.limit_tokens
    return min(tier.limit_tokens, left // per_token)


def candidates(
    used_day: Micros, used_month: Micros, limits: Thresholds, prompt_tokens: int, choices: int,
    tiers: Sequence[Tier], min_completion_tokens: int, job_room: Micros | None = None,
) -> list[Candidate]:
    """Every tier, in chain order, on which each of ``choices`` outputs can still have at least
    ``min_completion_tokens``, with the largest limit that fits there (within the tenant's room and,
    with a capped job, ``job_room``); empty when none can (or the call has no output to lower,
    ``choices == 0``)."""
    if choices < 1:
        return []
    left = room(used_day, used_month, limits)
    if job_room is not None:
        left = min(left, job_room)
    out = []
    for index, tier in enumerate(tiers):
        tokens = largest_output_tokens(left, prompt_tokens, choices, tier)
        if tokens is not None and tokens >= min_completion_tokens:
            worst = cost_micros(Usage(prompt_tokens, choices * tokens), tier.price)
            out.append(Candidate(index, tokens, worst))
    return out
