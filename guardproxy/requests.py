"""Reading and validating client request bodies: size limit first, then JSON, then the fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import Request

from guardproxy.errors import ErrorKind, GuardError
from guardproxy.types import JSONObject


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be larger than ``max_bytes``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> GuardError:
    return GuardError(
        ErrorKind.REQUEST_TOO_LARGE, f"The request body is larger than this proxy accepts ({max_bytes} bytes)."
    )


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request, with the caller's original bytes."""

    raw: bytes
    body: JSONObject
    model: str
    messages: list[Any]
    tools: Any
    stream: bool
    wants_usage: bool
    #: The request's own completion-token limit (``max_completion_tokens`` or ``max_tokens``).
    max_output_tokens: int | None
    #: How many choices to generate (``n``): each can be as long as the limit.
    choices: int


def parse_json_object(raw: bytes) -> JSONObject:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GuardError(
            ErrorKind.INVALID_JSON,
            "We could not parse the JSON body of your request. The body must be a JSON object.",
        ) from None
    if not isinstance(body, dict):
        raise GuardError(ErrorKind.INVALID_JSON, "The request body must be a JSON object.")
    return body


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = parse_json_object(raw)
    model = _required(body, "model", str, "a string")
    if not model:
        raise _invalid("model", "'model' must not be empty.")
    messages = _required(body, "messages", list, "an array of messages")
    if not messages:
        raise _invalid("messages", "'messages' must contain at least one message.")
    stream = _optional(body, "stream", bool, "a boolean") or False
    options = _optional(body, "stream_options", dict, "an object") or {}
    limit = _positive_int(body, "max_completion_tokens")
    if limit is None:
        limit = _positive_int(body, "max_tokens")
    return ChatRequest(
        raw=raw, body=body, model=model, messages=messages, tools=body.get("tools"), stream=stream,
        wants_usage=bool(options.get("include_usage")), max_output_tokens=limit,
        choices=_positive_int(body, "n") or 1,
    )


def _required(body: JSONObject, name: str, kind: type, description: str) -> Any:
    if body.get(name) is None:
        raise GuardError(ErrorKind.MISSING_FIELD, f"Missing required parameter: '{name}'.", param=name)
    return _optional(body, name, kind, description)


def _optional(body: JSONObject, name: str, kind: type, description: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise _invalid(name, f"Invalid type for '{name}': expected {description}.")
    return value


def _positive_int(body: JSONObject, name: str) -> int | None:
    value: int | None = _optional(body, name, int, "an integer")
    if value is not None and value < 1:
        raise _invalid(name, f"Invalid '{name}': must be at least 1, got {value}.")
    return value


def _invalid(name: str, message: str) -> GuardError:
    return GuardError(ErrorKind.INVALID_FIELD, message, param=name)
