"""One error mapping: every failure a handler meets reaches the client as OpenAI's error shape.

The issue's reproduction: ``GET /admin/tenants`` with Redis down was a 500 with a traceback,
because ``StoreUnavailable`` was not translated where the admin API meets it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from guardproxy.app import create_app
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import CHAT, SERVICE_KEY, TENANT_KEY, make_config
from tests.security.wire import ADMIN_KEY, assert_openai_error, raw_request
from tests.servers import free_port, in_process, serve_in_thread


@pytest.fixture
def store_down_url(upstream_url: str, serve_proxy: Callable[..., str]) -> str:
    """A proxy whose Redis is not there at all (nothing listens on its port)."""
    config = make_config(upstream_url, store={"redis_url": f"redis://127.0.0.1:{free_port()}/0"},
                         unbudgeted_paths="passthrough", admin={"api_key": ADMIN_KEY})
    return serve_proxy(config)


@pytest.mark.parametrize(("method", "target", "body"), [
    ("GET", "/admin/tenants", b""), ("GET", "/admin/tenants/acme", b""), ("GET", "/admin/", b""),
    ("GET", "/admin/tenants/acme/calls", b""), ("PUT", "/admin/tenants/acme/budget", b'{"daily_usd": 2}'),
    ("DELETE", "/admin/tenants/acme/budget", b""),
])
def test_the_admin_api_answers_503_when_the_store_is_down(
    method: str, target: str, body: bytes, store_down_url: str,
) -> None:
    # Admin bodies are JSON, declared as such (guardproxy.csrf).
    json_type = [("Content-Type", "application/json")] if body else []
    answer = raw_request(store_down_url, method, target, [("Authorization", f"Bearer {ADMIN_KEY}"), *json_type], body)
    assert_openai_error(answer, 503, "budget_store_unavailable")
    assert answer.header("retry-after") == "1"


def test_budgeted_calls_metrics_and_passthrough_with_the_store_down(
    store_down_url: str, fake_state: FakeUpstreamState,
) -> None:
    auth = [("Authorization", f"Bearer {TENANT_KEY}")]
    assert_openai_error(raw_request(store_down_url, "POST", "/v1/chat/completions", auth, CHAT), 503,
                        "budget_store_unavailable")
    assert fake_state.requests == []
    assert raw_request(store_down_url, "GET", "/metrics").status == 200
    assert raw_request(store_down_url, "GET", "/readyz").status == 503
    # Passthrough is unbudgeted: it does not need the store.
    assert raw_request(store_down_url, "GET", "/v1/files", auth).status == 200


class Broken:
    """A job resolver with a bug in it: the proxy must still answer in OpenAI's shape."""

    async def tenant_for_job(self, job_id: str, st_tenant_id: str | None) -> str:
        raise RuntimeError("a bug")


@pytest.mark.anyio
async def test_a_real_bug_is_a_500_in_openai_shape_with_a_request_id(
    upstream_url: str, redis_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    app = create_app(make_config(upstream_url, store={"redis_url": redis_url}), jobs=Broken())
    async with in_process(app) as served, httpx.AsyncClient(
        transport=httpx.ASGITransport(app=served, raise_app_exceptions=False), base_url="http://gp"
    ) as client:
        answer = await client.post("/v1/chat/completions", content=CHAT, headers={
            "authorization": f"Bearer {SERVICE_KEY}", "x-servicetitan-job-id": "42"})
    assert answer.status_code == 500
    assert answer.json() == {"error": {"message": "The proxy hit an internal error.", "type": "server_error",
                                       "param": None, "code": "internal_error"}}
    request_id = answer.headers["x-request-id"]
    assert any(request_id in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


@pytest.fixture
def cutting_upstream() -> Iterator[str]:
    """An upstream whose answers break off after the first bytes: an event stream and a download."""

    async def cut(kind: str) -> StreamingResponse:
        async def body() -> object:
            yield b"data: {\"n\": 1}\n\n" if kind == "events" else b"first half of a file"
            await asyncio.sleep(0.05)
            raise ConnectionResetError("the upstream went away")

        media = "text/event-stream" if kind == "events" else "application/octet-stream"
        return StreamingResponse(body(), media_type=media)  # type: ignore[arg-type]

    async def endpoint(request: Request) -> Response:
        return await cut(request.path_params["kind"])

    with serve_in_thread(Starlette(routes=[Route("/v1/cut/{kind}", endpoint)])) as url:
        yield url


def test_a_passthrough_answer_cut_after_its_head_is_no_500(
    cutting_upstream: str, redis_url: str, serve_proxy: Callable[..., str], caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(cutting_upstream, store={"redis_url": redis_url}, unbudgeted_paths="passthrough")
    url = serve_proxy(config)
    auth = [("Authorization", f"Bearer {TENANT_KEY}")]
    events = raw_request(url, "GET", "/v1/cut/events", auth)
    assert events.status == 200
    assert events.body.startswith(b'data: {"n": 1}\n\n')
    assert b'"code":"upstream_unavailable"' in events.body  # the stream ends with an OpenAI error frame
    download = raw_request(url, "GET", "/v1/cut/file", auth)
    assert download.status == 200 and download.body.startswith(b"first half of a file")
    assert not any("Traceback" in r.getMessage() or r.exc_info for r in caplog.records
                   if r.name.startswith("guardproxy") or "Exception in ASGI" in r.getMessage())


def test_query_numbers_outside_ascii_are_a_400_not_a_500(passthrough_url: str) -> None:
    admin = [("Authorization", f"Bearer {ADMIN_KEY}")]
    # "²".isdigit() is true and int("²") raises: the limit is read as ASCII digits only.
    for limit in ("%C2%B2", "%D9%A3", "1%00", "-1", "1001", "abc"):
        answer = raw_request(passthrough_url, "GET", f"/admin/tenants/acme/calls?limit={limit}", admin)
        assert_openai_error(answer, 400, "invalid_field")
