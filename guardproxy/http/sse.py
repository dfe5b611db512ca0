"""An incremental server-sent-events parser that keeps each frame's original bytes.

The relay forwards frames byte for byte, so the parser reports where each frame ends (its ``raw``
bytes) as well as its ``data`` and ``event`` fields. Chunks may split a frame anywhere, even
between the ``\\r`` and ``\\n`` of one line ending.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import orjson

# A line ending followed by an empty line ends a frame; a lone \r counts only when no \n follows.
_FRAME_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINE_END = re.compile(rb"\r\n|\n|\r")


class Frame(NamedTuple):
    """One SSE event: ``raw`` as received (terminator included), its joined ``data`` and ``event``.

    A named tuple: one is made per streamed chunk, and a frozen dataclass costs several times more
    to build."""

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
    # What upstreams send nearly always: one "data: ..." line and a blank line, no \r. The same
    # frame as the general parse gives (tests/unit/test_sse.py checks both agree), without its
    # regex split and per-line work.
    if raw.startswith(b"data: ") and raw.find(b"\n") == len(raw) - 2 and raw.endswith(b"\n\n") \
            and b"\r" not in raw:
        return Frame(raw, raw[6:-2], None)
    return parse_lines(raw)


def parse_lines(raw: bytes) -> Frame:
    """The general parse of one frame's lines (any line endings, fields, comments)."""
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
        buffer = self._buffer + chunk if self._buffer else chunk
        frames = []
        start = 0
        if b"\r" not in buffer:  # \n line endings only (nearly every upstream): a frame ends at \n\n
            while (end := buffer.find(b"\n\n", start)) >= 0:
                frames.append(parse_frame(buffer[start : end + 2]))
                start = end + 2
            self._buffer = buffer[start:]
            return frames
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
