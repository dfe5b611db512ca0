"""The ``servicetitan`` section of proxy.yaml (placeholder: only the empty section is accepted yet)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guardproxy.validation import ConfigError, Fields


@dataclass(frozen=True)
class ServiceTitanConfig:
    environment: str = "production"


def parse_servicetitan(raw: Any, path: str) -> ServiceTitanConfig | None:
    f = Fields(raw, path)
    if not f.raw:
        return None
    raise ConfigError(path, "ServiceTitan lookups are not supported yet")
