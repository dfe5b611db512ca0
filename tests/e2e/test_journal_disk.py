"""A journal that cannot be written, for real: a small tmpfs filled to the last page, or mounted
read-only, under ``guardproxy serve`` while its Redis is paused (SIGSTOP).

What must hold: an answered call's charge is never dropped (settled = billed exactly once Redis is
back); while neither Redis nor the journal can take a charge no call is admitted (503), even with
``fail_open``; ``/readyz`` names the journal; a write cut short by the full disk leaves no torn line.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from guardproxy.store.journal import Entry
from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.e2e.books import AUTH, CALL, ProxyProcess, assert_books_balance, paused, pending
from tests.helpers import all_settled, config_dict, wait_for
from tests.redis_procs import RedisServer
from tests.servers import no_proxy_env

PAGE = 4096


@contextlib.contextmanager
def small_disk(path: Path, size: str = "64k", *options: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (root only: the suite runs as root in CI)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                             capture_output=True, timeout=10)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=10)


def fill(disk: Path, leave_pages: int) -> Path:
    """Fill ``disk`` to the last byte, then free ``leave_pages`` pages of it; the filler's path."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with contextlib.suppress(OSError):
            for _ in range(10_000):  # 40 MB at most: far more than the disk
                os.write(fd, b"\0" * PAGE)
        size = os.fstat(fd).st_size
        os.ftruncate(fd, (size // PAGE - leave_pages) * PAGE)
    finally:
        os.close(fd)
    return filler


async def calls(url: str, count: int, concurrency: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60) as client:
        gate = asyncio.Semaphore(concurrency)

        async def one() -> httpx.Response:
            async with gate:
                return await client.post(url + "/v1/chat/completions", json=CALL, headers=AUTH)

        return await asyncio.gather(*(one() for _ in range(count)))


def journal_lines(disk: Path) -> list[bytes]:
    return [line for p in disk.glob("journal2-*.jsonl") for line in p.read_bytes().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_full_journal_loses_no_answered_charge_and_stops_admitting(
    upstream_url: str, fake_state: FakeUpstreamState, own_redis: RedisServer,
    proxies: Callable[[dict[str, Any]], ProxyProcess], tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "journal") as disk:
        raw = config_dict(upstream_url, store={"redis_url": own_redis.url, "on_unavailable": "fail_open",
                                               "journal_dir": str(disk), "call_log_size": 1000})
        proxy = proxies(raw)
        proxy.wait_until("/readyz")
        assert httpx.post(proxy.url + "/v1/chat/completions", json=CALL, headers=AUTH).status_code == 200
        all_settled(own_redis.url)
        fill(disk, leave_pages=2)  # room for ~16 entries, then a write cut short at the page's end
        with paused(own_redis):
            answers = asyncio.run(calls(proxy.url, count=60, concurrency=12))
            statuses = [a.status_code for a in answers]
            ready = httpx.get(proxy.url + "/readyz", timeout=30)
            on_disk = journal_lines(disk)
            kept = pending(proxy.url)
        served, refused = statuses.count(200), statuses.count(503)
        others = [(a.status_code, a.text[:200]) for a in answers if a.status_code not in (200, 503)]
        assert served + refused == 60 and served and refused, others
        assert {a.json()["error"]["code"] for a in answers if a.status_code == 503} == {"budget_store_unavailable"}
        assert ready.status_code == 503 and "journal" in ready.json(), ready.text
        # Every line on the full disk is a whole entry: the write cut short was cut back.
        entries = [Entry.from_line(line) for line in on_disk]
        assert 0 < len(entries) < served <= kept + 1
        billed = assert_books_balance(own_redis.url, fake_state, proxy.url)  # Redis back: every charge written
        assert served + 1 == len(fake_state.billed)
        wait_for(lambda: httpx.get(proxy.url + "/readyz").status_code == 200, timeout_s=10)  # drained: room again
    print(f"\nfull journal: served={served} refused_503={refused} on_disk={len(entries)} "
          f"in_memory={served - len(entries)} billed={billed} settled=billed readyz={ready.json()}")


def test_a_read_only_journal_stops_serve_at_start_up_with_the_fix(
    upstream_url: str, own_redis: RedisServer, tmp_path: Path,
) -> None:
    """A journal that cannot be written when the proxy starts: no call is ever admitted without a place
    for its charge, so serve refuses to start (the preflight), naming the directory and the error. A
    journal that turns unwritable later (a full disk) is the test above: /readyz 503, calls refused
    while Redis is down too."""
    with small_disk(tmp_path / "journal", "64k", "ro") as disk:
        raw = config_dict(upstream_url, store={"redis_url": own_redis.url, "on_unavailable": "fail_open",
                                               "journal_dir": str(disk)})
        path = tmp_path / "proxy.yaml"
        path.write_text(yaml.safe_dump(raw))
        served = subprocess.run([sys.executable, "-m", "guardproxy", "serve", "--config", str(path), "--port", "0"],
                                capture_output=True, text=True, timeout=60, env=no_proxy_env())
    assert served.returncode == 1, served.stderr
    assert f"cannot start: store.journal_dir: cannot write the journal in {disk}" in served.stderr
    assert "Read-only file system" in served.stderr
