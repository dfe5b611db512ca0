"""The settlement journal: charges the store could not take, kept on local disk until it can.

When Redis cannot be reached (or does not answer in time), a settlement is appended to this
process's journal file and fsynced before the call ends, so neither a restart nor ``kill -9`` loses
it. The ledger replays the journal at start-up and drains it in the background as soon as the store
answers again; replays are exactly-once because the settle script ignores an id it already settled.

Layout: one file per process, ``<dir>/journal2-<pid>-<random>.jsonl``, one JSON settlement per line.
The ``2`` is the format of the ids it holds (``<epoch>.<seq>``, whose exactly-once markers an earlier
settle script cannot read): a process of an earlier version globs ``journal-*.jsonl`` only, so during a
rolling upgrade it never adopts, and so never charges again, what this version journaled; this version
adopts both (an earlier version's ids are uuids, marked as before).
The owning process holds an exclusive ``flock`` on its file for its whole life, so files of live
processes (``--workers``, or several apps in one process) are never touched by another, and the lock
of a dead process (even one killed with -9) is released by the kernel: any process that can take
that lock adopts the file's entries into its own journal, then deletes it. An entry already applied
before a crash may be replayed again; the store's settled-marker makes that a no-op.

Running streams are checkpointed beside the file: ``<name>.checkpoint`` holds, for each stream still
relaying, the settlement of what it has relayed so far (rewritten about every second, atomically and
fsynced). Between two checkpoints, each stream's charge so far is appended to ``<name>.progress.<n>``
before each batch of frames is relayed (``progress``: one ``write`` into the page cache, no fsync; a
stream's first line in a file is its whole entry, the next ones its charge and completion tokens), and
each checkpoint starts a new progress file and removes the older ones once it is on disk. A process
killed mid-stream (SIGKILL, a crash, the OOM killer) thus leaves every relayed frame's charge to its
adopter, which settles, per stream, the largest charge found (after the dead process's own entries: a
settled id is never charged twice, so a stream that did settle before the crash costs nothing more).
A machine that loses power can lose what was relayed since the last checkpoint (at most a second).

A journal that cannot be written (a full disk, a read-only mount) never drops a charge: the entry is
kept in memory, retried on disk and in the store until one of them takes it, and ``writable`` says so
(the ledger then stops admitting calls the store could not charge either). A write that fails part
way (ENOSPC after some bytes) is cut back to the last acknowledged entry, so the next append starts
on a clean line; adoption also reads past a torn line to the entry joined to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson

from guardproxy.budget.levels import booked_caps, caps_booked
from guardproxy.budget.records import Reservation
from guardproxy.errors import StoreUnavailable
from guardproxy.types import Micros

log = logging.getLogger("guardproxy.journal")

#: This version's files, then an earlier version's (adopted; never written).
_PATTERNS = ("journal2-*.jsonl", "journal-*.jsonl")
#: The start of every entry's line (``Entry.to_line``): adoption finds an entry joined to a torn line by it.
_ENTRY_START = b'{"id":'
#: Room a write check asks of the disk: a few entries' worth (an entry is ~300-600 bytes).
PROBE_BYTES = 4096
#: How long a write check's verdict stands (``/readyz`` asks often; the background task every tick).
CHECK_EVERY_S = 1.0


@dataclass(frozen=True)
class Entry:
    """One settlement waiting for the store: release ``reservation``, charge ``charge``, log ``record``."""

    reservation: Reservation
    charge: Micros
    record: Mapping[str, str | int] | None = None

    def to_line(self) -> bytes:
        r = self.reservation
        line: dict[str, Any] = {
            "id": r.id, "tenant": r.tenant, "day": r.day, "month": r.month, "amount": r.amount, "job": r.job,
            "charge": self.charge, "record": dict(self.record) if self.record is not None else None,
        }
        if r.levels:  # a charge no admission booked: the caps it goes to (what settle needs of each)
            line["levels"] = booked_caps(r.levels)
        return orjson.dumps(line) + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> Entry:
        """Raises ``ValueError`` (or ``KeyError``/``TypeError``) for a line that is not an entry."""
        data: dict[str, Any] = orjson.loads(line)
        record = data.get("record")
        reservation = Reservation(str(data["id"]), str(data["tenant"]), str(data["day"]), str(data["month"]),
                                  int(data["amount"]), str(data.get("job") or ""), caps_booked(data.get("levels")))
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
        #: Numbers of the waiting entries that are in memory only: the file could not take them.
        self._unwritten: set[int] = set()
        self._numbers = itertools.count()
        self._write_lock = anyio.Lock()
        self._drain_lock = anyio.Lock()
        #: Bytes of our file that hold acknowledged entries; anything past it is a failed write's.
        self._good_bytes = 0
        #: The last drain stopped because the store was unreachable.
        self.stalled = False
        #: Why the journal cannot be written (the last write or check failed), else ``None``.
        self.problem: str | None = None
        self._checked_at = -CHECK_EVERY_S
        #: The progress file appended to now (``progress``), its number, and its descriptor once open.
        self._progress_number = 0
        self._progress_fd: int | None = None
        #: The streams whose whole entry the current progress file holds (the others' lines are short).
        self._progress_whole: set[str] = set()

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def writable(self) -> bool:
        """The last write (or write check) succeeded."""
        return self.problem is None

    @property
    def unwritten(self) -> int:
        """Waiting entries held in memory only (neither the store nor the file took them)."""
        return len(self._unwritten)

    async def append(self, entry: Entry) -> bool:
        """Write ``entry`` durably (fsynced) before returning ``True``. Concurrent appends share one
        fsync. ``False``: the file cannot take it (``problem`` says why); it is kept in memory and
        retried (``check``, ``drain``) until the file or the store takes it."""
        self._queue.append(entry)
        async with self._write_lock:
            if not self._queue:
                return entry not in self._unwritten_entries()  # an earlier holder of the lock wrote it
            batch, self._queue = self._queue, []
            was_empty = not self._pending
            numbers = [next(self._numbers) for _ in batch]
            for number, e in zip(numbers, batch, strict=True):
                self._pending[number] = e
            written = await self._write_or_keep(numbers)
            self.stalled = True
        if was_empty:
            log.error("journal: the store is unavailable; charges are kept on disk in %s until it is back",
                      self.path)
        self._changed()
        return written

    def _unwritten_entries(self) -> list[Entry]:
        return [self._pending[n] for n in self._unwritten if n in self._pending]

    async def _write_or_keep(self, numbers: list[int]) -> bool:
        """Write the waiting entries ``numbers`` (under the write lock); on failure keep them in memory."""
        lines = [self._pending[n].to_line() for n in numbers if n in self._pending]
        try:
            await anyio.to_thread.run_sync(self._write, lines)
        except OSError as exc:
            self._unwritten.update(n for n in numbers if n in self._pending)
            self._failed(exc)
            return False
        self._unwritten.difference_update(numbers)
        self._recovered()
        return True

    def _failed(self, exc: OSError) -> None:
        problem = f"cannot write to {self.directory}: {exc.strerror or exc}"
        if self.problem is None:
            log.error("journal: %s; %d charge(s) the store has not taken are kept in memory only, and calls "
                      "are refused while the store cannot take a charge either", problem, len(self._unwritten))
        self.problem = problem

    def _recovered(self) -> None:
        if self.problem is not None:
            log.warning("journal: %s is writable again", self.directory)
        self.problem = None

    async def check(self, max_age_s: float = CHECK_EVERY_S) -> str | None:
        """Whether the journal can take a charge now: writes ``PROBE_BYTES`` past its entries and cuts
        them off again (at most once per ``max_age_s``); entries kept in memory are written once it
        can. Returns ``problem``."""
        now = time.monotonic()
        if now - self._checked_at < max_age_s:
            return self.problem
        self._checked_at = now
        async with self._write_lock:
            try:
                await anyio.to_thread.run_sync(self._probe)
            except OSError as exc:
                self._failed(exc)
                return self.problem
            if self._unwritten:
                if not await self._write_or_keep(sorted(self._unwritten)):
                    return self.problem
                log.warning("journal: the charges kept in memory are now on disk in %s", self.path)
                self._changed()
            self._recovered()
        return self.problem

    def progress(self, entry: Entry, *, only_completion: bool = False) -> bool:
        """Note a running stream's charge so far before it relays more: appended to the current progress
        file, in the calling thread (one ``write`` into the page cache, a few microseconds; no fsync), so
        that it survives the process, not the machine. ``only_completion``: nothing but its charge and
        its completion tokens changed since its last entry, which then takes a short line (its charge
        and completion tokens) once the file has its whole entry. ``False`` (and the journal marked
        unwritable) when it could not be written."""
        reservation_id = entry.reservation.id
        if only_completion and reservation_id in self._progress_whole:
            completion = int((entry.record or {}).get("completion_tokens", 0))
            data = orjson.dumps({"p": reservation_id, "charge": entry.charge, "completion_tokens": completion}) + b"\n"
        else:
            data = entry.to_line()
        try:
            if self._progress_fd is None:
                self._own_fd()  # the progress files are ours while our journal file is locked
                assert self.path is not None
                self._progress_fd = os.open(_progress_of(self.path, self._progress_number),
                                            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            if not data.startswith(b'{"p":'):
                self._progress_whole.add(reservation_id)
            while data:
                data = data[os.write(self._progress_fd, data):]
        except OSError as exc:
            self._failed(exc)
            return False
        return True

    def _next_progress(self) -> int:
        """Start a new progress file (opened at its first entry); returns the number of the first one
        the next checkpoint must keep."""
        if self._progress_fd is not None:
            os.close(self._progress_fd)
            self._progress_fd = None
        self._progress_number += 1
        self._progress_whole.clear()
        return self._progress_number

    async def checkpoint(self, entries: list[Entry]) -> None:
        """Replace this process's checkpoint with ``entries`` (the running streams' charges so far),
        durably; an empty list removes it. The progress files written before ``entries`` were taken are
        removed once it is on disk (call it right after taking them, with no await in between). A
        failure is logged and marks the journal unwritable."""
        lines = [e.to_line() for e in entries]
        keep_from = self._next_progress()
        async with self._write_lock:
            try:
                await anyio.to_thread.run_sync(self._write_checkpoint, lines, keep_from)
            except OSError as exc:
                self._failed(exc)

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
                self._unwritten.discard(number)
                written += 1
            else:
                self.stalled = False
            if written:
                self._changed()
            if not self._pending:
                async with self._write_lock:
                    if not self._pending and not self._queue:
                        with contextlib.suppress(OSError):  # then emptied at the next drain
                            await anyio.to_thread.run_sync(self._truncate)
                log.warning("journal: drained: every kept charge is now written to the store (%d in this pass)",
                            written)
        return written

    def close(self) -> None:
        """Release this process's file (kept on disk when it still holds entries, else removed)."""
        for entry in self._unwritten_entries():
            # Nowhere left to keep it: the log is the last place an operator can recover it from.
            log.error("journal: charge lost at shutdown (neither the store nor %s took it): %s",
                      self.directory, entry.to_line().decode().strip())
        if self._fd is None:
            return
        if self._progress_fd is not None:
            os.close(self._progress_fd)
            self._progress_fd = None
        checkpointed = self.path is not None and (
            _checkpoint_of(self.path).exists() or bool(_progress_files(self.path)))
        if not self._pending and not self._queue and not checkpointed and self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        elif len(self._pending) > len(self._unwritten):
            log.error("journal: %d charge(s) still unwritten at shutdown; kept in %s for the next start",
                      len(self._pending) - len(self._unwritten), self.path)
        os.close(self._fd)
        self._fd = None

    # -- file operations (run in a worker thread) ---------------------------------------------------

    def _changed(self) -> None:
        if self.on_pending is not None:
            self.on_pending(len(self._pending))

    def _own_fd(self) -> int:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            name = f"journal2-{os.getpid()}-{secrets.token_hex(6)}"
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
        """Append ``lines`` and fsync; on failure, cut the file back to its acknowledged entries (a
        partial line left behind would join the next append's line) and raise."""
        fd = self._own_fd()
        data = b"".join(lines)
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError:
            self._cut_back(fd)
            raise
        self._good_bytes = os.fstat(fd).st_size

    def _probe(self) -> None:
        fd = self._own_fd()
        try:
            # Spaces and a newline: a blank line, skipped by adoption should a crash leave it.
            os.write(fd, b" " * (PROBE_BYTES - 1) + b"\n")
        finally:
            self._cut_back(fd)

    def _cut_back(self, fd: int) -> None:
        try:
            os.ftruncate(fd, self._good_bytes)
        except OSError as exc:  # the torn line stays; adoption reads past it to the next entry
            log.error("journal: could not cut %s back after a failed write: %s", self.path, exc)

    def _write_checkpoint(self, lines: list[bytes], keep_from: int = 0) -> None:
        self._write_snapshot(lines)
        if self.path is not None:
            for number, path in _progress_files(self.path):
                if number < keep_from:
                    path.unlink(missing_ok=True)

    def _write_snapshot(self, lines: list[bytes]) -> None:
        if not lines:
            if self.path is not None and _checkpoint_of(self.path).exists():
                _checkpoint_of(self.path).unlink()
                _fsync_directory(self.directory)
            return
        self._own_fd()  # the checkpoint is ours while our journal file is locked
        assert self.path is not None
        target = _checkpoint_of(self.path)
        temporary = self.directory / f".{target.name}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            data = b"".join(lines)
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        except OSError:
            os.close(fd)
            temporary.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(temporary, target)
        _fsync_directory(self.directory)

    def _truncate(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.fsync(self._fd)
            self._good_bytes = 0

    def _adopt(self) -> list[Entry]:
        if not self.directory.is_dir():
            return []
        adopted: list[Entry] = []
        for path in sorted(p for pattern in _PATTERNS for p in self.directory.glob(pattern)):
            if path == self.path:
                continue
            fd = _lock_orphan(path)
            if fd is None:
                continue
            try:
                entries = _read_entries(fd, path)
                checkpoint = _checkpoint_of(path)
                settled = {e.reservation.id for e in entries}
                # After the dead process's own entries: a stream that settled before the crash keeps
                # its full charge (its checkpoint's replay is then ignored as already settled). Per
                # stream, the largest charge of its checkpoint and progress entries: what it relayed.
                progress = _progress_files(path)
                streams = _largest_charges(_read_checkpoint(checkpoint), [p for _, p in progress])
                entries += [e for i, e in streams.items() if i not in settled]
                if entries:
                    # Into our own file first, durably; only then is the dead one removed.
                    try:
                        self._write([e.to_line() for e in entries])
                    except OSError as exc:
                        log.error("journal: cannot adopt %s yet (%s); it stays for a later try", path, exc)
                        continue
                # Removed while still locked, so no second adopter can read it.
                checkpoint.unlink(missing_ok=True)
                for _, progress_path in progress:
                    progress_path.unlink(missing_ok=True)
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
        entry = _entry_in(line)
        if entry is None:
            # Only a write cut by a crash leaves a partial line, and that append was never acknowledged.
            log.error("journal: %s line %d is not an entry; skipped", path, number)
        else:
            entries.append(entry)
    return entries


def _checkpoint_of(path: Path) -> Path:
    return path.with_suffix(".checkpoint")


def _progress_of(path: Path, number: int) -> Path:
    return path.with_suffix(f".progress.{number}")


def _progress_files(path: Path) -> list[tuple[int, Path]]:
    """The progress files of the journal ``path``, by number."""
    found = []
    for candidate in path.parent.glob(f"{path.stem}.progress.*"):
        number = candidate.name.rpartition(".")[2]
        if number.isdigit():
            found.append((int(number), candidate))
    return sorted(found)


def _largest_charges(checkpointed: list[Entry], progress: list[Path]) -> dict[str, Entry]:
    """Per stream, its entry of largest charge among its checkpoint's and its progress files' (read in
    order: a short line takes the stream's last whole entry, with its charge and completion tokens)."""
    last: dict[str, Entry] = {}
    largest: dict[str, Entry] = {}

    def seen(e: Entry) -> None:
        last[e.reservation.id] = e
        known = largest.get(e.reservation.id)
        if known is None or e.charge >= known.charge:
            largest[e.reservation.id] = e

    for checkpoint_entry in checkpointed:
        seen(checkpoint_entry)
    for path in progress:
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            continue
        for line in content.splitlines():
            if line.startswith(b'{"p":'):
                try:
                    short = orjson.loads(line)
                    whole = last[str(short["p"])]
                    charge, completion = int(short["charge"]), int(short["completion_tokens"])
                except (ValueError, KeyError, TypeError):
                    continue  # torn by a failed write, or its stream's whole entry is missing
                record = {**(whole.record or {}), "completion_tokens": completion, "cost_micros": charge}
                seen(Entry(whole.reservation, charge, record))
            elif line.strip():
                entry = _entry_in(line)
                if entry is not None:
                    seen(entry)
    return largest


def _read_checkpoint(path: Path) -> list[Entry]:
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        return []
    entries = [_entry_in(line) for line in content.splitlines() if line.strip()]
    return [e for e in entries if e is not None]


def _entry_in(line: bytes) -> Entry | None:
    """The entry on ``line``; for a torn write joined to the next entry's line, that entry."""
    start = 0
    while start >= 0:
        try:
            return Entry.from_line(line[start:])
        except (ValueError, KeyError, TypeError):
            start = line.find(_ENTRY_START, start + 1)
    return None


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
