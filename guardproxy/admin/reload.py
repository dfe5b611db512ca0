"""Reloading ``proxy.yaml`` while serving: on SIGHUP and through ``POST /admin/reload``.

Single process: SIGHUP is handled on the event loop. With ``serve --workers N`` the supervisor
(``guardproxy.supervisor``) forwards SIGHUP to every worker, and a worker that reloads through the
admin API sends SIGHUP to the supervisor, so every worker reads the file. A file that does not
validate is refused and logged with the field at fault; the running config stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.admin.auth import check_admin
from guardproxy.config.validation import ConfigError
from guardproxy.errors import ErrorKind, GuardError
from guardproxy.http.runtime import Runtime

log = logging.getLogger("guardproxy.reload")


class SighupReloader:
    """Reloads ``runtime`` on SIGHUP while the app runs in the main thread (a real server, not a test thread)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._loop: asyncio.AbstractEventLoop | None = None
        if runtime.config_path is None or threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.on_sighup)
            self._loop = loop

    def on_sighup(self) -> None:
        try:
            result = self.runtime.reload()
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return
        if not result.changed:
            log.info("reload: %s unchanged (generation %d)", self.runtime.config_path, result.generation)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGHUP)
            self._loop = None


def _json(payload: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


async def post_reload(request: Request) -> Response:
    """Re-read proxy.yaml: 200 with the new generation, 400 naming the field when the file is refused."""
    runtime: Runtime = request.app.state.runtime
    check_admin(request, runtime.current.services)
    try:
        result = runtime.reload()
    except ConfigError as exc:
        log.error("reload refused, the running config stays: %s", exc)
        raise GuardError(ErrorKind.INVALID_FIELD, f"Config not reloaded: {exc}", param=exc.path or None,
                         code="invalid_config") from None
    return _json({
        "reloaded": result.changed, "generation": result.generation, "config_sha256": result.config_sha256,
        "restart_required": list(result.restart_required), "workers_signalled": runtime.signal_siblings(),
    })


async def get_reload(request: Request) -> Response:
    """Which config this process serves: its generation and the file's sha256."""
    runtime: Runtime = request.app.state.runtime
    current = runtime.current
    check_admin(request, current.services)
    return _json({"generation": current.number, "config_sha256": current.config_sha256, "pid": os.getpid()})


def reload_routes() -> list[Route]:
    return [
        Route("/admin/reload", post_reload, methods=["POST"]),
        Route("/admin/reload", get_reload, methods=["GET"]),
    ]
