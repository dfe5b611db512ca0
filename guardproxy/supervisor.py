"""``serve --workers N``: uvicorn's worker supervisor, with SIGHUP meaning "reload the config".

uvicorn's own supervisor answers SIGHUP by replacing every worker. guardproxy reloads in place
instead (``guardproxy.admin.reload``): the supervisor forwards SIGHUP to each worker, which re-reads
``proxy.yaml``, keeps serving its in-flight calls and refuses a file that does not validate.
A worker that reloads through ``POST /admin/reload`` signals the supervisor the same way, so
every worker follows, and the workers' board (``guardproxy.http.workers``) tells it when they all have.

Workers are forked, not spawned as uvicorn does: the supervisor has imported the app and built the
configured models' token encodings (o200k_base's tables are ~42 MB of Rust heap) before it forks, and
freezes its objects out of the garbage collector's reach, so N workers share those pages instead of
holding N copies (bench/README.md, "Memory": total PSS of ``--workers 4``). The supervisor opens no
store, socket client, thread or event loop before forking: each worker builds its own in its lifespan.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterable
from socket import socket

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess
from uvicorn.supervisors.multiprocess import SIGNALS, Process

from guardproxy.admin.reload import catch_early_sighup
from guardproxy.budget import tokens
from guardproxy.http.runtime import SUPERVISOR_ENV
from guardproxy.http.workers import WORKERS_COUNT_ENV, WORKERS_DIR_ENV
from guardproxy.observe.metrics import after_fork as metrics_after_fork

log = logging.getLogger("guardproxy.supervisor")


_FORK = multiprocessing.get_context("fork")


def _forked_worker(worker: Process, sockets: list[socket]) -> None:
    """A forked worker's first steps, then uvicorn's: what spawning gave it fresh, it resets here."""
    for sig in SIGNALS:  # the supervisor's handlers only queue signals for the supervisor's loop
        signal.signal(sig, signal.SIG_DFL)
    catch_early_sighup()  # a reload asked before the app serves is applied once it does
    metrics_after_fork()
    worker.config.configure_logging()
    try:
        worker.target(sockets=sockets)
    except KeyboardInterrupt:  # as uvicorn's spawned workers: the supervisor already expects the exit
        pass
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class ForkedWorker(Process):
    """uvicorn's worker process, forked from the supervisor instead of spawned."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket]) -> None:
        super().__init__(config, sockets)  # builds (does not start) a spawn process: replaced here
        self.process = _FORK.Process(target=_forked_worker, args=(self, sockets))  # type: ignore[assignment]


class ReloadingSupervisor(Multiprocess):
    """uvicorn's ``Multiprocess`` whose SIGHUP reaches every worker instead of restarting them, and
    whose workers are forked (``ForkedWorker``) after ``preload``."""

    def _new_worker(self) -> Process:
        # Objects alive now stay out of every collection (the worker's too), so its collector never
        # writes to their pages and they stay shared.
        gc.freeze()
        worker = ForkedWorker(self.config, self.sockets)
        worker.start()
        return worker

    def init_processes(self) -> None:
        for _ in range(self.processes_num):
            self.processes.append(self._new_worker())

    def handle_ttin(self) -> None:
        log.info("SIGTTIN: one more worker")
        self.processes_num += 1
        self.processes.append(self._new_worker())

    def keep_subprocess_alive(self) -> None:
        """uvicorn's: a worker that died or hangs is replaced (forked again); one that failed to start stops
        the supervisor (it would fail the same way every time)."""
        if self.should_exit.is_set():
            return
        timeout = getattr(self.config, "timeout_worker_healthcheck", 5)  # a setting of uvicorn 0.31+
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=timeout):
                continue
            process.kill()
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %s failed to start: stopping", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info("worker %s died: starting another", process.pid)
            self.processes[index] = self._new_worker()

    def handle_hup(self) -> None:
        """Signal every running worker. Not through uvicorn's ``is_alive``: that pings the worker over a
        pipe with a timeout, and a worker busy for a second then missed the reload (issue 22.18)."""
        log.info("SIGHUP: asking %d workers to reload the config", len(self.processes))
        for process in self.processes:
            if process.pid is not None and process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


def preload(models: Iterable[str]) -> None:
    """Build in the supervisor what every worker would build for itself: the models' token encodings."""
    tokens.warm_up(models)
    gc.collect()  # what is garbage now is not frozen (``_new_worker``) for every worker's lifetime


def run_workers(config: uvicorn.Config, models: Iterable[str] = ()) -> None:
    """Bind once, build ``models``' encodings, and run ``config.workers`` forked workers under the
    reloading supervisor."""
    preload(models)
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    board = tempfile.mkdtemp(prefix="guardproxy-workers-")
    os.environ[WORKERS_DIR_ENV] = board
    os.environ[WORKERS_COUNT_ENV] = str(config.workers)
    sockets: list[socket] = [config.bind_socket()]
    try:
        ReloadingSupervisor(config, sockets=sockets).run()
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
        shutil.rmtree(board, ignore_errors=True)
