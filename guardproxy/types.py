"""Type aliases shared across guardproxy, so units show in signatures."""

from __future__ import annotations

from typing import Any, TypeAlias

#: Money, always an integer count of micro-USD (1 USD = 1_000_000).
Micros: TypeAlias = int
#: Price of one million tokens, in micro-USD (2.50 USD per 1M tokens = 2_500_000).
MicrosPerMTokens: TypeAlias = int
#: A parsed JSON object, as orjson returns it.
JSONObject: TypeAlias = dict[str, Any]
