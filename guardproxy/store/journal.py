"""The settlement journal: charges the store could not take, kept on local disk until it can.

When Redis cannot be reached (or does not answer in time), a settlement is appended to this
process's journal file and fsynced before the call ends, so neither a restart nor ``kill -9`` loses
it. The ledger replays the journal at start-up and drains it in the background as soon as the store
answers again; replays are exactly-once because the settle script ignores an id it already settled.

Layout: one file per process, ``<dir>/journal-<pid>-<random>.jsonl``, one JSON settlement per line.
The owning process holds an exclusive ``flock`` on its file for its whole life, so files of live
processes (``--workers``, or several apps in one process) are never touched by another, and the lock
of a dead process (even one killed with -9) is released by the kernel: any process that can take
that lock adopts the file's entries into its own journal, then deletes it. An entry already applied
before a crash may be replayed again; the store's settled-marker makes that a no-op.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson

from guardproxy.budget.records import Reservation
from guardproxy.errors import StoreUnavailable
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.journal")

_PATTERN = "journal-*.jsonl"


@dataclass(frozen=True)
class Entry:
    """One settlement waiting for the store: release ``reservation``, charge ``charge``, log ``record``."""

    reservation: Reservation
    charge: Micros
    record: Mapping[str, str | int] | None = None

    def to_line(self) -> bytes:
        r = self.reservation
        return orjson.dumps({
            "id": r.id, "tenant": r.tenant, "day": r.day, "month": r.month, "amount": r.amount, "job": r.job,
            "charge": self.charge, "record": dict(self.record) if self.record is not None else None,
        }) + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Entry:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) for a line that is not an entry."""
        data: dict[str, Any] = orjson.loads(line)
        record = data.get("record")
        reservation = Reservation(str(data["id"]), str(data["tenant"]), str(data["day"]), str(data["month"]),
                                  int(data["amount"]), str(data.get("job") or ""))
        return cls(reservation, int(data["charge"]), dict(record) if isinstance(record, dict) else None)


class Journal:
    """This process's journal file and the entries still waiting for the store.

    ``on_pending`` hears the number of waiting entries whenever it changes (for the gauge).
    """

    def __init__(self, directory: Path, on_pending: Callable[[int], None] | None = None) -> None:
        self.directory = directory
        self.on_pending = on_pending
        self._fd: int | None = None
        self.path: Path | None = None
        self._pending: dict[int, Entry] = {}
        self._queue: list[Entry] = []
        self._numbers = itertools.count()
        self._write_lock = anyio.Lock()
        self._drain_lock = anyio.Lock()
        #: The last drain stopped because the store was unreachable.
        self.stalled = False

    def __len__(self) -> int:
        return len(self._pending)

    async def append(self, entry: Entry) -> None:
        """Write ``entry`` durably (fsynced) before returning. Concurrent appends share one fsync."""
        self._queue.append(entry)
        async with self._write_lock:
            if not self._queue:
                return  # an earlier holder of the lock wrote it
            batch, self._queue = self._queue, []
            was_empty = not self._pending
            await anyio.to_thread.run_sync(self._write, [e.to_line() for e in batch])
            for e in batch:
                self._pending[next(self._numbers)] = e
            self.stalled = True
        if was_empty:
            log.error("journal: the store is unavailable; charges are kept on disk in %s until it is back",
                      self.path)
        self._changed()

    async def adopt_orphans(self) -> int:
        """Take over the journals of dead processes in the directory; returns the entries adopted."""
        adopted: list[Entry] = []
        async with self._write_lock:
            adopted = await anyio.to_thread.run_sync(self._adopt)
            for e in adopted:
                self._pending[next(self._numbers)] = e
        if adopted:
            log.warning("journal: adopted %d unwritten charge(s) left by stopped processes", len(adopted))
            self._changed()
        return len(adopted)

    async def drain(self, apply: Callable[[Entry], Awaitable[None]]) -> int:
        """Hand each waiting entry, oldest first, to ``apply`` until it raises ``StoreUnavailable``;
        returns how many were written. The file is emptied once nothing waits."""
        written = 0
        async with self._drain_lock:
            if not self._pending:
                return 0
            for number, entry in list(self._pending.items()):
                try:
                    await apply(entry)
                except StoreUnavailable:
                    self.stalled = True
                    break
                del self._pending[number]
                written += 1
            else:
                self.stalled = False
            if written:
                self._changed()
            if not self._pending:
                async with self._write_lock:
                    if not self._pending and not self._queue:
                        await anyio.to_thread.run_sync(self._truncate)
                log.warning("journal: drained: every kept charge is now written to the store (%d in this pass)",
                            written)
        return written

    def close(self) -> None:
        """Release this process's file (kept on disk when it still holds entries, else removed)."""
        if self._fd is None:
            return
        if not self._pending and not self._queue and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            log.error("journal: %d charge(s) still unwritten at shutdown; kept in %s for the next start",
                      len(self._pending), self.path)
        os.close(self._fd)
        self._fd = None

    # -- file operations (run in a worker thread) ---------------------------------------------------

    def _changed(self) -> None:
        if self.on_pending is not None:
            self.on_pending(len(self._pending))

    def _own_fd(self) -> int:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"journal-{os.getpid()}-{secrets.token_hex(6)}"
            # Locked under a name no other process adopts, then renamed: never seen unlocked.
            temporary = self.directory / f".{name}.tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self.path = self.directory / f"{name}.jsonl"
            os.rename(temporary, self.path)
            _fsync_directory(self.directory)
            self._fd = fd
        return self._fd

    def _write(self, lines: list[bytes]) -> None:
        fd = self._own_fd()
        data = b"".join(lines)
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)

    def _truncate(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)

    def _adopt(self) -> list[Entry]:
        if not self.directory.is_dir():
            return []
        adopted: list[Entry] = []
        for path in sorted(self.directory.glob(_PATTERN)):
            if path == self.path:
                continue
            fd = _lock_orphan(path)
            if fd is None:
                continue
            try:
                entries = _read_entries(fd, path)
                if entries:
                    # Into our own file first, durably; only then is the dead one removed.
                    self._write([e.to_line() for e in entries])
                # Removed while still locked, so no second adopter can read it.
                path.unlink(missing_ok=True)
                _fsync_directory(self.directory)
            finally:
                os.close(fd)
            adopted.extend(entries)
        return adopted


def _lock_orphan(path: Path) -> int | None:
    """A locked descriptor of ``path`` if its owner is gone (its lock can be taken), else ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.stat(path).st_ino == os.fstat(fd).st_ino:
            return fd
    except (BlockingIOError, FileNotFoundError):
        pass  # a live process owns it, or another adopter removed it meanwhile
    os.close(fd)
    return None


def _read_entries(fd: int, path: Path) -> list[Entry]:
    with os.fdopen(os.dup(fd), "rb") as file:
        content = file.read()
    entries = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(Entry.from_line(line))
        except (ValueError, KeyError, TypeError):
            # Only a write cut by a crash leaves a partial line, and that append was never acknowledged.
            log.error("journal: %s line %d is not an entry; skipped", path, number)
    return entries


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
