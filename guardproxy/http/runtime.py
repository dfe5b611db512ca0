"""The running configuration and everything built from it, replaced whole on reload.

``Runtime.current`` is one ``Generation``: the config, its ``Services`` and the endpoints serving
them. A request reads ``current`` once, at its start, and keeps that generation to the end, so a
reload (SIGHUP or ``POST /admin/reload``) never changes a call half-way; new requests get the new
generation from the moment it is assigned. A file that does not validate changes nothing.

What a reload cannot change without a restart (the listening address, the store connection, the
ServiceTitan client) keeps its running value and is named in the reload's answer and log.
What outlives generations: the store and ledger (pending charges), the runtime key ring, metrics,
the ServiceTitan resolver, and each upstream whose settings did not change (its pool and breaker).
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from guardproxy.config.settings import Config, parse_config_bytes
from guardproxy.config.validation import ConfigError
from guardproxy.http import workers
from guardproxy.http.auth import JobTenantResolver, TenantResolver
from guardproxy.http.endpoints import BUDGETED
from guardproxy.http.passthrough import UnbudgetedPaths
from guardproxy.http.pipeline import BudgetedEndpoint
from guardproxy.http.semantic_cache import SemanticCache
from guardproxy.http.services import Services
from guardproxy.http.upstream import Upstream, build_upstreams
from guardproxy.observe.metrics import Metrics
from guardproxy.store.keys import KeyRing
from guardproxy.store.ledger import Ledger

if TYPE_CHECKING:
    from guardproxy.observe.telemetry import Tracing

log = logging.getLogger("guardproxy.reload")

#: Set by ``guardproxy serve --workers N`` in each worker: the supervisor's pid, which forwards
#: SIGHUP to every worker (``guardproxy.supervisor``).
SUPERVISOR_ENV = "GUARDPROXY_SUPERVISOR_PID"


@dataclass(frozen=True)
class Generation:
    """One loaded config and what serves it."""

    number: int
    services: Services
    endpoints: dict[str, BudgetedEndpoint]
    unbudgeted: UnbudgetedPaths
    #: sha256 of the file's text (empty for a config not read from a file).
    config_sha256: str = ""


@dataclass(frozen=True)
class ReloadResult:
    generation: int
    changed: bool
    config_sha256: str
    #: Settings that differ in the file but need a restart to take effect.
    restart_required: tuple[str, ...] = field(default=())


class Runtime:
    """Holds the current ``Generation``; ``reload`` replaces it with one built from the file."""

    def __init__(
        self, config: Config, *, ledger: Ledger, metrics: Metrics, clock: Callable[[], datetime],
        keyring: KeyRing, jobs: JobTenantResolver | None,
        config_path: str | Path | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.keyring = keyring
        self.jobs = jobs
        self.config_path = Path(config_path) if config_path else None
        self.tracing = tracing
        self._retired: list[Upstream] = []
        digest = _file_sha256(self.config_path) if self.config_path else ""
        self.current = self._build(config, 1, {}, digest)
        workers.publish(1, digest)

    def _build(self, config: Config, number: int, keep: dict[str, Upstream], digest: str) -> Generation:
        breaker_state = self.metrics.breaker_state
        fresh = {name: u for name, u in config.upstreams.items()
                 if name not in keep or keep[name].config != u}
        upstreams = {**{n: keep[n] for n in config.upstreams if n not in fresh},
                     **build_upstreams(fresh, lambda n, state: breaker_state.labels(n).set(state))}
        for name in fresh:
            breaker_state.labels(name).set(0)
        services = Services(
            config=config, ledger=self.ledger, upstreams=upstreams,
            tenants=TenantResolver(config, self.jobs, self.keyring), metrics=self.metrics, clock=self.clock,
            observers=(self.tracing.observer(config),) if self.tracing else (),
            semantic=SemanticCache(config.cache.semantic, config.cache.ttl_s, self.ledger.store, self.metrics),
        )
        return Generation(
            number=number, services=services,
            endpoints={shape.path: BudgetedEndpoint(services, shape) for shape in BUDGETED},
            unbudgeted=UnbudgetedPaths(services), config_sha256=digest,
        )

    def reload(self, *, force: bool = False) -> ReloadResult:
        """Re-read the config file; raises ``ConfigError`` (naming the field) and changes nothing if it is bad.

        The file is read once: the sha256 reported is that of the bytes validated and applied. A file
        that would switch the admin API off or remove every tenant is refused (``LockoutRefused``)
        unless ``force``: a truncated file is often still valid YAML."""
        if self.config_path is None:
            raise ConfigError("", "this proxy was not started from a config file, so there is nothing to reload")
        try:
            data = self.config_path.read_bytes()
        except OSError as exc:
            raise ConfigError("", f"cannot read config file {self.config_path}: {exc.strerror}") from None
        digest = hashlib.sha256(data).hexdigest()
        old = self.current
        if digest == old.config_sha256:
            return ReloadResult(old.number, False, digest)
        config = parse_config_bytes(data, self.config_path)
        if not force:
            refuse_lockout(old.services.config, config)
        return self.apply(config, digest)

    def apply(self, config: Config, digest: str = "") -> ReloadResult:
        """Make ``config`` current (already validated): one assignment, after everything is built."""
        old = self.current
        running = old.services.config
        restart = _needs_restart(running, config)
        upstreams = old.services.upstreams
        new = self._build(config, old.number + 1, upstreams, digest)
        self._retired.extend(u for name, u in upstreams.items() if new.services.upstreams.get(name) is not u)
        # The ledger admits with the current policy (budgets, fail_open): a fixed budget applies at once.
        self.ledger.config = config
        self.current = new
        workers.publish(new.number, digest)
        for name in restart:
            log.warning("reload: %s changed in the file but needs a restart to take effect", name)
        log.info("reload: config generation %d is live (%d models, %d tenants)", new.number,
                 len(config.models), len(config.tenants))
        return ReloadResult(new.number, True, digest, tuple(restart))

    def signal_siblings(self) -> bool:
        """Under ``serve --workers``: ask the supervisor to send SIGHUP to every worker; False when alone."""
        parent = os.environ.get(SUPERVISOR_ENV, "")
        if not parent.isdigit() or int(parent) != os.getppid():
            return False
        os.kill(int(parent), signal.SIGHUP)
        return True

    async def aclose(self) -> None:
        for upstream in {id(u): u for u in [*self.current.services.upstreams.values(), *self._retired]}.values():
            await upstream.aclose()


class LockoutRefused(ConfigError):
    """A valid file that would take away what the operator reloads and serves with."""


def refuse_lockout(running: Config, loaded: Config) -> None:
    """``LockoutRefused`` when ``loaded`` drops the admin key or every tenant that ``running`` has."""
    if running.admin_api_key and not loaded.admin_api_key:
        raise LockoutRefused("admin.api_key", "the new file has no admin key, so the admin API (and this reload "
                             "over HTTP) would be switched off; is the file complete? To apply it anyway: "
                             "POST /admin/reload?force=true")
    if running.tenants and not loaded.tenants:
        raise LockoutRefused("tenants", f"the new file has no tenants (the running config has {len(running.tenants)})"
                             ", so every tenant key would stop working; is the file complete? To apply it anyway: "
                             "POST /admin/reload?force=true")


def _needs_restart(running: Config, loaded: Config) -> list[str]:
    checks = {
        "server.host": running.server.host != loaded.server.host,
        "server.port": running.server.port != loaded.server.port,
        # on_unavailable is read per admission (the ledger follows the current config); the rest is the connection.
        "store": _connection(running) != _connection(loaded),
        "servicetitan": running.servicetitan != loaded.servicetitan,
        "telemetry": running.telemetry != loaded.telemetry,
        "server.cors_allow_origins": running.server.cors_allow_origins != loaded.server.cors_allow_origins,
        # the connection limits live in the HTTP server (http/slow_clients.py), built at start-up
        **{f"server.{name}": getattr(running.server, name) != getattr(loaded.server, name)
           for name in ("max_connections", "header_timeout_s", "keep_alive_timeout_s", "max_header_bytes",
                        "log_format")},
    }
    return [name for name, changed in checks.items() if changed]


def _connection(config: Config) -> tuple[str, str, str, int]:
    store = config.store
    return store.url, store.synchronous, store.key_prefix, store.call_log_size


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""
