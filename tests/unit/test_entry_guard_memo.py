"""``EntryGuard`` remembers header values that carry no key; a reload's new keys are searched for anew."""

from __future__ import annotations

import hashlib
from collections.abc import Collection

import pytest
from starlette.types import Message, Receive, Scope, Send

from guardproxy.http.paths import EntryGuard

NEW_KEY = b"gpk-added-by-a-reload-0123456789"


def _hash(key: bytes) -> str:
    return "sha256:" + hashlib.sha256(key).hexdigest()


async def _headers_seen(guard: EntryGuard, seen: list[list[tuple[bytes, bytes]]], value: bytes) -> None:
    scope: Scope = {"type": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
                    "headers": [(b"x-note", value), (b"content-type", b"application/json")]}

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    await guard(scope, receive, send)


@pytest.mark.anyio
async def test_a_value_remembered_as_keyless_is_searched_again_once_the_keys_change() -> None:
    keys: list[Collection[str]] = [frozenset({_hash(b"gpk-the-first-config-key-000000")})]
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(list(scope["headers"]))

    guard = EntryGuard(app, key_hashes=lambda scope: keys[0])
    for _ in range(2):  # the second time from memory
        await _headers_seen(guard, seen, NEW_KEY)
    assert [dict(h).get(b"x-note") for h in seen] == [NEW_KEY, NEW_KEY]
    keys[0] = frozenset({*keys[0], _hash(NEW_KEY)})  # a reload adds the key
    await _headers_seen(guard, seen, NEW_KEY)
    assert b"x-note" not in dict(seen[-1])
    assert dict(seen[-1])[b"content-type"] == b"application/json"


@pytest.mark.anyio
async def test_a_value_carrying_a_key_is_dropped_every_time() -> None:
    keys = frozenset({_hash(NEW_KEY)})
    seen: list[list[tuple[bytes, bytes]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(list(scope["headers"]))

    guard = EntryGuard(app, key_hashes=lambda scope: keys)
    for _ in range(3):
        await _headers_seen(guard, seen, b"note " + NEW_KEY)
    assert all(b"x-note" not in dict(h) for h in seen)
