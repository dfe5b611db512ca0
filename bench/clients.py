"""The benchmark's own HTTP clients, for what wrk cannot measure: the time to the first streamed frame, and
memory with many streams open at once. Standard library only, HTTP/1.1 over loopback, every loop bounded.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

_HEAD_END = b"\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def request_bytes(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    """A keep-alive ``POST`` of ``body`` to ``url``, as bytes on the wire."""
    parts = urlsplit(url)
    lines = [f"POST {parts.path or '/'} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def response_complete(head: bytes, body: bytes) -> bool:
    """Whether ``body`` is the whole body announced by the response ``head`` (length or chunked)."""
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip().lower()
    if b"content-length" in fields:
        return len(body) >= int(fields[b"content-length"])
    if fields.get(b"transfer-encoding") == b"chunked":
        return body == _LAST_CHUNK or body.endswith(b"\r\n" + _LAST_CHUNK)
    return False  # read to close: the caller stops at its deadline


def first_frame_latencies(url: str, body: bytes, headers: dict[str, str], count: int,
                          timeout_s: float = 10.0) -> list[float]:
    """``count`` streaming requests one after another on one connection: for each, the seconds from
    sending it to the first ``data:`` byte of the answer's body (the time to first token a client sees)."""
    parts = urlsplit(url)
    request = request_bytes(url, body, headers)
    samples: list[float] = []
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for _ in range(count):
            started = time.perf_counter()
            sock.sendall(request)
            buffer = b""
            first: float | None = None
            head = b""
            deadline = started + timeout_s
            while time.perf_counter() < deadline:
                data = sock.recv(65536)
                if not data:
                    raise RuntimeError(f"{url} closed the connection mid-answer")
                buffer += data
                if not head and _HEAD_END in buffer:
                    head, _, buffer = buffer.partition(_HEAD_END)
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise RuntimeError(f"{url} answered {head.splitlines()[0]!r}")
                if head and first is None and b"data:" in buffer:
                    first = time.perf_counter()
                if head and response_complete(head, buffer):
                    break
            else:
                raise RuntimeError(f"{url}: no complete answer in {timeout_s} s")
            if first is None:
                raise RuntimeError(f"{url}: a streamed answer without a data frame")
            samples.append(first - started)
    finally:
        sock.close()
    return samples


async def _open_stream(url: str, request: bytes, opened: asyncio.Event, release: asyncio.Event,
                       connect: asyncio.Semaphore) -> None:
    parts = urlsplit(url)
    async with connect:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(request)
        await writer.drain()
    try:
        buffer = b""
        while b"data:" not in buffer.partition(_HEAD_END)[2]:
            data = await reader.read(65536)
            if not data:
                raise RuntimeError(f"{url} closed a stream before its first frame")
            buffer += data
        opened.set()
        await release.wait()
    finally:
        writer.close()


async def _hold(url: str, body: bytes, headers: dict[str, str], count: int, timeout_s: float,
                sample: Callable[[int], T]) -> T:
    request = request_bytes(url, body, headers)
    release = asyncio.Event()
    connect = asyncio.Semaphore(64)  # connections being opened at once: no SYN flood on the backlog
    events = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.create_task(_open_stream(url, request, event, release, connect)) for event in events]
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not all(e.is_set() for e in events):
            if any(t.done() and t.exception() for t in tasks):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # let the server settle with every stream open
        return sample(sum(e.is_set() for e in events))
    finally:
        release.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def hold_streams(url: str, body: bytes, headers: dict[str, str], count: int, timeout_s: float,
                 sample: Callable[[int], T]) -> T:
    """Open ``count`` streams to ``url`` at once, wait (at most ``timeout_s``) until each has received its
    first frame, call ``sample(number_open)`` while they are all open, then close them all."""
    return asyncio.run(_hold(url, body, headers, count, timeout_s, sample))
