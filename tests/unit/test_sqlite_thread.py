"""The SQLite store's thread (``_StoreThread``): what ``run_in_executor`` gave the store, kept.

With ``synchronous=full`` (each commit syncs the disk) every transaction runs on the client's one
thread (with ``normal`` they run on the event loop: tests/unit/test_sqlite_loop.py).
Its reply (or its exception) reaches the waiting event loop; a caller cancelled before its transaction
started does not run it; a caller whose loop is gone does not stop the thread for the next ones.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from guardproxy.store.sqlite import SqliteClient


def test_replies_and_exceptions_reach_the_caller_from_one_thread(tmp_path: Path) -> None:
    client = SqliteClient(tmp_path / "spend.db", synchronous="full")
    threads: set[int] = set()

    def note(_tx: object) -> int:
        threads.add(threading.get_ident())
        return 7

    async def main() -> None:
        try:
            assert await asyncio.gather(*(client.transact(note, writes=False) for _ in range(20))) == [7] * 20
            with pytest.raises(ZeroDivisionError):
                await client.transact(lambda _tx: 1 // 0, writes=False)
            assert await client.set("gp:k", "v") is True  # the thread survived the error
            assert await client.get("gp:k") == b"v"
        finally:
            await client.aclose()

    asyncio.run(main())
    assert len(threads) == 1 and threading.get_ident() not in threads
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(client.get("gp:k"))


def test_a_caller_cancelled_before_its_transaction_started_does_not_run_it(tmp_path: Path) -> None:
    client = SqliteClient(tmp_path / "spend.db", synchronous="full")
    started, release = threading.Event(), threading.Event()

    def hold(_tx: object) -> None:
        started.set()
        release.wait(10)

    async def main() -> None:
        try:
            first = asyncio.ensure_future(client.transact(hold, writes=False))
            await asyncio.to_thread(started.wait, 10)
            second = asyncio.ensure_future(client.set("gp:cancelled", "1"))
            await asyncio.sleep(0.05)  # queued behind the first
            second.cancel()
            release.set()
            await first
            with pytest.raises(asyncio.CancelledError):
                await second
            assert await client.get("gp:cancelled") is None
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_caller_whose_loop_is_gone_does_not_stop_the_thread(tmp_path: Path) -> None:
    client = SqliteClient(tmp_path / "spend.db", synchronous="full")
    started, release = threading.Event(), threading.Event()

    def hold(_tx: object) -> str:
        started.set()
        release.wait(10)
        return "late"

    async def leave_it_running() -> None:
        caller = asyncio.ensure_future(client.transact(hold, writes=False))
        await asyncio.to_thread(started.wait, 10)
        assert not caller.done()

    asyncio.run(leave_it_running())  # cancels the caller and closes its loop while the job runs
    release.set()

    async def next_caller() -> bytes | None:
        try:
            await client.set("gp:after", "ok")
            value: bytes | None = await client.get("gp:after")
            return value
        finally:
            await client.aclose()

    assert asyncio.run(next_caller()) == b"ok"
