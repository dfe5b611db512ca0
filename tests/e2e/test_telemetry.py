"""Tracing: the OTLP receiver gets one span per call with the audit entry's tokens and cost."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from guardproxy.config.settings import parse_config
from tests.helpers import HI, TENANT_KEY, config_dict, keys
from tests.otlp_receiver import Received, create_receiver
from tests.servers import serve_in_thread

ADMIN = {"authorization": "Bearer adm-otel"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def receiver() -> Iterator[tuple[str, Received]]:
    received = Received()
    with serve_in_thread(create_receiver(received)) as url:
        yield url, received


def test_one_span_per_call_with_genai_attributes_and_the_audit_figures(
    receiver: tuple[str, Received], upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    endpoint, received = receiver
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": "adm-otel"},
                      telemetry={"otlp_endpoint": endpoint, "service_name": "gp-test",
                                 "headers": {"authorization": "Basic bGY6a2V5"}})
    url = serve_proxy(parse_config(raw, {}))
    headers = {"authorization": f"Bearer {TENANT_KEY}", "x-fake-completion-tokens": "9",
               "x-fake-cached-tokens": "2", "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    whole = httpx.post(url + "/v1/chat/completions", headers=headers,
                       json={"model": "gpt-4o", "messages": HI, "max_tokens": 40})
    assert whole.status_code == 200
    body = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 40, "stream": True}
    plain = {"authorization": f"Bearer {TENANT_KEY}", "x-fake-completion-tokens": "5"}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=plain, json=body) as streamed:
        assert streamed.status_code == 200 and list(streamed.iter_lines())
    embedded = httpx.post(url + "/v1/embeddings", headers=plain,
                          json={"model": "gpt-4o-mini", "input": "dispatch notes"})
    assert embedded.status_code == 200
    deadline = time.monotonic() + 8
    while len(received.spans) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # nothing more arrives: one span per call
    assert len(received.spans) == 3
    audit = {c["request_id"]: c for c in httpx.get(url + "/admin/tenants/acme/calls", headers=ADMIN).json()["data"]}
    assert len(audit) == 3
    for span in received.spans:
        a = span.attributes
        entry = audit[a["guardproxy.request_id"]]
        assert a["gen_ai.usage.input_tokens"] == entry["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == entry["completion_tokens"]
        assert a["gen_ai.usage.cache_read.input_tokens"] == entry["cached_tokens"]
        assert a["guardproxy.cost_micros"] == entry["cost_micros"] > 0
        assert a["gen_ai.request.model"] == entry["requested_model"] and a["guardproxy.tenant"] == "acme"
        assert a["gen_ai.system"] == "openai" and a["guardproxy.budget_state"] == "active"
        assert a["guardproxy.downgraded"] is False and span.kind == 3  # SPAN_KIND_CLIENT
        assert span.resource["service.name"] == "gp-test" and span.end_ns >= span.start_ns
    by_model = {s.attributes["gen_ai.request.model"] + s.attributes["gen_ai.operation.name"]: s
                for s in received.spans}
    chat = by_model["gpt-4ochat"]
    assert chat.attributes["gen_ai.usage.output_tokens"] == 9 and chat.name == "chat gpt-4o"
    assert chat.trace_id == TRACE_ID and chat.parent_span_id == PARENT_ID  # the caller's trace continues
    assert by_model["gpt-4o-minichat"].parent_span_id == ""  # no traceparent: a new trace
    assert by_model["gpt-4o-miniembeddings"].attributes["gen_ai.usage.output_tokens"] == 0


def test_a_downgrade_and_the_budget_state_show_on_the_span(
    receiver: tuple[str, Received], upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    endpoint, received = receiver
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, telemetry={"otlp_endpoint": endpoint})
    url = serve_proxy(parse_config(raw, {}))
    day, _ = keys()
    spent = redis.Redis.from_url(redis_url)
    spent.set(day, 800_000)  # acme: 1 USD a day, soft cap 0.8
    spent.close()
    reply = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                       json={"model": "gpt-4o", "messages": HI})
    assert reply.status_code == 200 and reply.headers["x-guardproxy-model"] == "gpt-4o-mini"
    deadline = time.monotonic() + 8
    while not received.spans and time.monotonic() < deadline:
        time.sleep(0.05)
    (span,) = received.spans
    a: dict[str, Any] = span.attributes
    assert a["guardproxy.downgraded"] is True and a["guardproxy.downgraded_from"] == "gpt-4o"
    assert a["guardproxy.model"] == "gpt-4o-mini" and a["gen_ai.request.model"] == "gpt-4o"
    assert a["guardproxy.budget_state"] == reply.headers["x-guardproxy-budget-state"] == "downgrading"


def test_without_an_endpoint_the_tracing_sdk_is_never_imported(upstream_url: str) -> None:
    """No tracer, exporter or export thread. (redis-py itself imports the OpenTelemetry API when it
    is installed, so only the SDK's tracing and the exporter are checked.)"""
    script = (
        "import sys\n"
        "from starlette.testclient import TestClient\n"
        "from guardproxy.app import create_app\n"
        "from tests.helpers import make_config\n"
        f"app = create_app(make_config({upstream_url!r}))\n"
        "with TestClient(app) as client:\n"
        "    assert client.get('/healthz').status_code == 200\n"
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
