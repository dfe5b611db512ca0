"""Real servers on loopback for tests: an ASGI app served by uvicorn in a background thread, and
``guardproxy serve`` as a subprocess (``ProxyProcess``), to be stopped, signalled or killed for real."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

LOOP = os.environ.get("GP_TEST_LOOP", "auto")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def in_process(app: Starlette) -> AsyncIterator[ASGIApp]:
    """``app`` started (its lifespan run) in this process, as an ASGI app that hands each request the
    lifespan state as a server does (``httpx.ASGITransport`` and hand-made scopes run no lifespan)."""
    async with app.router.lifespan_context(app) as state:

        async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
            await app({**scope, "state": dict(state or {})}, receive, send)

        yield with_state


@contextlib.contextmanager
def serve_in_thread(app: Any, *, port: int | None = None, **options: Any) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 until the block ends; yields its base URL (``http://127.0.0.1:PORT``)."""
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=2, loop=LOOP,
        **options,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"server on port {port} failed to start")
        if time.monotonic() > deadline:
            raise TimeoutError(f"server on port {port} did not start in 20 s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def no_proxy_env() -> dict[str, str]:
    """The environment for subprocesses, without proxies that would capture loopback traffic."""
    return {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}


class ProxyProcess:
    """``guardproxy serve`` as a subprocess on a free loopback port, its output in ``log_path``.

    ``config`` is a config as YAML would give it (written to ``tmp_path``) or the path of one.
    """

    def __init__(self, config: dict[str, Any] | Path, tmp_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        if isinstance(config, Path):
            path = config
        else:
            path = tmp_path / f"proxy-{self.port}.yaml"
            path.write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / f"proxy-{self.port}.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "guardproxy", "serve", "--config", str(path), "--port", str(self.port),
                 *flags],
                env=no_proxy_env(), stdout=log, stderr=subprocess.STDOUT,
            )

    def wait_until(self, path: str = "/readyz", timeout_s: float = 30) -> None:
        """Until ``path`` answers 200 (``/healthz``: serving; ``/readyz``: the store takes writes too)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + path).status_code == 200:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"guardproxy did not become ready: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.05)

    def wait_serving(self) -> None:
        self.wait_until("/healthz")

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=15)


@contextlib.contextmanager
def running_proxy(config: dict[str, Any] | Path, tmp_path: Path, *flags: str) -> Iterator[ProxyProcess]:
    """A ``ProxyProcess`` that is ready (``/readyz``) for the block and stopped after it."""
    proxy = ProxyProcess(config, tmp_path, *flags)
    try:
        proxy.wait_until("/readyz")
        yield proxy
    finally:
        proxy.stop()
