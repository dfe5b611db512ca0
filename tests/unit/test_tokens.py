"""Offline token counting: encodings per model, known counts, the chat formula, packaged vocab."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import tiktoken

from guardproxy.budget import tokens
from guardproxy.budget.tokens import (
    TOKENS_PER_IMAGE,
    TokenCounter,
    encoding_name_for,
    get_encoding,
)


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini", "o200k_base"),
        ("gpt-4o-2024-08-06", "o200k_base"),
        ("gpt-4.1", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-4.5-preview", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("o1-mini", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-32k", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("gpt-3.5-turbo-0125", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-3-large", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("llama-3-70b", "o200k_base"),
        ("", "o200k_base"),
    ],
)
def test_encoding_name_for(model: str, encoding: str) -> None:
    assert encoding_name_for(model) == encoding


def test_known_counts() -> None:
    o200k = get_encoding("o200k_base")
    cl100k = get_encoding("cl100k_base")
    assert o200k.encode_ordinary("hello world") == [24912, 2375]
    assert cl100k.encode_ordinary("hello world") == [15339, 1917]
    assert TokenCounter("gpt-4o").text("hello world") == 2
    assert TokenCounter("gpt-4").text("hello world") == 2
    assert TokenCounter("gpt-4o").text("") == 0


@pytest.mark.parametrize("name", ["o200k_base", "cl100k_base"])
def test_space_hello_is_one_token(name: str) -> None:
    # the fake upstream streams " hello" words and counts one token each
    assert len(get_encoding(name).encode_ordinary(" hello")) == 1
    assert len(get_encoding(name).encode_ordinary(" hello" * 50)) == 50


def test_encodings_are_cached() -> None:
    assert get_encoding("o200k_base") is get_encoding("o200k_base")
    assert get_encoding("o200k_base").name == "o200k_base"
    assert get_encoding("cl100k_base").name == "cl100k_base"


def test_special_token_text_is_counted_as_text() -> None:
    # a prompt containing "<|endoftext|>" must not raise (encode() would) and is counted as ordinary text
    assert TokenCounter("gpt-4o").text("<|endoftext|>") > 1


def test_texts_sums() -> None:
    counter = TokenCounter("gpt-4o")
    assert counter.texts(["hello world", " hello", ""]) == 3
    assert counter.texts([]) == 0


# --- the chat formula ------------------------------------------------------------------------


def user(content: Any, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": content, **extra}


def test_chat_one_user_message() -> None:
    # 3 (reply primer) + 3 (message) + "user" (1) + "hello world" (2)
    assert TokenCounter("gpt-4o").chat_prompt([user("hello world")]) == 9
    assert TokenCounter("gpt-4").chat_prompt([user("hello world")]) == 9


def test_chat_name_adds_one_plus_its_tokens() -> None:
    counter = TokenCounter("gpt-4o")
    assert counter.text("bob") == 1
    assert counter.chat_prompt([user("hello world", name="bob")]) == 9 + 1 + 1


def test_chat_two_messages() -> None:
    messages = [{"role": "system", "content": "hello world"}, user("hello world")]
    counter = TokenCounter("gpt-4o")
    system = counter.text("system")
    assert counter.chat_prompt(messages) == 3 + (3 + system + 2) + (3 + 1 + 2)


def test_chat_text_parts() -> None:
    parts = [{"type": "text", "text": "hello world"}, {"type": "text", "text": " hello"}]
    assert TokenCounter("gpt-4o").chat_prompt([user(parts)]) == 3 + 3 + 1 + 2 + 1


def test_chat_image_parts_estimated() -> None:
    parts = [{"type": "text", "text": "hello world"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000, "detail": "high"}}]
    assert TokenCounter("gpt-4o").chat_prompt([user(parts)]) == 9 + TOKENS_PER_IMAGE
    two = [*parts, {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]
    assert TokenCounter("gpt-4o").chat_prompt([user(two)]) == 9 + 2 * TOKENS_PER_IMAGE


def test_chat_image_url_is_not_tokenised() -> None:
    # a huge base64 image must cost the fixed estimate, not tens of thousands of tokens
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + "QUJD" * 50_000}}]
    assert TokenCounter("gpt-4o").chat_prompt([user(parts)]) == 3 + 3 + 1 + TOKENS_PER_IMAGE


def test_chat_tools_are_counted() -> None:
    counter = TokenCounter("gpt-4o")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "hello world",
                                               "parameters": {"type": "object", "properties": {}}}}]
    with_tools = counter.chat_prompt([user("hello world")], tools)
    assert with_tools > 9
    # the values of "type" keys are structure, not content: not counted
    assert with_tools == 9 + counter.texts(["get_weather", "hello world"])


def test_chat_tool_call_arguments_counted() -> None:
    counter = TokenCounter("gpt-4o")
    message = {"role": "assistant", "content": None,
               "tool_calls": [{"id": "call_1", "type": "function",
                               "function": {"name": "f", "arguments": "hello world"}}]}
    expected = 3 + 3 + counter.texts(["assistant", "call_1", "f", "hello world"])
    assert counter.chat_prompt([message]) == expected


def test_chat_non_dict_message_costs_framing_only() -> None:
    assert TokenCounter("gpt-4o").chat_prompt(["hello", 5]) == 3 + 3 + 3


def test_chat_empty() -> None:
    assert TokenCounter("gpt-4o").chat_prompt([]) == 3


# --- offline ---------------------------------------------------------------------------------


def test_packaged_vocab_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("token counting tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(tokens, "_encodings", {})  # force a fresh build
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent-guardproxy-test-cache")
    for name in ("o200k_base", "cl100k_base"):
        encoding = get_encoding(name)
        assert isinstance(encoding, tiktoken.Encoding)
        assert len(encoding.encode_ordinary("hello world")) == 2
    assert TokenCounter("gpt-4o").chat_prompt([user("hello world")]) == 9


def test_packaged_vocab_matches_tiktoken_reference_size() -> None:
    assert get_encoding("o200k_base").n_vocab == 200019
    assert get_encoding("cl100k_base").n_vocab == 100277


def test_corrupt_vocab_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(tokens._EXPECTED_SHA256, "o200k_base", "0" * 64)
    with pytest.raises(RuntimeError, match="corrupt"):
        tokens._load_ranks("o200k_base")


def test_warm_up_builds_only_the_configured_models_encodings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_encodings", {})
    tokens.warm_up(["gpt-4o", "gpt-4.1-mini"])
    assert set(tokens._encodings) == {"o200k_base"}
    tokens.warm_up(["gpt-4o", "text-embedding-3-small"])
    assert set(tokens._encodings) == {"o200k_base", "cl100k_base"}
    # A model configured later (or not at all) still counts: its encoding is built on first use.
    monkeypatch.setattr(tokens, "_encodings", {})
    tokens.warm_up([])
    assert tokens._encodings == {}
    assert TokenCounter("gpt-4").text("hello world") == 2


def test_encodings_count_and_decode_without_their_python_ranks() -> None:
    # The Python copy of the ranks is dropped after the build: encoding and decoding use the Rust core.
    for name in ("o200k_base", "cl100k_base"):
        encoding = get_encoding(name)
        text = "Budgets hold: naïve café, 東京, emoji 🎉 and code `x = y**2`."
        assert encoding.decode(encoding.encode_ordinary(text)) == text
        assert encoding.encode_single_token(b"hello") == encoding.encode_ordinary("hello")[0]
        assert encoding.encode("<|endoftext|>", allowed_special="all") == [encoding.eot_token]
