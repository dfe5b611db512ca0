"""What admission decided for one attempt of a call, and what the client is told about it."""

from __future__ import annotations

from dataclasses import dataclass, field

from guardproxy.budget import decision as budget
from guardproxy.budget import ratelimit
from guardproxy.budget.pricing import micros_to_usd
from guardproxy.budget.records import Admission, Reservation
from guardproxy.config.settings import ModelConfig
from guardproxy.http.requests import ApiRequest
from guardproxy.observe.calls import CallContext


@dataclass(frozen=True)
class Plan:
    """What admission decided for one attempt of a call."""

    tenant: str
    request: ApiRequest
    #: The model the client asked for, as priced.
    requested: ModelConfig
    #: The model of this attempt: ``requested`` or one of its fallbacks.
    attempt: ModelConfig
    #: The model sent: ``attempt`` or a cheaper tier of it.
    sent: ModelConfig
    prompt_tokens: int
    admission: Admission
    context: CallContext = field(default_factory=CallContext)
    #: The lowered output limit sent, when the call was clamped to fit (``clamp.py``).
    clamped_tokens: int | None = None

    @property
    def reservation(self) -> Reservation:
        assert self.admission.reservation is not None
        return self.admission.reservation

    @property
    def own_request_id(self) -> str:
        """guardproxy's id for this attempt (``req_gp_<reservation id>``), for an upstream that sends none."""
        return f"req_gp_{self.reservation.id}"

    @property
    def downgraded(self) -> bool:
        return self.sent.name != self.attempt.name

    @property
    def fell_back(self) -> bool:
        return self.attempt.name != self.requested.name

    @property
    def upstream_model(self) -> str:
        """The name sent upstream: a configured deployment, else the caller's own name when unchanged."""
        if self.sent.deployment:
            return self.sent.deployment
        return self.request.model if self.sent is self.requested else self.sent.name

    def headers(self) -> dict[str, str]:
        """The ``x-guardproxy-*`` response headers (contract §5), at admission."""
        decision, limits = self.admission.decision, self.admission.limits
        headers = {
            "x-guardproxy-tenant": self.tenant,
            "x-guardproxy-model": self.sent.name,
            "x-guardproxy-budget-state":
                budget.state_of(decision.used_day, decision.used_month, limits, self.admission.refused),
            "x-guardproxy-budget-remaining-usd":
                f"{micros_to_usd(budget.remaining(decision.used_day, decision.used_month, limits)):.6f}",
        }
        if self.downgraded:
            headers["x-guardproxy-downgraded-from"] = self.attempt.name if self.fell_back else self.request.model
        if self.fell_back:
            headers["x-guardproxy-fallback-from"] = self.request.model
        # The tenant's own per-minute limits; they replace the upstream's headers of the same kind.
        headers.update(ratelimit.headers(self.admission.rate))
        if self.clamped_tokens is not None:
            headers["x-guardproxy-clamped-max-tokens"] = str(self.clamped_tokens)
        return headers
