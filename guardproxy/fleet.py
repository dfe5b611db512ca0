"""Brakes for agent fleets, as values: the runaway-loop brake and the spend-velocity alert (pure).

``loop: {max_repeats, window_s, action}`` refuses (or only alerts on) the same request sent more than
``max_repeats`` times within ``window_s`` by one key for one job; ``velocity: {factor, ...}`` alerts
when a tenant's last hour costs more than ``factor`` times its trailing hourly average. Both are set
in ``budgets.defaults`` and per tenant (``config.merge_policy``); ``brakes.py`` applies them.

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

from guardproxy.pricing import usd_to_micros
from guardproxy.types import Micros
from guardproxy.validation import ConfigError, Fields

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
