"""Writes to a client coalesced per event-loop iteration: one packet where uvicorn would send two.

uvicorn writes a response's head as soon as the app sends ``http.response.start`` and each body
chunk as it comes, and uvloop sends each write at once (a system call, and a wake-up of the client
when it is waiting). A complete answer's head and body, and a stream's head and first frame when the
frame is already there, are sent in the same iteration of the event loop: ``CoalescingTransport``
keeps the writes of one iteration and sends them together at its end (``loop.call_soon``), so the
client gets them in one packet. Nothing waits longer than the iteration that wrote it: a head whose
first frame has not arrived still goes out at once, and a complete response goes out as soon as its
last write is made (the protocol calls ``flush`` when uvicorn reports the response complete), before
the app goes on in the same iteration (settling the call). Measured with ``bench/ttfb.py``: see
bench/README.md.
"""

from __future__ import annotations

import asyncio
from typing import Any


class CoalescingTransport:
    """A client connection's transport whose writes of one loop iteration leave as one write.

    Everything but writing and closing goes to the wrapped transport unchanged (flow control,
    ``get_extra_info``, pausing reads); closing sends what is kept first, aborting drops it.
    """

    __slots__ = ("_kept", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._kept: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._kept:
            self._loop.call_soon(self.flush)
        self._kept.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        """Send what this iteration wrote, now."""
        if not self._kept:
            return
        data = self._kept[0] if len(self._kept) == 1 else b"".join(self._kept)
        self._kept.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._kept.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(k) for k in self._kept)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
