"""Headers: each response header once, nothing that identifies the upstream or acts on the proxy's
origin, no hop-by-hop header either way, and no header injection.

The issue's reproduction: every proxied response carried ``date`` and ``server`` twice (the
upstream's and uvicorn's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import CHAT, TENANT_KEY, make_config
from tests.security.wire import ADMIN_KEY, RawResponse, raw_request, store_snapshot
from tests.servers import serve_in_thread

AUTH = [("Authorization", f"Bearer {TENANT_KEY}"), ("Content-Type", "application/json")]
LEAKY = {
    "server": "leaky-upstream/1.0", "via": "1.1 internal-gw", "x-powered-by": "Express",
    "set-cookie": "session=upstream; Path=/", "strict-transport-security": "max-age=1", "alt-svc": 'h3=":443"',
    "openai-organization": "org-operator", "x-envoy-upstream-service-time": "5", "connection": "x-hop",
    "x-hop": "1", "x-request-id": "req_upstream_1", "x-ratelimit-remaining-requests": "99",
}


def assert_each_header_once(answer: RawResponse) -> None:
    repeated = [name for name, count in Counter(answer.names).items() if count > 1]
    assert repeated == [], f"sent more than once: {repeated}"


@pytest.fixture
def leaky_upstream(evil_url: str) -> Iterator[str]:
    """An upstream that sends every header a client should not see, and redirects to the attacker."""

    async def chat(request: Request) -> Response:
        answer = {"id": "c1", "object": "chat.completion", "model": "gpt-4o", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
        return Response(orjson.dumps(answer), headers=LEAKY, media_type="application/json")

    async def redirect(request: Request) -> Response:
        return Response(b"", 302, headers={**LEAKY, "location": f"{evil_url}/v1/steal"})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/v1/redirect", redirect, methods=["GET", "POST"])])
    with serve_in_thread(app) as url:
        yield url


def test_upstream_headers_that_identify_it_or_act_on_the_proxy_are_dropped(
    leaky_upstream: str, redis_url: str, serve_proxy: Callable[..., str], evil_state: FakeUpstreamState,
) -> None:
    url = serve_proxy(make_config(leaky_upstream, store={"redis_url": redis_url}, unbudgeted_paths="passthrough"))
    budgeted = raw_request(url, "POST", "/v1/chat/completions", AUTH, CHAT)
    redirected = raw_request(url, "GET", "/v1/redirect", AUTH)
    assert budgeted.status == 200 and redirected.status == 302
    for answer in (budgeted, redirected):
        assert_each_header_once(answer)
        names = set(answer.names)
        for dropped in ("via", "x-powered-by", "set-cookie", "strict-transport-security", "alt-svc", "location",
                        "openai-organization", "x-envoy-upstream-service-time", "x-hop"):
            assert dropped not in names, dropped
        assert answer.header("server") in (None, "uvicorn")  # the proxy's own server, never the upstream's
        assert answer.header("x-request-id") == "req_upstream_1"
        assert answer.header("x-ratelimit-remaining-requests") == "99"
    assert evil_state.paths == []  # the redirect was not followed


@pytest.mark.parametrize(("method", "target", "headers", "body"), [
    ("POST", "/v1/chat/completions", AUTH, CHAT),
    ("POST", "/v1/chat/completions", [*AUTH, ("x-fake-fail", "400")], CHAT),
    ("POST", "/v1/chat/completions", [*AUTH, ("x-fake-fail", "500")], CHAT),
    ("POST", "/v1/chat/completions", AUTH, orjson.dumps({"model": "gpt-4o", "stream": True, "messages": [
        {"role": "user", "content": "hi"}]})),
    ("POST", "/v1/responses", AUTH, orjson.dumps({"model": "gpt-4o", "input": "hi"})),
    ("GET", "/v1/files", AUTH, b""), ("GET", "/v1/models", AUTH, b""), ("GET", "/v1/nowhere//x", AUTH, b""),
    ("POST", "/v1/chat/completions", [], CHAT), ("GET", "/metrics", [], b""), ("GET", "/healthz", [], b""),
    ("GET", "/admin/tenants", [("Authorization", f"Bearer {ADMIN_KEY}")], b""), ("GET", "/admin/", [], b""),
])
def test_each_response_header_is_sent_once(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes, passthrough_url: str,
) -> None:
    answer = raw_request(passthrough_url, method, target, headers, body)
    assert answer.status < 500 or answer.header("x-guardproxy-model") is not None
    assert_each_header_once(answer)
    assert answer.header("date") is not None
    # Every answer can be quoted back: passthrough of an upstream that sent none, /v1/models, admin...
    assert (answer.header("x-request-id") or "").startswith(("req_gp_", "req_")), answer.names


def test_hop_by_hop_and_network_headers_are_not_sent_upstream(
    passthrough_url: str, fake_state: FakeUpstreamState,
) -> None:
    extra = [("Connection", "x-secret-hop"), ("X-Secret-Hop", "1"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
             ("Proxy-Authorization", "Basic eDp5"), ("Forwarded", "for=10.0.0.7"), ("X-Forwarded-For", "10.0.0.7"),
             ("X-Real-IP", "10.0.0.7"), ("X-Tenant-Id", "acme"), ("Cookie", "a=b"), ("X-Kept", "yes")]
    for target, body in (("/v1/chat/completions", CHAT), ("/v1/files", b"")):
        answer = raw_request(passthrough_url, "POST" if body else "GET", target, [*AUTH, *extra], body)
        assert answer.status == 200, answer.body
    for sent in fake_state.headers:
        assert sent["x-kept"] == "yes"
        for name in ("x-secret-hop", "keep-alive", "te", "proxy-authorization", "forwarded", "x-forwarded-for",
                     "x-real-ip", "x-tenant-id", "cookie"):
            assert name not in sent, name


@pytest.mark.parametrize("injection", [
    b"X-Custom: a\rX-Injected: 1\r\n", b"X-Custom: a\nX-Injected: 1\r\n", b"X-Custom: a\x00b\r\n",
    b"X-Tenant-Id: acme\r\n folded: continuation\r\n", b"Bad Header: 1\r\n", b"X-Custom : a\r\n",
])
def test_header_injection_is_refused_by_the_http_parser(
    injection: bytes, passthrough_url: str, fake_state: FakeUpstreamState, redis_url: str,
) -> None:
    answer = raw_request(passthrough_url, "POST", "/v1/chat/completions", AUTH, CHAT, extra_head=injection)
    assert answer.status == 400
    assert fake_state.headers == []
    assert store_snapshot(redis_url) == {}


@pytest.mark.parametrize(("count", "size"), [(1, 60_000), (300, 100), (1, 2_000_000)])
def test_huge_headers_are_never_a_5xx(
    count: int, size: int, passthrough_url: str, fake_state: FakeUpstreamState,
) -> None:
    headers = [*AUTH, *((f"X-Big-{i}", "v" * size) for i in range(count))]
    answer = raw_request(passthrough_url, "POST", "/v1/chat/completions", headers, CHAT)
    assert answer.status < 500 or answer.header("x-guardproxy-model") is not None, answer.body[:200]
    for sent in fake_state.headers:
        assert all(TENANT_KEY not in value for value in sent.values())
