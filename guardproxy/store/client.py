"""From ``store.redis_url`` to a Redis client, and which Redis errors mean "store unavailable".

Four kinds of URL (docs/production.md, "Running on Redis Sentinel" and "Running on Redis Cluster"):

- ``redis://``, ``rediss://``, ``unix://``: one Redis, through a plain connection pool, each command
  ending by one deadline (``DeadlineRedis``).
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master-name>[/db]`` (``rediss+sentinel``
  for TLS to the data nodes): the primary that the Sentinels name, followed through failovers, through
  a ``DeadlineRedis`` too.
- ``redis+cluster://[[user]:password@]host:port[,host:port...]`` (``rediss+cluster`` for TLS): Redis
  Cluster; the hosts are startup nodes, the client learns the rest of the cluster from them.

``parse_store_url`` (``guardproxy.config.store_url``) is pure and says how to fix a bad URL;
``connect`` builds the client; ``unavailable`` is the one table of errors that the store turns into
``StoreUnavailable``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from guardproxy.config.store_url import Kind, StoreURL, parse_store_url
from guardproxy.errors import StoreUnavailable
from guardproxy.store.compat import internals, require

# redis-py's internals (the pool's checkout, the Sentinel pool's connection lists and address lookup, the
# Sentinel connection's connect and read, the cluster client's connection class) are used in this module
# only: its seam (guardproxy/store/compat.py). A release that moves them stops this import with
# IncompatibleLibrary naming redis, its version and this range.
REDIS_TESTED = ">=5.2,<8.3"
with internals("redis", REDIS_TESTED):
    import hiredis
    import redis.asyncio as aioredis
    from redis import exceptions as redis_errors
    from redis.asyncio.client import Pipeline
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    from redis.asyncio.connection import AbstractConnection, ConnectionPool
    from redis.asyncio.retry import Retry
    from redis.asyncio.sentinel import (
        MasterNotFoundError,
        Sentinel,
        SentinelConnectionPool,
        SentinelManagedConnection,
        SentinelManagedSSLConnection,
    )
    from redis.backoff import ExponentialWithJitterBackoff


def check_internals() -> None:
    """What this module reaches for inside redis-py is there (``IncompatibleLibrary`` if not)."""
    pool = ConnectionPool()
    cluster = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", 6379)])  # contacts nothing until used
    require(
        "redis", REDIS_TESTED,
        ConnectionPool=(pool, ("_in_use_connections", "_available_connections", "get_available_connection",
                               "ensure_connection", "release", "connection_class")),
        AbstractConnection=(AbstractConnection, ("pack_command", "send_packed_command", "read_response",
                                                 "mark_for_reconnect", "is_connected")),
        Sentinel=(Sentinel([]), ("check_master_state", "discover_master", "sentinels")),
        # _SentinelPool/_SentinelConnection: a Sentinel connection asks its pool for the address on connect
        # (``connect_to`` it), and the pool keeps the primary's address in ``master_address``.
        SentinelConnectionPool=(SentinelConnectionPool("m", Sentinel([])),  # type: ignore[no-untyped-call]
                                ("get_master_address", "master_address", "reset", "_in_use_connections",
                                 "_available_connections")),
        SentinelManagedConnection=(SentinelManagedConnection, ("connect_to", "read_response")),
        RedisCluster=(cluster, ("_initialize", "initialize", "execute_command", "connection_kwargs",
                                "startup_nodes")),
        hiredis=(hiredis, ("pack_command",)),
    )


check_internals()

#: Either client; both speak the commands and scripts the store uses.
StoreClient: TypeAlias = "aioredis.Redis | RedisCluster"

POOL_SIZE = 256
TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 30
#: Redis Cluster: how often the client tries a command again after a connection error, a timeout or
#: CLUSTERDOWN, and how long it waits between tries. redis-py's default (10 tries, backoff up to 10 s)
#: held every call to a dead shard for 3-14 s; the store answers with a 503 and its Retry-After
#: instead (the journal keeps settlements), so a dead shard's tenants get that within ~0.3 s.
CLUSTER_RETRIES = 2
CLUSTER_BACKOFF_BASE_S = 0.05
CLUSTER_BACKOFF_CAP_S = 0.5
#: Behind Sentinel: how long the primary's address from one discovery serves the connections opened
#: after it (``_SentinelPool``). The ledger looks afresh every half second, and a write short of replica
#: confirmations or a failed connection drops it at once; this bounds it when neither happens.
ANSWER_REUSE_S = 1.0
#: What a Sentinel-managed connection raises when the server it connects or talks to fails.
_CONNECTION_FAILED = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)

#: Raised by the client when the store cannot take the command now; another try later may work.
_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,  # includes MasterNotFoundError, MaxConnectionsError, BusyLoadingError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # a replica, e.g. a primary just demoted
    redis_errors.OutOfMemoryError,  # OOM: maxmemory reached under noeviction; writes refused until freed
    redis_errors.ClusterError,  # ClusterDownError, MasterDownError
    redis_errors.TryAgainError,  # a slot migrating, retries exhausted
    redis_errors.AskError,  # MOVED / ASK still bouncing after the client's retries
    redis_errors.RedisClusterException,  # SlotNotCoveredError, no reachable startup node
    OSError,
    sqlite3.OperationalError,  # the SQLite store: its file locked past the timeout, or the disk failing
)
#: Error replies (first word) meaning the same, also when a Lua script relays them.
#: ``OOM``: a full Redis (``maxmemory`` reached under ``noeviction``) refuses writes until memory is freed.
_UNAVAILABLE_REPLIES = ("NOREPLICAS", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "MOVED",
                        "ASK", "BUSY", "OOM", "MISCONF")


def unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` means "the store cannot take this now" (503 / fail_open), not a bug (500)."""
    if isinstance(exc, _UNAVAILABLE_TYPES):
        return True
    if isinstance(exc, redis_errors.ResponseError):
        message = str(exc)
        # A script relays a refused write as "ERR ... NOREPLICAS ..." or "NOREPLICAS ...".
        return any(word in _UNAVAILABLE_REPLIES for word in message.replace(":", " ").split())
    return False


class _Translated:
    """``async with translated():`` runs a store call; an error of the ``unavailable`` kind leaves as
    ``StoreUnavailable``. A class, not a generator-based context manager: it is entered on every store
    call, and holds no state, so one instance serves all."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, Exception) and unavailable(exc):
            raise StoreUnavailable(f"budget store unavailable: {type(exc).__name__}: {_first_line(exc)}") from exc


_TRANSLATED = _Translated()


def translated() -> _Translated:
    """Run a store call (``async with``); an error of the ``unavailable`` kind leaves as ``StoreUnavailable``."""
    return _TRANSLATED


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


class _NewestSentinel(Sentinel):
    """Sentinel client that believes the Sentinel with the newest configuration.

    redis-py takes the first Sentinel's word; right after a failover the Sentinels that have not yet
    heard of it (they learn within ~2 s) still name the old primary, which keeps taking writes until
    it is reconfigured. The highest ``config-epoch`` is the latest failover.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        answers = await asyncio.gather(*(s.sentinel_masters() for s in self.sentinels), return_exceptions=True)
        best: tuple[int, str, int] | None = None
        for answer in answers:
            if isinstance(answer, BaseException):
                if not isinstance(answer, (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)):
                    raise answer
                continue
            state = answer.get(service_name) if isinstance(answer, dict) else None
            if state and self.check_master_state(state, service_name):
                candidate = (int(state.get("config-epoch", 0)), str(state["ip"]), int(state["port"]))
                if best is None or candidate[0] > best[0]:
                    best = candidate
        if best is None:
            raise MasterNotFoundError(f"No master found for {service_name!r}")
        return best[1], best[2]


class _SentinelPool(SentinelConnectionPool):
    """The Sentinel pool, with two changes to redis-py's.

    One discovery for the connections opened together: redis-py asks the Sentinels (here all of them,
    ``_NewestSentinel``) each time it opens a connection, so a burst of 100 new connections (a cold
    start under load, or the reconnects after a failover) sent 300 queries, enough on a busy machine
    to miss the store's deadline. Here a connection being opened waits for the discovery under way, or
    takes the last answer while it is under ``answer_reuse_s`` old, unless since then a connection to
    that primary failed (``forget``: the next one asks again). ``discover`` (``rediscover``: the
    ledger's half-second look, a write short of replica confirmations) sets that answer aside and asks.

    Leaving a former primary for good: redis-py's asyncio pool drops only the idle connections to it,
    so one busy at that moment would go back into the pool still writing to the old primary.
    """

    answer_reuse_s: float = ANSWER_REUSE_S
    #: The primary's address the last discovery gave, and when (``time.monotonic()``).
    _answer: tuple[tuple[str, int], float] | None = None
    #: The discovery under way (or the last one).
    _lookup: asyncio.Task[tuple[str, int]] | None = None

    def reset(self) -> None:
        super().reset()  # type: ignore[no-untyped-call]
        self._answer = self._lookup = None

    async def get_master_address(self) -> Any:
        """The primary's address for a connection being opened (redis-py asks on every connect)."""
        if self._answer is not None and time.monotonic() - self._answer[1] < self.answer_reuse_s:
            return self._answer[0]
        return await self._shared_lookup()

    async def discover(self) -> tuple[str, int]:
        """Ask the Sentinels which server is primary now (joining a discovery already under way)."""
        self._answer = None
        return await self._shared_lookup()

    def forget(self, address: tuple[str, int]) -> None:
        """A connection to ``address`` failed: the next connection opened asks the Sentinels again."""
        if self._answer is not None and self._answer[0] == address:
            self._answer = None

    async def _shared_lookup(self) -> tuple[str, int]:
        lookup = self._lookup
        if lookup is None or lookup.done() or lookup.get_loop() is not asyncio.get_running_loop():
            lookup = self._lookup = asyncio.get_running_loop().create_task(self._look_up())
            lookup.add_done_callback(_consume_error)  # no waiter left (all cut by their deadline) is fine
        # A waiter cut short by its deadline leaves the discovery running for the others.
        return await asyncio.shield(lookup)

    async def _look_up(self) -> tuple[str, int]:
        host, port = await super().get_master_address()  # type: ignore[no-untyped-call]
        address = (str(host), int(port))
        for connection in (*self._in_use_connections, *self._available_connections):
            where = (getattr(connection, "host", None), getattr(connection, "port", None))
            if connection.is_connected and where != address:
                connection.mark_for_reconnect()  # type: ignore[no-untyped-call]  # closed when released
        self._answer = (address, time.monotonic())
        return address


def _consume_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _SentinelConnection(SentinelManagedConnection):
    """A connection to the primary that tells its pool when it fails: connecting refused or timed out,
    or a reply that never came or said READONLY (a demoted primary; redis-py's class then disconnects).
    The pool then stops giving that address to new connections."""

    connection_pool: _SentinelPool

    async def connect_to(self, address: Any) -> None:
        try:
            await super().connect_to(address)  # type: ignore[no-untyped-call]
        except _CONNECTION_FAILED:
            self.connection_pool.forget((str(address[0]), int(address[1])))
            raise

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except _CONNECTION_FAILED:
            self.connection_pool.forget((str(self.host), int(self.port)))
            raise


class _SentinelSSLConnection(_SentinelConnection, SentinelManagedSSLConnection):
    """``_SentinelConnection`` over TLS (``rediss+sentinel://``)."""


_Connection = TypeVar("_Connection", bound=AbstractConnection)


def c_packed(base: type[_Connection]) -> type[_Connection]:
    """``base``, packing commands with hiredis's C packer.

    redis-py's asyncio connection packs a command argument by argument in Python, and a budgeted
    call's two scripts take ~40 arguments each: that was the largest part of the client's CPU per call
    (bench/store_calls.py). The bytes sent are the same; anything hiredis does not take (a bool, None,
    a memoryview) goes to redis-py's packer, which raises its usual error or packs it.
    """

    def pack_command(self: _Connection, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " not in args[0]:  # redis-py splits "CONFIG GET"-style names
            with contextlib.suppress(TypeError):
                return [hiredis.pack_command(args)]
        return base.pack_command(self, *args)

    return type(f"CPacked{base.__name__}", (base,), {"pack_command": pack_command})


class DeadlineRedis(aioredis.Redis):
    """A client of one Redis (or of the primary that Sentinel names) over a plain connection pool: each
    command, or pipeline, ends within ``deadline_s`` (``TimeoutError``), and at most ``limit`` are under
    way, the others waiting (within their deadline).

    This replaces a blocking pool (a Condition per checkout) and socket timeouts (a timer per read, a
    task per write): one timer per command instead. A command cut short while its reply is awaited
    leaves its connection closed (redis-py disconnects on any exception there, cancellation included),
    so no pooled connection ever holds a reply that a later command would take for its own; as with a
    socket timeout, the command may have run (``store.reply_lost``). The store sends no WATCH or MULTI
    outside a pipeline's ``execute``, the only other way to the server.
    """

    def __init__(self, pool: ConnectionPool, *, deadline_s: float, limit: int) -> None:
        super().__init__(connection_pool=pool)
        self.deadline_s = deadline_s
        self._slots = asyncio.Semaphore(limit)

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        async with asyncio.timeout(self.deadline_s), self._slots:
            if args[0] == "EVALSHA":
                return await self._script_call(args)
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]

    async def _script_call(self, args: tuple[Any, ...]) -> Any:
        """A script call (two per budgeted call) straight on a pooled connection: check one out, send,
        read, release. Skipped: redis-py's per-command retry wrapper and observability hooks, and on
        checkout its pool lock, deprecated-argument check and connection-count records (a checkout
        takes no await before the connection is ours, so no lock is needed in one event loop). The
        connection is still made ready (connected, no stray data) by the pool's ``ensure_connection``.
        Client CPU per admit + settle, bench/store_calls.py: 0.121 -> 0.108 ms without the wrapper,
        then 0.099 -> 0.089 ms with the lean checkout.

        Like redis-py's path on these connections (no retry policy), an error is not retried: a script
        that may have run is never sent twice. A script reply needs no response callback. An error while
        sending or reading leaves the connection disconnected (redis-py's connection does that), so it
        never goes back to the pool with a reply pending."""
        pool = self.connection_pool
        conn = pool.get_available_connection()  # type: ignore[no-untyped-call]
        try:
            await pool.ensure_connection(conn)
            await conn.send_packed_command(conn.pack_command(*args))
            return await conn.read_response()
        finally:
            await pool.release(conn)

    def pipeline(self, transaction: bool = True, shard_hint: str | None = None) -> Pipeline:
        return _DeadlinePipeline(self, transaction, shard_hint)


class _DeadlinePipeline(Pipeline):
    """A pipeline of ``DeadlineRedis``: its ``execute`` is one command as far as deadline and slots go."""

    def __init__(self, client: DeadlineRedis, transaction: bool, shard_hint: str | None) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, transaction, shard_hint)
        self._client = client

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        async with asyncio.timeout(self._client.deadline_s), self._client._slots:
            return await super().execute(raise_on_error)


class _Cluster(RedisCluster):
    """redis-py's cluster client, learning the cluster before it routes a command.

    redis-py chooses a command's shard before it learns the cluster: with no shard map yet (a fresh
    client, or one that closed itself after CLUSTERDOWN or MOVED) it sends EVALSHA to a random primary.
    Two in three of the first burst's commands then bounce (MOVED), and every fifth MOVED makes the
    client close all its connections, under the commands still using them (uvloop: ``RuntimeError``,
    a 500). Here a command waits for the cluster to be learnt first; redis-py's lock makes concurrent
    first commands wait for one discovery.
    """

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            await self.initialize()
        return await super().execute_command(*args, **kwargs)


@dataclass
class StoreConnection:
    """A client for one ``StoreURL`` and what else must be closed with it."""

    url: StoreURL
    client: StoreClient
    sentinel: Sentinel | None = None

    @property
    def kind(self) -> Kind:
        return self.url.kind

    async def rediscover(self) -> str | None:
        """Behind Sentinel: ask which server is primary now (``host:port``, ``None`` when no Sentinel
        answers or the store is not behind Sentinel); connections to a former one are dropped.

        redis-py asks only when it opens a connection, and a demoted primary answers READONLY only once
        Sentinel reconfigures it (~10 s after a failover); until then pooled connections would keep
        writing to it. Called when replicas fail to confirm a write, the first sign of a failover, and
        by the ledger every half second to learn of failovers (``BudgetStore.primary``).
        """
        pool = getattr(self.client, "connection_pool", None)
        if isinstance(pool, _SentinelPool):
            with contextlib.suppress(redis_errors.RedisError, OSError):
                host, port = await pool.discover()
                return f"{host}:{port}"
        return None

    async def aclose(self) -> None:
        if isinstance(self.client, RedisCluster):
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)
        if self.sentinel is not None:
            await self.sentinel.aclose()


def connect(
    url: str, *, pool_size: int = POOL_SIZE, timeout_s: float = TIMEOUT_S, answer_reuse_s: float = ANSWER_REUSE_S
) -> StoreConnection:
    """A client for ``url`` (nothing is contacted until the first command). ``answer_reuse_s``: behind
    Sentinel, how long one discovery of the primary serves the connections opened after it."""
    parsed = parse_store_url(url)
    timeouts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if parsed.kind == "redis":
        # No socket timeout (redis-py's default is 5 s): DeadlineRedis bounds every command.
        pool = ConnectionPool.from_url(
            url, max_connections=pool_size, socket_timeout=None, socket_connect_timeout=timeout_s,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
        )
        pool.connection_class = c_packed(pool.connection_class)
        return StoreConnection(parsed, DeadlineRedis(pool, deadline_s=timeout_s, limit=pool_size))
    auth: dict[str, Any] = {"username": parsed.username, "password": parsed.password}
    if parsed.kind == "sentinel":
        # The Sentinels themselves are asked without credentials (theirs are not the data nodes').
        sentinel = _NewestSentinel(list(parsed.nodes), sentinel_kwargs=dict(timeouts))
        # The primary's connections as redis:// ones: no socket timeout, DeadlineRedis bounds every command.
        pool = _SentinelPool(  # type: ignore[no-untyped-call]
            parsed.master, sentinel, db=parsed.db, ssl=parsed.tls,
            connection_class=c_packed(_SentinelSSLConnection if parsed.tls else _SentinelConnection),
            max_connections=pool_size, socket_timeout=None, socket_connect_timeout=timeout_s,
            health_check_interval=HEALTH_CHECK_INTERVAL_S, **auth,
        )
        pool.answer_reuse_s = answer_reuse_s
        return StoreConnection(parsed, DeadlineRedis(pool, deadline_s=timeout_s, limit=pool_size), sentinel)
    cluster = _Cluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parsed.nodes], ssl=parsed.tls,
        max_connections=pool_size, require_full_coverage=True, health_check_interval=HEALTH_CHECK_INTERVAL_S,
        retry=Retry(ExponentialWithJitterBackoff(cap=CLUSTER_BACKOFF_CAP_S, base=CLUSTER_BACKOFF_BASE_S),
                    CLUSTER_RETRIES),
        **auth, **timeouts,
    )
    # RedisCluster takes no connection class: every node it learns of is built from its connection_kwargs
    # (the startup nodes already were, with no connection open yet).
    packed = c_packed(cluster.connection_kwargs["connection_class"])
    cluster.connection_kwargs["connection_class"] = packed
    for node in cluster.startup_nodes:
        node.connection_class = packed
    return StoreConnection(parsed, cluster)


def mask_password(url: str, mask: str = "***") -> str:
    """``url`` with its password replaced by ``mask`` (multi-host URLs too)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = rest.find("/")
    netloc, path = (rest, "") if end < 0 else (rest[:end], rest[end:])
    userinfo, at, hosts = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if not at or not colon:
        return url
    return f"{scheme}://{user}:{mask}@{hosts}{path}"
