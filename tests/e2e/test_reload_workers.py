"""SIGHUP and ``POST /admin/reload`` under ``serve --workers 2`` reach every worker, also busy ones, and
the admin answer comes once all workers serve the new file."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import ADMIN, chat, file_sha, raw_config, served, workers_on

ROUNDS = 3


def statuses(url: str, count: int = 16) -> list[int]:
    """``count`` calls, each on a new connection (so both workers get some)."""
    return [chat(url).status_code for _ in range(count)]


@pytest.mark.slow
def test_sighup_reaches_a_worker_that_was_busy_when_it_came(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A worker that cannot answer the supervisor's ping for a second (SIGSTOP here; a long GC pause or
    a CPU-bound request in production) still gets the SIGHUP, and handles it when it runs again."""
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 0.00001)))
    with served(path, workers=2) as (process, url, log_path):
        pids = sorted(workers_on(url, file_sha(path), 2, timeout_s=30))
        assert len(pids) == 2
        for round_ in range(ROUNDS):
            daily, expected = (10, 200) if round_ % 2 == 0 else (0.00001, 429)
            path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, daily)))
            paused = pids[round_ % 2]
            os.kill(paused, signal.SIGSTOP)
            try:
                process.send_signal(signal.SIGHUP)  # to the supervisor
                time.sleep(1.5)
            finally:
                os.kill(paused, signal.SIGCONT)
            time.sleep(1.5)  # 3 s after the SIGHUP
            assert statuses(url) == [expected] * 16, f"round {round_}: {log_path.read_text()[-3000:]}"


@pytest.mark.slow
def test_the_admin_reload_answers_once_every_worker_has_the_file(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 0.00001)))
    with served(path, workers=2) as (_, url, log_path):
        assert len(workers_on(url, file_sha(path), 2, timeout_s=30)) == 2
        assert statuses(url, 4) == [429] * 4
        path.write_text(yaml.safe_dump(raw_config(upstream_url, redis_url, 10)))
        reloaded = httpx.post(url + "/admin/reload", headers=ADMIN, timeout=30)
        assert reloaded.status_code == 200, reloaded.text
        answer = reloaded.json()
        assert answer["workers_signalled"] is True
        assert answer["workers"] == answer["workers_reloaded"] == 2 and answer["all_workers_reloaded"] is True
        assert statuses(url) == [200] * 16, log_path.read_text()[-3000:]  # no wait: all have it already
