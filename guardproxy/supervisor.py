"""``serve --workers N``: uvicorn's worker supervisor, with SIGHUP meaning "reload the config".

uvicorn's own supervisor answers SIGHUP by replacing every worker. guardproxy reloads in place
instead (``guardproxy.admin.reload``): the supervisor forwards SIGHUP to each worker, which re-reads
``proxy.yaml``, keeps serving its in-flight calls and refuses a file that does not validate.
A worker that reloads through ``POST /admin/reload`` signals the supervisor the same way, so
every worker follows.
"""

from __future__ import annotations

import logging
import os
import signal
from socket import socket

import uvicorn
from uvicorn.supervisors import Multiprocess

from guardproxy.http.runtime import SUPERVISOR_ENV

log = logging.getLogger("guardproxy.supervisor")


class ReloadingSupervisor(Multiprocess):
    """uvicorn's ``Multiprocess`` whose SIGHUP reaches every worker instead of restarting them."""

    def handle_hup(self) -> None:
        log.info("SIGHUP: asking %d workers to reload the config", len(self.processes))
        for process in self.processes:
            if process.pid is not None and process.is_alive(timeout=1):
                os.kill(process.pid, signal.SIGHUP)


def run_workers(config: uvicorn.Config) -> None:
    """Bind once and run ``config.workers`` workers under the reloading supervisor."""
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    sockets: list[socket] = [config.bind_socket()]
    try:
        ReloadingSupervisor(config, sockets=sockets).run()
    except KeyboardInterrupt:
        pass
    finally:
        for sock in sockets:
            sock.close()
