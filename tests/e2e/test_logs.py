"""Logs for machines: one JSON object per line, one line per settled call with its audit figures."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import HI, TENANT_KEY, config_dict
from tests.servers import running_proxy

ADMIN = {"authorization": "Bearer adm-logs"}


@contextlib.contextmanager
def serve(raw: dict[str, Any], tmp_path: Path, *flags: str) -> Iterator[tuple[str, Path]]:
    with running_proxy(raw, tmp_path, *flags) as proxy:
        yield proxy.url, proxy.log_path


def calls(url: str, expected: int = 2) -> list[dict[str, Any]]:
    """The audit log (newest first) once ``expected`` calls are settled."""
    deadline = time.monotonic() + 5
    while True:
        found: list[dict[str, Any]] = httpx.get(url + "/admin/tenants/acme/calls", headers=ADMIN).json()["data"]
        if len(found) == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def make_calls(url: str) -> None:
    headers = {"authorization": f"Bearer {TENANT_KEY}", "x-servicetitan-job-id": "4242",
               "x-fake-cached-tokens": "3", "x-fake-completion-tokens": "17"}
    whole = httpx.post(url + "/v1/chat/completions", headers=headers,
                       json={"model": "gpt-4o", "messages": HI, "max_tokens": 50})
    assert whole.status_code == 200
    body = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 50, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", headers=headers, json=body) as streamed:
        assert streamed.status_code == 200
        assert list(streamed.iter_lines())[-2:] == ["data: [DONE]", ""]


def test_json_logs_one_object_per_line_and_the_call_line_matches_the_audit_entry(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": "adm-logs"})
    with serve(raw, tmp_path, "--log-format", "json") as (url, log_path):
        make_calls(url)
        audit = calls(url)
        time.sleep(0.2)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    settled = [e for e in entries if e.get("event") == "call_settled"]
    assert len(settled) == 2 and len(audit) == 2
    by_request = {e["request_id"]: e for e in settled}
    for entry in audit:
        line = by_request[entry["request_id"]]
        for key in ("requested_model", "model", "prompt_tokens", "completion_tokens", "cached_tokens",
                    "cost_micros", "outcome"):
            assert line[key] == entry[key], key
        assert line["tenant"] == "acme" and line["job_id"] == "4242" and line["duration_ms"] >= 0
        assert line["cost_micros"] > 0 and line["completion_tokens"] == 17
    # No access line and no httpx "HTTP Request" line: the settled line is the one line per call.
    assert not [e for e in entries if e["logger"] in ("uvicorn.access", "httpx", "httpcore")]
    assert not [e for e in entries if "HTTP Request" in e["message"] or "/v1/chat/completions HTTP" in e["message"]]


def test_text_logs_say_the_same_and_the_access_log_is_opt_in(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": "adm-logs"},
                      server={"log_format": "text"})
    # Text logs write no line per call unless asked (the audit log has every call).
    with serve(raw, tmp_path) as (url, log_path):
        make_calls(url)
        audit = calls(url)
        time.sleep(0.2)
    assert audit and not [line for line in log_path.read_text().splitlines() if "request_id=" in line]
    with serve(raw, tmp_path, "--log-calls") as (url, log_path):
        make_calls(url)
        audit = calls(url, expected=4)[:2]  # the two calls of this run (newest first)
        time.sleep(0.2)
    text = log_path.read_text()
    for entry in audit:
        (line,) = [line for line in text.splitlines() if f"request_id={entry['request_id']}" in line]
        assert f"cost_micros={entry['cost_micros']} " in line and "job_id=4242" in line
        assert f"tokens={entry['prompt_tokens']}/{entry['completion_tokens']}/{entry['cached_tokens']}" in line
    assert "HTTP Request" not in text and '"POST /v1/chat/completions HTTP/1.1" 200' not in text
    with serve(raw, tmp_path, "--access-log") as (url, log_path):
        assert httpx.get(url + "/healthz").status_code == 200
        time.sleep(0.2)
    assert '"GET /healthz HTTP/1.1" 200' in log_path.read_text()
