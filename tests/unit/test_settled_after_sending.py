"""A complete answer is settled after it has been sent, exactly once, whatever the sending meets."""

from __future__ import annotations

import anyio
import pytest
from starlette.types import Message

from guardproxy.http.answers import SettledAfterSending

pytestmark = pytest.mark.anyio

SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def answer(events: list[str]) -> SettledAfterSending:
    async def settle() -> None:
        await anyio.sleep(0.01)  # a round trip: a cancelled request must still get through it
        events.append("settled")

    return SettledAfterSending(b'{"id":"x"}', 200, {"x-request-id": "req_1"}, settle)


async def test_the_answer_is_sent_first_then_settled_once() -> None:
    events: list[str] = []

    async def send(message: Message) -> None:
        events.append(message["type"])

    await answer(events)(SCOPE, receive, send)
    assert events == ["http.response.start", "http.response.body", "settled"]


async def test_a_client_gone_while_sending_still_settles_once() -> None:
    events: list[str] = []

    async def send(message: Message) -> None:
        raise OSError("connection reset")

    with pytest.raises(OSError):
        await answer(events)(SCOPE, receive, send)
    assert events == ["settled"]


async def test_a_request_cancelled_while_sending_still_settles_once() -> None:
    events: list[str] = []

    async def send(message: Message) -> None:
        events.append(message["type"])
        await anyio.sleep(10)  # a client that does not read: the server's send waits

    with anyio.move_on_after(0.05):
        await answer(events)(SCOPE, receive, send)
    assert events == ["http.response.start", "settled"]
