"""The audit trail says what happened to each call, under the id the client was given."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from guardproxy.budget.records import Outcome
from guardproxy.config.settings import parse_config
from tests.e2e.books import AUTH, CALL, audit_log
from tests.helpers import HI, TENANT_KEY, config_dict, wait_for

STREAM = {**CALL, "stream": True}


def outcomes(redis_url: str) -> dict[str, str]:
    return {e["request_id"]: e["outcome"] for e in audit_log(redis_url)}


def test_every_stream_ending_is_recorded_as_what_happened(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    url = serve_proxy(parse_config(raw, {}))
    # A second proxy whose upstream times out after 0.5 s without a byte.
    raw["upstreams"]["openai"]["timeout_s"] = 0.5
    impatient = serve_proxy(parse_config(raw, {}))
    client = openai.OpenAI(base_url=url + "/v1", api_key=TENANT_KEY, max_retries=0)
    expected: dict[str, Outcome] = {}

    with client.chat.completions.with_streaming_response.create(model="gpt-4o", messages=HI, stream=True) as done:
        assert len(list(done.parse())) > 3
        expected[done.headers["x-request-id"]] = Outcome.COMPLETED

    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o", messages=HI, stream=True, extra_headers={"x-fake-cut-after": "3"}
    ) as cut:
        with pytest.raises(openai.APIError):
            list(cut.parse())
        expected[cut.headers["x-request-id"]] = Outcome.UPSTREAM_CUT

    with httpx.stream("POST", url + "/v1/chat/completions", json=STREAM,
                      headers={**AUTH, "x-fake-chunk-delay-ms": "100", "x-fake-completion-tokens": "40"}) as left:
        chunks = left.iter_bytes()
        next(chunks)
        next(chunks)
        expected[left.headers["x-request-id"]] = Outcome.CLIENT_DISCONNECTED
    # the client hung up after two chunks of a 4 s stream

    with httpx.stream("POST", impatient + "/v1/chat/completions", json=STREAM,
                      headers={**AUTH, "x-fake-chunk-delay-ms": "1500"}, timeout=30) as slow:
        body = slow.read()
        assert b"upstream_unavailable" in body  # the stream ends with an OpenAI error frame
        expected[slow.headers["x-request-id"]] = Outcome.UPSTREAM_TIMEOUT

    wait_for(lambda: len(audit_log(redis_url)) == 4)
    assert outcomes(redis_url) == {k: v.value for k, v in expected.items()}


def test_every_answer_carries_the_request_id_the_audit_log_keeps(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url})
    url = serve_proxy(parse_config(raw, {}))
    raw["upstreams"]["openai"]["base_url"] = "http://127.0.0.1:9/v1"  # nothing listens: 502
    unreachable = serve_proxy(parse_config(raw, {}))
    seen: dict[str, Outcome] = {}

    own = httpx.post(url + "/v1/chat/completions", json=CALL, headers={**AUTH, "x-fake-no-request-id": "1"})
    assert own.status_code == 200 and own.headers["x-request-id"].startswith("req_gp_")
    seen[own.headers["x-request-id"]] = Outcome.COMPLETED
    theirs = httpx.post(url + "/v1/chat/completions", json=CALL, headers=AUTH)
    assert theirs.headers["x-request-id"].startswith("req_chatcmpl-fake")
    seen[theirs.headers["x-request-id"]] = Outcome.COMPLETED
    failed = httpx.post(url + "/v1/chat/completions", json=CALL, headers={**AUTH, "x-fake-fail": "500"})
    assert failed.status_code == 500 and failed.headers["x-request-id"].startswith("req_fake_")
    seen[failed.headers["x-request-id"]] = Outcome.UPSTREAM_ERROR
    gone = httpx.post(unreachable + "/v1/chat/completions", json=CALL, headers=AUTH)
    assert gone.status_code == 502 and gone.headers["x-request-id"].startswith("req_gp_")
    seen[gone.headers["x-request-id"]] = Outcome.UPSTREAM_ERROR
    streamed = httpx.post(url + "/v1/chat/completions", json=STREAM, headers={**AUTH, "x-fake-no-request-id": "1"})
    assert streamed.headers["x-request-id"].startswith("req_gp_")
    seen[streamed.headers["x-request-id"]] = Outcome.COMPLETED

    wait_for(lambda: len(audit_log(redis_url)) == len(seen))
    assert outcomes(redis_url) == {k: v.value for k, v in seen.items()}
