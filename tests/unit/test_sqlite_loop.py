"""The SQLite store's transactions on the event loop, and what a connection knows between them.

With ``synchronous=normal`` a transaction runs on the event loop's own connection (a commit syncs
nothing, so it costs only its CPU); while another connection holds the file's write lock it is tried
again after short pauses, and the loop keeps serving. The writing transactions of one turn of the loop
share one commit, each whole and in turn, a failing one alone. Between its transactions a connection keeps
what it read and wrote (``Known``) for as long as no other connection commits: these tests change the
file behind its back (another client, another process's plain sqlite3 connection, a rolled-back
transaction, an expired TTL) and check that every read is the file's.
"""

from __future__ import annotations

import asyncio
import sqlite3
import struct
import threading
from pathlib import Path

import pytest

from guardproxy.budget.records import Reservation
from guardproxy.store.redis import BudgetStore
from guardproxy.store.sqlite import SqliteClient
from guardproxy.store.sqlite_data import Known, Tx


def test_a_transaction_runs_on_the_loop_s_thread(tmp_path: Path) -> None:
    client = SqliteClient(tmp_path / "spend.db")
    threads: set[int] = set()

    def note(tx: Tx) -> int:
        threads.add(threading.get_ident())
        return tx.incrby("gp:n", 1)

    async def main() -> list[int]:
        try:
            return list(await asyncio.gather(*(client.transact(note, writes=True) for _ in range(5))))
        finally:
            await client.aclose()

    assert sorted(asyncio.run(main())) == [1, 2, 3, 4, 5]
    assert threads == {threading.get_ident()}


def test_a_write_meeting_another_connection_s_lock_waits_and_the_loop_keeps_serving(
        tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    client = SqliteClient(path)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    async def main() -> None:
        try:
            await client.set("gp:k", "before")  # the file and its schema exist
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # another process's writer holds the lock
            stop = asyncio.Event()
            ticking = asyncio.create_task(ticker(stop))
            write = asyncio.create_task(client.set("gp:k", "after"))
            await asyncio.sleep(0.3)
            assert not write.done()  # it waits for the lock...
            held_ticks = ticks
            assert held_ticks >= 10  # ...and the loop served the ticker meanwhile (60 ticks if idle)
            other.execute("ROLLBACK")
            other.close()
            assert await asyncio.wait_for(write, 5) is True
            stop.set()
            await ticking
            assert await client.get("gp:k") == b"after"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_read_follows_what_another_client_committed(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    first, second = SqliteClient(path), SqliteClient(path)

    async def main() -> None:
        try:
            assert await first.incrby("gp:spent", 5) == 5
            await first.hset("gp:budget", "hard_day", "100")
            assert await first.hget("gp:budget", "hard_day") == b"100"  # known to the first now
            assert await second.incrby("gp:spent", 7) == 12
            await second.hset("gp:budget", "hard_day", "50")
            await second.delete("gp:gone")
            await first.set("gp:gone", "x")
            await second.delete("gp:gone")
            # every write below reads first: each must see the other client's commits
            assert await first.incrby("gp:spent", 1) == 13
            assert await first.hincrby("gp:budget", "hard_day", 1) == 51
            assert await first.set("gp:gone", "y", nx=True) is True
        finally:
            await first.aclose()
            await second.aclose()

    asyncio.run(main())


def test_a_write_by_a_plain_sqlite_connection_is_seen(tmp_path: Path) -> None:
    """Another program (``guardproxy store copy``, an operator's sqlite3 shell) editing the file."""
    path = tmp_path / "spend.db"
    client = SqliteClient(path)

    async def main() -> None:
        try:
            assert await client.incrby("gp:spent", 5) == 5
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("UPDATE strings SET value = ? WHERE key = 'gp:spent'", (b"40",))
            other.close()
            assert await client.incrby("gp:spent", 2) == 42
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_rolled_back_transaction_leaves_nothing_known(tmp_path: Path) -> None:
    client = SqliteClient(tmp_path / "spend.db")

    def write_then_fail(tx: Tx) -> None:
        tx.incrby("gp:spent", 100)
        tx.hset("gp:budget", "hard_day", "1")
        raise ValueError("the script failed after writing")

    async def main() -> None:
        try:
            await client.incrby("gp:spent", 5)
            await client.hset("gp:budget", "hard_day", "9")
            with pytest.raises(ValueError, match="after writing"):
                await client.transact(write_then_fail, writes=True)
            assert await client.incrby("gp:spent", 0) == 5
            assert await client.hincrby("gp:budget", "hard_day", 0) == 9
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_known_key_expires_on_time(tmp_path: Path) -> None:
    now = [1_000_000.0]
    client = SqliteClient(tmp_path / "spend.db", clock=lambda: now[0])

    async def main() -> None:
        try:
            await client.set("gp:hold", "5", ex=10)
            assert await client.incrby("gp:hold", 1) == 6  # known, TTL kept
            now[0] += 9.9
            assert await client.get("gp:hold") == b"6"
            now[0] += 0.2
            assert await client.get("gp:hold") is None
            assert await client.incrby("gp:hold", 1) == 1  # a fresh key, no TTL
            assert await client.ttl("gp:hold") == -1
        finally:
            await client.aclose()

    asyncio.run(main())


def test_known_forgets_when_another_connection_committed_or_it_grew_past_its_limit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    db = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    db.execute("CREATE TABLE t (x)")
    known = Known()
    known.follow(db)
    known.strings["gp:a"] = b"1"
    known.follow(db)
    assert known.strings == {"gp:a": b"1"}  # nobody else committed
    other = sqlite3.connect(tmp_path / "k.db", isolation_level=None)
    other.execute("INSERT INTO t VALUES (1)")
    known.follow(db)
    assert known.strings == {}
    monkeypatch.setattr(Known, "LIMIT", 3)
    for i in range(4):
        known.remember("gp:h", str(i), b"v")
    known.follow(db)
    assert known.fields == {} and known.field_count == 0
    other.close()
    db.close()


def log_frames(path: Path) -> int:
    """The frames in the WAL log (the WAL index header's ``mxFrame``; see tests/unit/test_sqlite_sync.py)."""
    return int(struct.unpack_from("=I", Path(f"{path}-shm").read_bytes(), 16)[0])


def test_the_writes_of_one_turn_of_the_loop_share_one_commit_each_whole_and_in_turn(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    client = SqliteClient(path, sync_every_s=3600.0)

    async def main() -> tuple[list[int], int, int]:
        try:
            await client.set("gp:warm", "1")  # the file made, its first checkpoint posted
            await asyncio.sleep(0.3)
            before = log_frames(path)
            replies = await asyncio.gather(*(client.incrby("gp:n", 1) for _ in range(40)))
            shared = log_frames(path) - before
            before = log_frames(path)
            for _ in range(10):
                await client.incrby("gp:m", 1)
            return list(replies), shared, log_frames(path) - before
        finally:
            await client.aclose()

    replies, shared, ten_alone = asyncio.run(main())
    assert sorted(replies) == list(range(1, 41))  # each increment whole, one after the other
    assert ten_alone >= 10  # a commit writes at least one frame
    assert shared < 10  # 40 transactions, one commit: the pages once


def test_a_failing_transaction_in_a_shared_commit_fails_alone(tmp_path: Path) -> None:
    client = SqliteClient(tmp_path / "spend.db")

    def write_then_fail(tx: Tx) -> None:
        tx.incrby("gp:a", 1000)
        raise ValueError("this script failed")

    async def main() -> None:
        try:
            outcomes = await asyncio.gather(
                client.incrby("gp:a", 1), client.transact(write_then_fail, writes=True), client.incrby("gp:a", 2),
                client.incrby("gp:b", 5), return_exceptions=True)
            assert outcomes[0] == 1 and outcomes[2] == 3 and outcomes[3] == 5  # the others ran again, in turn
            assert isinstance(outcomes[1], ValueError)
            assert await client.get("gp:a") == b"3" and await client.get("gp:b") == b"5"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_caller_cancelled_before_the_commit_writes_nothing(tmp_path: Path) -> None:
    client = SqliteClient(tmp_path / "spend.db")

    async def main() -> None:
        try:
            await client.set("gp:k", "0")
            kept = asyncio.ensure_future(client.incrby("gp:k", 1))
            dropped = asyncio.ensure_future(client.incrby("gp:k", 100))
            await asyncio.sleep(0)  # both queued for the next turn's commit
            dropped.cancel()
            assert await kept == 1
            assert await client.get("gp:k") == b"1"
        finally:
            await client.aclose()

    asyncio.run(main())


def test_reads_without_a_bound_and_long_pipelines_run_on_the_thread(tmp_path: Path) -> None:
    """A scan or a status page's long pipeline would hold the event loop for as long as the data is
    big; calls' own reads and writes are short and stay on the loop."""
    client = SqliteClient(tmp_path / "spend.db")
    threads: list[tuple[str, int]] = []

    async def main() -> None:
        try:
            await client.set("gp:a", "1")
            note = threading.get_ident
            await client.transact(lambda _t: threads.append(("short", note())), writes=False)
            await client.transact(lambda _t: threads.append(("scan", note())), writes=False, unbounded=True)
            assert await client.keys("gp:*") == [b"gp:a"]
            pipe = client.pipeline()
            for i in range(20):
                pipe.set(f"gp:p{i}", i)
            assert await pipe.execute() == [True] * 20
            assert await client.get("gp:p19") == b"19"
        finally:
            await client.aclose()

    asyncio.run(main())
    loop_thread = threading.get_ident()
    assert threads[0] == ("short", loop_thread)
    assert threads[1][0] == "scan" and threads[1][1] != loop_thread


def test_the_first_write_of_a_turn_commits_at_once_the_next_wait_for_the_turn_s_commit(tmp_path: Path) -> None:
    """A caller alone (concurrency 1) pays no loop turn waiting for others to share its commit."""
    client = SqliteClient(tmp_path / "spend.db")

    async def main() -> tuple[bool, bool]:
        try:
            await client.set("gp:warm", "1")
            await asyncio.sleep(0.01)  # a new turn
            turned = asyncio.Event()
            asyncio.get_running_loop().call_soon(turned.set)
            assert await client.incrby("gp:n", 1) == 1
            first_waited = turned.is_set()
            turned.clear()
            asyncio.get_running_loop().call_soon(turned.set)
            assert await client.incrby("gp:n", 1) == 2  # the same turn: it joins the next commit
            return first_waited, turned.is_set()
        finally:
            await client.aclose()

    assert asyncio.run(main()) == (False, True)


def committed_value(path: Path, key: str) -> bytes | None:
    """``key``'s string as another connection (another process) reads the file: only what is committed."""
    other = sqlite3.connect(path)
    try:
        row = other.execute("SELECT value FROM strings WHERE key = ?", (key,)).fetchone()
        return None if row is None else bytes(row[0])
    finally:
        other.close()


def settle_later(client: SqliteClient, key: str, amount: int) -> asyncio.Future[int]:
    """A settlement-like write asked for ``later`` (as the settle script is)."""
    return asyncio.ensure_future(client.transact(lambda tx: tx.incrby(key, amount), writes=True, later=True))


def test_a_settlement_commits_with_the_next_write_one_commit_for_both(tmp_path: Path) -> None:
    """At concurrency 1 a call's settlement and the next call's admission pay one commit, not two."""
    path = tmp_path / "spend.db"
    client = SqliteClient(path, sync_every_s=3600.0)

    async def main() -> tuple[int, int]:
        try:
            await client.set("gp:warm", "1")
            await asyncio.sleep(0.3)  # the first checkpoint done...
            await client.incrby("gp:admitted", 0)  # ...and the log restarted: it grows by commits only
            before = log_frames(path)
            await client.incrby("gp:spend", 5)
            await client.incrby("gp:admitted", 1)
            alone = log_frames(path) - before
            settled = settle_later(client, "gp:spend", 5)
            await asyncio.sleep(0)
            assert not settled.done() and committed_value(path, "gp:spend") == b"5"  # not yet committed
            before = log_frames(path)
            assert await client.incrby("gp:admitted", 1) == 2  # commits at once, the settlement with it
            shared = log_frames(path) - before
            assert committed_value(path, "gp:spend") == b"10"  # committed with it
            assert await settled == 10
            return alone, shared
        finally:
            await client.aclose()

    alone, shared = asyncio.run(main())
    assert shared < alone  # one commit's frames against two


def test_a_settlement_alone_commits_within_its_bound(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    client = SqliteClient(path)

    async def main() -> float:
        try:
            await client.set("gp:warm", "1")
            started = asyncio.get_running_loop().time()
            assert await asyncio.wait_for(settle_later(client, "gp:spend", 7), 1.0) == 7
            assert committed_value(path, "gp:spend") == b"7"  # its caller heard back after the commit
            return asyncio.get_running_loop().time() - started
        finally:
            await client.aclose()

    assert asyncio.run(main()) < 0.5


def test_a_read_or_a_scan_sees_the_settlements_asked_for_before_it(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    client = SqliteClient(path)

    async def main() -> None:
        try:
            await client.set("gp:warm", "1")
            settled = settle_later(client, "gp:spend", 3)
            await asyncio.sleep(0)
            assert await client.get("gp:spend") == b"3"  # a read on the loop: after the settlement's commit
            assert committed_value(path, "gp:spend") == b"3" and await settled == 3
            settle_later(client, "gp:other", 4)
            await asyncio.sleep(0)
            assert await client.keys("gp:o*") == [b"gp:other"]  # a scan on the thread: the same
        finally:
            await client.aclose()

    asyncio.run(main())


def test_closing_commits_the_settlements_waiting(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    client = SqliteClient(path)

    async def main() -> asyncio.Future[int]:
        await client.set("gp:warm", "1")
        settled = settle_later(client, "gp:spend", 9)
        await asyncio.sleep(0)
        await client.aclose()
        return settled

    assert asyncio.run(main()).result() == 9
    assert committed_value(path, "gp:spend") == b"9"


def test_the_settle_script_is_asked_for_later_and_its_caller_hears_back_once_committed(tmp_path: Path) -> None:
    path = tmp_path / "spend.db"
    store = BudgetStore(SqliteClient(path), "gp")
    key = store.keys("acme").spend_day("2026-12-07")

    async def main() -> None:
        try:
            await store.client.set("gp:warm", "1")
            settling = asyncio.ensure_future(store.settle(Reservation("r1", "acme", "2026-12-07", "2026-12", 0), 25))
            await asyncio.sleep(0)
            assert committed_value(path, key) is None  # waiting for the next transaction
            assert (await settling).applied  # its caller hears back once it is committed...
            assert committed_value(path, key) == b"25"  # ...within LATER_AT_MOST_S, alone
        finally:
            await store.aclose()

    asyncio.run(main())
