"""``guardproxy store rebuild``'s reading of JSON logs: only charged ``call_settled`` lines count."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from guardproxy.admin.store_cli import LoggedCall, logged_calls


def line(**fields: object) -> bytes:
    base: dict[str, object] = {"time": "2026-12-06T21:00:00.123Z", "level": "info", "logger": "guardproxy.calls",
                               "message": "settled ...", "event": "call_settled", "tenant": "acme",
                               "request_id": "req_1", "cost_micros": 153, "model": "gpt-4o",
                               "prompt_tokens": 13, "completion_tokens": 12}
    return orjson.dumps({**base, **fields})


def test_charged_call_settled_lines_are_read_with_their_time() -> None:
    assert logged_calls([line()]) == [
        LoggedCall("acme", "req_1", datetime(2026, 12, 6, 21, 0, 0, 123000, tzinfo=UTC), 153, "gpt-4o", 13, 12)]


def test_everything_else_is_skipped() -> None:
    lines = [
        b"2026-12-06 21:00:00,000 INFO guardproxy: a text line",
        b"{not json",
        orjson.dumps(["a", "list"]),
        line(event="request"),  # another structured line
        line(cost_micros=0),  # an error, nothing charged
        line(tenant="../etc"),  # not a tenant id
        line(time="yesterday"),
        line(cost_micros="a lot"),
    ]
    assert logged_calls(lines) == []
