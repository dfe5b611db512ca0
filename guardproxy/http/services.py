"""What every request handler needs, built once in the app's lifespan (``app.py``) and passed
explicitly: the config, the ledger, the upstreams, tenant resolution, the metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from guardproxy.config.settings import Config
from guardproxy.http.auth import TenantResolver
from guardproxy.http.semantic_cache import SemanticCache
from guardproxy.http.upstream import Upstream
from guardproxy.observe.calls import SettledCall
from guardproxy.observe.metrics import Metrics
from guardproxy.store.ledger import Ledger


@dataclass(frozen=True)
class Services:
    """Everything a request needs, built once in the app's lifespan."""

    config: Config
    ledger: Ledger
    upstreams: dict[str, Upstream]
    tenants: TenantResolver
    metrics: Metrics
    clock: Callable[[], datetime]
    #: Told of every settled attempt (``guardproxy.observe.telemetry``'s spans).
    observers: tuple[Callable[[SettledCall], None], ...] = ()
    #: The semantic cache (``semantic_cache.py``), for tenants with ``cache: semantic``.
    semantic: SemanticCache | None = None
