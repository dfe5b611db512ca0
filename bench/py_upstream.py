"""A Python streaming upstream for the benchmark: an aiohttp server that sends a stream's response head on
its own, before its first frame, as a model server does (the head goes out when the request is accepted,
each token when it is generated), unlike the canned nginx stream, whose first frame rides with the head.

``POST /pystream/v1/chat/completions`` answers ``text/event-stream``: the head, then ``FRAMES`` SSE frames
``GAP_S`` apart (the first at once, a write of its own): two content chunks, the usage chunk, ``[DONE]``.

Served by ``bench/run.py`` as ``python bench/py_upstream.py PORT``.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workload import dumps

ROUTE = "pystream"
GAP_S = 0.05
PROMPT_TOKENS = 27


def stream_frames() -> list[bytes]:
    """The four frames: two words, the usage chunk (empty ``choices``), ``[DONE]``."""
    base = {"id": "chatcmpl-pybench", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-4o-2024-08-06"}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": " bench"}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2,
                                          "total_tokens": PROMPT_TOKENS + 2}},
    ]
    return [f"data: {dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


FRAMES = stream_frames()


async def chat(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"content-type": "text/event-stream", "x-request-id": "req_pybench"})
    await response.prepare(request)  # aiohttp sends a StreamResponse's head at once
    for i, frame in enumerate(FRAMES):
        if i:
            await asyncio.sleep(GAP_S)
        await response.write(frame)
    await response.write_eof()
    return response


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_post(f"/{ROUTE}/v1/chat/completions", chat)
    return app


if __name__ == "__main__":
    web.run_app(create_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
