"""Relaying a streamed completion to the client as it arrives, and learning what it cost.

A ``StreamWatcher`` is pure: it sees each SSE frame, remembers the usage and the text, and decides
the bytes the client gets. ``ChatStreamWatcher`` serves chat and legacy completions: it hides the
usage chunk from clients that did not ask for it (the Responses API has its own watcher,
``responses_stream``). ``StreamRelay`` is the ASGI response that pumps frames from upstream to
client; whatever happens (client gone, upstream cut), its ``finally`` closes the upstream request
and hands the result to the settlement callback. The outcome is the pump's own: a stream that was
fully relayed is ``completed`` even though the server reports the client's disconnect right after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import orjson
from starlette.types import Message, Receive, Scope, Send

from guardproxy.budget.cost import add_usage_cost
from guardproxy.budget.pricing import Usage
from guardproxy.budget.records import Outcome
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.sse import Frame, SSEParser, json_object
from guardproxy.http.upstream import UpstreamResponse
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.relay")



def usage_from(
    value: Any, *, prompt: str = "prompt_tokens", completion: str = "completion_tokens",
    details: str = "prompt_tokens_details", output_details: str = "completion_tokens_details",
) -> Usage | None:
    """OpenAI's ``usage`` object as ``Usage``; ``None`` when absent or malformed. The key names are
    chat's; the Responses API names the same figures ``input_tokens``/``output_tokens``."""
    if not isinstance(value, dict):
        return None
    try:
        cached = value.get(details) or {}
        generated = value.get(output_details) or {}
        return Usage(
            prompt_tokens=int(value[prompt]),
            completion_tokens=int(value.get(completion) or 0),
            cached_prompt_tokens=int(cached.get("cached_tokens") or 0) if isinstance(cached, dict) else 0,
            reasoning_tokens=int(generated.get("reasoning_tokens") or 0) if isinstance(generated, dict) else 0,
        )
    except (KeyError, TypeError, ValueError):
        return None


def completion_texts(choices: Any, key: str) -> list[str]:
    """The generated text in ``choices``: ``key`` is ``delta`` for chat chunks, ``message`` for chat
    answers, ``text`` for legacy completions (chunks and answers)."""
    texts: list[str] = []
    if not isinstance(choices, list):
        return texts
    for choice in choices:
        part = choice.get(key) if isinstance(choice, dict) else None
        if key == "text":
            texts.extend([part] if isinstance(part, str) else [])
            continue
        if not isinstance(part, dict):
            continue
        for field in ("content", "refusal", "reasoning_content"):
            if isinstance(part.get(field), str):
                texts.append(part[field])
        for call in part.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                texts.extend(v for v in (function.get("name"), function.get("arguments")) if isinstance(v, str))
    return texts


class StreamWatcher(Protocol):
    """Follows one kind of stream frame by frame; what the relay and the settlement need of it."""

    usage: Usage | None
    texts: list[str]
    #: The stream's proper end was seen (``[DONE]``, ``response.completed``…).
    done: bool
    first_token_at: float | None
    #: The id of the answer (a chat completion's, a response's), once a frame has shown it.
    object_id: str | None

    def process(self, frame: Frame) -> bytes:
        """The bytes to send the client for ``frame`` (empty to drop it)."""

    def error_frame(self, error: GuardError) -> bytes:
        """How to tell the client, mid-stream, that the answer ends with ``error``."""


class ChatStreamWatcher:
    """Follows a chat-completion (or, with ``text_key="text"``, a legacy completion) stream."""

    def __init__(self, client_wants_usage: bool, text_key: str = "delta") -> None:
        self.client_wants_usage = client_wants_usage
        self.text_key = text_key
        self.usage: Usage | None = None
        self.texts: list[str] = []
        self.done = False
        self.first_token_at: float | None = None
        #: What a usage costs, when the usage chunk the client sees is to carry ``usage.cost``.
        self.cost_of: Callable[[Usage], Micros] | None = None
        self.object_id: str | None = None

    def process(self, frame: Frame) -> bytes:
        """The bytes to send the client for ``frame`` (empty to drop it)."""
        if frame.data == b"[DONE]":
            self.done = True
            return frame.raw
        chunk = json_object(frame)
        if chunk is None:
            return frame.raw
        if self.object_id is None and isinstance(chunk.get("id"), str):
            self.object_id = chunk["id"]
        texts = completion_texts(chunk.get("choices"), self.text_key)
        if any(texts) and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.texts.extend(texts)
        if "usage" not in chunk or self.client_wants_usage:
            if chunk.get("usage") is not None:
                self.usage = usage_from(chunk["usage"]) or self.usage
                if self.cost_of is not None and self.usage is not None:
                    add_usage_cost(chunk, self.cost_of(self.usage))
                    return b"data: " + orjson.dumps(chunk) + b"\n\n"
            return frame.raw
        usage = chunk.pop("usage")
        if usage is not None:
            # The usage chunk (Azure may also send an early one with empty choices and no usage).
            self.usage = usage_from(usage) or self.usage
            if not chunk.get("choices"):
                return b""
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def error_frame(self, error: GuardError) -> bytes:
        # Both SDKs raise APIError on a data frame carrying an "error" object, and do not retry.
        return b"data: " + error.body() + b"\n\n"


@dataclass(frozen=True)
class RelayResult:
    outcome: Outcome
    watcher: StreamWatcher
    duration_s: float


class StreamRelay:
    """ASGI response streaming an upstream SSE answer through a ``StreamWatcher``."""

    def __init__(
        self, upstream: str, response: UpstreamResponse, headers: dict[str, str], watcher: StreamWatcher,
        on_close: Callable[[RelayResult], Awaitable[None]],
        on_object: Callable[[str], Awaitable[None]] | None = None,
        before_send: Callable[[], None] | None = None,
    ) -> None:
        self.upstream = upstream
        #: Called before each batch of frames is sent, once the watcher has read them: the ledger notes
        #: the stream's charge so far, so that what the client gets is charged even if the process dies.
        self.before_send = before_send
        #: Told the answer's id (``StreamWatcher.object_id``) before the frame showing it is relayed,
        #: so that the id is usable (retrieved, continued) as soon as the client has seen it.
        self.on_object = on_object
        self.response = response
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.watcher = watcher
        self.on_close = on_close
        #: How the upstream side ended, once it has; until then a stop means the client left.
        self.ended: Outcome | None = None
        self.client_gone = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        # A plain task, not an anyio task group: ~5 µs per stream instead of ~50 (the group's scopes).
        # It never cancels the pump: it closes the upstream answer, which ends the pump's read.
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(receive))
        try:
            await self._pump(send)
        except OSError:
            pass  # the server's send() failed: the client is gone
        finally:
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                await self.response.aclose()  # closing mid-body cancels the upstream request
                outcome = self.ended or Outcome.CLIENT_DISCONNECTED
                await self.on_close(RelayResult(outcome, self.watcher, time.monotonic() - started))

    async def _watch_disconnect(self, receive: Receive) -> None:
        """When the client hangs up, end the upstream request at once (a stalled one too)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        self.client_gone = True
        await self.response.aclose()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.response.status_code, "headers": self.headers})
        parser = SSEParser()

        async def forward(frames: list[Frame]) -> None:
            body = b"".join(self.watcher.process(frame) for frame in frames)
            if self.on_object is not None and self.watcher.object_id is not None:
                on_object, self.on_object = self.on_object, None
                await on_object(self.watcher.object_id)
            if body:
                if self.before_send is not None:
                    self.before_send()
                message: Message = {"type": "http.response.body", "body": body, "more_body": True}
                await send(message)

        try:
            async for chunk in self.response.chunks():
                await forward(parser.feed(chunk))
            await forward(parser.close())
        except GuardError as exc:
            if self.client_gone:
                return  # the read ended because the client left (_watch_disconnect)
            timed_out = exc.kind is ErrorKind.UPSTREAM_TIMEOUT
            self.ended = Outcome.UPSTREAM_TIMEOUT if timed_out else Outcome.UPSTREAM_CUT
            log.warning("stream from upstream %s ended early: %s", self.upstream, exc.message)
            error = GuardError(ErrorKind.UPSTREAM_UNAVAILABLE, f"The upstream stream ended early: {exc.message}")
            await send({"type": "http.response.body", "body": self.watcher.error_frame(error), "more_body": True})
        else:
            if self.client_gone:
                return
            self.ended = Outcome.COMPLETED if self.watcher.done else Outcome.UPSTREAM_CUT
        await send({"type": "http.response.body", "body": b"", "more_body": False})
