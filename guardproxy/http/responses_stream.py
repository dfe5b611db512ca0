"""The Responses API (``/v1/responses``) on the wire: its usage, its text and its named-event streams.

Its streams differ from chat's: every frame is a named event (``event: response.output_text.delta``)
whose JSON repeats the name in ``type``; there is no ``[DONE]``; the usage always comes, inside
``response.usage`` of the final ``response.completed`` / ``response.incomplete`` /
``response.failed`` event, so the proxy neither asks for it nor hides it: every frame passes
through byte for byte, except that the terminal event's usage gains ``cost`` (``cost.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson

from guardproxy.budget.cost import add_usage_cost
from guardproxy.budget.pricing import Usage
from guardproxy.errors import GuardError
from guardproxy.http.relay import usage_from
from guardproxy.http.sse import Frame, json_object
from guardproxy.types import Micros

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# Delta events carry generated tokens as text (output, refusals, tool arguments, reasoning), except
# audio, whose delta is base64 bytes.
_NOT_TEXT_DELTAS = frozenset({"response.audio.delta"})


def _is_text_delta(kind: Any) -> bool:
    return isinstance(kind, str) and kind.endswith(".delta") and kind not in _NOT_TEXT_DELTAS


def responses_usage(value: Any) -> Usage | None:
    """A Responses API ``usage`` object as ``Usage``; ``None`` when absent or malformed."""
    return usage_from(value, prompt="input_tokens", completion="output_tokens", details="input_tokens_details",
                      output_details="output_tokens_details")


def output_texts(response: Any) -> list[str]:
    """The generated text of a response object: message text and refusals, tool-call arguments, reasoning."""
    texts: list[str] = []
    output = response.get("output") if isinstance(response, dict) else None
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        texts.extend(v for v in (item.get("arguments"), item.get("input")) if isinstance(v, str))
        for part in [*(item.get("content") or ()), *(item.get("summary") or ())]:
            if isinstance(part, dict):
                texts.extend(v for v in (part.get("text"), part.get("refusal")) if isinstance(v, str))
    return texts


def answer_usage(answer: Any) -> tuple[Usage | None, list[str]]:
    """Usage and text of a complete (non-streamed) response object."""
    usage = responses_usage(answer.get("usage")) if isinstance(answer, dict) else None
    return usage, output_texts(answer)


class ResponsesStreamWatcher:
    """Follows a Responses API stream: text from delta events, usage from the terminal event."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.texts: list[str] = []
        self.done = False
        self.first_token_at: float | None = None
        #: What a usage costs, when the terminal event is to carry ``usage.cost``.
        self.cost_of: Callable[[Usage], Micros] | None = None
        self.object_id: str | None = None
        self._last_sequence_number = -1

    def process(self, frame: Frame) -> bytes:
        event = json_object(frame)
        if event is None:
            return frame.raw
        kind = event.get("type") or frame.event
        if isinstance(event.get("sequence_number"), int):
            self._last_sequence_number = event["sequence_number"]
        if self.object_id is None and isinstance(event.get("response"), dict) \
                and isinstance(event["response"].get("id"), str):
            self.object_id = event["response"]["id"]
        delta = event.get("delta")
        if isinstance(delta, str) and _is_text_delta(kind):
            if delta and self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.texts.append(delta)
        elif kind in TERMINAL_EVENTS:
            self.done = True
            response = event.get("response")
            self.usage = responses_usage(response.get("usage") if isinstance(response, dict) else None) or self.usage
            cost_of, usage = self.cost_of, self.usage
            if cost_of is not None and usage is not None and add_usage_cost(response, cost_of(usage)):
                name = f"event: {frame.event}\n".encode() if frame.event else b""
                return name + b"data: " + orjson.dumps(event) + b"\n\n"
        return frame.raw

    def error_frame(self, error: GuardError) -> bytes:
        """An ``error`` event as the Responses API sends it, with the chat-style ``error`` object too.

        Typed clients read ``type``/``code``/``message``; the openai SDKs raise ``APIError`` (and do
        not retry) on any event whose data carries an ``error`` object.
        """
        payload = {
            "type": "error", "code": error.code, "message": error.message, "param": error.param,
            "sequence_number": self._last_sequence_number + 1, "error": orjson.loads(error.body())["error"],
        }
        return b"event: error\ndata: " + orjson.dumps(payload) + b"\n\n"
