"""CoalescingTransport over a real loopback connection: the writes of one loop iteration leave as one
write, in order; nothing waits past its iteration; closing sends what is kept, aborting drops it."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from guardproxy.http.coalesce import CoalescingTransport


class _Sink(asyncio.Protocol):
    def __init__(self, accepted: asyncio.Future[asyncio.Transport]) -> None:
        self.accepted = accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.accepted.set_result(transport)  # type: ignore[arg-type]


async def _pair() -> tuple[CoalescingTransport, asyncio.Transport, socket.socket]:
    """A server-side transport wrapped as guardproxy wraps a client's, and the client's raw socket."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    server = await loop.create_server(lambda: _Sink(accepted), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    client.setblocking(False)
    transport = await asyncio.wait_for(accepted, 5)
    server.close()
    return CoalescingTransport(transport, loop), transport, client


async def _read(client: socket.socket, expected: int) -> list[bytes]:
    """What the client receives, recv by recv, until ``expected`` bytes (bounded in time)."""
    loop = asyncio.get_running_loop()
    reads: list[bytes] = []
    async with asyncio.timeout(5):
        while sum(map(len, reads)) < expected:
            data = await loop.sock_recv(client, 65536)
            if not data:
                break
            reads.append(data)
    return reads


def _run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(test())  # type: ignore[arg-type]


def test_writes_of_one_iteration_leave_together_and_in_order() -> None:
    async def test() -> None:
        wrapped, raw, client = await _pair()
        with client:
            wrapped.write(b"HTTP/1.1 200 OK\r\n\r\n")
            wrapped.write(b"")  # nothing to send: no write, no flush of its own
            wrapped.writelines([b"data: 1\n\n", bytearray(b"data: 2\n\n")])
            assert raw.get_write_buffer_size() == 0  # nothing written yet...
            assert wrapped.get_write_buffer_size() == 37  # ...but counted, for uvicorn's flow control
            await asyncio.sleep(0)  # the end of the iteration
            reads = await _read(client, 37)
            assert reads == [b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\ndata: 2\n\n"]
            wrapped.write(b"later")  # a later iteration's write leaves on its own
            assert await _read(client, 5) == [b"later"]
            raw.close()

    _run(test)


def test_close_sends_what_is_kept_and_abort_drops_it() -> None:
    async def test() -> None:
        wrapped, _, client = await _pair()
        with client:
            wrapped.write(b"last words")
            wrapped.close()
            assert await _read(client, 100) == [b"last words"]  # then end of stream
            assert wrapped.is_closing()  # everything else is the wrapped transport's

        wrapped, _, client = await _pair()
        with client:
            wrapped.write(b"never sent")
            wrapped.abort()
            await asyncio.sleep(0.05)
            assert await _read(client, 100) == []

    _run(test)


def test_a_complete_response_leaves_before_the_app_goes_on() -> None:
    """Served by guardproxy's uvicorn protocol: head and body arrive in one read, and as soon as the
    response is complete, though the app then blocks its loop (as settling a call keeps it busy)."""
    import time

    from starlette.types import Receive, Scope, Send

    from guardproxy.http.slow_clients import GuardedHttpToolsProtocol
    from tests.servers import serve_in_thread

    block_s = 2.0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
        await send({"type": "http.response.body", "body": b"hello"})
        time.sleep(block_s)  # noqa: ASYNC251 (on purpose: a busy loop, where nothing kept for later leaves)

    with serve_in_thread(app, http=GuardedHttpToolsProtocol) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            started = time.monotonic()
            client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            first = client.recv(65536)
            waited = time.monotonic() - started
    assert first.startswith(b"HTTP/1.1 200 OK\r\n") and first.endswith(b"\r\n\r\nhello")
    assert waited < block_s / 2
