"""What the benchmark sends and what its canned upstream answers: the request, the answer, the stream."""

from __future__ import annotations

import json
from typing import Any

TENANT = "bench"
TENANT_KEY = "sk-bench-tenant-key"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the benchmark, briefly."},
]
MODES = ("plain", "stream")
# Each kind of answer has its own model on guardproxy and LiteLLM (each model its own upstream base URL),
# and its own path on nginx; the bare proxies pick the path from the x-bench-route header.
MODELS = {"plain": "bench-plain", "stream": "bench-stream", "slow": "bench-slow", "pystream": "bench-pystream"}
#: The route served by the Python upstream (``bench/py_upstream.py``), not by nginx.
PY_ROUTE = "pystream"
COMPLETE_MARKERS = {"plain": '"stop"', "stream": "[DONE]"}
# A stream's words: one SSE frame each.
WORDS = ["Hello", ",", " bench", "mark", "!", " Nice", " to", " meet", " you", "."]
# The slow stream (1,000 open streams): the response head and first frame at once (nginx counts the head
# in limit_rate_after), then the rest at this many bytes/s, so a stream stays open for minutes.
SLOW_RATE_BYTES_S = 16
SLOW_HEAD_ALLOWANCE_BYTES = 512


BASELINE = "bare-httpx-aiohttp"
GUARD = "guardproxy-redis"


def request_body(route: str) -> dict[str, Any]:
    """What every target receives: a small chat request, streaming with usage asked by the client itself
    (so guardproxy forwards the caller's bytes unchanged)."""
    body: dict[str, Any] = {"model": MODELS[route], "messages": MESSAGES}
    if route != "plain":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def request_headers(route: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {TENANT_KEY}", "x-bench-route": route}


# -- the canned upstream -------------------------------------------------------------------------------


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def canned_answer() -> bytes:
    """The upstream's non-streaming chat completion (usage included)."""
    return dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 27, "completion_tokens": len(WORDS), "total_tokens": 27 + len(WORDS)},
        "system_fingerprint": "fp_bench",
    }).encode()


def canned_stream_frames() -> list[bytes]:
    """The upstream's streamed chat completion, frame by frame: role, words, finish, usage, [DONE]."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_bench"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": word}, "logprobs": None,
                                     "finish_reason": None}]} for word in WORDS]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [],
                   "usage": {"prompt_tokens": 27, "completion_tokens": len(WORDS), "total_tokens": 27 + len(WORDS)}})
    return [f"data: {dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]
