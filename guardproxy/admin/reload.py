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
from guardproxy.http import app_state, workers
from guardproxy.http.runtime import LockoutRefused, Runtime

log = logging.getLogger("guardproxy.reload")

#: A SIGHUP that reached a worker before its app could handle it (``catch_early_sighup``): the app
#: reloads as soon as it can, instead of the signal's default action ending the worker.
_EARLY_SIGHUP = threading.Event()


def catch_early_sighup() -> None:
    """In a worker, before the app exists: remember a SIGHUP instead of dying of it."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda signum, frame: _EARLY_SIGHUP.set())


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
        if self._loop is not None and _EARLY_SIGHUP.is_set():
            _EARLY_SIGHUP.clear()
            self.on_sighup()

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
    """Re-read proxy.yaml: 200 with the new generation, 400 naming the field when the file is refused
    (``reload_refused`` for a file that would switch the admin API off or drop every tenant, which
    ``?force=true`` applies anyway)."""
    runtime = app_state.runtime(request)
    check_admin(request, runtime.current.services)
    force = request.query_params.get("force", "false")
    if force not in ("true", "false"):
        raise GuardError(ErrorKind.INVALID_FIELD, "force must be true or false.", param="force")
    try:
        result = runtime.reload(force=force == "true")
    except ConfigError as exc:
        log.error("reload refused, the running config stays: %s", exc)
        code = "reload_refused" if isinstance(exc, LockoutRefused) else "invalid_config"
        raise GuardError(ErrorKind.INVALID_FIELD, f"Config not reloaded: {exc}", param=exc.path or None,
                         code=code) from None
    signalled = runtime.signal_siblings()
    # Under --workers: answer once every worker serves this file (or after workers.RELOAD_WAIT_S).
    reloaded, running = await workers.wait_for_all(result.config_sha256) if signalled else (1, 1)
    return _json({
        "reloaded": result.changed, "generation": result.generation, "config_sha256": result.config_sha256,
        "restart_required": list(result.restart_required), "workers_signalled": signalled,
        "workers": running, "workers_reloaded": reloaded, "all_workers_reloaded": reloaded >= running,
    })


async def get_reload(request: Request) -> Response:
    """Which config this process serves: its generation and the file's sha256."""
    runtime = app_state.runtime(request)
    current = runtime.current
    check_admin(request, current.services)
    return _json({"generation": current.number, "config_sha256": current.config_sha256, "pid": os.getpid()})


def reload_routes() -> list[Route]:
    return [
        Route("/admin/reload", post_reload, methods=["POST"]),
        Route("/admin/reload", get_reload, methods=["GET"]),
    ]
