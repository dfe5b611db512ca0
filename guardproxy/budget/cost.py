"""Telling the caller what a call cost: exactly the micro-dollars charged, never an estimate.

``x-guardproxy-cost-usd`` on every non-streamed answer (and on cache hits: 0), as a fixed
six-decimal USD amount; and, unless ``server.usage_cost: false``, ``usage.cost`` in the answer's
body and in the usage of a stream's final chunk, in USD, as OpenRouter reports it (a JSON number).
"""

from __future__ import annotations

from typing import Any

from guardproxy.types import Micros

COST_HEADER = "x-guardproxy-cost-usd"
_MICROS_PER_USD = 1_000_000


def usd_text(micros: Micros) -> str:
    """``micros`` as an exact USD amount with six decimals (``0.000125``): no float rounding."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), _MICROS_PER_USD)
    return f"{sign}{whole}.{fraction:06d}"


def usd_number(micros: Micros) -> float:
    """``micros`` in USD as a JSON number: the nearest double to the six-decimal amount."""
    return float(usd_text(micros))


def add_usage_cost(answer: Any, micros: Micros) -> bool:
    """Put ``usage.cost`` into ``answer`` (a chat, completion, embedding or response object, or a
    stream's usage chunk) when it has a ``usage`` object; whether it did."""
    usage = answer.get("usage") if isinstance(answer, dict) else None
    if not isinstance(usage, dict):
        return False
    usage["cost"] = usd_number(micros)
    return True
