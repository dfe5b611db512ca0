"""Brakes for agent fleets, as values: the runaway-loop brake and the spend-velocity alert (pure).

``loop: {max_repeats, window_s, action}`` refuses (or only alerts on) the same request sent more than
``max_repeats`` times within ``window_s`` by one key for one job; ``velocity: {factor, ...}`` alerts
when a tenant's last hour costs more than ``factor`` times its trailing hourly average. Both are set
in ``budgets.defaults`` and per tenant (read by ``guardproxy.config.fleet``); ``http/brakes.py`` and
``store/velocity.py`` apply them.

"The same request" is the request's canonical digest: the endpoint and its parsed JSON body with
sorted keys, without the fields that do not change the answer (``IGNORED_FIELDS``), so a stream of
the same question, or one sent with another ``user`` tag, is still the same question.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson

from guardproxy.types import Micros

#: Top-level request fields left out of the digest: they change how the answer is delivered, tagged
#: or stored, never what it says.
IGNORED_FIELDS = frozenset({
    "stream", "stream_options", "user", "metadata", "store", "service_tier", "prompt_cache_key",
    "safety_identifier",
})
LOOP_ACTIONS = ("refuse", "alert")
#: Bounds the per-request zset the loop script keeps (it holds at most ``max_repeats`` entries).
MAX_REPEATS_LIMIT = 10_000
MAX_WINDOW_S = 86_400
MAX_BASELINE_HOURS = 168


@dataclass(frozen=True)
class LoopPolicy:
    """More than ``max_repeats`` identical requests of one key and job within ``window_s``: a loop."""

    max_repeats: int = 5
    window_s: int = 60
    #: ``refuse`` (429 ``loop_detected``) or ``alert`` (let it through, queue a ``loop`` alert).
    action: str = "refuse"

    @property
    def refuses(self) -> bool:
        return self.action == "refuse"


@dataclass(frozen=True)
class VelocityPolicy:
    """Alert when the last hour costs more than ``factor`` x the average of the ``baseline_hours``
    before it, and at least ``min_micros``."""

    factor: Decimal
    baseline_hours: int = 24
    min_micros: Micros = 1_000_000

    @property
    def factor_ppm(self) -> int:
        return int(self.factor * 1_000_000)


def request_digest(endpoint: str, body: Mapping[str, Any]) -> str:
    """The canonical digest of a request: sha256 (hex, 32 digits) of the endpoint and the JSON body,
    keys sorted at every level, without ``IGNORED_FIELDS``."""
    kept = {k: v for k, v in body.items() if k not in IGNORED_FIELDS}
    canonical = orjson.dumps([endpoint, kept], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()[:32]


def key_fingerprint(key_digest: str | None) -> str:
    """A caller's key as the loop brake and the export name it: the first 16 hex digits of its sha256
    (``guardproxy hash-key`` prints the whole), never the key; ``-`` for none."""
    if not key_digest:
        return "-"
    return key_digest.removeprefix("sha256:")[:16]
