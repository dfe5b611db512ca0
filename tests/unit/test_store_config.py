"""``store.url``, ``store.redis_url`` and the SQLite store's file: which store a config names."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardproxy.config.settings import parse_config
from guardproxy.config.validation import ConfigError
from tests.helpers import minimal


def test_no_url_is_the_sqlite_file_under_the_state_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    store = parse_config(minimal(), {}).store
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert store.embedded and store.sqlite_path() == tmp_path / "guardproxy" / "spend.db"
    assert store.url == f"sqlite://{tmp_path}/guardproxy/spend.db" and store.synchronous == "normal"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert store.sqlite_path() == Path.home() / ".local" / "state" / "guardproxy" / "spend.db"


def test_store_url_names_a_sqlite_file_or_a_redis() -> None:
    sqlite = parse_config({**minimal(), "store": {"url": "sqlite:///var/lib/gp/spend.db", "synchronous": "full"}},
                          {}).store
    assert sqlite.embedded and sqlite.sqlite_path() == Path("/var/lib/gp/spend.db") and sqlite.synchronous == "full"
    redis = parse_config({**minimal(), "store": {"url": "redis://127.0.0.1:6379/0"}}, {}).store
    assert not redis.embedded and redis.redis_url == redis.url == "redis://127.0.0.1:6379/0"
    legacy = parse_config({**minimal(), "store": {"redis_url": "redis://127.0.0.1:6379/0"}}, {}).store
    assert legacy == redis


@pytest.mark.parametrize(("store", "message"), [
    ({"url": "sqlite:///a.db", "redis_url": "redis://h:6379"}, "not both"),
    ({"url": "sqlite://"}, "sqlite:///path"),
    ({"url": "postgres://h/db"}, "sqlite:///path"),
    ({"synchronous": "off"}, "synchronous"),
])
def test_a_bad_store_is_named(store: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({**minimal(), "store": store}, {})
