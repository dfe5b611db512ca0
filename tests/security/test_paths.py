"""One canonical path, decided once (issue: budget bypass and upstream-key theft through passthrough).

Over real sockets with the exact request line: ``//``, dot segments, percent-encoded separators and
absolute URLs are what an attacker types with netcat, not what an HTTP library sends.
"""

from __future__ import annotations

import pytest

from guardproxy.testing.fake_upstream import FakeUpstreamState
from tests.helpers import CHAT, TENANT_KEY, set_day_spend
from tests.security.wire import assert_openai_error, money, raw_request, store_snapshot

AUTH = [("Authorization", f"Bearer {TENANT_KEY}"), ("Content-Type", "application/json")]

NOT_CANONICAL = [
    "/v1//chat/completions", "/v1/chat/completions/.", "/v1/chat/completions/", "/v1/./chat/completions",
    "/v1/chat/./completions", "/v1/x/../chat/completions", "/v1/chat/completions/..", "//v1/chat/completions",
    "/v1/chat%2Fcompletions", "/v1/chat%2fcompletions", "/v1/%2e/chat/completions", "/v1/chat/completions%2F",
    "/v1/%2E%2E/v1/chat/completions", "/v1/chat%5Ccompletions", "/v1/chat\\completions",
    "/v1/chat/completions;x=1", "/v1/chat/completions%3B", "/v1/chat/completions%00", "/v1/chat/completions%0d%0a",
    "/v1/chat/completions%09", "/v1/chat/completions%7F", "/v1/chat/completions%C0%AE", "/v1/chat/completions%25",
    "/v1/chat/completions%3F", "/v1/chat/completions%23", "/v1/@127.0.0.1/chat/completions", "/v1/%40evil/x",
    "/v1/../../_mock/log", "/v1/..%2F..%2F_mock/log", "/v1/%2e%2e/%2e%2e/_mock/log", "/v1/files/",
    "/v1/http:", "/v1/" + "a" * 2100,
]


@pytest.mark.parametrize("target", NOT_CANONICAL)
def test_a_path_that_is_not_canonical_is_refused_before_routing(
    target: str, passthrough_url: str, redis_url: str, fake_state: FakeUpstreamState,
) -> None:
    before = store_snapshot(redis_url)
    answer = raw_request(passthrough_url, "POST", target, AUTH, CHAT)
    # Refused by guardproxy (400 invalid_path) or by the HTTP parser itself: never routed, never sent.
    if answer.header("content-type") == "application/json":
        assert_openai_error(answer, 400, "invalid_path")
    else:
        assert answer.status == 400
    assert answer.header("location") is None
    assert fake_state.paths == []
    assert store_snapshot(redis_url) == before


def test_the_budget_bypass_of_the_issue_is_closed_past_the_hard_cap(
    passthrough_url: str, redis_url: str, fake_state: FakeUpstreamState,
) -> None:
    set_day_spend(redis_url, 1_000_000)  # acme's whole daily budget
    before = store_snapshot(redis_url)
    for target in ("/v1//chat/completions", "/v1/chat/completions/.", "/v1/chat/completions/",
                   "/v1/Chat/Completions", "/v1/chat/COMPLETIONS.", "/v1/responses%20"):
        answer = raw_request(passthrough_url, "POST", target, AUTH, CHAT)
        assert_openai_error(answer, 400, "invalid_path")
        assert answer.header("x-guardproxy-unbudgeted") is None
    answer = raw_request(passthrough_url, "POST", "/v1/chat/completions", AUTH, CHAT)
    assert_openai_error(answer, 429, "insufficient_quota")
    assert fake_state.paths == []
    assert money(store_snapshot(redis_url)) == money(before)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "PROPFIND"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"])
def test_a_budgeted_path_is_only_served_by_its_route_whatever_the_method(
    method: str, path: str, passthrough_url: str, redis_url: str, fake_state: FakeUpstreamState,
) -> None:
    listed = path == "/v1/chat/completions"  # GET lists the tenant's stored chat completions (test_objects.py)
    if listed and method == "GET":
        return
    answer = raw_request(passthrough_url, method, path, AUTH, CHAT)
    assert answer.status == 405
    assert answer.header("allow") == ("POST, GET" if listed else "POST")
    if method != "HEAD":
        assert_openai_error(answer, 405, "method_not_supported")
    assert fake_state.paths == []
    assert store_snapshot(redis_url) == {}


def test_an_absolute_url_in_the_path_never_chooses_the_target(
    passthrough_url: str, evil_url: str, evil_state: FakeUpstreamState, fake_state: FakeUpstreamState,
) -> None:
    port = evil_url.rsplit(":", 1)[1]
    for target in (f"/v1/http://127.0.0.1:{port}/steal", f"/v1/http:/127.0.0.1:{port}/steal",
                   f"/v1//127.0.0.1:{port}/steal", f"/v1/%2F%2F127.0.0.1:{port}/steal",
                   f"/v1/http%3A%2F%2F127.0.0.1:{port}/steal", f"/v1/@127.0.0.1:{port}/steal"):
        answer = raw_request(passthrough_url, "POST", target, AUTH, b"{}")
        assert_openai_error(answer, 400, "invalid_path")
    # An absolute-form request target names the attacker's host: the path is used, never the host.
    answer = raw_request(passthrough_url, "POST", f"http://127.0.0.1:{port}/v1/chat/completions", AUTH, CHAT)
    assert evil_state.paths == [] and evil_state.headers == []
    assert answer.status in (200, 400)
    assert all(path == "/v1/chat/completions" for path in fake_state.paths)


def test_a_passthrough_path_reaches_only_the_configured_base(
    passthrough_url: str, fake_state: FakeUpstreamState, redis_url: str,
) -> None:
    answer = raw_request(passthrough_url, "GET", "/v1/audio/voice-abc%20x:y?purpose=batch&include[]=a", AUTH)
    assert answer.status == 200, answer.body
    assert answer.json()["path"] == "/v1/audio/voice-abc x:y"
    assert fake_state.paths == ["/v1/audio/voice-abc x:y?purpose=batch&include%5B%5D=a"]  # as the fake decodes it
    # A model id with colons is a path of guardproxy's own (GET /v1/models/{id}): only configured models.
    models = raw_request(passthrough_url, "GET", "/v1/models/ft:gpt-4o:acme::abc123", AUTH)
    assert_openai_error(models, 404, "model_not_found")
    assert len(fake_state.paths) == 1
    # A stored object's id is looked up as the caller's, whatever characters it holds: not its own, 404.
    stored = raw_request(passthrough_url, "GET", "/v1/files/file-abc%20x:y", AUTH)
    assert_openai_error(stored, 404, "object_not_found")
    assert len(fake_state.paths) == 1
    assert store_snapshot(redis_url) == {}


def test_the_trailing_slash_is_never_redirected(passthrough_url: str, fake_state: FakeUpstreamState) -> None:
    for target in ("/v1/chat/completions/", "/v1/models/", "/healthz/", "/admin/tenants/"):
        answer = raw_request(passthrough_url, "POST", target, AUTH, CHAT)
        assert_openai_error(answer, 400, "invalid_path")
        assert answer.header("location") is None
    assert raw_request(passthrough_url, "GET", "/admin/", []).status == 401  # the admin page's own path
    assert fake_state.paths == []


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models/ft:gpt-4o:acme::abc", "/admin/", "/healthz",
                                  "/v1/files/file-1", "/v1/files/a%20b", "/admin/tenants/acme.t_1-x/budget"])
def test_canonical_paths_pass(path: str) -> None:
    from guardproxy.http.paths import path_problem  # here: the suite also runs against code without it

    assert path_problem(path.replace("%20", " "), path.encode()) is None


def test_raw_path_and_path_must_agree() -> None:
    from guardproxy.http.paths import path_problem

    assert path_problem("/v1/chat/completions", b"/v1/chat%2Fcompletions") is not None
    assert path_problem("/v1/a", b"/v1/b") is not None
    assert path_problem("/v1/a\nb", None) is not None
    assert path_problem("v1/a", None) is not None
