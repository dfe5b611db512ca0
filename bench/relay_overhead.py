"""What relaying a stream costs in guardproxy's own ASGI response (``relay.StreamRelay``) against the same
relay written as Starlette's ``StreamingResponse`` over a generator that settles in its ``finally`` (issue
19's option), on one event loop, in process: no sockets, so only the two responses' own CPU is compared.

    python bench/relay_overhead.py [--streams 5000] [--rounds 5]

Both relay the bench's canned stream (14 SSE frames, as one upstream chunk, as nginx sends it) through the
same ``ChatStreamWatcher``, watch the client's disconnect (uvicorn speaks ASGI 2.3, so
``StreamingResponse`` listens for it in an anyio task group) and call the same settlement callback once.
Prints CPU µs per stream, per round (interleaved), and the median ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Message

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(BENCH_DIR.parent))

from workload import canned_stream_frames  # noqa: E402

from guardproxy.budget.records import Outcome  # noqa: E402
from guardproxy.http.relay import ChatStreamWatcher, RelayResult, StreamRelay  # noqa: E402
from guardproxy.http.sse import SSEParser  # noqa: E402

BODY = b"".join(canned_stream_frames())
SCOPE: dict[str, Any] = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST"}
HEADERS = {"content-type": "text/event-stream", "x-request-id": "req_bench", "x-guardproxy-tenant": "bench"}


class CannedAnswer:
    """An ``UpstreamResponse`` look-alike: the canned stream in one chunk."""

    status_code = 200

    def __init__(self) -> None:
        self.closed = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        yield BODY

    async def aclose(self) -> None:
        self.closed += 1


async def _receive_nothing() -> Message:
    await asyncio.Event().wait()  # the client never leaves; cancelled when the response ends
    return {"type": "http.disconnect"}


async def _drop(message: Message) -> None:
    pass


def as_relay(settled: list[Outcome]) -> Any:
    async def on_close(result: RelayResult) -> None:
        settled.append(result.outcome)

    return StreamRelay("bench", CannedAnswer(), HEADERS, ChatStreamWatcher(True), on_close)  # type: ignore[arg-type]


def as_streaming_response(settled: list[Outcome]) -> Any:
    answer, watcher = CannedAnswer(), ChatStreamWatcher(True)

    async def frames() -> AsyncIterator[bytes]:
        outcome = Outcome.CLIENT_DISCONNECTED
        parser = SSEParser()
        try:
            async for chunk in answer.chunks():
                body = b"".join(watcher.process(frame) for frame in parser.feed(chunk))
                if body:
                    yield body
            outcome = Outcome.COMPLETED if watcher.done else Outcome.UPSTREAM_CUT
        finally:
            with anyio.CancelScope(shield=True):
                await answer.aclose()
                settled.append(outcome)

    return StreamingResponse(frames(), headers=HEADERS)


async def _round(make: Any, streams: int) -> float:
    settled: list[Outcome] = []
    started = time.process_time()
    for _ in range(streams):
        await make(settled)(SCOPE, _receive_nothing, _drop)
    spent = time.process_time() - started
    assert settled == [Outcome.COMPLETED] * streams, "each stream settled once, completed"
    return spent / streams * 1e6


async def main_async(streams: int, rounds: int) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {"StreamRelay": [], "StreamingResponse": []}
    await _round(as_relay, 200)
    await _round(as_streaming_response, 200)
    for _ in range(rounds):
        results["StreamRelay"].append(await _round(as_relay, streams))
        results["StreamingResponse"].append(await _round(as_streaming_response, streams))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    import uvloop

    results = uvloop.run(main_async(args.streams, args.rounds))
    for name, values in results.items():
        print(f"{name:<18} {statistics.median(values):7.1f} µs CPU per stream   "
              + " ".join(f"{v:.1f}" for v in values))
    ratios = [b / a for a, b in zip(results["StreamRelay"], results["StreamingResponse"], strict=True)]
    print(f"StreamingResponse / StreamRelay: {statistics.median(ratios):.2f} (median of same-round ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
