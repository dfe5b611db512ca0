"""Prices from the genai-prices catalog for models proxy.yaml leaves unpriced."""

from __future__ import annotations

import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest

from guardproxy.budget.pricing import Price
from guardproxy.config import prices as price_catalog
from guardproxy.config.settings import parse_config
from guardproxy.config.validation import ConfigError

# The example proxy.yaml's models as they were priced by hand before the catalog took over.
HAND_TYPED = {
    "gpt-4o": Price(2_500_000, 1_250_000, 10_000_000),
    "gpt-4o-mini": Price(150_000, 75_000, 600_000),
    "gpt-4.1": Price(2_000_000, 500_000, 8_000_000),
    "gpt-4.1-mini": Price(400_000, 100_000, 1_600_000),
    "gpt-4.1-nano": Price(100_000, 25_000, 400_000),
    "text-embedding-3-small": Price(20_000, 20_000, 0),
}


def config_with(models: dict[str, Any], **upstream: Any) -> Any:
    raw = {"upstreams": {"openai": {"base_url": "https://api.openai.com/v1", **upstream}}, "models": models}
    return parse_config(raw, {})


def test_the_catalog_prices_the_example_models_as_they_were_typed_by_hand() -> None:
    config = config_with({name: {} for name in HAND_TYPED})
    for name, price in HAND_TYPED.items():
        assert config.models[name].price == price, name
        assert config.models[name].price_source == f"genai-prices 0.2.3 (openai/{name})"


def test_prices_in_proxy_yaml_win_field_by_field() -> None:
    config = config_with({"gpt-4o": {"output": 12}, "gpt-4o-mini": {"input": 1, "output": 2}})
    assert config.models["gpt-4o"].price == Price(2_500_000, 1_250_000, 12_000_000)
    assert config.models["gpt-4o"].price_source == "proxy.yaml + genai-prices 0.2.3 (openai/gpt-4o)"
    # input and output both given: the catalog is not asked, cached_input defaults to input as before.
    assert config.models["gpt-4o-mini"].price == Price(1_000_000, 1_000_000, 2_000_000)
    assert config.models["gpt-4o-mini"].price_source == "proxy.yaml"


@pytest.mark.parametrize(
    ("base_url", "name", "provider", "expected"),
    [
        ("https://api.x.ai/v1", "grok", "", "x-ai"),  # from the host
        ("http://127.0.0.1:9/v1", "openai", "", "openai"),  # from the upstream's name
        ("http://127.0.0.1:9/v1", "local", "anthropic", "anthropic"),  # named
    ],
)
def test_the_provider_comes_from_config_host_or_name(base_url: str, name: str, provider: str, expected: str) -> None:
    assert price_catalog.provider_for(base_url, name, provider) == expected


def test_a_model_nobody_prices_is_a_config_error_naming_the_field() -> None:
    with pytest.raises(ConfigError) as unknown:
        config_with({"house-model": {"max_output_tokens": 10}})
    assert unknown.value.path == "models.house-model.input" and "guardproxy prices house-model" in str(unknown.value)
    raw = {"upstreams": {"vllm": {"base_url": "http://127.0.0.1:9/v1"}}, "models": {"gpt-4o": {}}}
    with pytest.raises(ConfigError) as no_provider:
        parse_config(raw, {})
    assert no_provider.value.path == "models.gpt-4o.input" and "upstreams.vllm.provider" in str(no_provider.value)


def test_a_tiered_price_takes_the_base_tier_and_warns() -> None:
    raw = {"upstreams": {"anthropic": {"base_url": "https://api.anthropic.com/v1"}},
           "models": {"claude-sonnet-4-5": {}}}
    config = parse_config(raw, {})
    assert config.models["claude-sonnet-4-5"].price == Price(3_000_000, 300_000, 15_000_000)
    assert any("claude-sonnet-4-5" in w and "200000+" in w for w in config.warnings)


def test_catalog_prices_are_exact_decimals() -> None:
    found = price_catalog.lookup("gpt-4o-mini", "openai")
    assert found is not None and found.cached_input == Decimal("0.075") and isinstance(found.input, Decimal)


def test_the_catalog_works_without_a_network() -> None:
    """Import and look-up in a process where opening any socket fails."""
    script = (
        "import socket\n"
        "def refuse(*a, **k):\n    raise OSError('network used')\n"
        "socket.socket.connect = refuse\nsocket.create_connection = refuse\nsocket.getaddrinfo = refuse\n"
        "from guardproxy.config import prices as price_catalog\n"
        "p = price_catalog.lookup('gpt-4.1', 'openai')\n"
        "print(p.input, p.cached_input, p.output, price_catalog.provider_for('https://api.openai.com/v1', 'x'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "0.5", "8", "openai"]
