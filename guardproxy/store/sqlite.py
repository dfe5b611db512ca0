"""The embedded store: one SQLite file, shared by every process that opens it (the default without Redis).

``SqliteClient`` answers the part of redis-py's asyncio client that ``BudgetStore`` uses (the same
commands, arguments and reply shapes) on ``sqlite_data``'s tables, so the budget store, its keys and its
contract are the same on both engines; ``evalsha`` of the budget scripts runs their transcription
(``sqlite_scripts``). Every call is one transaction: a script, a pipeline or a single command. Writing
ones start with ``BEGIN IMMEDIATE`` (the file's write lock, taken before the first read), so an admission
or a settlement is atomic across threads and processes; nothing reads in one transaction and writes what
it read in another.

The file is in WAL mode: readers never wait for the writer, and a committed transaction survives the
process being killed. ``synchronous`` decides what a power cut may take: ``full`` syncs the log at every
commit (nothing committed is lost), ``normal`` syncs at checkpoints (the last commits before the cut may
be lost, the file stays consistent): one every ``SYNC_EVERY_COMMITS`` writing commits, and one after the
first writing commit ``SYNC_EVERY_S`` after the last. docs/store.md has the measured cost of each.

With ``normal`` a transaction runs on the event loop, on a connection of its own: a commit syncs
nothing, so it costs only CPU, less than handing it to a thread (``SqliteClient.transact``); what may
wait on the disk (opening the file, checkpoints, the sweep of expired keys) runs on the client's one
thread, nobody waiting for it. With ``full`` (a sync at every commit) every transaction runs on that
thread, the event loop waiting only for the reply. A transaction that finds the write lock taken by
another process is tried again after a short random pause (instead of SQLite's busy handler, which
sleeps in steps of 1 to 100 ms) until ``busy_timeout_ms``, then fails as ``StoreUnavailable``.
Between its transactions a connection keeps what it read and wrote (``sqlite_data.Known``) for as long
as no other connection commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from redis import exceptions as redis_errors

from guardproxy.config.store_url import sqlite_path as sqlite_path
from guardproxy.store.sqlite_data import SCHEMA, Known, Tx, Value, sweep
from guardproxy.store.sqlite_scripts import SCRIPTS, settle_v4

log = logging.getLogger("guardproxy.store.sqlite")

Clock = Callable[[], float]
#: How often a writing transaction also deletes a batch of expired keys.
SWEEP_EVERY_S = 10.0
#: With ``synchronous=normal``: the first commit this long after the last checkpoint starts one
#: (syncing the log), so a power cut takes at most about this much activity (docs/store.md)...
SYNC_EVERY_S = 1.0
#: ... and every this many writing commits on the event loop's connection, whose automatic checkpoint
#: (SQLite's, every 1,000 pages of log: ~140 transactions of ~7 pages) is off, so the log stays as short.
SYNC_EVERY_COMMITS = 128
#: A passive checkpoint (the thread's) copies the log as far as it was when the checkpoint began, and the
#: log starts over only at a commit that finds it wholly copied; while the loop's connection goes on
#: writing, frames always come meanwhile, so it never does and the log grows without end (SQLite's
#: checkpoint starvation: 190 MB in 12 s of bench load, every commit appending past the end of a
#: growing file). Once the log holds this many frames (16 MiB of 4 KiB pages), the thread follows its
#: checkpoint with a RESTART one, which holds the write lock while it copies the last frames and syncs
#: (a few ms: the loop's writes wait as for another process's lock), so the next commit starts over.
RESTART_LOG_AT_FRAMES = 4096
#: A log started over is cut back to this size (``journal_size_limit``), so a burst leaves no big file.
LOG_SIZE_LIMIT = 16 * 1024 * 1024
SYNCHRONOUS = ("normal", "full")
#: The most writing transactions one commit on the event loop takes (``SqliteClient._flush``): each
#: holds the loop ~0.1 ms, so one commit holds it ~2 ms at most; the others wait for the next turn.
COMMIT_AT_MOST = 16
#: The longest a settlement waits for the next transaction to commit with (``SqliteClient.transact``'s
#: ``later``): its caller's client has had its answer; alone, it commits after this long.
LATER_AT_MOST_S = 0.001


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


#: A writing transaction waiting for its commit: the work, its caller's future, when it gives up.
_Write = tuple[Callable[[Tx], Any], "asyncio.Future[Any]", float]


class _Failed(Exception):
    """The transaction at ``index`` of a shared commit failed with ``error``."""

    def __init__(self, index: int, error: Exception) -> None:
        self.index, self.error = index, error


class Script:
    """What ``register_script`` returns: called like redis-py's, run as one transaction."""

    def __init__(self, client: SqliteClient, source: str) -> None:
        self.client = client
        self.script = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()
        if self.sha not in SCRIPTS:
            raise RuntimeError(f"the SQLite store has no transcription of the script with SHA1 {self.sha}: "
                               "guardproxy/store/sqlite_scripts.py must follow an edited guardproxy/store/lua script")

    async def __call__(self, keys: Sequence[Value] = (), args: Sequence[Value] = ()) -> Any:
        return await self.client.evalsha(self.sha, len(keys), *keys, *args)


def _text(value: Value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _b(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


# redis-py's commands as the facade answers them: name -> (writes, fn(tx, *args, **kwargs)).
def _set(t: Tx, name: Value, value: Value, ex: int | None = None, px: int | None = None,
         nx: bool = False) -> bool | None:
    ms = px if px is not None else None if ex is None else int(ex) * 1000
    return True if t.set(_text(name), value, ex_ms=ms, nx=nx) else None


def _hset(t: Tx, name: Value, key: Value | None = None, value: Value | None = None,
          mapping: Mapping[Value, Value] | None = None) -> int:
    items = dict(mapping or {})
    if key is not None and value is not None:
        items[key] = value
    return sum(t.hset(_text(name), f, v) for f, v in items.items())


def _zadd(t: Tx, name: Value, mapping: Mapping[Value, float], xx: bool = False) -> int:
    return sum(t.zadd(_text(name), score, member, xx=xx) for member, score in mapping.items())


def _zrange(t: Tx, name: Value, start: int, end: int, desc: bool = False, withscores: bool = False) -> list[Any]:
    rows = t.zrange(_text(name), start, end, reverse=desc)
    return [(m.encode(), s) for m, s in rows] if withscores else [m.encode() for m, _ in rows]


def _zrangebyscore(t: Tx, name: Value, low: Value, high: Value, start: int | None = None,
                   num: int | None = None) -> list[bytes]:
    return [m.encode() for m in t.zrangebyscore(_text(name), low, high, start or 0, -1 if num is None else num)]


def _entries(rows: list[tuple[str, list[str]]]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return [(i.encode(), {f.encode(): v.encode() for f, v in zip(fs[::2], fs[1::2], strict=True)}) for i, fs in rows]


def _xadd(t: Tx, name: Value, fields: Mapping[Value, Value], id: Value = "*",
          maxlen: int | None = None, approximate: bool = True) -> bytes:
    flat: list[Value] = [v for pair in fields.items() for v in pair]
    try:
        return t.xadd(_text(name), flat, maxlen=maxlen, entry_id=_text(id)).encode()
    except ValueError as exc:
        raise redis_errors.ResponseError(str(exc)) from None


def _keys(t: Tx, pattern: Value = "*") -> list[bytes]:
    text = _text(pattern)
    if "*" in text[:-1] or "?" in text or "[" in text:
        raise redis_errors.ResponseError(f"the SQLite store's KEYS takes '*' or 'prefix*' only, got {text!r}")
    return [k.encode() for k in t.keys(text.rstrip("*"))]


_OPS: dict[str, tuple[bool, Callable[..., Any]]] = {
    "ping": (False, lambda t: True),
    "time": (False, lambda t: (t.now_ms // 1000, t.now_ms % 1000 * 1000)),
    "get": (False, lambda t, k: t.get(_text(k))),
    "mget": (False, lambda t, ks, *more: [t.get(_text(k)) for k in ([ks] if isinstance(ks, str | bytes) else ks)]
             + [t.get(_text(k)) for k in more]),
    "set": (True, _set),
    "incr": (True, lambda t, k: t.incrby(_text(k), 1)),
    "incrby": (True, lambda t, k, n=1: t.incrby(_text(k), n)),
    "decrby": (True, lambda t, k, n=1: t.decrby(_text(k), n)),
    "delete": (True, lambda t, *ks: t.delete(*map(_text, ks))),
    "exists": (False, lambda t, *ks: t.exists(*map(_text, ks))),
    "expire": (True, lambda t, k, s: bool(t.expire(_text(k), s))),
    "pexpire": (True, lambda t, k, ms: bool(t.pexpire(_text(k), ms))),
    "ttl": (False, lambda t, k: t.ttl(_text(k))),
    "pttl": (False, lambda t, k: t.pttl(_text(k))),
    "type": (False, lambda t, k: t.type(_text(k)).encode()),
    "keys": (False, _keys),
    "hget": (False, lambda t, k, f: t.hget(_text(k), f)),
    "hset": (True, _hset),
    "hsetnx": (True, lambda t, k, f, v: t.hsetnx(_text(k), f, v)),
    "hdel": (True, lambda t, k, *fs: t.hdel(_text(k), *fs)),
    "hincrby": (True, lambda t, k, f, n=1: t.hincrby(_text(k), f, n)),
    "hgetall": (False, lambda t, k: {f.encode(): v for f, v in t.hgetall(_text(k)).items()}),
    "hmget": (False, lambda t, k, fs, *more: t.hmget(_text(k), *([fs] if isinstance(fs, str | bytes) else fs), *more)),
    "hexists": (False, lambda t, k, f: bool(t.hexists(_text(k), f))),
    "hlen": (False, lambda t, k: t.hlen(_text(k))),
    "hkeys": (False, lambda t, k: [f.encode() for f in t.hkeys(_text(k))]),
    "zadd": (True, _zadd),
    "zrem": (True, lambda t, k, *ms: t.zrem(_text(k), *ms)),
    "zscore": (False, lambda t, k, m: t.zscore(_text(k), m)),
    "zcard": (False, lambda t, k: t.zcard(_text(k))),
    "zrange": (False, _zrange),
    "zrevrange": (False, lambda t, k, a, b, withscores=False: _zrange(t, k, a, b, True, withscores)),
    "zrangebyscore": (False, _zrangebyscore),
    "zremrangebyscore": (True, lambda t, k, lo, hi: t.zremrangebyscore(_text(k), lo, hi)),
    "zcount": (False, lambda t, k, lo, hi: t.zcount(_text(k), lo, hi)),
    "zremrangebyrank": (True, lambda t, k, a, b: t.zremrangebyrank(_text(k), int(a), int(b))),
    "sadd": (True, lambda t, k, *ms: t.sadd(_text(k), *ms)),
    "srem": (True, lambda t, k, *ms: t.srem(_text(k), *ms)),
    "smembers": (False, lambda t, k: {m.encode() for m in t.smembers(_text(k))}),
    "xadd": (True, _xadd),
    "xrange": (False, lambda t, k, min="-", max="+", count=None: _entries(
        t.xrange(_text(k), _text(min), _text(max), -1 if count is None else count))),
    "xrevrange": (False, lambda t, k, max="+", min="-", count=None: _entries(
        t.xrange(_text(k), _text(min), _text(max), -1 if count is None else count, reverse=True))),
    "xlen": (False, lambda t, k: t.xlen(_text(k))),
    # MINID only; always exact (Redis's default "~" trims at least as much, by whole nodes)
    "xtrim": (True, lambda t, k, minid, approximate=True: t.xtrim_minid(
        _text(k), *map(int, _text(minid).partition("-")[::2]))),
    "flushall": (True, lambda t: t.delete(*t.keys()) >= 0),
}
#: Reads whose size has no bound but the data's (a prefix's keys, a whole hash, set or stream): on the
#: store's thread, never on the event loop, as a pipeline of more than ``LOOP_PIPELINE`` commands is.
UNBOUNDED_READS = frozenset({"keys", "hgetall", "hkeys", "smembers", "xrange", "xrevrange", "zrange", "zrevrange",
                             "zrangebyscore"})
LOOP_PIPELINE = 16


class Pipeline:
    """``pipeline(transaction=False)``: the queued commands run as one transaction at ``execute``."""

    def __init__(self, client: SqliteClient) -> None:
        self._client = client
        self._queued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., Pipeline]:
        if name not in _OPS:
            raise AttributeError(f"the SQLite store has no command {name!r}")

        def queue(*args: Any, **kwargs: Any) -> Pipeline:
            self._queued.append((name, args, kwargs))
            return self

        return queue

    async def execute(self) -> list[Any]:
        queued, self._queued = self._queued, []
        writes = any(_OPS[name][0] for name, _, _ in queued)
        unbounded = len(queued) > LOOP_PIPELINE or (not writes and any(n in UNBOUNDED_READS for n, _, _ in queued))
        replies: list[Any] = await self._client.transact(
            lambda t: [_OPS[n][1](t, *a, **kw) for n, a, kw in queued], writes=writes, unbounded=unbounded)
        return replies

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._queued = []


class SqliteClient:
    """An asyncio client of one SQLite file with redis-py's command names and replies (see the module)."""

    def __init__(self, path: Path | str, *, synchronous: str = "normal", busy_timeout_ms: int = 5000,
                 clock: Clock = time.time, ttl_clock: Clock | None = None,
                 sweep_every_s: float = SWEEP_EVERY_S, sync_every_s: float = SYNC_EVERY_S) -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous is one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self.busy_timeout_ms = busy_timeout_ms
        #: The time the scripts read (``TIME``), and the one TTLs count in (the same unless a test splits them).
        self.clock = clock
        self.ttl_clock = ttl_clock
        self._thread = _StoreThread()
        self._local = threading.local()
        #: The event loop's connection (``transact``), opened by the thread, used by the loop only.
        self._loop_db: sqlite3.Connection | None = None
        self._loop_known = Known()
        self._writes: list[_Write] = []  # the writing transactions waiting for the next ``_flush``
        self._flush_pending = False
        self._turn_busy = False  # a write of this loop turn committed at once (``transact``)
        self._later: list[_Write] = []  # settlements waiting to commit with the next transaction
        self._later_timer: asyncio.TimerHandle | None = None
        self._next_sweep = 0.0
        self.sweep_every_s = sweep_every_s
        self._next_sync = 0.0
        self.sync_every_s = sync_every_s
        self._commits_unsynced = 0  # writing commits on the loop's connection since its last checkpoint
        #: The longest a transaction has held the file (ms), for the bench and docs/store.md.
        self.longest_tx_ms = 0.0
        # ":memory:": a store of the client's own, gone when it closes (tests). A connection of its own
        # would be another store, so everything runs on the thread's one connection.
        self._on_loop = synchronous == "normal" and str(path) != ":memory:"
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)

    # -- the thread's connection and transactions -------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        """The calling thread's connection (the store thread's), opened on first use."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._open(check_same_thread=True)
            self._local.db = db
            self._local.known = Known()
        return db

    def _open(self, *, check_same_thread: bool) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=check_same_thread)
        # No busy handler: ``run_on`` waits for another process's lock itself, in short pauses.
        db.execute("PRAGMA busy_timeout=0")
        # Each reads the file (its schema), which another process starting at the same moment may
        # hold for itself while it makes the file: the same short pauses as a transaction's. Workers
        # forked together meet there (issue 26: before, spawning staggered them).
        self.run_on(db, lambda: db.execute(f"PRAGMA synchronous={self.synchronous.upper()}"))
        self.run_on(db, lambda: db.execute("PRAGMA journal_mode=WAL"))
        db.execute(f"PRAGMA journal_size_limit={LOG_SIZE_LIMIT}")
        self.run_on(db, lambda: db.executescript(SCHEMA))
        return db

    def run_on(self, db: sqlite3.Connection, work: Callable[[], Any]) -> Any:
        """``work`` on ``db``, tried again while another connection holds the lock (see ``run``)."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        pause = 0.0001
        while True:
            try:
                return work()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(random.uniform(pause / 2, pause))
            pause = min(pause * 2, 0.005)

    def _now_ms(self, clock: Clock) -> int:
        return round(clock() * 1_000_000) // 1000

    def run(self, work: Callable[[Tx], Any], *, writes: bool) -> Any:
        """Run ``work`` as one transaction, on the calling thread (the client's own, see ``transact``).

        A writing transaction takes the write lock first (``BEGIN IMMEDIATE``). While another connection
        holds it, the transaction is tried again after a short random pause (0.05 ms growing to 5 ms),
        up to ``busy_timeout_ms``; a transaction that met the lock mid-way was rolled back whole first.
        """
        db = self._connection()
        known: Known = self._local.known
        return self.run_on(db, lambda: self._once(db, known, work, writes, upkeep=True))

    @contextlib.contextmanager
    def _transaction(self, db: sqlite3.Connection, known: Known, *, writes: bool) -> Iterator[None]:
        """``BEGIN`` (``IMMEDIATE`` when writing: the write lock before the first read) ... ``COMMIT``.
        A writing one first forgets what ``known`` may no longer hold true; any error rolls it back, and
        ``known`` forgets what the rolled-back work had taught it."""
        db.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        started = time.perf_counter()
        try:
            if writes:
                known.follow(db)
            yield
            db.execute("COMMIT")
        except BaseException:
            if writes:
                known.forget()
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self.longest_tx_ms = max(self.longest_tx_ms, (time.perf_counter() - started) * 1000)

    def _tx(self, db: sqlite3.Connection, known: Known | None, *, writes: bool) -> Tx:
        """One transaction's commands, at this moment of the scripts' clock (and of the TTLs')."""
        now_ms = self._now_ms(self.clock)
        ttl_now_ms = now_ms if self.ttl_clock is None else self._now_ms(self.ttl_clock)
        return Tx(db, now_ms, writes=writes, ttl_now_ms=ttl_now_ms, known=known)

    def _once(self, db: sqlite3.Connection, known: Known, work: Callable[[Tx], Any], writes: bool, *,
              upkeep: bool) -> Any:
        """One try of a transaction; with ``upkeep``, the sweep and the checkpoint when they are due."""
        with self._transaction(db, known, writes=writes):
            tx = self._tx(db, known if writes else None, writes=writes)
            result = work(tx)
            if upkeep and writes and time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + self.sweep_every_s
                sweep(db, tx.ttl_now_ms, known=known)
        if upkeep and writes and self.synchronous == "normal" and time.monotonic() >= self._next_sync:
            self._next_sync = time.monotonic() + self.sync_every_s
            self._sync_log(db)
        return result

    def _sync_log(self, db: sqlite3.Connection) -> None:
        """A passive checkpoint: it syncs the log, then copies it into the file. Under load SQLite's own
        (every 1,000 pages of log) comes first; this one bounds in time what a power cut may take at a
        few calls a minute, when 1,000 pages could be hours of charges. It runs after the commit: a
        checkpoint that fails (another process's in progress, a disk error) leaves the transaction
        committed and is tried again at the next commit."""
        try:
            _, frames, _ = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames >= RESTART_LOG_AT_FRAMES:  # never started over: see RESTART_LOG_AT_FRAMES
                self._restart_log(db)
        except sqlite3.Error as exc:
            if not (isinstance(exc, sqlite3.OperationalError) and _is_busy(exc)):  # busy: theirs syncs the log
                self._next_sync = 0.0
                log.warning("SQLite store: checkpoint failed (tried again at the next write): %s", exc)

    def _restart_log(self, db: sqlite3.Connection) -> None:
        """On the thread: a RESTART checkpoint, tried while a writer holds the lock (up to ~50 ms)."""
        for _ in range(100):
            busy, _, _ = db.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
            if not busy:
                return
            time.sleep(0.0005)
        log.info("SQLite store: the log could not be started over (the file stayed busy); tried again later")

    async def transact(self, work: Callable[[Tx], Any], *, writes: bool, unbounded: bool = False,
                       later: bool = False) -> Any:
        """``work`` as one transaction, on the event loop's own connection with ``synchronous=normal``,
        on the client's thread with ``full`` (the event loop then waits only for the reply).

        With ``normal`` a commit writes the log into the page cache and syncs nothing, so a transaction
        costs only its CPU (about 0.15 ms for an admission; bench/sqlite_store.py), less than the two
        hops to a thread and back and the GIL handed between them. The first writing transaction of a
        turn of the event loop commits at once, alone; those asked for after it in the same turn commit
        together at the next (``_flush``, at most ``COMMIT_AT_MOST``), each still atomic and isolated,
        run whole, one after the other, under the one write lock. While another connection
        holds that lock (another process, or this client's thread) SQLite answers busy at once (no
        busy handler); the transactions, rolled back whole, are tried again after a pause the loop
        spends on other work (0.25 ms growing to 5 ms), each up to ``busy_timeout_ms``. What may wait
        on the disk never runs on the loop: opening the file, the sweep of expired keys and the
        checkpoint that syncs the log (the loop's connection has SQLite's automatic checkpoint off; the
        thread runs it when due), and with ``full`` every transaction, since each of its commits syncs.
        A transaction that may be long (``unbounded``: a scan, a whole hash or stream, a long pipeline;
        status pages, exports and housekeeping ask for those, calls do not) runs on the thread too.

        A writing transaction asked for ``later`` (a settlement: its caller's client has had its answer)
        does not commit alone at once: it commits with the next transaction this client runs, or after
        ``LATER_AT_MOST_S`` if none comes, and its caller hears back then. At concurrency 1 the call
        that follows a settled one then pays one commit for both (a commit, ~50 µs of log writes and
        locks, costs more than a settlement's statements), not two. Every other transaction of this
        client sees the settlements asked for before it: a write takes them into its commit, a read or
        a transaction on the thread waits for them to commit first.
        """
        if self._later and not (writes and self._on_loop and not unbounded):
            await self._commit_later()
        if not self._on_loop or unbounded:
            return await self._thread.call(lambda: self.run(work, writes=writes))
        if self._loop_db is None:
            self._loop_db = await self._thread.call(lambda: self._open_for_loop())
        if writes:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[Any] = loop.create_future()
            job = (work, future, time.monotonic() + self.busy_timeout_ms / 1000)
            if later:
                self._later.append(job)
                if self._later_timer is None:
                    self._later_timer = loop.call_later(LATER_AT_MOST_S, self._flush_later)
            elif not (self._writes or self._flush_pending or self._turn_busy):
                # The turn's first write commits at once (with the settlements waiting for a commit): a
                # caller alone (concurrency 1) pays no loop turns waiting for others. The next writes of
                # this turn share the next commit.
                self._turn_busy = True
                loop.call_soon(self._turn_over)
                self._run([*self._take_later(), job], 0.0005)
            else:
                self._writes.append(job)
                if not self._flush_pending:
                    self._flush_pending = True
                    loop.call_soon(self._flush, 0.0005)
            return await future
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        pause = 0.0005
        while True:
            try:
                return self._once(self._loop_db, self._loop_known, work, False, upkeep=False)
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc) or time.monotonic() > deadline:
                    raise
            await asyncio.sleep(random.uniform(pause / 2, pause))
            pause = min(pause * 2, 0.005)

    def _flush(self, pause: float) -> None:
        """On the loop: the writing transactions asked for since the last flush, in one commit.

        Committing costs more than a budget script's statements (the lock, a log frame for every page
        written, ~40 µs), and a burst of calls writes the same pages (a tenant's counters and holds): a
        commit shared by the transactions of one turn of the loop pays that once. A transaction that
        fails (its script's error) rolls the commit back whole; it gets its error and the others run
        again, without it, at once."""
        self._flush_pending = False
        jobs, self._writes = [*self._take_later(), *self._writes], []
        self._run(jobs, pause)

    def _run(self, jobs: list[_Write], pause: float) -> None:
        """``jobs`` (in order, at most ``COMMIT_AT_MOST``; the rest at the next turn) in one commit; each
        caller hears back (``_flush``)."""
        jobs = [job for job in jobs if not job[1].cancelled()]
        if not jobs:
            return
        if len(jobs) > COMMIT_AT_MOST:  # the loop is held for one commit at a time: the rest at the next turn
            self._retry(jobs[COMMIT_AT_MOST:], 0.0, pause)
            jobs = jobs[:COMMIT_AT_MOST]
        try:
            replies = self._commit([work for work, _, _ in jobs])
        except _Failed as failed:
            jobs[failed.index][1].set_exception(failed.error)
            self._retry(jobs[:failed.index] + jobs[failed.index + 1:], 0.0, pause)
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                self._fail(jobs, exc)
                return
            now = time.monotonic()
            self._fail([job for job in jobs if now > job[2]], exc)
            self._retry([job for job in jobs if now <= job[2]], random.uniform(pause / 2, pause),
                        min(pause * 2, 0.005))
            return
        except Exception as exc:  # the commit itself failed (disk full, I/O error): nothing was written
            self._fail(jobs, exc)
            return
        for (_, future, _), reply in zip(jobs, replies, strict=True):
            if not future.cancelled():
                future.set_result(reply)
        self._committed(len(jobs))

    def _take_later(self) -> list[_Write]:
        """The settlements waiting for a commit, taken (into the commit being made)."""
        if self._later_timer is not None:
            self._later_timer.cancel()
            self._later_timer = None
        jobs, self._later = self._later, []
        return jobs

    def _flush_later(self) -> None:
        """The settlements waiting for a commit: into the next (at once, unless one is due this turn)."""
        if self._later and not self._flush_pending:
            self._flush_pending = True
            self._flush(0.0005)

    async def _commit_later(self) -> None:
        """Commit the settlements waiting for a commit; wait for them (their errors are their callers')."""
        waiting = [future for _, future, _ in self._later]
        self._flush_later()
        for future in waiting:
            with contextlib.suppress(Exception):
                await future

    def _turn_over(self) -> None:
        self._turn_busy = False

    def _committed(self, transactions: int) -> None:
        """After a commit on the loop: the checkpoint and the sweep posted to the thread when due."""
        self._commits_unsynced += transactions
        if self._commits_unsynced >= SYNC_EVERY_COMMITS or time.monotonic() >= min(self._next_sweep,
                                                                                   self._next_sync):
            self._thread.post(functools.partial(self._upkeep, self._due()))  # nobody waits for it

    def _commit(self, works: list[Callable[[Tx], Any]]) -> list[Any]:
        db, known = self._loop_db, self._loop_known
        if db is None:
            raise RuntimeError("the SQLite store is closed")
        replies: list[Any] = []
        with self._transaction(db, known, writes=True):
            for index, work in enumerate(works):
                try:
                    replies.append(work(self._tx(db, known, writes=True)))
                except sqlite3.OperationalError as exc:
                    if _is_busy(exc):
                        raise
                    raise _Failed(index, exc) from exc
                except Exception as exc:
                    raise _Failed(index, exc) from exc
        return replies

    def _retry(self, jobs: list[_Write], delay: float, pause: float) -> None:
        if not jobs:
            return
        self._writes = jobs + self._writes
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_later(delay, self._flush, pause)

    @staticmethod
    def _fail(jobs: list[_Write], error: BaseException) -> None:
        for _, future, _ in jobs:
            if not future.cancelled():
                future.set_exception(error)

    def _open_for_loop(self) -> sqlite3.Connection:
        if self._loop_db is None:
            db = self._open(check_same_thread=False)
            db.execute("PRAGMA wal_autocheckpoint=0")  # the thread checkpoints (``_upkeep``)
            self._loop_db = db
        return self._loop_db

    def _due(self) -> tuple[bool, bool]:
        """Whether the sweep and the checkpoint are due, each moved on to its next time if so."""
        now = time.monotonic()
        sweep_due = now >= self._next_sweep
        sync_due = now >= self._next_sync or self._commits_unsynced >= SYNC_EVERY_COMMITS
        if sweep_due:
            self._next_sweep = now + self.sweep_every_s
        if sync_due:
            self._next_sync = now + self.sync_every_s
            self._commits_unsynced = 0
        return sweep_due, sync_due

    def _upkeep(self, due: tuple[bool, bool]) -> None:
        """On the thread, after a commit on the loop: the sweep of expired keys and the checkpoint, as
        ``_due`` found them due. Nobody waits for it; a failure is logged (and a failed checkpoint is
        tried again at the next commit)."""
        sweep_due, sync_due = due
        try:
            if sweep_due:
                self.run(lambda t: sweep(t.db, t.ttl_now_ms, known=t.known), writes=True)
            if sync_due:
                self._sync_log(self._connection())
        except sqlite3.Error as exc:
            log.warning("SQLite store: the sweep of expired keys failed (tried again later): %s", exc)

    # -- redis-py's interface ---------------------------------------------------------------------------

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name not in _OPS:
            raise AttributeError(f"the SQLite store has no command {name!r}")
        writes, op = _OPS[name]
        unbounded = name in UNBOUNDED_READS

        async def command(*args: Any, **kwargs: Any) -> Any:
            return await self.transact(lambda t: op(t, *args, **kwargs), writes=writes, unbounded=unbounded)

        return command

    async def scan_iter(self, match: str = "*") -> AsyncIterator[bytes]:
        """The keys matching ``match`` (``*`` or ``prefix*``), as redis-py's ``scan_iter`` yields them."""
        for key in await self.keys(match):
            yield key

    def pipeline(self, transaction: bool = False) -> Pipeline:
        return Pipeline(self)

    def register_script(self, source: str) -> Script:
        return Script(self, source)

    async def script_load(self, source: str | bytes | memoryview) -> str:
        return Script(self, source if isinstance(source, str) else bytes(source).decode()).sha

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Value) -> Any:
        script = SCRIPTS.get(sha)
        if script is None:
            raise redis_errors.NoScriptError("NOSCRIPT No matching script (the SQLite store runs the budget "
                                             "scripts only)")
        keys = [None, *map(_text, keys_and_args[:numkeys])]
        args = [None, *map(_text, keys_and_args[numkeys:])]

        def work(t: Tx) -> Any:
            try:
                return script(t, keys, args)
            except (TypeError, ValueError, IndexError) as exc:  # what a Lua script's error would be
                raise redis_errors.ResponseError(f"script {sha}: {type(exc).__name__}: {exc}") from exc

        return await self.transact(work, writes=True, later=script is settle_v4)

    async def aclose(self, close_connection_pool: bool = True) -> None:
        if self._later:
            await self._commit_later()

        def close() -> None:
            db: sqlite3.Connection | None = getattr(self._local, "db", None)
            if db is not None:
                db.close()
                self._local.db = None
            if self._loop_db is not None:
                self._loop_db.close()
                self._loop_db = None

        await self._thread.call(close)
        self._thread.stop()



#: (the waiting loop, its future, the job); (None, None, job) for a job nobody waits for.
Job = tuple[asyncio.AbstractEventLoop | None, "asyncio.Future[Any] | None", Callable[[], Any]]


class _StoreThread:
    """The client's one thread: runs each job (a transaction) in turn and hands its reply to the waiting
    event loop. A queue and ``call_soon_threadsafe`` instead of ``run_in_executor``: 18 µs of CPU per hop
    on uvloop against 50 (two hops per budgeted call; bench/README.md). As with the executor, a job whose
    caller was cancelled before it started does not run, and one that started runs to its end."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._lock = threading.Lock()

    async def call(self, fn: Callable[[], Any]) -> Any:
        if self._stopped:
            raise RuntimeError("the SQLite store is closed")
        self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((loop, future, fn))
        return await future

    def _start(self) -> None:
        if self._thread is None:
            with self._lock:  # started on first use, never before: a process may fork until then
                if self._thread is None:
                    self._thread = threading.Thread(target=self._serve, name="guardproxy-sqlite", daemon=True)
                    self._thread.start()

    def post(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` on the thread, after the jobs queued; nobody waits for it (its errors are its own)."""
        if not self._stopped:
            self._start()
            self._jobs.put((None, None, fn))

    def stop(self) -> None:
        """No more jobs; the thread ends after those queued."""
        self._stopped = True
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn = job
            if loop is None or future is None:  # posted: nobody waits
                try:
                    fn()
                except Exception:
                    log.exception("SQLite store: a background job failed")
                continue
            if future.cancelled():
                continue
            try:
                result, error = fn(), None
            except BaseException as exc:  # the caller's to handle, as run_in_executor hands it over
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
