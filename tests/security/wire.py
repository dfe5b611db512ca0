"""HTTP at the byte level, for attacks an HTTP client library would refuse to send or would tidy up.

``raw_request`` writes the exact request line and headers it is given to a real socket and parses
the answer without normalising it (duplicate headers stay duplicates), so a test sees what a client
on the wire sees. ``store_snapshot`` reads every key of a Redis, to show that a refused request
changed nothing.
"""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis

ADMIN_KEY = "ak-admin-secret"


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        assert len(values) <= 1, f"header {name} sent {len(values)} times"
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def names(self) -> list[str]:
        return [k for k, _ in self.headers]


def raw_request(
    base_url: str, method: str, target: bytes | str, headers: list[tuple[str, str]] | None = None,
    body: bytes = b"", *, extra_head: bytes = b"", timeout_s: float = 10.0,
) -> RawResponse:
    """Send one request over a fresh connection exactly as written; ``extra_head`` is appended raw."""
    parts = urlsplit(base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    target_bytes = target.encode("latin-1") if isinstance(target, str) else target
    lines = [f"{method} ".encode() + target_bytes + b" HTTP/1.1", f"Host: {host}:{port}".encode(),
             b"Connection: close", f"Content-Length: {len(body)}".encode()]
    lines += [f"{k}: {v}".encode("latin-1") for k, v in headers or []]
    payload = b"\r\n".join(lines) + b"\r\n" + extra_head + b"\r\n" + body
    deadline = time.monotonic() + timeout_s
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        data = bytearray()
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            if len(data) > 32 * 1024 * 1024:
                raise AssertionError("answer larger than 32 MB")
    return parse_response(bytes(data))


def parse_response(data: bytes) -> RawResponse:
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in header_lines)]
    if ("transfer-encoding", "chunked") in headers:
        rest = _dechunk(rest)
    return RawResponse(status, headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return bytes(out)


#: The registry of tenants seen: admission adds a (valid, authenticated) tenant even when it answers
#: 429; it holds no money, so it is left out of snapshots (``tenants_seen`` checks its members).
REGISTRY = b"gp:tenant-index"
#: The store's marker (``store_health``): written once, holds no money.
STORE_MARKER = b"{gp-store}"


def tenants_seen(redis_url: str) -> set[bytes]:
    client = redis.Redis.from_url(redis_url)
    try:
        members: list[bytes] = client.zrange(REGISTRY, 0, -1)  # type: ignore[assignment]
        return set(members)
    finally:
        client.close()


#: Keys a budget refusal (429) writes on purpose: the period's blocked flag (``gp:{t}:flags:<period>:<id>``)
#: and its alert event. No money: spend, reservations, settled markers and the call log are elsewhere.
REFUSAL_RECORDS = re.compile(rb":flags:(day|month):[^:]+$|:alerts(:due|:delivery)?$")


def money(snapshot: dict[bytes, Any]) -> dict[bytes, Any]:
    """``snapshot`` without what a refusal records on purpose (``REFUSAL_RECORDS``)."""
    return {key: value for key, value in snapshot.items() if not REFUSAL_RECORDS.search(key)}


#: The key /readyz writes to check that the store takes writes (``BudgetStore.check_writable``).
READY_PROBE = b":{readyz}:probe"


def store_snapshot(redis_url: str) -> dict[bytes, Any]:
    """Every key of the store with its value, whatever its type (counters, reservations, call log)."""
    client = redis.Redis.from_url(redis_url)
    try:
        snapshot: dict[bytes, Any] = {}
        for key in client.scan_iter(count=1000):
            if key == REGISTRY or key.endswith(READY_PROBE) or STORE_MARKER in key:
                continue  # /readyz writes its probe key on every call: that is how it knows writes work
            kind = client.type(key)
            if kind == b"string":
                value = client.get(key)
                if value != b"0":  # a counter at 0 and no counter are the same money (admission tidies them)
                    snapshot[key] = value
            elif kind == b"hash":
                snapshot[key] = client.hgetall(key)
            elif kind == b"zset":
                snapshot[key] = client.zrange(key, 0, -1, withscores=True)
            elif kind == b"stream":
                snapshot[key] = client.xrange(key)
            elif kind == b"set":
                snapshot[key] = client.smembers(key)
            elif kind == b"list":
                snapshot[key] = client.lrange(key, 0, -1)
            else:
                snapshot[key] = kind
        return snapshot
    finally:
        client.close()


def assert_openai_error(response: RawResponse, status: int, code: str | None = None) -> dict[str, Any]:
    """``response`` is guardproxy's error: the status, OpenAI's error object and an ``x-request-id``."""
    assert response.status == status, (response.status, response.body[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code, error
    request_id = response.header("x-request-id")
    assert request_id is not None and request_id.startswith("req_gp_")
    return dict(error)
