"""Processes that open a new SQLite store's file at the same moment all get it.

``serve --workers N`` forks its workers together (they used to be spawned, a second of imports
apart): each opens the file and sets its pragmas while another may be making the file (switching it
to WAL, creating the tables) and holding it alone. Every statement of opening then waits in the
store's short pauses, as a transaction does, instead of failing with "database is locked". In a fresh
interpreter (nothing else running in it), two processes are forked at once on a new file, ten times.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RACE = """
import asyncio, os, sys
from guardproxy.store.sqlite import SqliteClient

failures = []
for trial in range(10):
    path = os.path.join(sys.argv[1], f"spend-{trial}.db")
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            async def main() -> None:
                client = SqliteClient(path)
                try:
                    await client.set("gp:opened", "1")
                finally:
                    await client.aclose()
            try:
                asyncio.run(main())
            except BaseException as exc:
                print(f"trial {trial}: {type(exc).__name__}: {exc}", flush=True)
                os._exit(1)
            os._exit(0)
        children.append(pid)
    for pid in children:
        if os.waitpid(pid, 0)[1] != 0:
            failures.append(trial)
print("failed trials:", failures)
"""


def test_two_processes_opening_a_new_file_at_once_both_get_it(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", RACE, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "failed trials: []", done.stdout
