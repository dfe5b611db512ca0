"""Several processes opening one new SQLite store file at the same moment all open it: each step of
setting up a connection that reads or changes the file (``synchronous``, WAL, the schema) waits while
another process holds it, as transactions do, instead of failing with "database is locked"."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from guardproxy.store.sqlite import SqliteClient

PROCESSES = 6
ROUNDS = 2
OPEN_AND_WRITE = r"""
import asyncio, sys
from guardproxy.store.sqlite import SqliteClient

async def main() -> None:
    client = SqliteClient(sys.argv[1], synchronous="full")
    print("ready", flush=True)
    sys.stdin.readline()  # every process is ready: they open the file at once
    await client.set("opened:" + sys.argv[2], "1")
    await client.aclose()

asyncio.run(main())
"""


def open_at_once(path: Path) -> list[str]:
    """``PROCESSES`` processes open ``path`` together; the error of each that failed."""
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AND_WRITE, str(path), str(i)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(PROCESSES)]
    errors = []
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            if proc.returncode != 0:
                errors.append(err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return errors


def test_processes_opening_a_new_file_at_the_same_moment_all_open_it(tmp_path: Path) -> None:
    for round_ in range(ROUNDS):
        path = tmp_path / f"round{round_}" / "spend.db"
        assert open_at_once(path) == []

        async def opened(path: Path) -> list[bytes | None]:
            client = SqliteClient(path)
            try:
                return [await client.get(f"opened:{i}") for i in range(PROCESSES)]
            finally:
                await client.aclose()

        assert asyncio.run(opened(path)) == [b"1"] * PROCESSES
