"""A property-based fuzzer over every route: budgeted, /v1/models, admin (with and without its key),
passthrough (on and off), /metrics, /readyz, /healthz.

Each example is one request, given to the app in process as uvicorn would (an ASGI scope built
from the raw request target, so ``//``, ``%2F`` and friends arrive as sent), with a real Redis and
the fake upstream on a real loopback socket (uvicorn with h11, a strict parser), which records each
request as it was read off the wire; every request guardproxy's aiohttp sessions start is recorded
too, wherever it goes. Properties:

- no 5xx from guardproxy itself (a 5xx is only ever the upstream's own answer, relayed);
- every error guardproxy answers is OpenAI-shaped (``error`` with message/type/param/code) and
  carries an ``x-request-id``;
- a request guardproxy refused, or passed through unbudgeted, changes no counter, reservation or
  call log (the store is compared key by key before and after), and no reservation is ever left;
- no request the upstream receives carries a guardproxy credential (tenant, service, admin key),
  and every one goes to the configured base URL: each request started is one the fake received.

A second fuzzer sends browser-shaped requests to the admin routes that change state: form posts
(``text/plain`` bodies shaped as JSON, urlencoded, multipart), the cookie and Basic credentials a
browser adds by itself, cross-site ``Origin`` and ``Sec-Fetch-Site``. Whatever a cross-site page can
make a browser send is refused (403/415) and changes nothing in the store.

``GP_FUZZ_EXAMPLES`` sets the number of examples (default 300); the figures of a run are written to
``test-artifacts/fuzz-stats-<examples>.json`` (``fuzz-browser-stats-<examples>.json`` for the second).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import string
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import aiohttp
import anyio
import anyio.from_thread
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from yarl import URL

from guardproxy.app import create_app
from guardproxy.config.settings import TENANT_ID, Config
from guardproxy.testing.fake_upstream import create_fake_upstream
from tests.helpers import OTHER_TENANT_KEY, SERVICE_KEY, TENANT_KEY, keys, make_config
from tests.security.wire import ADMIN_KEY, REFUSAL_RECORDS, store_snapshot, tenants_seen
from tests.servers import in_process, serve_in_thread

EXAMPLES = int(os.environ.get("GP_FUZZ_EXAMPLES", "300"))
SECRETS = (TENANT_KEY, OTHER_TENANT_KEY, SERVICE_KEY, ADMIN_KEY)
UPSTREAM_KEY = "sk-upstream-secret"
STATS_FILE = Path(__file__).resolve().parents[2] / "test-artifacts" / f"fuzz-stats-{EXAMPLES}.json"
BROWSER_STATS_FILE = STATS_FILE.with_name(f"fuzz-browser-stats-{EXAMPLES}.json")


# -- the system under test -------------------------------------------------------------------------


@dataclass
class Received:
    """One request as the fake upstream's server read it off the wire, and the status it answered."""

    method: str
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    status: int = 0


class RecordingUpstream:
    """ASGI middleware in front of the fake upstream: records every request it serves, then lets the
    fake answer (a fake that raises answers 500, as uvicorn would)."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self.received: list[Received] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the proxy hung up before its request was complete
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        query = scope.get("query_string", b"")
        record = Received(scope["method"], scope["raw_path"] + (b"?" + query if query else b""),
                          list(scope["headers"]), body)
        self.received.append(record)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, sending)
        except Exception:
            if not record.status:
                record.status = 500
            raise


class StartedRequests:
    """The URL of every request an aiohttp session starts (guardproxy's calls upstream), wherever it goes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.urls: list[URL] = []
        request = aiohttp.ClientSession.request

        def recording(session: aiohttp.ClientSession, method: str, url: Any, **kwargs: Any) -> Any:
            self.urls.append(URL(url))
            return request(session, method, url, **kwargs)

        monkeypatch.setattr(aiohttp.ClientSession, "request", recording)


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


async def asgi_call(app: ASGIApp, method: str, target: bytes, headers: list[tuple[bytes, bytes]],
                    body: bytes) -> Answer:
    """One request as uvicorn hands it to the app (httptools: the path is the raw path, %-decoded)."""
    raw_path, _, query = target.partition(b"?")
    decoded = raw_path.decode("ascii")
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
        "method": method, "scheme": "http", "path": unquote(decoded) if "%" in decoded else decoded,
        "raw_path": raw_path, "query_string": query, "root_path": "",
        "headers": [(b"host", b"gp.test"), (b"content-length", str(len(body)).encode()), *headers],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080),
    }
    done = anyio.Event()
    delivered = False
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    with anyio.fail_after(20):
        await app(scope, receive, send)  # type: ignore[arg-type]
    done.set()
    assert start, f"no response to {method} {target!r}"
    return Answer(start["status"], list(start.get("headers", [])), b"".join(chunks))


@dataclass
class Target:
    portal: anyio.from_thread.BlockingPortal
    apps: dict[str, ASGIApp]
    upstream: RecordingUpstream
    upstream_url: URL
    started: StartedRequests
    redis_url: str
    stats: Counter[str] = field(default_factory=Counter)

    def call(self, app: str, method: str, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> Answer:
        return self.portal.call(asgi_call, self.apps[app], method, target, headers, body)


def fuzz_config(redis_url: str, upstream_url: str, **overrides: Any) -> Config:
    # No breaker: a 5xx the fake answers must not turn into the proxy's own 502s for later examples.
    upstream = {"base_url": f"{upstream_url}/v1", "api_key": UPSTREAM_KEY, "breaker": {"failures": 0}}
    return make_config(upstream_url, store={"redis_url": redis_url}, upstreams={"openai": upstream}, **overrides)


@pytest.fixture
def target(redis_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[Target]:
    recorder = RecordingUpstream(create_fake_upstream())
    started = StartedRequests(monkeypatch)
    with contextlib.ExitStack() as stack:
        upstream_url = stack.enter_context(serve_in_thread(recorder, http="h11"))
        created = {
            # passthrough on, admin API on
            "open": create_app(fuzz_config(redis_url, upstream_url, unbudgeted_paths="passthrough",
                                           admin={"api_key": ADMIN_KEY})),
            # the defaults: passthrough off, admin API off
            "closed": create_app(fuzz_config(redis_url, upstream_url)),
        }
        portal = stack.enter_context(anyio.from_thread.start_blocking_portal())
        apps = {name: stack.enter_context(portal.wrap_async_context_manager(in_process(app)))
                for name, app in created.items()}
        # acme starts 300 micro-USD short of its daily budget: its calls meet the downgrade and the 429.
        client = redis.Redis.from_url(redis_url)
        client.set(keys()[0], 999_700)
        client.close()
        fuzz_target = Target(portal, apps, recorder, URL(upstream_url), started, redis_url)
        for figure in ("guardproxy_5xx", "counter_changes_on_refused", "credentials_seen_upstream"):
            fuzz_target.stats[figure] = 0
        yield fuzz_target
    stats_file = STATS_FILE if request.node.name == "test_fuzz_every_route" else BROWSER_STATS_FILE
    stats_file.parent.mkdir(exist_ok=True)
    stats_file.write_bytes(orjson.dumps(dict(sorted(fuzz_target.stats.items())), option=orjson.OPT_INDENT_2))


# -- what requests look like -----------------------------------------------------------------------

BUDGETED = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
KNOWN = [
    *BUDGETED, "/v1/models", "/v1/models/gpt-4o", "/v1/files", "/v1/files/file-1/content", "/v1/moderations",
    "/v1/responses/resp_1", "/v1/chat/completions/cmpl_1", "/healthz", "/readyz", "/metrics", "/admin", "/admin/",
    "/admin/tenants", "/admin/tenants/acme", "/admin/tenants/globex/budget", "/admin/tenants/acme/calls?limit=5",
    "/admin/tenants/acme/calls?limit=0", "/admin/tenants/acme/calls?limit=%C2%B2", "/v1", "/", "/nowhere",
]
MUTATIONS = [
    lambda p: p.replace("/", "//", 2), lambda p: p + "/", lambda p: p + "/.", lambda p: p + "/..",
    lambda p: p.replace("/", "/./", 2), lambda p: p.replace("/", "/x/../", 2), lambda p: p.replace("/", "%2F"),
    lambda p: p.replace("/", "%2f", 2), lambda p: p.replace("/", "\\", 2), lambda p: p.upper(),
    lambda p: p.replace("/", "/%2e/", 2), lambda p: p + "%00", lambda p: p + "%0d%0aX-Injected:%201",
    lambda p: p.replace("/v1/", "/v1/@127.0.0.1/"), lambda p: p + ";x=1", lambda p: p + ".",
    lambda p: p.replace("/v1/", "/v1/http://127.0.0.1:1/"), lambda p: p.replace("/v1/", "/v1//127.0.0.1:1/"),
    lambda p: p + "%20", lambda p: p + "%C0%AE", lambda p: p + "?" + "q=" + "%ff" * 3, lambda p: "/" + p,
    lambda p: p.replace("c", "%63"), lambda p: p + "#frag", lambda p: p.replace("/v1", "/V1"),
]
SEGMENT = st.text(alphabet=string.ascii_letters + string.digits + "-._~:!$&'()*+,;=@%/\\", min_size=0, max_size=12)


@st.composite
def targets(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["known", "known", "mutated", "mutated", "random"]))
    if kind == "known":
        path = draw(st.sampled_from(KNOWN))
    elif kind == "mutated":
        path = draw(st.sampled_from(MUTATIONS))(draw(st.sampled_from(KNOWN)))
    else:
        path = "/" + "/".join(draw(st.lists(SEGMENT, min_size=0, max_size=5)))
    # A real socket carries printable ASCII only in the request line.
    return "".join(c for c in path if 0x21 <= ord(c) <= 0x7E).encode("ascii") or b"/"


def auth_headers(choice: str, tenant: str) -> list[tuple[str, str]]:
    basic = base64.b64encode(f"admin:{ADMIN_KEY}".encode()).decode()
    return {
        "none": [],
        "tenant": [("authorization", f"Bearer {TENANT_KEY}")],
        "tenant-api-key": [("api-key", TENANT_KEY)],
        "other-tenant": [("authorization", f"Bearer {OTHER_TENANT_KEY}"), ("x-tenant-id", tenant)],
        "service": [("authorization", f"Bearer {SERVICE_KEY}"), ("x-tenant-id", tenant)],
        "service-job": [("authorization", f"Bearer {SERVICE_KEY}"), ("x-servicetitan-job-id", tenant)],
        "service-bare": [("authorization", f"Bearer {SERVICE_KEY}")],
        "admin": [("authorization", f"Bearer {ADMIN_KEY}")],
        "admin-basic": [("authorization", f"Basic {basic}")],
        "admin-cookie": [("cookie", f"guardproxy_admin={ADMIN_KEY}")],
        "garbage": [("authorization", f"Bearer {tenant}")],
        "leaky": [("authorization", f"Bearer {TENANT_KEY}"), ("x-api-key", TENANT_KEY),
                  ("cookie", f"guardproxy_admin={ADMIN_KEY}"), ("x-other", f"Token {SERVICE_KEY}")],
    }[choice]


_PRINTABLE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=30)
HEADER_VALUE = st.one_of(_PRINTABLE, _PRINTABLE, _PRINTABLE,
                         st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40))
EXTRA_HEADERS = st.lists(st.tuples(st.sampled_from([
    "content-type", "x-tenant-id", "x-servicetitan-job-id", "x-servicetitan-tenant-id", "accept", "connection",
    "te", "upgrade", "x-request-id", "user-agent", "transfer-encoding", "forwarded", "x-forwarded-for",
    "openai-organization", "x-random",
]), HEADER_VALUE), max_size=3)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
TEXT = st.text(max_size=30)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"])},
                                optional={"content": st.one_of(TEXT, TEXT, TEXT, JSON), "name": JSON})


@st.composite
def bodies(draw: st.DrawFn, kind: str | None = None) -> bytes:
    kind = kind or draw(st.sampled_from(["chat", "chat", "responses", "completions", "embeddings", "json", "bytes",
                                         "deep", "empty", "budget"]))
    small = st.integers(1, 3)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    optional = {
        "stream": st.one_of(st.booleans(), st.booleans(), JSON),
        "n": st.one_of(small, small, st.integers(-2, 200), JSON),
        "max_tokens": st.one_of(st.integers(1, 50), st.integers(1, 50), st.integers(-1, 2**40), JSON),
        "stream_options": st.one_of(st.just({"include_usage": True}), st.just({}), JSON),
        "tools": st.one_of(st.just([tool]), JSON), "max_completion_tokens": st.integers(-1, 5000),
    }
    model = st.sampled_from(["gpt-4o", "gpt-4o-mini", "gpt-4o-mini", "gpt-4o-2024-08-06", "unpriced", ""]) | JSON
    value: Any
    if kind == "chat":
        value = draw(st.fixed_dictionaries(
            {"model": model, "messages": st.one_of(*[st.lists(MESSAGE, min_size=1, max_size=3)] * 3, JSON)},
            optional=optional))
    elif kind == "responses":
        value = draw(st.fixed_dictionaries({"model": model, "input": st.one_of(TEXT, TEXT, JSON)},
                                           optional={**optional, "instructions": JSON, "background": JSON}))
    elif kind == "completions":
        value = draw(st.fixed_dictionaries({"model": model, "prompt": st.one_of(TEXT, TEXT, JSON)},
                                           optional={**optional, "suffix": JSON, "best_of": JSON}))
    elif kind == "embeddings":
        value = draw(st.fixed_dictionaries({"model": model, "input": st.one_of(TEXT, TEXT, JSON)}))
    elif kind == "budget":
        value = draw(st.dictionaries(st.sampled_from(["daily_usd", "monthly_usd", "soft_cap", "hard_cap", "x"]),
                                     JSON, max_size=3))
    elif kind == "json":
        value = draw(JSON)
    elif kind == "bytes":
        return draw(st.binary(max_size=64))
    elif kind == "deep":
        depth = draw(st.integers(60, 3000))
        return b'{"model": "gpt-4o", "messages": [{"role": "user", "content": ' + b"[" * depth + b"]" * depth + b"}]}"
    else:
        return b""
    return orjson.dumps(value)


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, bytes, str, bytes]:
    """(method, target, auth, body): half of them a plausible call of a budgeted or passthrough path."""
    if draw(st.booleans()):
        endpoint = draw(st.sampled_from(["chat/completions", "chat/completions", "completions", "embeddings",
                                         "responses", "moderations", "files"]))
        kind = {"chat/completions": "chat", "moderations": "json", "files": "empty"}.get(endpoint, endpoint)
        auth = draw(st.sampled_from(["tenant", "tenant", "service", "other-tenant", "leaky", "admin"]))
        method = "GET" if endpoint == "files" else "POST"
        return method, f"/v1/{endpoint}".encode(), auth, draw(bodies(kind))
    method = draw(st.sampled_from(["GET", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]))
    auth = draw(st.sampled_from(["none", "tenant", "tenant", "tenant-api-key", "other-tenant", "service",
                                 "service-job", "service-bare", "admin", "admin-basic", "admin-cookie", "garbage",
                                 "leaky"]))
    return method, draw(targets()), auth, draw(bodies())


# -- the properties ----------------------------------------------------------------------------------

#: The record of an object created through the proxy (``BudgetStore.record_objects``).
OBJECT_RECORDS = re.compile(rb":obj:")
OWN_CODES = frozenset({"invalid_json", "invalid_path", "missing_field", "invalid_field", "model_not_found",
                       "missing_tenant", "invalid_tenant", "invalid_job_id", "servicetitan_job_not_found",
                       "invalid_api_key", "tenant_mismatch", "unknown_url", "method_not_supported",
                       "request_too_large", "insufficient_quota", "csrf_refused", "unsupported_media_type",
                       "key_in_routing_header", "object_not_found", "unbudgeted_spend_refused"})


def check_error_shape(answer: Answer, method: str) -> str:
    """The error's code, after checking its shape."""
    assert answer.header(b"x-request-id") is not None, "an error without x-request-id"
    if method == "HEAD":
        return "(head)"
    error = orjson.loads(answer.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str) and isinstance(error["code"], str)
    return str(error["code"])


def check_upstream_requests(target: Target, first: int, stats: Counter[str]) -> None:
    received = target.upstream.received[first:]
    base = target.upstream_url
    assert len(target.started.urls) == len(target.upstream.received), "a request started that the fake never read"
    for url in target.started.urls[first:]:
        assert (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port), url
        assert url.raw_path.startswith("/v1/"), url
    for request in received:
        assert request.target.startswith(b"/v1/"), request.target
        assert [v for k, v in request.headers if k == b"host"] == [f"{base.host}:{base.port}".encode()]
        text = repr(request.target) + repr(request.headers) + repr(request.body)
        leaked = [s for s in SECRETS if s in text]
        stats["credentials_seen_upstream"] += len(leaked)
        assert leaked == [], f"credential sent upstream: {leaked}"
        assert [v for k, v in request.headers if k == b"authorization"] == [f"Bearer {UPSTREAM_KEY}".encode()]
        assert not any(b"\r" in v or b"\n" in v for _, v in request.headers)


def no_reservation_left(snapshot: dict[bytes, Any]) -> bool:
    return all(
        (value in (None, b"0") if key.endswith(b":reserved") else not value)
        for key, value in snapshot.items() if key.endswith((b":reserved", b":resv"))
    )


@settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 300,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(
    app=st.sampled_from(["open", "closed"]),
    case=cases(),
    tenant=st.sampled_from(["acme", "globex", "globex", "new-tenant", "t2\n", "ACME", "a" * 70, "", "12345"])
    | HEADER_VALUE,
    extra=st.one_of(st.just([]), EXTRA_HEADERS),
)
def test_fuzz_every_route(target: Target, app: str, case: tuple[str, bytes, str, bytes], tenant: str,
                          extra: list[tuple[str, str]]) -> None:
    method, path, auth, body = case
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in [*auth_headers(auth, tenant), *extra]]
    first = len(target.upstream.received)
    before = store_snapshot(target.redis_url)
    answer = target.call(app, method, path, headers, body)
    after = store_snapshot(target.redis_url)
    stats = target.stats
    stats["cases"] += 1
    stats[f"status_{answer.status}"] += 1
    upstream_statuses = [request.status for request in target.upstream.received[first:]]
    forwarded = bool(upstream_statuses)
    stats["forwarded_upstream"] += forwarded

    from_upstream = answer.status in upstream_statuses
    if answer.status >= 500:
        stats["upstream_5xx_relayed" if from_upstream else "guardproxy_5xx"] += 1
        assert from_upstream, f"guardproxy answered {answer.status}: {answer.body[:300]!r}"
    if answer.status >= 400 and not from_upstream:
        stats[f"code_{check_error_shape(answer, method)}"] += 1

    check_upstream_requests(target, first, stats)
    stats["upstream_requests_checked"] += len(upstream_statuses)

    budgeted = answer.header(b"x-guardproxy-model") is not None and not answer.header(b"x-guardproxy-unbudgeted")
    admin_write = path.startswith(b"/admin/") and method in ("PUT", "DELETE") and answer.status == 200
    changed = {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}
    if answer.status == 429:
        # A budget refusal is meant to record itself: the period's blocked flag and its alert event.
        # Money (spend, reservations, settled markers, the call log) must not move.
        changed = {k: v for k, v in changed.items() if not REFUSAL_RECORDS.search(k)}
    if 200 <= answer.status < 300 and answer.header(b"x-guardproxy-unbudgeted"):
        # An object created through passthrough is recorded as the tenant's (guardproxy/objects.py).
        changed = {k: v for k, v in changed.items() if not OBJECT_RECORDS.search(k)}
    if not budgeted and not admin_write and changed:
        stats["counter_changes_on_refused"] += 1
        raise AssertionError(f"{method} {path!r} -> {answer.status} changed the store: {changed}")
    assert no_reservation_left(after), "a reservation was left behind"
    assert all(TENANT_ID.fullmatch(t.decode()) for t in tenants_seen(target.redis_url))


# -- browser-shaped requests on the admin routes that change state -------------------------------------

ADMIN_WRITES = [
    ("POST", "/admin/tenants/{t}/spend"), ("PUT", "/admin/tenants/{t}/budget"), ("DELETE", "/admin/tenants/{t}/budget"),
    ("POST", "/admin/tenants/{t}/keys"), ("DELETE", "/admin/tenants/{t}/keys/key_0123456789abcdef"),
    ("POST", "/admin/reload"), ("PATCH", "/admin/tenants/{t}/budget"),
]
#: The admin credential as a browser adds it by itself (ambient) or as a script sets it (a header).
ADMIN_CREDENTIALS = {"cookie": True, "basic": True, "cookie+basic": True, "bearer": False, "api-key": False}
FORM_TYPES = ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
              "multipart/form-data; boundary=----x", "text/json", "application/jsonp", ""]
JSON_TYPES = ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/merge-patch+json"]
CROSS_ORIGINS = ["https://evil.example", "null", "http://gp.test.evil.example", "http://gp.test:8443",
                 "http://evil.example/gp.test", "https://gp.test@evil.example", "gp.test", "ftp://gp.test"]
OWN_ORIGINS = ["http://gp.test", "https://gp.test"]
FORGED_BODIES = st.sampled_from([
    b'{"cost_usd": 1000000, "description": "x", "idempotency_key": "csrf", "x": "="}',
    b'{"daily_usd": 1000000, "x": "="}', b'{"name": "attacker", "x": "="}', b"cost_usd=1000000&description=x",
    b"------x\r\nContent-Disposition: form-data; name=\"daily_usd\"\r\n\r\n1000000\r\n------x--\r\n", b"",
])


def admin_credential(choice: str) -> list[tuple[str, str]]:
    basic = base64.b64encode(f"admin:{ADMIN_KEY}".encode()).decode()
    return {
        "cookie": [("cookie", f"guardproxy_admin={ADMIN_KEY}")], "basic": [("authorization", f"Basic {basic}")],
        "cookie+basic": [("cookie", f"other=1; guardproxy_admin={ADMIN_KEY}"), ("authorization", f"Basic {basic}")],
        "bearer": [("authorization", f"Bearer {ADMIN_KEY}")], "api-key": [("api-key", ADMIN_KEY)],
    }[choice]


@settings(max_examples=min(EXAMPLES, 200), deadline=None, derandomize=EXAMPLES <= 300,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    route=st.sampled_from(ADMIN_WRITES),
    tenant=st.sampled_from(["acme", "delta", "globex"]),
    credential=st.sampled_from(list(ADMIN_CREDENTIALS)),
    content_type=st.sampled_from(FORM_TYPES + JSON_TYPES + [None]),
    origin=st.sampled_from([None, None, *CROSS_ORIGINS, *OWN_ORIGINS]),
    fetch_site=st.sampled_from([None, None, "cross-site", "same-site", "same-origin", "none", "CROSS-SITE"]),
    body=FORGED_BODIES,
)
def test_fuzz_browser_shaped_admin_writes(target: Target, route: tuple[str, str], tenant: str, credential: str,
                                          content_type: str | None, origin: str | None, fetch_site: str | None,
                                          body: bytes) -> None:
    method, path = route
    headers = admin_credential(credential)
    for name, value in (("content-type", content_type), ("origin", origin), ("sec-fetch-site", fetch_site)):
        if value is not None:
            headers.append((name, value))
    if fetch_site is not None:
        headers.append(("sec-fetch-mode", "navigate" if content_type in FORM_TYPES else "cors"))
    before = store_snapshot(target.redis_url)
    answer = target.call("open", method, path.format(t=tenant).encode(),
                         [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers], body)
    after = store_snapshot(target.redis_url)
    stats = target.stats
    stats["browser_cases"] += 1
    assert answer.status < 500, answer.body[:300]
    cross_site = (origin in CROSS_ORIGINS) or (fetch_site is not None and fetch_site.lower() in ("cross-site",
                                                                                                 "same-site"))
    not_json = bool(body) and content_type not in JSON_TYPES
    forgeable = ADMIN_CREDENTIALS[credential] or cross_site or not_json
    if answer.status >= 400:
        stats[f"browser_code_{check_error_shape(answer, method)}"] += 1
    if forgeable:
        stats["browser_forgeable"] += 1
        assert answer.status in (403, 405, 415), (method, path, headers, answer.status, answer.body[:200])
        assert after == before, f"a browser-shaped {method} {path} changed the store"
        stats["browser_forgeable_refused"] += 1
