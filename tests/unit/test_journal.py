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
from tests.helpers import entry

pytestmark = pytest.mark.anyio




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


def test_this_versions_journal_is_out_of_an_earlier_versions_sight_and_adopts_an_earlier_ones(
        tmp_path: Path) -> None:
    """A rolling upgrade: an earlier version adopts ``journal-*.jsonl`` only and its settle script knows
    nothing of ``<epoch>.<seq>`` markers, so it must never see this version's entries (it would charge
    them again); this version adopts an earlier version's file (uuid ids, marked as before)."""
    live = Journal(tmp_path)
    asyncio.run(live.append(entry(0)))
    assert live.path is not None and live.path.name.startswith("journal2-")
    assert not list(tmp_path.glob("journal-*.jsonl"))  # what an earlier version adopts
    (tmp_path / "journal2-2-dead.jsonl").write_bytes(live.path.read_bytes())  # this version's, dead
    asyncio.run(live.drain(Store().apply))
    live.close()
    (tmp_path / "journal-1-dead.jsonl").write_bytes(entry(1).to_line())  # an earlier version's, dead
    adopter = Journal(tmp_path)
    assert asyncio.run(adopter.adopt_orphans()) == 2
    store = Store()
    asyncio.run(adopter.drain(store.apply))
    assert sorted(e.reservation.id for e in store.written) == sorted([entry(0).reservation.id, entry(1).reservation.id])
    adopter.close()


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
        "from tests.helpers import entry\n"
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


# --- a journal that cannot be written --------------------------------------------------------------

# A child process whose file-size limit (RLIMIT_FSIZE) makes its journal "full" at ``limit`` bytes: a
# write crossing it is cut short (fewer bytes written), the next one fails with EFBIG, as on a full disk.
_FULL_DISK_CHILD = (
    "import asyncio, resource, sys\n"
    "from pathlib import Path\n"
    "from guardproxy.store.journal import Journal\n"
    "from tests.helpers import entry\n"
    "async def main():\n"
    "    j = Journal(Path(sys.argv[1]))\n"
    "    assert await j.append(entry(0))\n"
    "    limit = j.path.stat().st_size + len(entry(1).to_line()) // 2\n"
    "    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)\n"
    "    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))\n"
    "    print('first', await j.append(entry(1)), j.writable, j.unwritten, j.path.stat().st_size, flush=True)\n"
    "    print('check', await j.check(max_age_s=0) is None, flush=True)\n"
    "    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))\n"
    "    print('check', await j.check(max_age_s=0) is None, j.unwritten, flush=True)\n"
    "    assert await j.append(entry(2))\n"
    "    print('ready', flush=True)\n"
    "    await asyncio.sleep(60)\n"
    "asyncio.run(main())\n"
)


def test_a_write_cut_short_by_a_full_disk_leaves_no_torn_line_and_loses_no_entry(tmp_path: Path) -> None:
    """ENOSPC (here EFBIG, the same partial write) after some bytes: the file is cut back to its
    acknowledged entries, the entry waits in memory, and once the disk has room it is written with
    the next ones; the dead process's file then adopts whole, every line an entry."""
    child = subprocess.Popen([sys.executable, "-c", _FULL_DISK_CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                             cwd=Path(__file__).parents[2])
    try:
        assert child.stdout is not None
        first = child.stdout.readline().split()
        size_after_one = len(entry(0).to_line())
        # not written, not writable, kept in memory; the file holds exactly the first entry, no partial line
        assert first == [b"first", b"False", b"False", b"1", str(size_after_one).encode()]
        assert child.stdout.readline().split() == [b"check", b"False"]  # still full
        assert child.stdout.readline().split() == [b"check", b"True", b"0"]  # room again: written from memory
        assert child.stdout.readline().strip() == b"ready"
        child.kill()
        child.wait(timeout=10)
    finally:
        child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    (left,) = tmp_path.glob("journal2-*.jsonl")
    assert lines(left) == [entry(0), entry(1), entry(2)]
    adopter = Journal(tmp_path)
    assert asyncio.run(adopter.adopt_orphans()) == 3
    adopter.close()


async def test_a_torn_line_joined_to_the_next_entry_still_adopts_that_entry(tmp_path: Path) -> None:
    """A file written before writes were cut back (or one that could not be cut back): the torn
    write's bytes and the next acknowledged entry share a line; the entry is recovered."""
    orphan = tmp_path / "journal-1-dead.jsonl"
    orphan.write_bytes(entry(1).to_line() + b'{"id":"torn","tenant":"ac' + entry(2).to_line()
                       + b'{"id": "x"' + b"\n" + entry(3).to_line())
    adopter = Journal(tmp_path)
    assert await adopter.adopt_orphans() == 3
    store = Store()
    await adopter.drain(store.apply)
    assert store.written == [entry(1), entry(2), entry(3)]
    adopter.close()


async def test_a_charge_kept_in_memory_is_drained_to_the_store_and_logged_if_shutdown_comes_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = Journal(tmp_path / "not-a-dir")
    (tmp_path / "not-a-dir").write_bytes(b"")  # a file where the directory should be: every write fails
    assert await journal.check(max_age_s=0) is not None and not journal.writable
    assert not await journal.append(entry(1))
    assert not await journal.append(entry(2))
    store = Store()
    assert await journal.drain(store.apply) == 2
    assert store.written == [entry(1), entry(2)] and journal.unwritten == 0 and len(journal) == 0
    assert not await journal.append(entry(3))
    journal.close()
    lost = [r.message for r in caplog.records if "charge lost at shutdown" in r.message]
    assert len(lost) == 1 and '"id":"r3"' in lost[0]


async def test_a_dead_process_checkpoint_is_adopted_after_its_own_entries(tmp_path: Path) -> None:
    """A stream that settled into the journal keeps that settlement; the others settle their checkpoint."""
    first = Journal(tmp_path)
    await first.checkpoint([entry(1, charge=40), entry(2, charge=30)])
    await first.append(entry(1, charge=100))  # stream 1 ended (the store was down): its full charge
    first.close()  # as a crash would leave them: both files stay
    assert first.path is not None and first.path.with_suffix(".checkpoint").exists()

    second = Journal(tmp_path)
    assert await second.adopt_orphans() == 2
    store = Store()
    await second.drain(store.apply)
    assert store.written == [entry(1, charge=100), entry(2, charge=30)]
    assert second.path is not None and os.listdir(tmp_path) == [second.path.name]
    await second.checkpoint([entry(3)])
    assert sorted(os.listdir(tmp_path)) == sorted([second.path.name, second.path.with_suffix(".checkpoint").name])
    await second.checkpoint([])  # no stream runs any more: removed
    assert os.listdir(tmp_path) == [second.path.name]
    second.close()


async def test_progress_written_after_the_checkpoint_is_adopted_largest_charge_per_stream(tmp_path: Path) -> None:
    """What a stream relayed after the last checkpoint is in the progress file: the adopter settles, per
    stream, the largest charge found; a checkpoint removes the progress files written before it."""
    first = Journal(tmp_path)
    assert first.progress(entry(1, charge=10))
    await first.checkpoint([entry(1, charge=20), entry(2, charge=30)])
    assert first.path is not None
    assert [n for n in os.listdir(tmp_path) if ".progress." in n] == []  # the one before it is gone
    assert first.progress(entry(1, charge=50)) and first.progress(entry(2, charge=35))
    assert first.progress(entry(1, charge=60)) and first.progress(entry(3, charge=5))
    assert len([n for n in os.listdir(tmp_path) if ".progress." in n]) == 1
    first.close()  # as a crash would leave them
    assert first.path.exists()

    second = Journal(tmp_path)
    assert await second.adopt_orphans() == 3
    store = Store()
    await second.drain(store.apply)
    assert sorted((e.reservation.id, e.charge) for e in store.written) == [("r1", 60), ("r2", 35), ("r3", 5)]
    assert second.path is not None and os.listdir(tmp_path) == [second.path.name]
    second.close()


async def test_a_journal_whose_streams_all_ended_leaves_no_progress_behind(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    assert journal.progress(entry(1, charge=10))
    await journal.checkpoint([])  # the stream ended and settled
    assert journal.path is not None and os.listdir(tmp_path) == [journal.path.name]
    journal.close()
    assert os.listdir(tmp_path) == []


async def test_short_progress_lines_take_their_stream_s_whole_entry(tmp_path: Path) -> None:
    """Once a progress file has a stream's whole entry, its next lines carry only the charge and the
    completion tokens; adoption rebuilds the entry from the last whole one."""

    def streamed(charge: int, completion: int) -> Entry:
        record: dict[str, str | int] = {"request_id": "req_s", "outcome": "interrupted", "prompt_tokens": 9,
                                        "completion_tokens": completion, "cost_micros": charge}
        return Entry(Reservation("rs", "acme", "2026-11-22", "2026-11", 500), charge, record)

    first = Journal(tmp_path)
    assert first.progress(streamed(10, 1), only_completion=True)  # the file's first: whole
    assert first.progress(streamed(20, 2), only_completion=True)
    assert first.progress(streamed(30, 3), only_completion=True)
    assert first.path is not None
    written = [n for n in os.listdir(tmp_path) if ".progress." in n]
    content = (tmp_path / written[0]).read_bytes().splitlines()
    assert len(content) == 3 and content[0].startswith(b'{"id":') and content[2].startswith(b'{"p":')
    assert len(content[2]) < len(content[0]) / 2
    first.close()

    second = Journal(tmp_path)
    assert await second.adopt_orphans() == 1
    store = Store()
    await second.drain(store.apply)
    assert store.written == [streamed(30, 3)]
    second.close()
