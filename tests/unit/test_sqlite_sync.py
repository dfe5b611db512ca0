"""The SQLite store with ``synchronous=normal`` syncs its log at least every ``sync_every_s`` of writes.

SQLite syncs a WAL log only when it checkpoints, which it does every 1,000 pages of log: at a few
calls a minute that could leave hours of charges unsynced, for a power cut to take. The store
checkpoints itself (on its thread) after the first writing commit ``sync_every_s`` after the last. Whether the log was
checkpointed is read, without touching it, from the WAL index (the ``-shm`` file; its layout is
SQLite's documented file format, https://www.sqlite.org/walformat.html): ``mxFrame``, the frames in
the log, and ``nBackfill``, those already copied into the file (a checkpoint syncs the log first).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import struct
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from guardproxy.store import sqlite as sqlite_store
from guardproxy.store.sqlite import SYNC_EVERY_COMMITS, SqliteClient

pytestmark = pytest.mark.anyio


def log_frames(path: Path) -> tuple[int, int]:
    """(frames in the log, frames checkpointed): the WAL index header's ``mxFrame`` (offset 16) and the
    checkpoint info's ``nBackfill`` (offset 96), native byte order."""
    shm = Path(f"{path}-shm").read_bytes()
    return struct.unpack_from("=I", shm, 16)[0], struct.unpack_from("=I", shm, 96)[0]


async def checkpointed(path: Path, within_s: float = 5.0) -> bool:
    """Whether every frame of the log went through a checkpoint, waiting up to ``within_s`` (the store's
    thread checkpoints after the commit, while the caller goes on)."""
    deadline = time.monotonic() + within_s
    while True:
        frames, copied = log_frames(path)
        if frames > 0 and copied == frames:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)


async def write_twice(client: SqliteClient, path: Path) -> None:
    await client.set("gp:first", "1")  # the first write checkpoints (nothing was synced yet)...
    if client.synchronous == "normal":
        assert await checkpointed(path)  # ...on the store's thread, soon after
    await client.incrby("gp:counter", 5)
    await asyncio.sleep(0.3)  # room for a checkpoint that should not happen to show itself


@contextlib.asynccontextmanager
async def kept_open(path: Path, **options: Any) -> AsyncIterator[SqliteClient]:
    """A client on ``path``, beside a connection that keeps the file open (closing the client's
    connection must not checkpoint)."""
    client = SqliteClient(path, **options)
    keeper = sqlite3.connect(path)
    keeper.execute("SELECT 1").fetchall()
    try:
        yield client
    finally:
        await client.aclose()
        keeper.close()


async def test_a_write_after_the_interval_checkpoints_the_log(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    async with kept_open(path, sync_every_s=0.0) as client:
        await write_twice(client, path)
        assert await checkpointed(path)  # everything committed went through a checkpoint
        assert await client.get("gp:counter") == b"5"


async def test_within_the_interval_the_log_waits_for_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    async with kept_open(path, sync_every_s=3600.0) as client:
        await write_twice(client, path)
        frames, copied = log_frames(path)
        # the first write checkpointed (so the second restarted the log); the second's frames wait
        assert frames > 0 and copied == 0


async def test_full_syncs_every_commit_and_does_not_checkpoint_itself(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    async with kept_open(path, synchronous="full", sync_every_s=0.0) as client:
        await write_twice(client, path)
        frames, copied = log_frames(path)
        assert frames > 0 and copied == 0


async def test_every_so_many_commits_checkpoint_the_log_however_soon(tmp_path: Path) -> None:
    """The event loop's connection does not checkpoint by itself (a checkpoint syncs the disk): the
    store asks its thread for one every ``SYNC_EVERY_COMMITS`` writing commits, so the log stays short
    and a power cut takes at most that many, even under load (where a second holds thousands)."""
    path = tmp_path / "spend.db"
    async with kept_open(path, sync_every_s=3600.0) as client:
        await write_twice(client, path)  # the first commit's checkpoint done, the clock's next in an hour
        frames, copied = log_frames(path)
        assert frames > 0 and copied == 0
        for _ in range(SYNC_EVERY_COMMITS - 1):  # with the second write: SYNC_EVERY_COMMITS since the first
            await client.incrby("gp:counter", 1)
        assert await checkpointed(path)
        assert await client.get("gp:counter") == str(5 + SYNC_EVERY_COMMITS - 1).encode()


def log_file_size(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


async def test_under_steady_writes_the_log_starts_over_and_stays_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread's passive checkpoints copy the log as far as it was when each began; the loop's writes
    never stop, so without a RESTART checkpoint the log would never start over and would grow with every
    commit (190 MB in 12 s of bench load)."""
    monkeypatch.setattr(sqlite_store, "RESTART_LOG_AT_FRAMES", 256)
    monkeypatch.setattr(sqlite_store, "LOG_SIZE_LIMIT", 256 * 4096)
    path = tmp_path / "spend.db"
    client = SqliteClient(path)
    largest = 0
    try:
        for i in range(6000):  # ~2 frames per commit: ~12,000 frames (48 MB) if it never started over
            await client.incrby(f"gp:{i % 400}", 1)
            if i % 100 == 0:
                largest = max(largest, log_file_size(path))
        largest = max(largest, log_file_size(path))
        assert int(await client.get("gp:0") or 0) == 15
    finally:
        await client.aclose()
    assert largest < 8 * 256 * 4096  # a few times the restart threshold, not the whole run's log
