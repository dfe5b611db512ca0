"""The ``servicetitan`` section of proxy.yaml: which ServiceTitan tenants to ask, and how a job maps
to a budget tenant (servicetitan.md, "Configuration").

Parsing is pure; secrets (``app_key``, client credentials) are kept out of ``repr`` so that a config
printed in a traceback or a log line does not leak them, and ``masked()`` is what ``check-config``
shows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from guardproxy.config.validation import ConfigError, Fields, describe

# Identical to ``guardproxy.config.settings.TENANT_ID``; kept here because config imports this module.
TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: "$" lets "t\n" through

#: Per environment: (token URL, API base URL).
ENDPOINTS: Mapping[str, tuple[str, str]] = {
    "production": ("https://auth.servicetitan.io/connect/token", "https://api.servicetitan.io"),
    "integration": (
        "https://auth-integration.servicetitan.io/connect/token",
        "https://api-integration.servicetitan.io",
    ),
}

#: Job fields whose (integer) value can name the budget tenant.
JOB_ID_FIELDS = ("businessUnitId", "customerId", "locationId", "jobTypeId")
#: Rules that take a name after a colon: ``externalData:<key>``, ``customField:<name>``.
NAMED_RULES = ("externalData", "customField")

INT64_MAX = 2**63 - 1
MASK = "***"


@dataclass(frozen=True)
class Connection:
    """One ServiceTitan tenant and the client credentials of the app installed in it."""

    st_tenant_id: int
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)


@dataclass(frozen=True)
class ServiceTitanConfig:
    """The validated ``servicetitan`` section; URLs are already resolved from ``environment``."""

    app_key: str = field(repr=False)
    connections: tuple[Connection, ...]
    environment: str = "production"
    auth_url: str = ENDPOINTS["production"][0]
    api_url: str = ENDPOINTS["production"][1]
    tenant_from: str = "st_tenant"
    tenant_map: Mapping[str, str] = field(default_factory=dict)
    cache_ttl_s: int = 86400
    negative_cache_ttl_s: int = 60
    timeout_s: float = 10.0

    def connection(self, st_tenant_id: int) -> Connection | None:
        """The connection for ``st_tenant_id``, or None when it is not configured."""
        return next((c for c in self.connections if c.st_tenant_id == st_tenant_id), None)

    def masked(self) -> dict[str, Any]:
        """The section as plain data for ``check-config`` output, with every credential shown as ``***``."""
        return {
            "environment": self.environment,
            "auth_url": self.auth_url,
            "api_url": self.api_url,
            "app_key": MASK,
            "connections": [
                {"st_tenant_id": c.st_tenant_id, "client_id": MASK, "client_secret": MASK}
                for c in self.connections
            ],
            "tenant_from": self.tenant_from,
            "tenant_map": dict(self.tenant_map),
            "cache_ttl_s": self.cache_ttl_s,
            "negative_cache_ttl_s": self.negative_cache_ttl_s,
            "timeout_s": self.timeout_s,
        }


def parse_servicetitan(raw: Any, path: str) -> ServiceTitanConfig | None:
    """Validate the ``servicetitan`` section; None when it is absent or empty (the feature is off).

    Every error is a ``ConfigError`` naming the field, e.g.
    ``servicetitan.connections[0].client_id: must not be empty``.
    """
    f = Fields(raw, path)
    if not f.raw:
        return None
    environment = f.text("environment", "production", choices=tuple(ENDPOINTS))
    default_auth_url, default_api_url = ENDPOINTS[environment]
    auth_url = parse_url(f, "auth_url") or default_auth_url
    api_url = (parse_url(f, "api_url") or default_api_url).rstrip("/")
    app_key = f.text("app_key", "", allow_empty=False)
    connections = parse_connections(f.get("connections"), f.at("connections"))
    tenant_from = parse_tenant_from(f.text("tenant_from", "st_tenant"), f.at("tenant_from"))
    tenant_map = f.text_map("tenant_map")
    for key, value in tenant_map.items():
        if not TENANT_ID.fullmatch(value):
            raise ConfigError(
                f"{f.at('tenant_map')}.{key}",
                f"must be a tenant id (letters, digits, '.', '_', '-'; at most 64), got {describe(value)}",
            )
    # 0 means "do not cache" (every lookup asks ServiceTitan).
    cache_ttl_s = f.integer("cache_ttl_s", 86400, min_value=0)
    negative_cache_ttl_s = f.integer("negative_cache_ttl_s", 60, min_value=0)
    timeout_s = 10.0
    if f.has("timeout_s"):
        timeout_s = float(f.decimal("timeout_s", None, min_value=Decimal("0.001"), max_value=Decimal(600)))
    f.done()
    return ServiceTitanConfig(
        app_key=app_key, connections=connections, environment=environment, auth_url=auth_url,
        api_url=api_url, tenant_from=tenant_from, tenant_map=tenant_map, cache_ttl_s=cache_ttl_s,
        negative_cache_ttl_s=negative_cache_ttl_s, timeout_s=timeout_s,
    )


def parse_url(f: Fields, key: str) -> str | None:
    url = f.optional_str(key)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ConfigError(f.at(key), f"must be an http:// or https:// URL, got {describe(url)}")
    return url


def parse_connections(raw: Any, path: str) -> tuple[Connection, ...]:
    if raw is None:
        raise ConfigError(path, "is required: list each ServiceTitan tenant with its client credentials")
    if not isinstance(raw, list):
        raise ConfigError(path, f"must be a list, got {describe(raw)}")
    if not raw:
        raise ConfigError(path, "must list at least one ServiceTitan tenant")
    connections: list[Connection] = []
    for i, item in enumerate(raw):
        f = Fields(item, f"{path}[{i}]")
        st_tenant_id = parse_st_tenant_id(f.get("st_tenant_id"), f.at("st_tenant_id"))
        if any(c.st_tenant_id == st_tenant_id for c in connections):
            raise ConfigError(f.at("st_tenant_id"), f"{st_tenant_id} is listed twice")
        connections.append(
            Connection(
                st_tenant_id=st_tenant_id,
                client_id=f.text("client_id", "", allow_empty=False),
                client_secret=f.text("client_secret", "", allow_empty=False),
            )
        )
        f.done()
    return tuple(connections)


def parse_st_tenant_id(value: Any, path: str) -> int:
    # A digit string is accepted too: ``st_tenant_id: ${ST_TENANT_ID}`` expands to a string.
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        value = int(value.strip())
    if value is None:
        raise ConfigError(path, "is required")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(path, f"must be a whole number (the ServiceTitan tenant id), got {describe(value)}")
    if not 0 < value <= INT64_MAX:
        raise ConfigError(path, f"must be a positive 64-bit integer, got {value}")
    return value


def parse_tenant_from(value: str, path: str) -> str:
    rule, sep, name = value.partition(":")
    if not sep and (rule == "st_tenant" or rule in JOB_ID_FIELDS):
        return value
    if sep and rule in NAMED_RULES:
        if not name.strip():
            raise ConfigError(path, f"{rule}: needs a name after the colon, e.g. {rule}:budget_tenant")
        return value
    allowed = ["st_tenant", *JOB_ID_FIELDS, *(f"{r}:<name>" for r in NAMED_RULES)]
    raise ConfigError(path, f"must be one of {', '.join(allowed)}; got {describe(value)}")
