"""Reloading proxy.yaml while serving: admin API and SIGHUP, one process and several workers."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from guardproxy.config.settings import load_config
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import (
    ADMIN,
    HI,
    OTHER_TENANT_KEY,
    TENANT_KEY,
    chat,
    file_sha,
    raw_config,
    served,
    status,
    workers_on,
)


def test_a_reload_fixes_a_budget_without_dropping_an_in_flight_stream(
    fake_state: FakeUpstreamState, upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 0.00001)))
    url = serve_proxy(load_config(path), config_path=path)
    assert chat(url).status_code == 429  # acme's budget is a typo: far too small
    assert status(url)["generation"] == 1

    chunks: list[str] = []
    done = threading.Event()

    def stream() -> None:  # globex streams slowly across the reload
        body = {"model": "gpt-4o-mini", "messages": HI, "max_tokens": 30, "stream": True}
        headers = {"authorization": f"Bearer {OTHER_TENANT_KEY}", "x-fake-chunk-delay-ms": "80",
                   "x-fake-completion-tokens": "20"}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30) as reply:
            assert reply.status_code == 200
            chunks.extend(line for line in reply.iter_lines() if line.startswith("data: "))
        done.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    time.sleep(0.3)
    assert not done.is_set()
    path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 10)))
    reloaded = httpx.post(url + "/admin/reload", headers=ADMIN)
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["reloaded"] is True and reloaded.json()["generation"] == 2
    assert not done.is_set(), "the stream should still be running during the reload"
    assert chat(url).status_code == 200  # the fixed budget applies at once
    streamer.join(timeout=20)
    assert done.is_set() and chunks[-1] == "data: [DONE]" and len(chunks) >= 20
    calls = httpx.get(url + "/admin/tenants/globex/calls", headers=ADMIN).json()["data"]
    # The whole stream was relayed and charged by its usage (the fake ends it itself: "completed").
    assert fake_state.stream_endings[-1] == "completed" and len(calls) == 1
    assert calls[0]["completion_tokens"] == 20 and calls[0]["cost_micros"] > 0
    # Reloading an unchanged file builds nothing new.
    again = httpx.post(url + "/admin/reload", headers=ADMIN).json()
    assert again["reloaded"] is False and again["generation"] == 2


@pytest.mark.parametrize(
    ("broken", "field"),
    [
        ("budgets:\n  defaults:\n    daily_usd: -5\n", "budgets.defaults.daily_usd"),
        ("models: {gpt-4o: {input: 1, output: 1, downgrade_to: nowhere}}\n", "models.gpt-4o.downgrade_to"),
        ("server: [unclosed\n", "not valid YAML"),
    ],
)
def test_a_broken_reload_changes_nothing(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path, broken: str, field: str
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 0.00001)))
    url = serve_proxy(load_config(path), config_path=path)
    before = status(url)
    path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 10)) + broken)
    refused = httpx.post(url + "/admin/reload", headers=ADMIN)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "invalid_config" and field in error["message"]
    assert status(url) == before
    assert chat(url).status_code == 429  # still the running (old) budget
    assert httpx.post(url + "/admin/reload").status_code == 401


def test_settings_that_need_a_restart_are_named_and_the_rest_applies(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    raw = raw_config(upstream_url, redis_url, 0.00001)
    path.write_text(yaml.safe_dump(raw))
    url = serve_proxy(load_config(path), config_path=path)
    raw["tenants"]["acme"]["daily_usd"] = 10
    # the port and the connection limits are the HTTP server's (built at start-up); the body's deadline
    # is read per request
    raw["server"] = {"port": 1, "header_timeout_s": 3, "body_timeout_s": 0.5}
    raw["store"]["on_unavailable"] = "fail_open"  # read per admission: no restart needed
    path.write_text(yaml.safe_dump(raw))
    reloaded = httpx.post(url + "/admin/reload", headers=ADMIN).json()
    assert reloaded["reloaded"] is True
    assert reloaded["restart_required"] == ["server.port", "server.header_timeout_s"]
    assert chat(url).status_code == 200
    assert seconds_to_408_for_half_a_body(url) < 5  # the reloaded 0.5 s, not the 60 s it started with


def seconds_to_408_for_half_a_body(url: str) -> float:
    """Send a chat request's head and half its body, then wait (at most 10 s) for the 408."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = b'{"model": "gpt-4o-mini", "messages": []}'
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {TENANT_KEY}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(head + body[: len(body) // 2])
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    return time.monotonic() - started








def test_sighup_reloads_a_single_process_and_survives_a_broken_file(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 0.00001)))
    with served(path) as (process, url, log_path):
        assert chat(url).status_code == 429
        path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 10)))
        process.send_signal(signal.SIGHUP)
        assert workers_on(url, file_sha(path), 1), log_path.read_text()[-2000:]
        assert chat(url).status_code == 200 and status(url)["generation"] == 2
        path.write_text("budgets: {defaults: {soft_cap: 2, hard_cap: 1}}\n" + path.read_text())
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert process.poll() is None and status(url)["generation"] == 2
        assert "budgets.defaults.soft_cap" in log_path.read_text()


@pytest.mark.slow
def test_every_worker_reloads_on_sighup_and_on_the_admin_api(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 0.00001)))
    with served(path, workers=2) as (process, url, log_path):
        assert len(workers_on(url, file_sha(path), 2)) == 2
        path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 5)))
        process.send_signal(signal.SIGHUP)  # to the supervisor
        assert len(workers_on(url, file_sha(path), 2)) == 2, log_path.read_text()[-3000:]
        path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 10)))
        reloaded = httpx.post(url + "/admin/reload", headers=ADMIN)  # reaches one worker
        assert reloaded.status_code == 200 and reloaded.json()["workers_signalled"] is True
        assert len(workers_on(url, file_sha(path), 2)) == 2, log_path.read_text()[-3000:]
        assert all(chat(url).status_code == 200 for _ in range(6))
