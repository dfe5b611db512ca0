"""Model prices from ``genai-prices`` (pydantic's maintained catalog), for models proxy.yaml leaves unpriced.

Consulted only while a config is loaded, never on the request path: the package ships its data
(no network at import or lookup) and its import costs about 0.2 s and 14 MB, paid only by a
config that needs it. Prices come back as exact ``Decimal`` USD per 1M tokens. A price that
depends on the prompt's length (long-context tiers) is taken at its base tier, the price of nearly
every call; ``tiered_from`` says from how many prompt tokens the provider charges more, so that the
config can warn about it (hand-typed prices win for those who send such prompts often).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import metadata
from typing import Any

CATALOG = "genai-prices"


@dataclass(frozen=True)
class CatalogPrice:
    """One model's catalog prices in USD per 1M tokens (``None``: the catalog has no such price)."""

    provider: str
    model_id: str
    input: Decimal | None
    cached_input: Decimal | None
    output: Decimal | None
    #: Prompt tokens from which the provider charges a higher tier (``None``: flat prices).
    tiered_from: int | None = None

    @property
    def source(self) -> str:
        return f"{CATALOG} {catalog_version()} ({self.provider}/{self.model_id})"


def catalog_version() -> str:
    try:
        return metadata.version(CATALOG)
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _snapshot() -> Any:
    from genai_prices import data_snapshot

    return data_snapshot.get_snapshot()


def provider_for(base_url: str, upstream_name: str, explicit: str = "") -> str | None:
    """The catalog provider of an upstream: ``explicit``, else known from ``base_url``'s host, else
    ``upstream_name`` when the catalog has a provider of that id; ``None`` when none fits."""
    snapshot = _snapshot()
    if explicit:
        return explicit
    try:
        provider: str = snapshot.find_provider(None, None, base_url).id
        return provider
    except LookupError:
        pass
    known = {p.id for p in snapshot.providers}
    return upstream_name if upstream_name in known else None


def providers() -> list[str]:
    return sorted(p.id for p in _snapshot().providers)


def lookup(model: str, provider: str | None, at: datetime | None = None) -> CatalogPrice | None:
    """The catalog's prices for ``model`` at ``provider`` (at time ``at``, default now); ``None`` if unknown.

    Without a provider the catalog picks the one that best knows the model's name.
    """
    try:
        found_provider, info = _snapshot().find_provider_model(model, None, provider, None)
    except LookupError:
        return None
    prices = info.get_prices(at or datetime.now(UTC))
    raw = [getattr(prices, name, None) for name in ("input_mtok", "cache_read_mtok", "output_mtok")]
    starts = [tier.start for price in raw if price is not None and not isinstance(price, Decimal)
              for tier in price.tiers]
    input_price, cached, output = (_base(price) for price in raw)
    return CatalogPrice(
        provider=found_provider.id, model_id=info.id, input=input_price, cached_input=cached, output=output,
        tiered_from=min(starts) if starts else None,
    )


def _base(price: Any) -> Decimal | None:
    """A flat price as is; a tiered one at its base tier."""
    if price is None or isinstance(price, Decimal):
        return price
    base: Decimal = price.base
    return base
