"""OpenTelemetry tracing: one span per settled call, exported over OTLP/HTTP (``guardproxy[otel]``).

Off, and never imported, while ``telemetry.otlp_endpoint`` is empty. The span carries the GenAI
semantic-convention attributes (``gen_ai.*``) that Langfuse, Helicone and other OpenTelemetry
backends read, and guardproxy's own (``guardproxy.*``): tenant, cost, budget state, downgrade.
A caller's ``traceparent`` is continued, so the call shows inside the agent's own trace. The span
is built when the call settles, from the values of its audit entry, with the call's real start and
end times; export happens on a background thread, never on the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from guardproxy.budget.pricing import micros_to_usd
from guardproxy.config.settings import Config, TelemetryConfig
from guardproxy.observe.calls import SettledCall

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("guardproxy.telemetry")

#: ``gen_ai.operation.name`` of each budgeted endpoint.
OPERATIONS = {"chat/completions": "chat", "completions": "text_completion", "embeddings": "embeddings",
              "responses": "chat"}
#: Export at least this often (the SDK's default is 5 s).
EXPORT_DELAY_MS = 1000


class Tracing:
    """The tracer provider of one app; ``observer(config)`` makes the pipeline's settle hook for a config."""

    def __init__(self, settings: TelemetryConfig) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError:
            raise RuntimeError(
                "telemetry.otlp_endpoint is set but OpenTelemetry is not installed: pip install 'guardproxy[otel]'"
            ) from None
        endpoint = settings.otlp_endpoint
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        self.provider: TracerProvider = TracerProvider(resource=Resource({"service.name": settings.service_name}))
        exporter = OTLPSpanExporter(endpoint=endpoint, headers=dict(settings.headers), timeout=10)
        self.provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS))
        self.tracer = self.provider.get_tracer("guardproxy")
        self.propagator = TraceContextTextMapPropagator()
        log.info("tracing: one span per call to %s", endpoint)

    def observer(self, config: Config) -> Callable[[SettledCall], None]:
        providers = {name: u.provider or ("azure.ai.openai" if u.azure else name)
                     for name, u in config.upstreams.items()}

        def observe(call: SettledCall) -> None:
            self.record(call, providers.get(call.upstream, call.upstream))

        return observe

    def record(self, call: SettledCall, provider: str) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        operation = OPERATIONS.get(call.endpoint, "chat")
        parent = self.propagator.extract(carrier=dict(call.context.trace_headers))
        span = self.tracer.start_span(
            f"{operation} {call.requested_model}", context=parent, kind=SpanKind.CLIENT,
            start_time=call.context.started_ns, attributes=span_attributes(call, operation, provider),
        )
        if call.outcome == "error":
            span.set_status(Status(StatusCode.ERROR, "the upstream failed"))
        span.end(end_time=max(call.ended_ns, call.context.started_ns))

    def shutdown(self) -> None:
        """Export what is pending and stop (at the app's shutdown)."""
        self.provider.shutdown()


def span_attributes(call: SettledCall, operation: str, provider: str) -> Mapping[str, Any]:
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.system": provider,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": call.requested_model,
        "gen_ai.response.model": call.upstream_model,
        "gen_ai.usage.input_tokens": call.prompt_tokens,
        "gen_ai.usage.output_tokens": call.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": call.cached_tokens,
        "guardproxy.tenant": call.tenant,
        "guardproxy.model": call.model,
        "guardproxy.upstream": call.upstream,
        "guardproxy.cost_micros": call.cost_micros,
        "guardproxy.cost_usd": micros_to_usd(call.cost_micros),
        "guardproxy.reserved_micros": call.reserved_micros,
        "guardproxy.budget_state": call.budget_state,
        "guardproxy.downgraded": call.downgraded_from is not None,
        "guardproxy.outcome": call.outcome,
        "guardproxy.request_id": call.request_id,
        # Langfuse and Helicone group traces by user: the tenant is who pays.
        "user.id": call.tenant,
    }
    optional = {"guardproxy.downgraded_from": call.downgraded_from, "guardproxy.fallback_from": call.fallback_from,
                "guardproxy.job_id": call.context.job_id or None}
    attributes.update({k: v for k, v in optional.items() if v is not None})
    return attributes
