"""store.redis_url parsing, password masking and the table of "store unavailable" errors."""

from __future__ import annotations

from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio.connection import Connection
from redis.asyncio.sentinel import MasterNotFoundError

from guardproxy.config.settings import parse_config
from guardproxy.config.store_url import StoreURL, parse_store_url
from guardproxy.config.validation import ConfigError
from guardproxy.store.client import c_packed, mask_password, unavailable
from tests.helpers import config_dict


def test_plain_urls_pass_through() -> None:
    for url in ("redis://10.0.0.1:6379/2", "rediss://:pw@redis.example:6380/0", "unix:///run/redis.sock"):
        assert parse_store_url(url) == StoreURL("redis", url)


def test_sentinel_url() -> None:
    parsed = parse_store_url("redis+sentinel://:s%40cret@10.0.0.1:26379,10.0.0.2:26380/mymaster/3")
    assert parsed.kind == "sentinel"
    assert parsed.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26380))
    assert (parsed.master, parsed.db, parsed.username, parsed.password, parsed.tls) == (
        "mymaster", 3, None, "s@cret", False)
    assert parse_store_url("rediss+sentinel://user:pw@[::1]:26379/m").nodes == (("::1", 26379),)
    assert parse_store_url("rediss+sentinel://user:pw@[::1]:26379/m").tls


def test_cluster_url() -> None:
    parsed = parse_store_url("redis+cluster://a:7000,b:7001,c:7002")
    assert (parsed.kind, parsed.nodes, parsed.db) == ("cluster", (("a", 7000), ("b", 7001), ("c", 7002)), 0)
    assert parse_store_url("redis+cluster://a:7000/0").kind == "cluster"


@pytest.mark.parametrize(("url", "says"), [
    ("http://localhost:6379", "must start with redis://"),
    ("redis+sentinel://a:26379", "needs the master name"),
    ("redis+sentinel://a:26379/m/x", "must be a number"),
    ("redis+sentinel://a/m", "host:port"),
    ("redis+cluster://a:7000,b/", "host:port"),
    ("redis+cluster://a:99999", "host:port"),
    ("redis+cluster://a:7000/2", "only db 0"),
    ("redis+cluster://a:7000?x=1", "no ?query"),
])
def test_bad_urls_say_how_to_fix_them(url: str, says: str) -> None:
    with pytest.raises(ValueError, match=says.replace("?", r"\?")):
        parse_store_url(url)
    with pytest.raises(ConfigError, match=r"store\.redis_url"):
        parse_config(config_dict("http://127.0.0.1:1", store={"redis_url": url}), {})


def test_replica_acks_default_to_one_behind_sentinel_and_are_refused_on_cluster() -> None:
    def store(**fields: object) -> object:
        return parse_config(config_dict("http://127.0.0.1:1", store=fields), {}).store

    assert store(redis_url="redis+sentinel://a:26379/m").min_replica_acks == 1  # type: ignore[attr-defined]
    assert store(redis_url="redis://a:6379/0").min_replica_acks == 0  # type: ignore[attr-defined]
    assert store(redis_url="redis://a:6379/0", min_replica_acks=2).min_replica_acks == 2  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="min-replicas-to-write"):
        store(redis_url="redis+cluster://a:7000", min_replica_acks=1)
    with pytest.raises(ConfigError, match="redis\\+sentinel"):
        store(min_replica_acks=1)


def test_passwords_are_masked() -> None:
    assert mask_password("redis+sentinel://:pw@a:1,b:2/m/0") == "redis+sentinel://:***@a:1,b:2/m/0"
    assert mask_password("redis+cluster://u:pw@a:1,b:2") == "redis+cluster://u:***@a:1,b:2"
    assert mask_password("redis://u:p@w@h:6379/0") == "redis://u:***@h:6379/0"
    assert mask_password("redis://h:6379/0") == "redis://h:6379/0"
    assert mask_password("redis+cluster://user@a:1") == "redis+cluster://user@a:1"


@pytest.mark.parametrize("exc", [
    redis_errors.ConnectionError("refused"), redis_errors.TimeoutError(), MasterNotFoundError("no master"),
    redis_errors.ReadOnlyError("READONLY You can't write against a read only replica."),
    redis_errors.ResponseError("NOREPLICAS Not enough good replicas to write."),
    redis_errors.ResponseError("ERR Error running script (call to f_1): @user_script:12: NOREPLICAS Not enough"),
    redis_errors.ClusterDownError("CLUSTERDOWN The cluster is down"), redis_errors.MasterDownError("MASTERDOWN"),
    redis_errors.TryAgainError("TRYAGAIN"), redis_errors.MovedError("3999 127.0.0.1:6381"),
    redis_errors.AskError("3999 127.0.0.1:6381"), redis_errors.SlotNotCoveredError("slot 5 not covered"),
    redis_errors.BusyLoadingError("LOADING"), ConnectionResetError(),
])
def test_store_unavailable_errors(exc: Exception) -> None:
    assert unavailable(exc)


@pytest.mark.parametrize("exc", [
    redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    redis_errors.DataError("bad"), ValueError("bug"), KeyError("bug"),
])
def test_bugs_are_not_store_unavailable(exc: Exception) -> None:
    assert not unavailable(exc)


@pytest.mark.parametrize("args", [
    ("EVALSHA", "0" * 40, 2, "gp:{acme}:a", "gp:{é}:b", -1, 0, 10**20, 2.5, b"\x00\xff", ""),
    ("CONFIG GET", "maxmemory"), ("SET", "k", memoryview(b"v")), ("SET", "k", "x" * 100_000),
])
def test_commands_packed_in_c_are_the_bytes_redis_py_packs(args: tuple[Any, ...]) -> None:
    plain, packed = Connection(), c_packed(Connection)()
    assert b"".join(packed.pack_command(*args)) == b"".join(plain.pack_command(*args))


@pytest.mark.parametrize("value", [True, None, [1]])
def test_commands_packed_in_c_refuse_what_redis_py_refuses(value: Any) -> None:
    with pytest.raises(redis_errors.DataError):
        c_packed(Connection)().pack_command("SET", "k", value)
