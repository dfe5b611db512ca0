"""A pooled upstream connection the server closes as the next request arrives (the keep-alive race):
the call is sent once more and answered, over real sockets; a server that always does so is a 502."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from guardproxy.config.models import UpstreamConfig
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.upstream import Upstream

pytestmark = pytest.mark.anyio

ANSWER = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}'


class Server:
    """Answers the first request of each connection and keeps it open; on the second request of a
    connection, closes it without answering (``always_close``: every request, the first included)."""

    def __init__(self, always_close: bool = False) -> None:
        self.always_close = always_close
        self.requests = 0
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(2)  # the body: b"{}"
                self.requests += 1
                if self.always_close or answered:
                    break
                writer.write(ANSWER)
                await writer.drain()
                answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()  # a reset, not a polite close


@pytest.fixture
async def upstream_of() -> AsyncIterator[list[asyncio.Server]]:
    servers: list[asyncio.Server] = []
    yield servers
    for server in servers:
        server.close()


async def start(server: Server, servers: list[asyncio.Server]) -> Upstream:
    listening = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    servers.append(listening)
    port = listening.sockets[0].getsockname()[1]
    return Upstream(UpstreamConfig(name="openai", base_url=f"http://127.0.0.1:{port}/v1"))


async def call(upstream: Upstream) -> int:
    response = await upstream.send("chat/completions", b"{}", [("content-type", "application/json")])
    await response.read()
    return response.status_code


async def test_a_connection_closed_as_the_next_request_arrives_is_retried_once(
        upstream_of: list[asyncio.Server]) -> None:
    server = Server()
    upstream = await start(server, upstream_of)
    try:
        assert [await call(upstream) for _ in range(3)] == [200, 200, 200]
    finally:
        await upstream.aclose()
    # calls 2 and 3 each met a connection closed on arrival and were sent again on a new one
    assert (server.requests, server.connections) == (5, 3)


async def test_an_upstream_that_never_answers_is_a_502_after_one_retry(upstream_of: list[asyncio.Server]) -> None:
    server = Server(always_close=True)
    upstream = await start(server, upstream_of)
    try:
        with pytest.raises(GuardError) as refused:
            await call(upstream)
    finally:
        await upstream.aclose()
    assert refused.value.kind is ErrorKind.UPSTREAM_UNAVAILABLE and server.requests == 2
