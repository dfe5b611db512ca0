"""Slow clients: a connection limit and a deadline for each request head, in uvicorn's protocol.

uvicorn has no deadline for a request head: a client that sends one header byte a second holds its
connection (and a file descriptor) as long as it likes, and 800 of them held 800 fds for minutes
(slowloris). Its ``limit_concurrency`` answers 503 only once a whole head has arrived, so a
dribbling client is never refused. ``GuardedHttpToolsProtocol`` / ``GuardedH11Protocol`` add, per
worker process (``server.*`` in proxy.yaml):

- ``max_connections``: a connection beyond it is answered 503 (``connection: close``) and closed at
  once, before it can hold anything;
- ``header_timeout_s``: a request head must arrive whole within this of the connection opening or
  of the previous answer, else 408 and the connection closes (dribbling resets nothing); a
  connection that sent nothing in that time is closed without an answer;
- ``max_header_bytes``: a longer head is answered 431 and the connection closes;
- ``keep_alive_timeout_s`` is uvicorn's own ``timeout_keep_alive``.

The body has its own deadline in the app (``requests.read_body``, ``server.body_timeout_s``).

This module is a seam (``guardproxy.store.compat``): it subclasses uvicorn's HTTP protocol classes and
uses their ``connections``, ``cycle``, ``transport`` and ``loop``; an upgrade that moves them stops
the import with ``IncompatibleLibrary``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import uvicorn

from guardproxy.config.settings import ServerConfig
from guardproxy.errors import error_body
from guardproxy.http.coalesce import CoalescingTransport
from guardproxy.store.compat import internals, require

log = logging.getLogger("guardproxy.server")

UVICORN_TESTED = ">=0.30,<0.56"

with internals("uvicorn", UVICORN_TESTED):
    from uvicorn.protocols.http.h11_impl import H11Protocol

    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional (uvicorn[standard]); h11 always comes with uvicorn
        HttpToolsProtocol = None  # type: ignore[assignment,misc]

_HOOKS = ("connection_made", "connection_lost", "data_received", "on_response_complete")
require("uvicorn", UVICORN_TESTED, h11=(H11Protocol, _HOOKS))
if HttpToolsProtocol is not None:
    require("uvicorn", UVICORN_TESTED, httptools=(HttpToolsProtocol, _HOOKS))


@dataclass(frozen=True)
class SlowClientLimits:
    """What a worker's protocol enforces (``server.*`` of proxy.yaml)."""

    max_connections: int = ServerConfig.max_connections
    header_timeout_s: float = ServerConfig.header_timeout_s
    max_header_bytes: int = ServerConfig.max_header_bytes

    @classmethod
    def of(cls, server: ServerConfig) -> SlowClientLimits:
        return cls(server.max_connections, server.header_timeout_s, server.max_header_bytes)


def _answer(status: str, message: str, retry_after_s: int | None = None) -> bytes:
    """A whole HTTP/1.1 answer in OpenAI's error shape, closing the connection (written before any app runs)."""
    code = {"408": "request_timeout", "431": "headers_too_large", "503": "too_many_connections"}[status[:3]]
    body = error_body(message, "server_error" if status.startswith("503") else "invalid_request_error", code)
    head = (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n")
    if retry_after_s is not None:
        head += f"retry-after: {retry_after_s}\r\n"
    return head.encode() + b"\r\n" + body


_TOO_MANY = _answer("503 Service Unavailable", "This proxy holds as many connections as it takes; retry shortly.", 1)
_HEAD_TIMEOUT = _answer("408 Request Timeout", "The request head did not arrive in time.")
_HEAD_TOO_LARGE = _answer("431 Request Header Fields Too Large", "The request head is larger than this proxy takes.")


class _Guarded:
    """The checks, mixed in before one of uvicorn's protocol classes (which supplies ``super()``)."""

    # uvicorn's protocol sets these; named here for the type checker.
    connections: set[Any]
    cycle: Any
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        self.limits: SlowClientLimits = getattr(config, "slow_clients", None) or SlowClientLimits()
        self._deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The writes of one loop iteration (a head and its body) leave as one packet (``coalesce``).
        coalescing = CoalescingTransport(transport, self.loop)  # type: ignore[arg-type]
        super().connection_made(coalescing)  # type: ignore[misc]
        if len(self.connections) > self.limits.max_connections:
            log.warning("connection refused: %d open, server.max_connections is %d", len(self.connections) - 1,
                        self.limits.max_connections)
            self.transport.write(_TOO_MANY)
            self.transport.close()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        waiting = self._awaiting_head()
        if waiting:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.max_header_bytes:
                self._close_with(_HEAD_TOO_LARGE)
                return
        super().data_received(data)  # type: ignore[misc]
        if waiting and not self._awaiting_head():  # the head is in: its deadline is met
            self._head_bytes = 0
            self._disarm()

    def on_response_complete(self) -> None:
        # The response's last bytes leave now, not after what the app does next in this iteration.
        if isinstance(self.transport, CoalescingTransport):
            self.transport.flush()
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():  # keep-alive: the next head has its own deadline
            self._head_bytes = 0
            self._arm()

    def _awaiting_head(self) -> bool:
        return self.cycle is None or bool(self.cycle.response_complete)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.limits.header_timeout_s, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self._awaiting_head():
            return
        if self._head_bytes:
            self._close_with(_HEAD_TIMEOUT)
        elif not self.transport.is_closing():
            # Nothing of a next request sent: an idle connection closes quietly, so that a client's
            # pool never reads an unsolicited 408 as the answer to a request it sends just then.
            self.transport.close()

    def _close_with(self, answer: bytes) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()


class GuardedH11Protocol(_Guarded, H11Protocol):
    """uvicorn's h11 protocol with guardproxy's slow-client limits."""


if HttpToolsProtocol is not None:

    class GuardedHttpToolsProtocol(_Guarded, HttpToolsProtocol):
        """uvicorn's httptools protocol with guardproxy's slow-client limits."""

    PROTOCOL = "guardproxy.http.slow_clients:GuardedHttpToolsProtocol"
else:  # pragma: no cover - the lock installs httptools
    PROTOCOL = "guardproxy.http.slow_clients:GuardedH11Protocol"


def uvicorn_config(app: Any, server: ServerConfig, **options: Any) -> uvicorn.Config:
    """uvicorn's ``Config`` for ``app`` with ``server``'s slow-client settings: the guarded protocol
    (as an import string, so ``--workers`` processes load it too), the keep-alive timeout, h11's head
    limit, and ``limit_concurrency`` one above ``max_connections`` (uvicorn's own 503 for requests in
    flight as a backstop; the protocol refuses connections first). The limits travel with the config
    to every worker."""
    config = uvicorn.Config(
        app, http=PROTOCOL, timeout_keep_alive=server.keep_alive_timeout_s,  # type: ignore[arg-type]
        limit_concurrency=server.max_connections + 1, h11_max_incomplete_event_size=server.max_header_bytes,
        **options,
    )
    config.slow_clients = SlowClientLimits.of(server)  # type: ignore[attr-defined]
    return config
