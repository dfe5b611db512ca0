"""The settlement journal on a real filesystem: durable appends, drains, and adopting dead processes' files."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guardproxy.budget.records import Reservation
from guardproxy.errors import StoreUnavailable
from guardproxy.store.journal import Entry, Journal

pytestmark = pytest.mark.anyio


def entry(i: int, charge: int = 100) -> Entry:
    record: dict[str, str | int] = {"request_id": f"req_{i}", "outcome": "completed", "cost_micros": charge}
    return Entry(Reservation(f"r{i}", "acme", "2026-11-22", "2026-11", 500), charge, record)


def lines(path: Path) -> list[Entry]:
    return [Entry.from_line(line) for line in path.read_bytes().splitlines() if line.strip()]


class Store:
    """Takes entries until told it is down."""

    def __init__(self) -> None:
        self.written: list[Entry] = []
        self.down = False

    async def apply(self, e: Entry) -> None:
        if self.down:
            raise StoreUnavailable("down")
        self.written.append(e)


def test_entry_round_trips() -> None:
    e = entry(1)
    assert Entry.from_line(e.to_line()) == e
    release = Entry(Reservation("x", "acme", "2026-11-22", "2026-11", 0), 0)
    assert Entry.from_line(release.to_line()) == release


async def test_appends_are_on_disk_when_append_returns_and_drain_empties_the_file(tmp_path: Path) -> None:
    seen: list[int] = []
    journal = Journal(tmp_path, seen.append)
    for i in range(3):
        await journal.append(entry(i))
    assert journal.path is not None
    assert lines(journal.path) == [entry(0), entry(1), entry(2)]
    assert len(journal) == 3 and seen[-1] == 3 and journal.stalled

    store = Store()
    assert await journal.drain(store.apply) == 3
    assert store.written == [entry(0), entry(1), entry(2)]
    assert len(journal) == 0 and seen[-1] == 0 and not journal.stalled
    assert journal.path.read_bytes() == b""  # emptied, still ours
    journal.close()
    assert not journal.path.exists()  # nothing waits: removed at shutdown


async def test_a_drain_stops_at_the_first_failure_and_resumes_in_order(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    for i in range(3):
        await journal.append(entry(i))
    store = Store()
    store.down = True
    assert await journal.drain(store.apply) == 0
    assert len(journal) == 3 and journal.stalled
    store.down = False
    await journal.append(entry(3))
    assert await journal.drain(store.apply) == 4
    assert [e.reservation.id for e in store.written] == ["r0", "r1", "r2", "r3"]
    journal.close()


async def test_unwritten_entries_stay_on_disk_at_shutdown_and_the_next_process_adopts_them(tmp_path: Path) -> None:
    first = Journal(tmp_path)
    await first.append(entry(1))
    await first.append(entry(2))
    first.close()  # the store never came back
    assert first.path is not None and first.path.exists()

    second = Journal(tmp_path)
    assert await second.adopt_orphans() == 2
    assert not first.path.exists()
    assert second.path is not None and lines(second.path) == [entry(1), entry(2)]  # adopted durably
    store = Store()
    await second.drain(store.apply)
    assert store.written == [entry(1), entry(2)]
    second.close()


async def test_a_live_journal_is_never_adopted(tmp_path: Path) -> None:
    """Another process (or another app in this one) holds its lock: its entries are its own."""
    owner = Journal(tmp_path)
    await owner.append(entry(1))
    other = Journal(tmp_path)
    assert await other.adopt_orphans() == 0
    assert owner.path is not None and lines(owner.path) == [entry(1)]
    owner.close()
    other.close()


def test_the_journal_of_a_process_killed_with_sigkill_is_adopted(tmp_path: Path) -> None:
    """The kernel drops a dead process's lock, however it died; a torn last line is skipped."""
    code = (
        "import asyncio, os, sys\n"
        "from pathlib import Path\n"
        "from guardproxy.store.journal import Journal\n"
        "from tests.unit.test_journal import entry\n"
        "async def main():\n"
        "    j = Journal(Path(sys.argv[1]))\n"
        "    await j.append(entry(7))\n"
        "    os.write(j._own_fd(), b'{\"id\": \"torn')\n"
        "    print('ready', flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    adopter = Journal(tmp_path)
    store = Store()
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                             cwd=Path(__file__).parents[2])
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        assert asyncio.run(adopter.adopt_orphans()) == 0  # alive: not adopted
        child.kill()
        child.wait(timeout=10)
        assert asyncio.run(adopter.adopt_orphans()) == 1
        asyncio.run(adopter.drain(store.apply))
    finally:
        child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    assert store.written == [entry(7)]
    assert adopter.path is not None and [p.name for p in tmp_path.iterdir()] == [adopter.path.name]
    adopter.close()


def test_a_file_being_adopted_is_locked_until_removed(tmp_path: Path) -> None:
    """Lock semantics the adoption relies on: flock is per open file, even within one process."""
    path = tmp_path / "journal-1-x.jsonl"
    path.write_bytes(entry(1).to_line())
    a = os.open(path, os.O_RDONLY)
    b = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(a, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BlockingIOError):
            fcntl.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(a)
        os.close(b)


def test_an_entry_keeps_its_job_and_a_line_from_before_jobs_reads_as_none() -> None:
    e = Entry(Reservation("r1", "acme", "2026-11-22", "2026-11", 500, "WO-1"), 120, {"job": "WO-1"})
    assert Entry.from_line(e.to_line()) == e
    line = b'{"id":"r1","tenant":"acme","day":"2026-11-22","month":"2026-11","amount":5,"charge":1,"record":null}'
    assert Entry.from_line(line).reservation.job == ""
