"""Prometheus metrics (contract §6), in a registry of the app's own so apps can coexist in a test."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from guardproxy.pricing import Usage, micros_to_usd
from guardproxy.types import Micros

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30)


class Metrics:
    """The proxy's counters and histograms. Model labels are configured model names only."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "guardproxy_requests", "Budgeted requests by outcome.", ["tenant", "model", "outcome"], registry=r
        )
        self.spend = Counter("guardproxy_spend_usd", "Settled spend in USD.", ["tenant", "model"], registry=r)
        self.tokens = Counter("guardproxy_tokens", "Settled tokens.", ["tenant", "model", "type"], registry=r)
        self.downgrades = Counter(
            "guardproxy_downgrades", "Calls sent to a cheaper model than asked.",
            ["tenant", "from_model", "to_model"], registry=r,
        )
        self.upstream_duration = Histogram(
            "guardproxy_upstream_request_duration_seconds", "Upstream call duration, to the last byte.",
            ["upstream", "model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.servicetitan_lookups = Counter(
            "guardproxy_servicetitan_lookups", "ServiceTitan job -> tenant lookups by result.", ["result"],
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "guardproxy_time_to_first_token_seconds", "Time from admission to the first streamed token.",
            ["model"], buckets=_TTFT_BUCKETS, registry=r,
        )

    def record_settled(self, tenant: str, model: str, usage: Usage, cost: Micros) -> None:
        self.spend.labels(tenant, model).inc(micros_to_usd(cost))
        self.tokens.labels(tenant, model, "prompt").inc(usage.prompt_tokens)
        self.tokens.labels(tenant, model, "completion").inc(usage.completion_tokens)
        self.tokens.labels(tenant, model, "cached_prompt").inc(usage.cached_prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
