"""What one budgeted call was, for the log line and the trace span written when it settles.

``CallContext`` is taken from the request when it arrives (job id, trace headers, start time);
``SettledCall`` adds what admission decided and what the call cost. Both are plain values: the
pipeline builds them, ``logs`` prints one line per settled call and ``telemetry`` turns it into
a span, so the two never disagree with each other or with the audit entry.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from guardproxy.budget.cost import usd_text
from guardproxy.types import Micros


@dataclass(frozen=True)
class CallContext:
    """What the proxy knows of a call before it is admitted."""

    job_id: str = ""
    #: W3C trace context of the caller (``traceparent``, ``tracestate``), continued by the span.
    trace_headers: Mapping[str, str] = field(default_factory=dict)
    started_s: float = field(default_factory=time.monotonic)
    started_ns: int = field(default_factory=time.time_ns)
    #: The caller's key as ``fleet.key_fingerprint`` names it (never the key), ``""``: not known.
    key_id: str = ""

    @classmethod
    def of(cls, headers: Mapping[str, str], job_id: str, key_id: str = "") -> CallContext:
        """The call's context: its job (already validated, ``auth.TenantResolver.job_of``), the caller's
        key fingerprint and the incoming trace headers."""
        trace = {name: headers[name] for name in ("traceparent", "tracestate") if name in headers}
        return cls(job_id=job_id, trace_headers=trace, key_id=key_id)


@dataclass(frozen=True)
class SettledCall:
    """One settled attempt of a call: the figures of its audit entry and what led to them."""

    context: CallContext
    #: The endpoint: ``chat/completions``, ``completions``, ``embeddings`` or ``responses``.
    endpoint: str
    tenant: str
    requested_model: str
    model: str
    upstream: str
    #: The model name sent upstream (an Azure deployment, or the caller's own dated name).
    upstream_model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_micros: Micros
    reserved_micros: Micros
    outcome: str
    request_id: str
    budget_state: str
    downgraded_from: str | None
    fallback_from: str | None
    ended_ns: int = field(default_factory=time.time_ns)
    ended_s: float = field(default_factory=time.monotonic)

    @property
    def duration_ms(self) -> int:
        return round((self.ended_s - self.context.started_s) * 1000)

    def log_fields(self) -> dict[str, Any]:
        """The structured fields of the ``call settled`` log line (JSON logs print them as keys)."""
        return {
            "event": "call_settled", "tenant": self.tenant, "requested_model": self.requested_model,
            "model": self.model, "upstream": self.upstream, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
            "cost_micros": self.cost_micros, "cost_usd": usd_text(self.cost_micros),
            "reserved_micros": self.reserved_micros, "outcome": self.outcome,
            "request_id": self.request_id, "job_id": self.context.job_id or None,
            "duration_ms": self.duration_ms, "budget_state": self.budget_state,
            "downgraded_from": self.downgraded_from,
        }

    def summary(self) -> str:
        """The same figures as one line of text."""
        return (
            f"settled tenant={self.tenant} requested={self.requested_model} sent={self.model} outcome={self.outcome} "
            f"tokens={self.prompt_tokens}/{self.completion_tokens}/{self.cached_tokens} "
            f"cost_micros={self.cost_micros} cost_usd={usd_text(self.cost_micros)} "
            f"reserved_micros={self.reserved_micros} request_id={self.request_id} "
            f"job_id={self.context.job_id or '-'} duration_ms={self.duration_ms}"
        )
