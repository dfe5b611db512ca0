"""An incremental server-sent-events parser that keeps each frame's original bytes.

The relay forwards frames byte for byte, so the parser reports where each frame ends (its ``raw``
bytes) as well as its ``data`` and ``event`` fields. Chunks may split a frame anywhere, even
between the ``\\r`` and ``\\n`` of one line ending.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

# A line ending followed by an empty line ends a frame; a lone \r counts only when no \n follows.
_FRAME_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINE_END = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True)
class Frame:
    """One SSE event: ``raw`` as received (terminator included), its joined ``data`` and ``event``."""

    raw: bytes
    data: bytes | None
    event: str | None


def json_object(frame: Frame) -> dict[str, Any] | None:
    """The frame's data as a JSON object; ``None`` for comments, ``[DONE]``, or anything not an object."""
    if frame.data is None:
        return None
    try:
        value = orjson.loads(frame.data)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def parse_frame(raw: bytes) -> Frame:
    data: list[bytes] = []
    event: str | None = None
    for line in _LINE_END.split(raw):
        if not line or line.startswith(b":"):
            continue
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            data.append(value)
        elif name == b"event":
            event = value.decode("utf-8", "replace")
    return Frame(raw, b"\n".join(data) if data else None, event)


class SSEParser:
    """Feed bytes as they arrive; get back the frames they complete."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Frame]:
        buffer = self._buffer + chunk
        frames = []
        start = 0
        while True:
            match = _FRAME_END.search(buffer, start)
            # A trailing \r may be half of a \r\n still on the wire: wait for the next chunk.
            if match is None or (match.end() == len(buffer) and buffer.endswith(b"\r")):
                break
            frames.append(parse_frame(buffer[start : match.end()]))
            start = match.end()
        self._buffer = buffer[start:]
        return frames

    def close(self) -> list[Frame]:
        """Frames left when the stream ends: a last one without its blank line still counts."""
        rest, self._buffer = self._buffer, b""
        return [parse_frame(rest)] if rest.strip() else []

    @property
    def pending(self) -> bytes:
        return self._buffer
