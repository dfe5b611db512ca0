"""Reading and validating client request bodies: size limit first, then JSON, then the fields.

One parser per budgeted endpoint; each returns an ``ApiRequest`` with what the budget needs (model,
stream, the output limit and how many outputs it multiplies) and the caller's original bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import anyio
import orjson
from starlette.requests import Request

from guardproxy.config.settings import ServerConfig
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.types import JSONObject


async def read_body(request: Request, max_bytes: int, timeout_s: float | None = None) -> bytes:
    """The whole body, refused with 413 as soon as it is known to be larger than ``max_bytes``, and
    with 408 when it has not arrived within ``timeout_s`` (default: the app's ``server.body_timeout_s``):
    a client that dribbles its body holds no connection and no handler for longer."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    if timeout_s is None:
        timeout_s = body_timeout_s(request)
    chunks: list[bytes] = []
    size = 0
    with anyio.move_on_after(timeout_s) as deadline:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(max_bytes)
            chunks.append(chunk)
    if deadline.cancelled_caught:
        raise GuardError(ErrorKind.REQUEST_TIMEOUT, f"The request body did not arrive within {timeout_s:g} s "
                         "(server.body_timeout_s).", headers={"connection": "close"})
    return b"".join(chunks)


def body_timeout_s(request: Request) -> float:
    """``server.body_timeout_s`` of the running config (a reload applies it to the next request; its
    default outside an app). Read by name from the lifespan state (``app_state.STATE_KEY``), as this
    module sits below ``app_state`` in the imports."""
    runtime = getattr(request.scope.get("state", {}).get("guardproxy"), "runtime", None)
    config = getattr(getattr(getattr(runtime, "current", None), "services", None), "config", None)
    return float(getattr(getattr(config, "server", None), "body_timeout_s", ServerConfig.body_timeout_s))


def _too_large(max_bytes: int) -> GuardError:
    return GuardError(
        ErrorKind.REQUEST_TOO_LARGE, f"The request body is larger than this proxy accepts ({max_bytes} bytes)."
    )


@dataclass(frozen=True)
class ApiRequest:
    """A validated request to a budgeted endpoint, with the caller's original bytes."""

    raw: bytes
    body: JSONObject
    model: str
    stream: bool
    #: The client asked for the usage chunk itself (``stream_options.include_usage``).
    wants_usage: bool
    #: The request's own output-token limit (``max_completion_tokens``, ``max_tokens``, ``max_output_tokens``).
    max_output_tokens: int | None
    #: How many outputs it generates (``n``, ``best_of``, several prompts): each can be as long as the limit.
    choices: int


@dataclass(frozen=True)
class ChatRequest(ApiRequest):
    """A validated chat-completions request."""

    messages: list[Any]
    tools: Any


#: Deepest nesting of arrays and objects a request body may have. OpenAI bodies need under 10;
#: the bound keeps every later walk of the body (token counting) shallow.
MAX_JSON_DEPTH = 64


def parse_json_object(raw: bytes) -> JSONObject:
    """``raw`` as a JSON object no deeper than ``MAX_JSON_DEPTH``, else 400 ``invalid_json``.

    The size was bounded while reading (``read_body``); orjson refuses depths beyond 1024 itself,
    and the tighter bound is checked right after, without recursion.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise GuardError(
            ErrorKind.INVALID_JSON,
            "We could not parse the JSON body of your request. The body must be a JSON object.",
        ) from None
    if not isinstance(body, dict):
        raise GuardError(ErrorKind.INVALID_JSON, "The request body must be a JSON object.")
    # Fewer brackets than the limit prove the bound without a walk (most bodies); else walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
        raise GuardError(ErrorKind.INVALID_JSON, f"The JSON body is nested deeper than {MAX_JSON_DEPTH} levels.")
    return body


_CONTAINERS = (dict, list)


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (a scalar is 0), level by level, no recursion.

    Stops counting one level past ``MAX_JSON_DEPTH``. Exact ``type`` checks: orjson builds plain
    dicts and lists, and they are several times faster than ``isinstance`` on this hot path.
    """
    level = [value] if type(value) in _CONTAINERS else []
    depth = 0
    while level and depth <= MAX_JSON_DEPTH:
        depth += 1
        below: list[Any] = []
        for item in level:
            below.extend([v for v in (item.values() if type(item) is dict else item) if type(v) in _CONTAINERS])
        level = below
    return depth


def parse_chat_request(raw: bytes) -> ChatRequest:
    body = parse_json_object(raw)
    model = _model(body)
    messages = _required(body, "messages", list, "an array of messages")
    if not messages:
        raise _invalid("messages", "'messages' must contain at least one message.")
    for i, message in enumerate(messages):
        _message(message, f"messages[{i}]")
    _objects(body, "tools")
    stream = _optional(body, "stream", bool, "a boolean") or False
    options = _stream_options(body)
    limit = _positive_int(body, "max_completion_tokens")
    if limit is None:
        limit = _positive_int(body, "max_tokens")
    return ChatRequest(
        raw=raw, body=body, model=model, messages=messages, tools=body.get("tools"), stream=stream,
        wants_usage=bool(options.get("include_usage")), max_output_tokens=limit,
        choices=_positive_int(body, "n") or 1,
    )


def parse_completions_request(raw: bytes) -> ApiRequest:
    """Legacy ``/v1/completions``: one completion per prompt and per ``best_of`` (at least ``n``)."""
    body = parse_json_object(raw)
    model = _model(body)
    prompts = _prompt_count(body, "prompt")
    _optional(body, "suffix", str, "a string")
    stream = _optional(body, "stream", bool, "a boolean") or False
    options = _stream_options(body)
    per_prompt = max(_positive_int(body, "n") or 1, _positive_int(body, "best_of") or 1)
    return ApiRequest(
        raw=raw, body=body, model=model, stream=stream, wants_usage=bool(options.get("include_usage")),
        max_output_tokens=_positive_int(body, "max_tokens"), choices=prompts * per_prompt,
    )


def parse_embeddings_request(raw: bytes) -> ApiRequest:
    """``/v1/embeddings``: input tokens only, never streamed."""
    body = parse_json_object(raw)
    model = _model(body)
    _prompt_count(body, "input")
    return ApiRequest(raw=raw, body=body, model=model, stream=False, wants_usage=False, max_output_tokens=None,
                      choices=0)


def parse_responses_request(raw: bytes) -> ApiRequest:
    """``/v1/responses``: ``input`` as a string or a list of items, plus ``instructions``."""
    body = parse_json_object(raw)
    model = _model(body)
    value = body.get("input")
    if value is not None and not isinstance(value, str | list):
        raise _invalid("input", "Invalid type for 'input': expected a string or an array of input items.")
    if isinstance(value, list) and not all(isinstance(item, dict) for item in value):
        raise _invalid("input", "Invalid type for 'input': every input item must be an object.")
    _objects(body, "tools")
    _optional(body, "instructions", str, "a string")
    if body.get("background") is True and body.get("stream") is True:
        # A background stream outlives its connection: what it costs would not pass the proxy.
        raise _invalid("stream", "Background responses are charged when they finish; ask for them without "
                                 "'stream' and retrieve them.")
    return ApiRequest(
        raw=raw, body=body, model=model, stream=_optional(body, "stream", bool, "a boolean") or False,
        wants_usage=True, max_output_tokens=_positive_int(body, "max_output_tokens"), choices=1,
    )


def _model(body: JSONObject) -> str:
    model: str = _required(body, "model", str, "a string")
    if not model:
        raise _invalid("model", "'model' must not be empty.")
    return model


def _prompt_count(body: JSONObject, name: str) -> int:
    """How many prompts ``name`` holds: a string, an array of strings, of token ids, or of token-id arrays."""
    value = _required(body, name, str | list, "a string or an array")
    if isinstance(value, str):
        return 1
    if not value:
        raise _invalid(name, f"'{name}' must not be empty.")
    if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
        return 1
    if all(isinstance(item, str) for item in value) or all(
        isinstance(item, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in item) for item in value
    ):
        return len(value)
    raise _invalid(name, f"Invalid type for '{name}': expected a string, an array of strings, an array of token ids "
                         "or an array of token-id arrays.")


def _required(body: JSONObject, name: str, kind: Any, description: str) -> Any:
    if body.get(name) is None:
        raise GuardError(ErrorKind.MISSING_FIELD, f"Missing required parameter: '{name}'.", param=name)
    return _optional(body, name, kind, description)


def _optional(body: JSONObject, name: str, kind: Any, description: str) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
        raise _invalid(name, f"Invalid type for '{name}': expected {description}.")
    return value


def _message(message: Any, where: str) -> None:
    """A chat message: an object with a string ``role`` and ``content`` a string, parts or null."""
    if not isinstance(message, dict):
        raise _invalid(where, f"Invalid type for '{where}': expected an object.")
    if not isinstance(message.get("role"), str):
        raise _invalid(f"{where}.role", f"Invalid type for '{where}.role': expected a string.")
    content = message.get("content")
    if content is not None and not isinstance(content, str | list):
        raise _invalid(f"{where}.content", f"Invalid type for '{where}.content': expected a string or an array "
                                           "of content parts.")
    if isinstance(content, list) and not all(isinstance(part, dict) for part in content):
        raise _invalid(f"{where}.content", f"Invalid type for '{where}.content': every part must be an object.")


def _objects(body: JSONObject, name: str) -> None:
    """``name``, when given, is an array of objects (``tools``)."""
    value = _optional(body, name, list, "an array")
    if value is not None and not all(isinstance(item, dict) for item in value):
        raise _invalid(name, f"Invalid type for '{name}': every item must be an object.")


def _stream_options(body: JSONObject) -> JSONObject:
    options: JSONObject = _optional(body, "stream_options", dict, "an object") or {}
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise _invalid("stream_options.include_usage", "Invalid type for 'stream_options.include_usage': "
                                                       "expected a boolean.")
    return options


# OpenAI's own bounds: ``n`` up to 128; no model writes 2**31 tokens. They keep the worst case that
# is priced and reserved a sensible integer whatever a client sends.
_INT_BOUNDS = {"n": 128, "best_of": 128}
_MAX_TOKENS_BOUND = 2**31 - 1


def _positive_int(body: JSONObject, name: str) -> int | None:
    value: int | None = _optional(body, name, int, "an integer")
    if value is not None and value < 1:
        raise _invalid(name, f"Invalid '{name}': must be at least 1, got {value}.")
    bound = _INT_BOUNDS.get(name, _MAX_TOKENS_BOUND)
    if value is not None and value > bound:
        raise _invalid(name, f"Invalid '{name}': must be at most {bound}, got {value}.")
    return value


def _invalid(name: str, message: str) -> GuardError:
    return GuardError(ErrorKind.INVALID_FIELD, message, param=name)
