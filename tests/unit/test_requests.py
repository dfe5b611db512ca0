"""parse_chat_request: which bodies are refused, with which ErrorKind and param, and what is read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.requests import parse_chat_request, parse_json_object

MESSAGES = [{"role": "user", "content": "hello world"}]


def body(**fields: Any) -> bytes:
    data: dict[str, Any] = {"model": "gpt-4o", "messages": MESSAGES}
    for key, value in fields.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return json.dumps(data).encode()


def refused(raw: bytes) -> GuardError:
    with pytest.raises(GuardError) as info:
        parse_chat_request(raw)
    return info.value


def test_minimal_request() -> None:
    raw = body()
    request = parse_chat_request(raw)
    assert request.raw == raw
    assert request.model == "gpt-4o"
    assert request.messages == MESSAGES
    assert request.body == {"model": "gpt-4o", "messages": MESSAGES}
    assert request.stream is False
    assert request.wants_usage is False
    assert request.max_output_tokens is None
    assert request.choices == 1
    assert request.tools is None


def test_full_request() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    request = parse_chat_request(body(stream=True, stream_options={"include_usage": True}, max_tokens=50, n=3,
                                      tools=tools, temperature=0.2))
    assert request.stream is True
    assert request.wants_usage is True
    assert request.max_output_tokens == 50
    assert request.choices == 3
    assert request.tools == tools
    assert request.body["temperature"] == 0.2


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"", ErrorKind.INVALID_JSON),
        (b"{", ErrorKind.INVALID_JSON),
        (b"model=gpt-4o", ErrorKind.INVALID_JSON),
        (b"\xff\xfe", ErrorKind.INVALID_JSON),
        (b"[]", ErrorKind.INVALID_JSON),
        (b'"text"', ErrorKind.INVALID_JSON),
        (b"null", ErrorKind.INVALID_JSON),
        (b"42", ErrorKind.INVALID_JSON),
    ],
)
def test_not_a_json_object(raw: bytes, kind: ErrorKind) -> None:
    error = refused(raw)
    assert error.kind is kind
    assert error.status == 400
    assert error.code == "invalid_json"
    assert error.param is None


@pytest.mark.parametrize("field", ["model", "messages"])
@pytest.mark.parametrize("value", [..., None])
def test_missing_required_field(field: str, value: Any) -> None:
    error = refused(body(**{field: value}))
    assert error.kind is ErrorKind.MISSING_FIELD
    assert error.param == field
    assert error.code == "missing_field"
    assert field in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": 4}, "model"),
        ({"model": ["gpt-4o"]}, "model"),
        ({"model": ""}, "model"),
        ({"messages": "hello"}, "messages"),
        ({"messages": {"role": "user"}}, "messages"),
        ({"messages": []}, "messages"),
        ({"stream": "true"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream_options": True}, "stream_options"),
        ({"stream_options": ["include_usage"]}, "stream_options"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 10.0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_completion_tokens": False}, "max_completion_tokens"),
        ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"n": "2"}, "n"),
    ],
)
def test_invalid_fields(fields: dict[str, Any], param: str) -> None:
    error = refused(body(**fields))
    assert error.kind is ErrorKind.INVALID_FIELD
    assert error.param == param
    assert error.status == 400
    assert param in error.message


def test_max_completion_tokens_preferred() -> None:
    assert parse_chat_request(body(max_completion_tokens=30, max_tokens=500)).max_output_tokens == 30
    assert parse_chat_request(body(max_completion_tokens=None, max_tokens=500)).max_output_tokens == 500
    assert parse_chat_request(body(max_completion_tokens=700)).max_output_tokens == 700
    assert parse_chat_request(body(max_tokens=1)).max_output_tokens == 1


def test_null_optionals_are_defaults() -> None:
    request = parse_chat_request(body(stream=None, stream_options=None, max_tokens=None, n=None))
    assert request.stream is False
    assert request.wants_usage is False
    assert request.max_output_tokens is None
    assert request.choices == 1


def test_n() -> None:
    assert parse_chat_request(body(n=4)).choices == 4
    assert parse_chat_request(body(n=1)).choices == 1


@pytest.mark.parametrize(
    ("options", "wants"),
    [({}, False), ({"include_usage": False}, False), ({"include_usage": True}, True), ({"other": 1}, False)],
)
def test_wants_usage(options: dict[str, Any], wants: bool) -> None:
    assert parse_chat_request(body(stream=True, stream_options=options)).wants_usage is wants


def test_parse_json_object() -> None:
    assert parse_json_object(b'{"a": [1, 2]}') == {"a": [1, 2]}
    with pytest.raises(GuardError):
        parse_json_object(b"[1]")


def test_error_body_shape() -> None:
    error = refused(body(model=...))
    payload = json.loads(error.body())
    assert payload == {"error": {"message": error.message, "type": "invalid_request_error", "param": "model",
                                 "code": "missing_field"}}
