"""Prices and the cost of a call: pure integer arithmetic, always rounded up."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal
from typing import TypeVar

from guardproxy.types import Micros, MicrosPerMTokens

MICROS_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000

# A dated snapshot name: gpt-4o-2024-08-06, gpt-4-0613, gpt-3.5-turbo-0125.
_SNAPSHOT_SUFFIX = re.compile(r"(?P<base>.+?)-(?:\d{4}-\d{2}-\d{2}|\d{4})")

T = TypeVar("T")


@dataclass(frozen=True)
class Price:
    """What one million tokens of each kind cost, in micro-USD."""

    input: MicrosPerMTokens
    cached_input: MicrosPerMTokens
    output: MicrosPerMTokens

    def __post_init__(self) -> None:
        for name in ("input", "cached_input", "output"):
            if getattr(self, name) < 0:
                raise ValueError(f"Price.{name} must not be negative")


@dataclass(frozen=True)
class Usage:
    """Tokens of one call. ``cached_prompt_tokens`` is a part of ``prompt_tokens`` and ``reasoning_tokens``
    a part of ``completion_tokens`` (charged as output), as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    reasoning_tokens: int = 0

    def __post_init__(self) -> None:
        if min(self.prompt_tokens, self.completion_tokens, self.cached_prompt_tokens, self.reasoning_tokens) < 0:
            raise ValueError("token counts must not be negative")


def cost_micros(usage: Usage, price: Price) -> Micros:
    """uncached prompt * input + cached prompt * cached_input + completion * output, rounded up."""
    cached = min(usage.cached_prompt_tokens, usage.prompt_tokens)
    uncached = usage.prompt_tokens - cached
    scaled = uncached * price.input + cached * price.cached_input + usage.completion_tokens * price.output
    return -(-scaled // TOKENS_PER_PRICE_UNIT)


def batch_discounted(price: Price) -> Price:
    """Half of ``price`` (rounded up per million tokens): the Batch API's discount at OpenAI."""
    return Price(-(-price.input // 2), -(-price.cached_input // 2), -(-price.output // 2))


def usd_to_micros(usd: Decimal) -> Micros:
    """A budget in USD as micro-USD (half a micro rounds up)."""
    return int((usd * MICROS_PER_USD).to_integral_value(rounding=ROUND_HALF_UP))


def price_to_micros(usd_per_m_tokens: Decimal) -> MicrosPerMTokens:
    """A price in USD per 1M tokens as micro-USD per 1M tokens, rounded up so nothing is undercharged."""
    return int((usd_per_m_tokens * MICROS_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def micros_to_usd(micros: Micros) -> float:
    return micros / MICROS_PER_USD


def format_usd(micros: Micros) -> str:
    """An amount for people: cents when it has no finer part, else every micro-dollar it has
    (``0.0004``, never ``0.00`` for a non-zero amount); thousands separated."""
    if micros % 10_000 == 0 or abs(micros) >= 100_000_000:
        return f"{micros / MICROS_PER_USD:,.2f}"
    return f"{Decimal(micros) / MICROS_PER_USD:,.6f}".rstrip("0")


def lookup_model(name: str, models: Mapping[str, T]) -> T | None:
    """The configured entry for ``name``; a dated snapshot falls back to its listed base model."""
    entry = models.get(name)
    if entry is not None:
        return entry
    match = _SNAPSHOT_SUFFIX.fullmatch(name)
    if match:
        return models.get(match.group("base"))
    return None
