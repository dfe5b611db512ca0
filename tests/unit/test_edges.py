"""The pure parts of the edges: key spotting, same-origin, reasoning models, job ids, metric labels."""

from __future__ import annotations

import base64
import string
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardproxy.admin.csrf import check_admin_write, is_json, same_origin
from guardproxy.config.servicetitan import canonical_job_id
from guardproxy.config.settings import hash_key
from guardproxy.errors import GuardError
from guardproxy.http.endpoints import CHAT, COMPLETIONS, RESPONSES, is_reasoning_model
from guardproxy.http.openai_resources import resource_label
from guardproxy.http.paths import carries_key, strip_keys_from_query

KEY_CHARS = string.ascii_letters + string.digits + "-_.~+/!@#$%^&*"
KEYS = st.text(alphabet=KEY_CHARS, min_size=8, max_size=40).filter(lambda k: k.strip(".,<>()[]{}!?*`|") == k)
WRAP = st.sampled_from(["{}", "{}.", "<{}>", "({})", "[{}],", "key={}", "token: {}", '"{}"', "`{}`", "{}!"])


def spelled(key: str, how: str, wrap: str) -> bytes:
    word = wrap.format(key)
    if how == "basic":
        return b"Basic " + base64.b64encode(f"user:{word}".encode())
    if how == "basic-unpadded":
        return b"Basic " + base64.b64encode(f"{word}:".encode()).rstrip(b"=")
    if how == "urlsafe":
        return base64.urlsafe_b64encode(f"u:{word}".encode())
    if how == "percent":
        return f"see key%3D{quote(key, safe='')}".encode()
    return f"note {word} end".encode()


@given(key=KEYS, wrap=WRAP, how=st.sampled_from(["plain", "basic", "basic-unpadded", "urlsafe", "percent"]))
def test_a_configured_key_is_found_in_every_spelling(key: str, wrap: str, how: str) -> None:
    assert carries_key(spelled(key, how, wrap), {hash_key(key)})


@given(text=st.text(alphabet=string.printable, max_size=80))
def test_text_without_a_key_is_not_flagged(text: str) -> None:
    assert not carries_key(text.encode(), {hash_key("tk-acme-secret")}) or "tk-acme-secret" in text


def test_runtime_key_shape_and_query_strings() -> None:
    runtime = "gp-" + "A" * 43
    assert carries_key(f"({runtime}).".encode(), frozenset())
    assert not carries_key(b"gp-short", frozenset())
    hashes = {hash_key("tk-acme-secret")}
    assert strip_keys_from_query(b"purpose=batch&api_key=tk-acme-secret&limit=2", hashes) == b"purpose=batch&limit=2"
    assert strip_keys_from_query(b"a=b", hashes) == b"a=b"
    assert strip_keys_from_query(b"key=tk-acme-secret%2E", hashes) == b""


@pytest.mark.parametrize(("origin", "host", "same"), [
    ("http://proxy:8080", "proxy:8080", True), ("https://proxy.example", "proxy.example", True),
    ("http://proxy.example", "proxy.example", True), ("https://proxy.example:443", "proxy.example", True),
    ("https://proxy.example", "proxy.example:8443", False), ("http://proxy:8081", "proxy:8080", False),
    ("https://evil.example", "proxy.example", False), ("null", "proxy", False), ("proxy", "proxy", False),
    ("https://proxy.example.evil", "proxy.example", False), ("ftp://proxy", "proxy", False),
    ("http://[::1]:8080", "[::1]:8080", True), ("http://proxy:99999", "proxy:99999", False),
])
def test_same_origin_compares_host_and_port(origin: str, host: str, same: bool) -> None:
    assert same_origin(origin, host) is same


def test_safe_methods_pass_and_json_is_json() -> None:
    for method in ("GET", "HEAD", "OPTIONS"):
        check_admin_write(method, {"origin": "https://evil.example", "sec-fetch-site": "cross-site"}, ambient=True)
    assert is_json("application/json; charset=utf-8") and is_json("application/merge-patch+json")
    assert not is_json("text/plain") and not is_json("application/jsonp") and not is_json("")
    with pytest.raises(GuardError) as refused:
        check_admin_write("POST", {"content-length": "2", "content-type": "text/plain"}, ambient=False)
    assert refused.value.status == 415
    check_admin_write("DELETE", {}, ambient=False)  # no body, no content type needed


@pytest.mark.parametrize(("name", "reasoning"), [
    ("o1", True), ("o1-mini", True), ("o3", True), ("o3-mini-2025-01-31", True), ("o4-mini", True),
    ("gpt-5", True), ("gpt-5-mini", True), ("GPT-5-nano", True), ("openai/o3", True), ("gpt-5.1", True),
    ("gpt-4o", False), ("gpt-4o-mini", False), ("gpt-4.1", False), ("omni-moderation", False), ("o", False),
    ("gpt-50", False), ("llama-3", False),
])
def test_reasoning_models(name: str, reasoning: bool) -> None:
    assert is_reasoning_model(name) is reasoning


def test_reasoning_models_take_max_completion_tokens_on_chat_only() -> None:
    assert CHAT.lowered_limit({}, 300, ("o4-mini",)) == {"max_completion_tokens": 300}
    assert CHAT.lowered_limit({"max_completion_tokens": 900}, 300, ("my-deployment", "o3")) == {
        "max_completion_tokens": 300}
    assert CHAT.lowered_limit({}, 300, ("gpt-4o",)) == {"max_tokens": 300}
    assert RESPONSES.lowered_limit({}, 300, ("o3",)) == {"max_output_tokens": 300}
    assert COMPLETIONS.lowered_limit({}, 300, ("o3",)) == {"max_tokens": 300}


@pytest.mark.parametrize(("raw", "canonical"), [
    ("123", "123"), ("0123", "123"), ("00123", "123"), ("0", "0"), ("000", "0"), ("WO-4711", "WO-4711"),
    ("12a", "12a"), ("", ""),
])
def test_servicetitan_job_ids_have_one_spelling(raw: str, canonical: str) -> None:
    assert canonical_job_id(raw) == canonical


def test_passthrough_labels_are_bounded() -> None:
    assert resource_label("files/file-1/content") == "files"
    assert resource_label("vector_stores") == "vector_stores"
    assert resource_label("xyz123") == "other" and resource_label("Files") == "other" and resource_label("") == "other"
