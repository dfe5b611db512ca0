"""Which config each worker of ``serve --workers N`` serves, so a reload can say when all have it.

The supervisor makes a directory (``WORKERS_DIR_ENV``) and says how many workers it runs
(``WORKERS_COUNT_ENV``); each worker writes ``<pid>.json`` there (its generation and the config's
sha256) whenever its generation changes, and removes it on the way out. ``POST /admin/reload``
waits (bounded) until every live worker reports the new file's sha256, and says how many did.
Without the supervisor (one process) the board is this process alone.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson

WORKERS_DIR_ENV = "GUARDPROXY_WORKERS_DIR"
WORKERS_COUNT_ENV = "GUARDPROXY_WORKERS"
#: How long ``POST /admin/reload`` waits for every worker to have the new config.
RELOAD_WAIT_S = 10.0


@dataclass(frozen=True)
class WorkerState:
    pid: int
    generation: int
    config_sha256: str


def board_dir() -> Path | None:
    directory = os.environ.get(WORKERS_DIR_ENV, "")
    return Path(directory) if directory else None


def expected_workers() -> int:
    count = os.environ.get(WORKERS_COUNT_ENV, "")
    return int(count) if count.isdigit() and int(count) > 0 else 1


def publish(generation: int, config_sha256: str) -> None:
    """Write this worker's state to the board (nothing without a supervisor)."""
    directory = board_dir()
    if directory is None:
        return
    path = directory / f"{os.getpid()}.json"
    tmp = path.with_suffix(".tmp")
    with contextlib.suppress(OSError):
        tmp.write_bytes(orjson.dumps({"pid": os.getpid(), "generation": generation, "sha": config_sha256}))
        tmp.replace(path)


def withdraw() -> None:
    directory = board_dir()
    if directory is not None:
        with contextlib.suppress(OSError):
            (directory / f"{os.getpid()}.json").unlink()


def live_workers() -> list[WorkerState]:
    """The workers on the board whose process is alive."""
    directory = board_dir()
    if directory is None:
        return []
    out = []
    for path in directory.glob("*.json"):
        try:
            raw = orjson.loads(path.read_bytes())
            pid = int(raw["pid"])
            os.kill(pid, 0)
        except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            continue
        out.append(WorkerState(pid, int(raw["generation"]), str(raw["sha"])))
    return out


async def wait_for_all(config_sha256: str, timeout_s: float = RELOAD_WAIT_S) -> tuple[int, int]:
    """Wait until every worker serves ``config_sha256`` (or ``timeout_s``); (how many do, how many run)."""
    expected = expected_workers()
    if board_dir() is None:
        return 1, 1
    deadline = time.monotonic() + timeout_s
    while True:
        workers = live_workers()
        current = sum(1 for w in workers if w.config_sha256 == config_sha256)
        if current >= expected or time.monotonic() >= deadline:
            return current, max(expected, len(workers))
        await anyio.sleep(0.05)
