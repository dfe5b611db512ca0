"""The embedded store's data on SQLite: Redis's shapes (strings, hashes, sorted sets, sets, streams, TTLs) as tables.

The SQLite store keeps the same keys, in the same shapes, as the Redis store: the budget scripts
(``sqlite_scripts.py``) are line-for-line transcriptions of the Lua, a store copies to Redis and back
key by key (``copy.py``), and the contract tests read both the same way. ``Tx`` is one
transaction: its commands are Redis's, with Redis's semantics where the scripts depend on them (a
container left empty is deleted with its TTL; ``SET`` drops a TTL, a write to a hash or a counter keeps
it; time stands still for the whole transaction, as it does for a script).

An expired key is gone for every read; a writing transaction deletes it when it meets it, and
``sweep`` deletes expired keys in bounded batches (the store runs it periodically), so cached responses
and finished windows do not pile up.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
from collections.abc import Iterable, Sequence

Value = str | int | float | bytes

SCHEMA = """
CREATE TABLE IF NOT EXISTS strings (key TEXT PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hashes (key TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL,
                                   PRIMARY KEY (key, field)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS zsets (key TEXT NOT NULL, member TEXT NOT NULL, score REAL NOT NULL,
                                  PRIMARY KEY (key, member)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS zsets_by_score ON zsets (key, score, member);
CREATE TABLE IF NOT EXISTS sets (key TEXT NOT NULL, member TEXT NOT NULL, PRIMARY KEY (key, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS streams (key TEXT NOT NULL, pos INTEGER NOT NULL, ms INTEGER NOT NULL,
                                    seq INTEGER NOT NULL, fields TEXT NOT NULL, PRIMARY KEY (key, pos)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_ends (key TEXT PRIMARY KEY, ms INTEGER NOT NULL, seq INTEGER NOT NULL,
                                        pos INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS expiry (key TEXT PRIMARY KEY, at_ms INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS expiry_by_time ON expiry (at_ms);
"""
#: The tables holding a key's data, in the order ``type`` checks them.
DATA_TABLES = (("strings", "string"), ("hashes", "hash"), ("zsets", "zset"), ("sets", "set"), ("streams", "stream"))
#: A stream trimmed to ``MAXLEN ~ n`` is trimmed when its length passes n by this many (Redis trims whole nodes).
TRIM_SLACK = 100


def as_bytes(value: Value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value)).encode()
    return str(value).encode()


def as_text(value: Value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bound(value: Value) -> tuple[float, bool]:
    """A ZRANGEBYSCORE bound: ``-inf``, ``+inf``, ``n`` or ``(n`` (exclusive)."""
    text = as_text(value)
    exclusive = text.startswith("(")
    text = text[1:] if exclusive else text
    return float(text.replace("+inf", "inf")), exclusive


class Known:
    """What a connection knows of the file's keys: their kind, TTL, string values and hash fields.

    A budget script reads the same few dozen rows it or the last call wrote (a tenant's counters, its
    override hash, its reservation hashes); reading each from SQLite was most of a transaction's cost
    (bench/sqlite_store.py: ~100 statements per admit + settle, 60 of them reads). What a transaction
    reads or writes is kept here and stays true for as long as no other connection commits: the store
    checks ``PRAGMA data_version`` (which changes only when another connection commits) at the start of
    each writing transaction, once it holds the write lock, and forgets everything when it moved, when a
    transaction rolls back, and when more than ``LIMIT`` keys are known. Every write of ``Tx`` updates it
    in the same step as the row, so a read served from here is the row SQLite would return.
    """

    LIMIT = 50_000

    def __init__(self) -> None:
        self.version: int | None = None
        self.kinds: dict[str, str] = {}  # key -> "string", "hash", "zset", "set", "stream" or "none"
        self.expiry: dict[str, int | None] = {}  # key -> its TTL's end (ms), None: no TTL
        self.strings: dict[str, bytes | None] = {}
        self.fields: dict[str, dict[str, bytes | None]] = {}  # hash -> the fields read or written so far
        self.complete: set[str] = set()  # the hashes all of whose fields are in ``fields`` (absent if not)
        self.field_count = 0  # fields remembered (an upper bound: counted when first remembered)
        self.ends: dict[str, tuple[int, int, int] | None] = {}  # stream -> its last (ms, seq, position)

    def forget(self) -> None:
        self.version = None
        self.kinds.clear()
        self.expiry.clear()
        self.strings.clear()
        self.fields.clear()
        self.complete.clear()
        self.field_count = 0
        self.ends.clear()

    def remember(self, key: str, field: str, value: bytes | None) -> None:
        fields = self.fields.get(key)
        if fields is None:
            fields = self.fields[key] = {}
        if field not in fields:
            self.field_count += 1
        fields[field] = value

    def follow(self, db: sqlite3.Connection) -> None:
        """At the start of a writing transaction (the write lock held): forget what another connection
        may have changed since this one's last transaction."""
        version = db.execute("PRAGMA data_version").fetchone()[0]
        if version != self.version or len(self.expiry) + len(self.strings) + self.field_count > self.LIMIT:
            self.forget()
            self.version = version

    def gone(self, key: str) -> None:
        """``key`` holds nothing now (dropped, or its container emptied)."""
        self.kinds[key] = "none"
        self.expiry[key] = None
        self.strings[key] = None
        self.fields[key] = {}
        self.complete.add(key)
        self.ends[key] = None


class Tx:
    """One transaction's commands on the store's connection; ``now_ms`` is fixed at its start. TTLs count
    from ``ttl_now_ms`` (the same time, but for tests that move the scripts' clock and not the TTLs').
    ``known`` is the connection's knowledge of its keys (``Known``), kept between its transactions by a
    writing connection; a transaction without one starts from nothing."""

    def __init__(self, db: sqlite3.Connection, now_ms: int, *, writes: bool, ttl_now_ms: int | None = None,
                 known: Known | None = None) -> None:
        self.db = db
        self.now_ms = now_ms
        self.ttl_now_ms = now_ms if ttl_now_ms is None else ttl_now_ms
        self.writes = writes
        self.known = Known() if known is None else known

    # -- keys and TTLs ----------------------------------------------------------------------------------

    def alive(self, key: str) -> bool:
        """False when ``key`` has expired (a writing transaction deletes it on the way)."""
        expiry = self.known.expiry
        if key in expiry:
            at_ms = expiry[key]
        else:
            row = self.db.execute("SELECT at_ms FROM expiry WHERE key = ?", (key,)).fetchone()
            at_ms = expiry[key] = None if row is None else row[0]
        if at_ms is None or at_ms > self.ttl_now_ms:
            return True
        if self.writes:
            self._drop(key)
            return True  # gone now: later commands see (and may create) a fresh key
        return False

    def _no_ttl(self, key: str) -> None:
        if self.known.expiry.get(key, 0) is not None:
            self.db.execute("DELETE FROM expiry WHERE key = ?", (key,))
            self.known.expiry[key] = None

    def _ttl_at(self, key: str, at_ms: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO expiry (key, at_ms) VALUES (?, ?)", (key, at_ms))
        self.known.expiry[key] = at_ms

    def _drop(self, key: str) -> None:
        kind = self.known.kinds.get(key)
        if kind != "none":
            for table, table_kind in DATA_TABLES:
                if kind is None or kind == table_kind:
                    self.db.execute(f"DELETE FROM {table} WHERE key = ?", (key,))
            if kind in (None, "stream"):
                self.db.execute("DELETE FROM stream_ends WHERE key = ?", (key,))
        self._no_ttl(key)
        self.known.gone(key)

    def _emptied(self, table: str, key: str) -> None:
        """A container with nothing left is no key any more (and keeps no TTL), as in Redis."""
        if table == "hashes" and key in self.known.complete:
            left = any(v is not None for v in self.known.fields.get(key, {}).values())
        else:
            left = self.db.execute(f"SELECT 1 FROM {table} WHERE key = ? LIMIT 1", (key,)).fetchone() is not None
        if not left:
            self._no_ttl(key)
            self.known.gone(key)

    def _is(self, key: str, kind: str) -> None:
        self.known.kinds[key] = kind

    def type(self, key: str) -> str:
        if not self.alive(key):
            return "none"
        known = self.known.kinds.get(key)
        if known is not None:
            return known
        kind = "none"
        for table, table_kind in DATA_TABLES:
            if self.db.execute(f"SELECT 1 FROM {table} WHERE key = ? LIMIT 1", (key,)).fetchone():
                kind = table_kind
                break
        else:  # a stream trimmed to nothing is still a stream
            if self.db.execute("SELECT 1 FROM stream_ends WHERE key = ?", (key,)).fetchone():
                kind = "stream"
        self.known.kinds[key] = kind
        return kind

    def exists(self, *keys: str) -> int:
        return sum(1 for key in keys if self.type(key) != "none")

    def delete(self, *keys: str) -> int:
        deleted = 0
        for key in keys:
            if self.type(key) != "none":
                deleted += 1
            self._drop(key)
        return deleted

    def expire_ms(self, key: str, ms: int) -> int:
        if self.type(key) == "none":
            return 0
        self._ttl_at(key, self.ttl_now_ms + ms)
        return 1

    def expire(self, key: str, seconds: Value) -> int:
        return self.expire_ms(key, int(as_text(seconds)) * 1000)

    def pexpire(self, key: str, ms: Value) -> int:
        return self.expire_ms(key, int(as_text(ms)))

    def pttl(self, key: str) -> int:
        if self.type(key) == "none":
            return -2
        at_ms = self.known.expiry[key]  # alive() read it
        return -1 if at_ms is None else max(0, at_ms - self.ttl_now_ms)

    def ttl(self, key: str) -> int:
        ms = self.pttl(key)
        return ms if ms < 0 else (ms + 500) // 1000

    def keys(self, prefix: str = "") -> list[str]:
        """Every live key starting with ``prefix``, sorted."""
        found: set[str] = set()
        for table in ("strings", "hashes", "zsets", "sets", "stream_ends"):
            rows = self.db.execute(f"SELECT DISTINCT key FROM {table} WHERE key >= ? AND key < ?",
                                   (prefix, prefix + "\U0010ffff"))
            found.update(row[0] for row in rows)
        return sorted(k for k in found if self.alive(k))

    # -- strings ----------------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        if not self.alive(key):
            return None
        strings = self.known.strings
        if key in strings:
            return strings[key]
        if self.known.kinds.get(key, "string") != "string":
            return None
        row = self.db.execute("SELECT value FROM strings WHERE key = ?", (key,)).fetchone()
        value = strings[key] = None if row is None else bytes(row[0])
        return value

    def _put(self, key: str, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO strings (key, value) VALUES (?, ?)", (key, value))
        self.known.strings[key] = value
        self.known.kinds[key] = "string"

    def set(self, key: str, value: Value, *, ex_ms: int | None = None, nx: bool = False) -> bool:
        if nx and self.type(key) != "none":
            return False
        self.alive(key)
        if self.known.kinds.get(key) not in (None, "none", "string"):
            self._drop(key)  # SET replaces a key of any kind
        self._put(key, as_bytes(value))
        if ex_ms is None:
            self._no_ttl(key)
        else:
            self._ttl_at(key, self.ttl_now_ms + ex_ms)
        return True

    def incrby(self, key: str, amount: Value) -> int:
        total = int(self.get(key) or 0) + int(as_text(amount))
        self._put(key, str(total).encode())
        return total

    def decrby(self, key: str, amount: Value) -> int:
        return self.incrby(key, -int(as_text(amount)))

    # -- hashes -----------------------------------------------------------------------------------------

    def hget(self, key: str, field: Value) -> bytes | None:
        if not self.alive(key):
            return None
        name = as_text(field)
        known = self.known
        fields = known.fields.get(key)
        if fields is not None and (name in fields or key in known.complete):
            return fields.get(name)
        if known.kinds.get(key, "hash") != "hash":
            return None
        found, any_field = self.db.execute(
            "SELECT (SELECT value FROM hashes WHERE key = ? AND field = ?), "
            "EXISTS (SELECT 1 FROM hashes WHERE key = ?)", (key, name, key)).fetchone()
        value = None if found is None else bytes(found)
        known.remember(key, name, value)
        if not any_field:
            known.complete.add(key)  # no field at all: every other is known absent too
        return value

    def hmget(self, key: str, *fields: Value) -> list[bytes | None]:
        return [self.hget(key, f) for f in fields]

    def hexists(self, key: str, field: Value) -> int:
        return 0 if self.hget(key, field) is None else 1

    def hgetall(self, key: str) -> dict[str, bytes]:
        if not self.alive(key):
            return {}
        rows = self.db.execute("SELECT field, value FROM hashes WHERE key = ? ORDER BY field", (key,))
        found = {field: bytes(value) for field, value in rows}
        self.known.fields[key] = dict(found)
        self.known.field_count += len(found)
        self.known.complete.add(key)
        return found

    def hkeys(self, key: str) -> list[str]:
        return list(self.hgetall(key))

    def hlen(self, key: str) -> int:
        return len(self.hgetall(key))

    def hset(self, key: str, field: Value, value: Value) -> int:
        added = self.hget(key, field) is None
        name, data = as_text(field), as_bytes(value)
        self.db.execute("INSERT OR REPLACE INTO hashes (key, field, value) VALUES (?, ?, ?)", (key, name, data))
        self.known.remember(key, name, data)
        self.known.kinds[key] = "hash"
        return int(added)

    def hsetnx(self, key: str, field: Value, value: Value) -> int:
        if self.hget(key, field) is not None:
            return 0
        return self.hset(key, field, value)

    def hincrby(self, key: str, field: Value, amount: Value) -> int:
        total = int(self.hget(key, field) or 0) + int(as_text(amount))
        self.hset(key, field, total)
        return total

    def hdel(self, key: str, *fields: Value) -> int:
        if not self.alive(key):
            return 0
        deleted = 0
        known = self.known.fields.get(key, {})
        for field in fields:
            name = as_text(field)
            if name in known and known[name] is None:
                continue  # known absent
            deleted += self.db.execute("DELETE FROM hashes WHERE key = ? AND field = ?", (key, name)).rowcount
            known.pop(name, None)  # mostly a finished call's id, not read again: forgotten, not kept as absent
        if deleted:
            self._emptied("hashes", key)
        return deleted

    # -- sorted sets (scores are whole ms wherever the scripts keep them) --------------------------------

    def zadd(self, key: str, score: Value, member: Value, *, xx: bool = False) -> int:
        exists = self.zscore(key, member) is not None
        if xx and not exists:
            return 0
        self.db.execute("INSERT OR REPLACE INTO zsets (key, member, score) VALUES (?, ?, ?)",
                        (key, as_text(member), float(as_text(score))))
        self._is(key, "zset")
        return 0 if exists else 1

    def zscore(self, key: str, member: Value) -> float | None:
        if not self.alive(key):
            return None
        row = self.db.execute("SELECT score FROM zsets WHERE key = ? AND member = ?", (key, as_text(member))).fetchone()
        return None if row is None else float(row[0])

    def zcard(self, key: str) -> int:
        if not self.alive(key):
            return 0
        return int(self.db.execute("SELECT count(*) FROM zsets WHERE key = ?", (key,)).fetchone()[0])

    def zrem(self, key: str, *members: Value) -> int:
        if not self.alive(key):
            return 0
        deleted = 0
        for member in members:
            deleted += self.db.execute("DELETE FROM zsets WHERE key = ? AND member = ?",
                                       (key, as_text(member))).rowcount
        if deleted:
            self._emptied("zsets", key)
        return deleted

    def zrange(self, key: str, start: int, stop: int, *, reverse: bool = False) -> list[tuple[str, float]]:
        """Members ``start``..``stop`` (inclusive, negative from the end) by (score, member), with scores."""
        if not self.alive(key):
            return []
        if start < 0 or stop < 0:
            card = self.zcard(key)
            start, stop = (max(0, card + start) if start < 0 else start), (card + stop if stop < 0 else stop)
        if stop < start:
            return []
        order = "DESC" if reverse else "ASC"
        rows = self.db.execute(f"SELECT member, score FROM zsets WHERE key = ? ORDER BY score {order}, member {order} "
                               "LIMIT ? OFFSET ?", (key, stop - start + 1, start))
        return [(member, float(score)) for member, score in rows]

    def _score_range(self, low: Value, high: Value) -> tuple[str, tuple[float, float]]:
        (lo, lo_x), (hi, hi_x) = _bound(low), _bound(high)
        return f"score {'>' if lo_x else '>='} ? AND score {'<' if hi_x else '<='} ?", (lo, hi)

    def zrangebyscore(self, key: str, low: Value, high: Value, offset: int = 0, count: int = -1) -> list[str]:
        if not self.alive(key):
            return []
        where, bounds = self._score_range(low, high)
        rows = self.db.execute(f"SELECT member FROM zsets WHERE key = ? AND {where} ORDER BY score, member "
                               "LIMIT ? OFFSET ?", (key, *bounds, count, offset))
        return [row[0] for row in rows]

    def zcount(self, key: str, low: Value, high: Value) -> int:
        return len(self.zrangebyscore(key, low, high))

    def zremrangebyscore(self, key: str, low: Value, high: Value) -> int:
        if not self.alive(key):
            return 0
        where, bounds = self._score_range(low, high)
        deleted = self.db.execute(f"DELETE FROM zsets WHERE key = ? AND {where}", (key, *bounds)).rowcount
        if deleted:
            self._emptied("zsets", key)
        return int(deleted)

    def zremrangebyrank(self, key: str, start: int, stop: int) -> int:
        """Remove members ``start``..``stop`` by (score, member) rank (inclusive, negative from the end)."""
        doomed = [member for member, _ in self.zrange(key, start, stop)]
        return self.zrem(key, *doomed) if doomed else 0

    # -- sets -------------------------------------------------------------------------------------------

    def sadd(self, key: str, *members: Value) -> int:
        self.alive(key)
        added = sum(self.db.execute("INSERT OR IGNORE INTO sets (key, member) VALUES (?, ?)",
                                    (key, as_text(m))).rowcount for m in members)
        if members:
            self._is(key, "set")
        return added

    def smembers(self, key: str) -> builtins.set[str]:
        if not self.alive(key):
            return set()
        return {row[0] for row in self.db.execute("SELECT member FROM sets WHERE key = ?", (key,))}

    def srem(self, key: str, *members: Value) -> int:
        if not self.alive(key):
            return 0
        removed = sum(self.db.execute("DELETE FROM sets WHERE key = ? AND member = ?", (key, as_text(m))).rowcount
                      for m in members)
        if removed:
            self._emptied("sets", key)
        return removed

    # -- streams (entry ids ``ms-seq`` from the transaction's clock, as Redis makes them) -------------------

    def xadd(self, key: str, fields: Sequence[Value], maxlen: int | None = None, entry_id: str = "*") -> str:
        """Append an entry (``fields``: field, value, ...) under a new id (or ``entry_id``, which must be
        above the stream's last); with ``maxlen``, keep about the latest that many."""
        self.alive(key)
        ends = self.known.ends
        if key in ends:
            end = ends[key]
        else:
            row = self.db.execute("SELECT ms, seq, pos FROM stream_ends WHERE key = ?", (key,)).fetchone()
            end = None if row is None else (row[0], row[1], row[2])
        last_ms, last_seq, last_pos = end if end is not None else (0, -1, 0)
        if entry_id != "*":
            ms, seq = _entry_id(entry_id, 0)
            if (ms, seq) <= (last_ms, last_seq):
                raise ValueError(f"XADD {key} {entry_id}: the id is not above the stream's last entry")
        else:
            ms, seq = (last_ms, last_seq + 1) if self.now_ms <= last_ms else (self.now_ms, 0)
        pos = last_pos + 1
        self.db.execute("INSERT INTO streams (key, pos, ms, seq, fields) VALUES (?, ?, ?, ?, ?)",
                        (key, pos, ms, seq, json.dumps([as_text(v) for v in fields])))
        self.db.execute("INSERT OR REPLACE INTO stream_ends (key, ms, seq, pos) VALUES (?, ?, ?, ?)",
                        (key, ms, seq, pos))
        ends[key] = (ms, seq, pos)
        self._is(key, "stream")
        if maxlen is not None and pos % TRIM_SLACK == 0:
            self.db.execute("DELETE FROM streams WHERE key = ? AND pos <= ?", (key, pos - maxlen))
        return f"{ms}-{seq}"

    def xrange(self, key: str, low: str = "-", high: str = "+", count: int = -1,
               *, reverse: bool = False) -> list[tuple[str, list[str]]]:
        """Entries between two ids (``-``/``+``: either end; ``(id``: that id excluded), oldest first (newest
        first if ``reverse``)."""
        if not self.alive(key):
            return []
        lo = (-1, -1) if low == "-" else _entry_id(low.removeprefix("("), 0)
        hi = (2**62, 2**62) if high == "+" else _entry_id(high.removeprefix("("), 2**62)
        if low.startswith("("):
            lo = (lo[0], lo[1] + 1)
        if high.startswith("("):
            hi = (hi[0], hi[1] - 1)
        order = "DESC" if reverse else "ASC"
        rows = self.db.execute(
            f"SELECT ms, seq, fields FROM streams WHERE key = ? AND (ms > ? OR (ms = ? AND seq >= ?)) "
            f"AND (ms < ? OR (ms = ? AND seq <= ?)) ORDER BY pos {order} LIMIT ?",
            (key, lo[0], lo[0], lo[1], hi[0], hi[0], hi[1], count))
        return [(f"{ms}-{seq}", json.loads(fields)) for ms, seq, fields in rows]

    def xtrim_minid(self, key: str, min_ms: int, min_seq: int = 0) -> int:
        """Delete the entries whose id is below ``min_ms-min_seq`` (``XTRIM key MINID``)."""
        if not self.alive(key):
            return 0
        return int(self.db.execute("DELETE FROM streams WHERE key = ? AND (ms < ? OR (ms = ? AND seq < ?))",
                                   (key, min_ms, min_ms, min_seq)).rowcount)

    def xlen(self, key: str) -> int:
        if not self.alive(key):
            return 0
        return int(self.db.execute("SELECT count(*) FROM streams WHERE key = ?", (key,)).fetchone()[0])


def _entry_id(text: str, default_seq: int) -> tuple[int, int]:
    ms, _, seq = text.partition("-")
    return int(ms), int(seq) if seq else default_seq


def sweep(db: sqlite3.Connection, now_ms: int, limit: int = 500, known: Known | None = None) -> int:
    """Delete up to ``limit`` expired keys (call inside a writing transaction); returns how many."""
    expired = [row[0] for row in db.execute("SELECT key FROM expiry WHERE at_ms <= ? LIMIT ?", (now_ms, limit))]
    tx = Tx(db, now_ms, writes=True, known=known)
    for key in expired:
        tx._drop(key)
    return len(expired)


def pairs(values: Iterable[str]) -> dict[str, str]:
    flat = list(values)
    return dict(zip(flat[::2], flat[1::2], strict=True))
