"""What must hold before the proxy serves, checked at start-up and by ``guardproxy check-config``.

A misconfiguration that only shows later loses money or silence: an unwritable journal loses the
charges it was meant to keep while Redis is away; an ``otlp_endpoint`` without OpenTelemetry
installed exports nothing. Each problem is one line that says what is wrong and how to fix it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import anyio

from guardproxy.config.settings import Config
from guardproxy.errors import StoreUnavailable
from guardproxy.observe.telemetry import OTEL_HINT as OTEL_HINT
from guardproxy.store.client import mask_password

#: How long ``check-config`` waits for the store to answer.
STORE_TIMEOUT_S = 5.0


class PreflightError(RuntimeError):
    """The proxy must not start: the message names each problem and its fix."""


def local_problems(config: Config, *, journal: bool | None = None) -> list[str]:
    """What is wrong on this machine for ``config`` (no network): the journal (``journal``: whether
    one is kept; by default, with a Redis store), the otel extra."""
    problems = []
    if not config.store.embedded if journal is None else journal:
        problem = journal_problem(config.store.journal_path())
        if problem is not None:
            problems.append(problem)
    if config.telemetry.enabled and not otel_installed():
        problems.append(f"telemetry.otlp_endpoint is set but OpenTelemetry is not installed: {OTEL_HINT}")
    return problems


def check_local(config: Config, *, journal: bool | None = None) -> None:
    """``PreflightError`` listing ``local_problems``, if any."""
    problems = local_problems(config, journal=journal)
    if problems:
        raise PreflightError("; ".join(problems))


def journal_problem(directory: Path) -> str | None:
    """Why charges could not be written to the journal in ``directory``, or ``None``: creates the
    directory if needed and writes, fsyncs and removes a probe file, as the journal would."""
    probe = directory / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"probe\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        return (f"store.journal_dir: cannot write the journal in {directory} ({reason}); charges the store "
                "cannot take while Redis is away would be lost. Create the directory and give the user guardproxy "
                f"runs as write access to it (mkdir -p {directory}), or set store.journal_dir to a writable "
                "directory")
    return None


def otel_installed() -> bool:
    """Whether the modules tracing needs (the ``otel`` extra) can be imported."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError:
        return False
    return True


async def store_problem(config: Config) -> str | None:
    """Why the configured store cannot be reached, or ``None`` (also for the embedded store)."""
    if config.store.embedded:
        return None
    from guardproxy.store.redis import BudgetStore

    where = mask_password(config.store.redis_url, "***")
    try:
        store = BudgetStore.from_config(config.store)
    except (ValueError, StoreUnavailable) as exc:
        return f"store.redis_url: cannot connect to {where}: {exc}"
    try:
        with anyio.fail_after(STORE_TIMEOUT_S):
            await store.ping()
    except (StoreUnavailable, TimeoutError) as exc:
        reason = str(exc) or f"no answer within {STORE_TIMEOUT_S:g} s"
        return (f"store.redis_url: Redis at {where} is unreachable ({reason}). Start Redis or fix store.redis_url "
                "(or REDIS_URL); to check the file alone, without reaching the store: check-config --offline")
    finally:
        await store.aclose()
    return None
