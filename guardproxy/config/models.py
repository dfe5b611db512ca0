"""Where each model goes and what it costs: the ``upstreams:`` and ``models:`` sections of ``proxy.yaml``.

Kept apart from ``config`` because routing grew its own rules: upstream kinds (OpenAI-compatible or
Azure), circuit breakers, per-model deployment names and fallbacks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

from guardproxy.budget.pricing import Price, price_to_micros
from guardproxy.config.validation import ConfigError, Fields, describe


@dataclass(frozen=True)
class BreakerConfig:
    """Open the upstream's circuit after ``failures`` consecutive failures (0: never); probe after ``cooldown_s``."""

    failures: int = 5
    cooldown_s: float = 30.0


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    base_url: str
    api_key: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 600.0
    #: ``openai`` (any OpenAI-compatible API) or ``azure`` (Azure OpenAI: ``api-key`` header, deployments).
    kind: str = "openai"
    #: Azure only: the ``api-version`` of deployment paths; empty means the ``/openai/v1/`` surface.
    api_version: str = ""
    #: When set, the tenant id is sent upstream in this header (e.g. ``Helicone-User-Id``).
    tenant_header: str = ""
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    #: The price catalog's provider id for models left unpriced (``price_catalog``); empty: guessed.
    provider: str = ""

    @property
    def azure(self) -> bool:
        return self.kind == "azure"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    upstream: str
    price: Price
    max_output_tokens: int
    downgrade_to: str | None = None
    #: The name the upstream knows the model by (Azure: the deployment); ``None``: the model's own name.
    deployment: str | None = None
    #: Models tried in order when this model's upstream fails before answering.
    fallbacks: tuple[str, ...] = ()
    #: Where ``price`` came from: ``proxy.yaml``, the catalog (package, version, provider/model) or both.
    price_source: str = "proxy.yaml"


def parse_upstreams(f: Fields) -> dict[str, UpstreamConfig]:
    if not f.raw:
        raise ConfigError(f.path or "upstreams", "at least one upstream must be configured")
    out = {}
    for name in list(f.raw):
        u = f.section(name)
        base_url = u.text("base_url", "", allow_empty=False).rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(u.at("base_url"), f"must be an http:// or https:// URL, got {describe(base_url)}")
        timeout = u.decimal("timeout_s", Decimal(600), min_value=Decimal("0.001"))
        kind = u.text("kind", UpstreamConfig.kind, choices=("openai", "azure"))
        api_version = u.text("api_version", "")
        if api_version and kind != "azure":
            raise ConfigError(u.at("api_version"), "is only used with kind: azure")
        if kind == "azure":
            # The resource endpoint is what Azure's portal shows; the API surface is chosen per request.
            base_url = base_url.removesuffix("/openai/v1").removesuffix("/openai")
        out[name] = UpstreamConfig(
            name=name, base_url=base_url, api_key=u.text("api_key", ""), headers=u.text_map("headers"),
            timeout_s=float(timeout), kind=kind, api_version=api_version,
            tenant_header=u.text("tenant_header", ""), breaker=_breaker(u.section("breaker")),
            provider=u.text("provider", ""),
        )
        _header_safe(u, out[name])
        u.done()
    f.done()
    return out


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # no CR, LF or other control characters


def _header_safe(u: Fields, upstream: UpstreamConfig) -> None:
    """What goes into upstream request headers must be a valid header: refused at start-up, not per call."""
    if not _HEADER_VALUE.fullmatch(upstream.api_key):
        raise ConfigError(u.at("api_key"), "must not contain line breaks or control characters")
    if upstream.tenant_header and not _HEADER_NAME.fullmatch(upstream.tenant_header):
        raise ConfigError(u.at("tenant_header"), f"is not a valid header name: {describe(upstream.tenant_header)}")
    for name, value in upstream.headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(u.at(f"headers.{name}"), "is not a valid header name")
        if not _HEADER_VALUE.fullmatch(value):
            raise ConfigError(u.at(f"headers.{name}"), "must not contain line breaks or control characters")


def _breaker(f: Fields) -> BreakerConfig:
    out = BreakerConfig(
        failures=f.integer("failures", BreakerConfig.failures, min_value=0),
        cooldown_s=float(f.decimal("cooldown_s", Decimal(str(BreakerConfig.cooldown_s)), min_value=Decimal("0.001"))),
    )
    f.done()
    return out


def parse_models(
    f: Fields, upstreams: Mapping[str, UpstreamConfig], warnings: list[str] | None = None
) -> dict[str, ModelConfig]:
    if not f.raw:
        raise ConfigError(f.path or "models", "at least one model must be configured")
    out = {}
    for name in list(f.raw):
        m = f.section(name)
        upstream = m.text("upstream", next(iter(upstreams)) if len(upstreams) == 1 else "", allow_empty=False)
        if upstream not in upstreams:
            raise ConfigError(m.at("upstream"), f"names no configured upstream (have: {', '.join(upstreams)})")
        price, source = _price(m, name, upstreams[upstream], warnings)
        out[name] = ModelConfig(
            name=name, upstream=upstream, price=price, price_source=source,
            max_output_tokens=m.integer("max_output_tokens", 16384, min_value=1),
            downgrade_to=m.optional_str("downgrade_to"),
            deployment=m.optional_str("deployment"),
            fallbacks=tuple(m.text_list("fallbacks")),
        )
        m.done()
    f.done()
    for name, model in out.items():
        for i, fallback in enumerate(model.fallbacks):
            if fallback not in out:
                raise ConfigError(f"models.{name}.fallbacks[{i}]", f"names no configured model: {fallback!r}")
            if fallback == name or fallback in model.fallbacks[:i]:
                raise ConfigError(f"models.{name}.fallbacks[{i}]", f"repeats {fallback!r}: each model is tried once")
    for name, model in out.items():
        seen = [name]
        target = model.downgrade_to
        while target is not None:
            if target not in out:
                raise ConfigError(f"models.{seen[-1]}.downgrade_to", f"names no configured model: {target!r}")
            if target in seen:
                raise ConfigError(f"models.{name}.downgrade_to", f"forms a cycle: {' -> '.join([*seen, target])}")
            seen.append(target)
            target = out[target].downgrade_to
    return out


def _price(m: Fields, name: str, upstream: UpstreamConfig, warnings: list[str] | None) -> tuple[Price, str]:
    """The model's price and its source: proxy.yaml's fields, and the catalog's for any left out.

    The catalog is asked only when input or output is missing; proxy.yaml's values always win.
    """
    zero = Decimal(0)
    given = {key: m.decimal(key, None, min_value=zero) for key in ("input", "cached_input", "output") if m.has(key)}
    if "input" in given and "output" in given:
        input_price = given["input"]
        return Price(
            input=price_to_micros(input_price),
            cached_input=price_to_micros(given.get("cached_input", input_price)),
            output=price_to_micros(given["output"]),
        ), "proxy.yaml"
    from guardproxy.config import prices as price_catalog

    provider = price_catalog.provider_for(upstream.base_url, upstream.name, upstream.provider)
    if provider is None:
        raise ConfigError(m.at("input"), f"has no price: set input and output (USD per 1M tokens), or set "
                          f"upstreams.{upstream.name}.provider so that {price_catalog.CATALOG} can price it")
    found = price_catalog.lookup(name, provider)
    if found is None or found.input is None:
        raise ConfigError(m.at("input"), f"has no price: set input and output (USD per 1M tokens); "
                          f"{price_catalog.CATALOG} {price_catalog.catalog_version()} does not know {name!r} "
                          f"at provider {provider!r} (try `guardproxy prices {name} --provider {provider}`)")
    if found.tiered_from is not None and warnings is not None:
        warnings.append(f"models.{name}: priced at {found.provider}'s base tier; prompts of {found.tiered_from}+ "
                        "tokens cost more there (set input/output here to charge differently)")
    input_price = given.get("input", found.input)
    prices = Price(
        input=price_to_micros(input_price),
        cached_input=price_to_micros(given.get("cached_input", found.cached_input or input_price)),
        output=price_to_micros(given.get("output", found.output or zero)),
    )
    return prices, ("proxy.yaml + " if given else "") + found.source
