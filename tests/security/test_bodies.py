"""Bodies are checked before any work: depth, types of every field the proxy reads, ids in full.

The issue's reproductions: content nested ~1,000 arrays deep was a 500 (``RecursionError`` while
counting tokens); ``messages: [null]`` and ``[1, 2]`` were forwarded upstream; ``"t2\\n"`` passed
the tenant id check.
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from guardproxy.config.servicetitan import Connection, ServiceTitanConfig
from guardproxy.config.settings import TENANT_ID
from guardproxy.errors import GuardError
from guardproxy.http.auth import valid_tenant
from guardproxy.http.requests import parse_chat_request
from guardproxy.servicetitan.mapping import UnmappableJob, tenant_for
from guardproxy.servicetitan.resolver import parse_job_id
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import SERVICE_KEY, TENANT_KEY
from tests.security.wire import ADMIN_KEY, assert_openai_error, raw_request, store_snapshot

AUTH = {"authorization": f"Bearer {TENANT_KEY}"}


def nested(depth: int) -> Any:
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}


HOSTILE: list[tuple[str, dict[str, Any] | bytes, str]] = [
    ("chat/completions", b'{"model": "gpt-4o", "messages": [{"role": "user", "content": ' + b"[" * 1000 + b"]" * 1000
     + b"}]}", "invalid_json"),
    ("chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "x": nested(70)}]}]),
     "invalid_json"),
    ("chat/completions", b'{"model": "gpt-4o", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_json"),
    ("chat/completions", chat(messages=[None]), "invalid_field"),
    ("chat/completions", chat(messages=[1, 2]), "invalid_field"),
    ("chat/completions", chat(messages=[{"content": "no role"}]), "invalid_field"),
    ("chat/completions", chat(messages=[{"role": 1, "content": "x"}]), "invalid_field"),
    ("chat/completions", chat(messages=[{"role": "user", "content": 5}]), "invalid_field"),
    ("chat/completions", chat(messages=[{"role": "user", "content": [1, "a"]}]), "invalid_field"),
    ("chat/completions", chat(tools="all"), "invalid_field"),
    ("chat/completions", chat(tools=[1]), "invalid_field"),
    ("chat/completions", chat(stream=True, stream_options={"include_usage": "yes"}), "invalid_field"),
    ("chat/completions", chat(stream_options=[1]), "invalid_field"),
    ("chat/completions", chat(n=10**6), "invalid_field"),
    ("chat/completions", b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "n": 1'
     + b"0" * 30 + b"}", "invalid_field"),
    ("chat/completions", chat(max_tokens=2**40), "invalid_field"),
    ("chat/completions", chat(max_completion_tokens=1.5), "invalid_field"),
    ("chat/completions", chat(model=["gpt-4o"]), "invalid_field"),
    ("chat/completions", b'{"model": "gpt-4o", "messages": [{"role": "user", "content": NaN}]}', "invalid_json"),
    ("chat/completions", b"\xff\xfe{}", "invalid_json"),
    ("chat/completions", b"[]", "invalid_json"),
    ("completions", {"model": "gpt-4o", "prompt": "hi", "suffix": 5}, "invalid_field"),
    ("completions", {"model": "gpt-4o", "prompt": [[1, "a"]]}, "invalid_field"),
    ("completions", {"model": "gpt-4o", "prompt": "hi", "best_of": 129}, "invalid_field"),
    ("embeddings", {"model": "gpt-4o", "input": [None]}, "invalid_field"),
    ("embeddings", {"model": "gpt-4o", "input": nested(100)}, "invalid_json"),
    ("responses", {"model": "gpt-4o", "input": [1]}, "invalid_field"),
    ("responses", {"model": "gpt-4o", "input": "hi", "tools": {"type": "x"}}, "invalid_field"),
    ("responses", {"model": "gpt-4o", "input": "hi", "instructions": ["x"]}, "invalid_field"),
]


@pytest.mark.parametrize(("endpoint", "body", "code"), HOSTILE)
def test_a_hostile_body_is_a_400_and_reaches_nothing(
    endpoint: str, body: dict[str, Any] | bytes, code: str, passthrough_url: str, redis_url: str,
    fake_state: FakeUpstreamState,
) -> None:
    before = store_snapshot(redis_url)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    answer = raw_request(passthrough_url, "POST", f"/v1/{endpoint}", [("Authorization", f"Bearer {TENANT_KEY}")], raw)
    assert_openai_error(answer, 400, code)
    assert fake_state.requests == []
    assert store_snapshot(redis_url) == before


def test_a_body_at_the_depth_limit_is_served(passthrough_url: str, fake_state: FakeUpstreamState) -> None:
    from guardproxy.http.requests import MAX_JSON_DEPTH, json_depth  # here: the suite also runs against older code

    # messages (1) > message (2) > content (3) > part (4) > ... : the part's field nests to the limit.
    part = {"type": "text", "text": "hi", "meta": nested(MAX_JSON_DEPTH - 5)}
    body = chat(messages=[{"role": "user", "content": [part]}])
    assert json_depth(body) == MAX_JSON_DEPTH
    answer = httpx.post(f"{passthrough_url}/v1/chat/completions", json=body, headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    assert len(fake_state.requests) == 1


def test_json_depth_is_iterative() -> None:
    from guardproxy.http.requests import MAX_JSON_DEPTH, json_depth

    assert json_depth("x") == 0 and json_depth({}) == 1 and json_depth([[{}]]) == 3
    assert json_depth(nested(100_000)) > MAX_JSON_DEPTH  # no RecursionError: a stack, not recursion
    with pytest.raises(GuardError) as caught:
        parse_chat_request(orjson.dumps(chat(messages=[{"role": "user", "content": [{"x": nested(200)}]}])))
    assert caught.value.code == "invalid_json"


@pytest.mark.parametrize("tenant", ["t2\n", "acme\n", "a\r", "a b", "", "-a", "a" * 65, "a/b", "a\x00", "ä"])
def test_tenant_ids_are_matched_in_full(tenant: str) -> None:
    assert TENANT_ID.fullmatch(tenant) is None
    with pytest.raises(GuardError) as caught:
        valid_tenant(tenant)
    assert caught.value.code == "invalid_tenant"


@pytest.mark.parametrize("job", ["123\n", "123\r", "1 2", "+1", "0", "-1", "9" * 20, "\uff11\uff12"])
def test_job_ids_are_matched_in_full(job: str) -> None:
    with pytest.raises(GuardError) as caught:
        parse_job_id(job)
    assert caught.value.code == "invalid_job_id"


@pytest.mark.parametrize("value", ["acme\n", "acme\r\nx", " acme", "acme "])
def test_servicetitan_mapped_values_are_matched_in_full(value: str) -> None:
    config = ServiceTitanConfig(app_key="k", connections=(Connection(1, "c", "s"),),
                                tenant_from="customField:Budget Code")
    job = {"id": 7, "customFields": [{"name": "Budget Code", "value": value}]}
    with pytest.raises(UnmappableJob):
        tenant_for(job, 1, config)


def test_the_admin_api_refuses_a_tenant_with_a_line_break(
    passthrough_url: str, redis_url: str,
) -> None:
    admin = [("Authorization", f"Bearer {ADMIN_KEY}"), ("Content-Type", "application/json")]
    for target in ("/admin/tenants/t2%0A/budget", "/admin/tenants/t2%0D%0A/budget", "/admin/tenants/t2%20/budget"):
        answer = raw_request(passthrough_url, "PUT", target, admin, b'{"daily_usd": 5}')
        assert answer.status == 400
        assert answer.json()["error"]["code"] in ("invalid_path", "invalid_tenant")
    assert store_snapshot(redis_url) == {}
    ok = raw_request(passthrough_url, "PUT", "/admin/tenants/t2/budget", admin, b'{"daily_usd": 5}')
    assert ok.status == 200 and ok.json()["tenant"] == "t2"


def test_a_service_key_naming_a_tenant_with_a_line_break_is_refused(passthrough_url: str) -> None:
    # Over a real socket a bare LF inside a header value is refused by the HTTP parser itself.
    answer = raw_request(passthrough_url, "POST", "/v1/chat/completions",
                         [("Authorization", f"Bearer {SERVICE_KEY}")], orjson.dumps(chat()),
                         extra_head=b"X-Tenant-Id: t2\n\r\n")
    assert answer.status == 400
