"""Slowloris against ``guardproxy serve`` as a real process on loopback, with a real redis-server.

Clients that dribble a request head (one header line every 0.3 s) or a body (one byte every 0.3 s)
used to hold their connections, and a file descriptor each, as long as they liked. Now the proxy
holds at most ``server.max_connections`` (answering 503 to the rest at once), cuts a head that is
not whole within ``header_timeout_s`` and a body not whole within ``body_timeout_s`` (408), and
serves normal clients meanwhile. Every loop is bounded in count and time; the figures of each run
are written to ``test-artifacts/slowloris-<name>.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.helpers import HI, TENANT_KEY, config_dict
from tests.servers import ProxyProcess, running_proxy

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
DRIBBLE_S = 0.3
#: No dribbler lives longer than this, whatever the proxy does.
GIVE_UP_S = 8.0


def slow_config(upstream_url: str, redis_url: str, max_connections: int) -> dict[str, Any]:
    return config_dict(upstream_url, store={"redis_url": redis_url}, server={
        "max_connections": max_connections, "header_timeout_s": HEADER_TIMEOUT_S, "body_timeout_s": BODY_TIMEOUT_S,
        "keep_alive_timeout_s": 1,
    })


def socket_fds(pid: int) -> int:
    """Sockets the process holds open (client connections, listeners, Redis, upstream pools)."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def all_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Figures:
    dribblers: int
    max_connections: int
    baseline_sockets: int = 0
    baseline_fds: int = 0
    peak_sockets: int = 0
    peak_fds: int = 0
    after_sockets: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    #: Seconds from the start until the last dribbler was cut.
    last_cut_s: float = 0.0
    normal_ok: int = 0
    normal_other: int = 0
    normal_slowest_s: float = 0.0

    @property
    def peak_held(self) -> int:
        return self.peak_sockets - self.baseline_sockets


async def dribble(port: int, kind: str, started: float) -> tuple[str, float]:
    """One slow client: its outcome (the status the proxy answered, or ``open``/``reset``) and when."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if kind == "head":
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n")
    else:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                     b"authorization: Bearer " + TENANT_KEY.encode() + b"\r\ncontent-type: application/json\r\n"
                     b"content-length: 100000\r\n\r\n{")
    outcome = "open"
    try:
        for i in range(int(GIVE_UP_S / DRIBBLE_S)):
            try:
                data = await asyncio.wait_for(reader.read(4096), DRIBBLE_S)
            except TimeoutError:
                writer.write(f"x-slow-{i}: {i}\r\n".encode() if kind == "head" else b" ")
                await writer.drain()
                continue
            outcome = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"
            break
    except (ConnectionError, OSError):
        outcome = "reset"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    return outcome, time.monotonic() - started


async def normal_clients(url: str, until: float, figures: Figures) -> None:
    """A well-behaved client calling the proxy throughout (a chat completion, then /healthz), one at a time."""
    async with httpx.AsyncClient(base_url=url, timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for _ in range(200):
            if time.monotonic() > until:
                return
            started = time.monotonic()
            chat = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                                     json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5})
            health = await client.get("/healthz")
            figures.normal_slowest_s = max(figures.normal_slowest_s, time.monotonic() - started)
            ok = chat.status_code == 200 and health.status_code == 200
            figures.normal_ok += ok
            figures.normal_other += not ok
            await asyncio.sleep(0.05)


async def sample(pid: int, until: float, figures: Figures) -> None:
    while time.monotonic() < until:
        figures.peak_sockets = max(figures.peak_sockets, socket_fds(pid))
        figures.peak_fds = max(figures.peak_fds, all_fds(pid))
        await asyncio.sleep(0.05)


async def attack(proxy: ProxyProcess, figures: Figures, kinds: list[str], *, normal: bool) -> None:
    pid = proxy.process.pid
    figures.baseline_sockets, figures.baseline_fds = socket_fds(pid), all_fds(pid)
    started = time.monotonic()
    until = started + HEADER_TIMEOUT_S + 2.5
    sockets: list[asyncio.Task[tuple[str, float]]] = []
    for i, kind in enumerate(kinds):  # opened at once, as an attacker would
        sockets.append(asyncio.create_task(dribble(proxy.port, kind, started)))
        if i % 50 == 49:
            await asyncio.sleep(0)
    background = [asyncio.create_task(sample(pid, until, figures))]
    if normal:
        background.append(asyncio.create_task(normal_clients(proxy.url, until, figures)))
    results = await asyncio.gather(*sockets)
    await asyncio.gather(*background)
    for outcome, _ in results:
        figures.outcomes[outcome] = figures.outcomes.get(outcome, 0) + 1
    figures.last_cut_s = round(max(at for _, at in results), 2)
    await asyncio.sleep(0.3)
    figures.after_sockets = socket_fds(pid)


def record(name: str, figures: Figures) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"slowloris-{name}.json").write_bytes(
        orjson.dumps({**vars(figures), "peak_held": figures.peak_held}, option=orjson.OPT_INDENT_2))


@pytest.mark.slow
def test_300_dribbling_heads_hold_no_more_than_the_limit_and_are_cut_at_the_deadline(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    figures = Figures(dribblers=300, max_connections=200)
    with running_proxy(slow_config(upstream_url, redis_url, 200), tmp_path) as proxy:
        asyncio.run(attack(proxy, figures, ["head"] * 300, normal=False))
        after = httpx.post(proxy.url + "/v1/chat/completions", headers={"authorization": f"Bearer {TENANT_KEY}"},
                           json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 5})
        assert after.status_code == 200  # served as soon as the dribblers are cut
    record("over-the-limit", figures)
    # at most the limit held (a few sockets of slack: the sampler's own /readyz, Redis, the upstream pool)
    assert figures.peak_held <= 200 + 5, figures
    # the connections beyond the limit were answered 503 at once, the others cut with 408 at the deadline
    assert figures.outcomes.get("503", 0) >= 100 - 5 and figures.outcomes.get("408", 0) >= 195, figures
    assert figures.outcomes.get("open", 0) == 0, figures
    assert figures.last_cut_s < HEADER_TIMEOUT_S + 1.5, figures
    assert figures.after_sockets <= figures.baseline_sockets + 5, figures


@pytest.mark.slow
def test_dribbling_heads_and_bodies_under_the_limit_are_cut_while_normal_clients_are_served(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    figures = Figures(dribblers=300, max_connections=1000)
    with running_proxy(slow_config(upstream_url, redis_url, 1000), tmp_path) as proxy:
        asyncio.run(attack(proxy, figures, ["head", "body"] * 150, normal=True))
    record("under-the-limit", figures)
    assert figures.outcomes.get("408", 0) == 300, figures  # every one cut, heads and bodies alike
    assert figures.last_cut_s < max(HEADER_TIMEOUT_S, BODY_TIMEOUT_S) + 1.5, figures
    assert figures.normal_ok >= 5 and figures.normal_other == 0, figures
    assert figures.normal_slowest_s < 2.0, figures
    assert figures.after_sockets <= figures.baseline_sockets + 5, figures


@pytest.mark.slow
def test_idle_connections_close_quietly_and_a_huge_head_gets_431(
    upstream_url: str, redis_url: str, tmp_path: Path
) -> None:
    async def run(port: int) -> tuple[bytes, float, bytes, bytes]:
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        silent = await asyncio.wait_for(reader.read(4096), HEADER_TIMEOUT_S + 3)  # sends nothing at all
        silent_after = time.monotonic() - started
        writer.close()
        # one request, then idle on the kept-alive connection: closed after keep_alive_timeout_s (1 s)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        answered = await asyncio.wait_for(reader.read(4096), 5)
        idle = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")
        big = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        return silent, silent_after, answered + idle, big

    with running_proxy(slow_config(upstream_url, redis_url, 100), tmp_path) as proxy:
        silent, silent_after, kept_alive, big = asyncio.run(run(proxy.port))
    assert silent == b"" and HEADER_TIMEOUT_S - 0.2 < silent_after < HEADER_TIMEOUT_S + 1.5
    assert kept_alive.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408" not in kept_alive  # closed, not answered
    assert big.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in big
