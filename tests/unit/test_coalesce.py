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
