"""``cache: semantic`` and ``cache.semantic``: defaults, validation naming the field, check-config's view."""

from __future__ import annotations

import json
from typing import Any

import pytest

from guardproxy.cli import masked
from guardproxy.config.settings import SemanticCacheConfig, parse_config
from guardproxy.config.validation import ConfigError


def raw(**extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "upstreams": {"openai": {"base_url": "https://api.openai.com/v1", "api_key": "sk-test"}},
        "models": {"gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.00},
                   "text-embedding-3-small": {"input": 0.02}},
        "tenants": {"acme": {"cache": "semantic"}, "globex": {"cache": True}, "initech": {}},
    }
    out.update(extra)
    return out


def test_cache_semantic_switches_on_both_caches_per_tenant_and_defaults_apply() -> None:
    config = parse_config(raw(), {})
    acme, globex, initech = (config.policy_for(t) for t in ("acme", "globex", "initech"))
    assert (acme.cache, acme.semantic_cache) == (True, True)
    assert (globex.cache, globex.semantic_cache) == (True, False)
    assert (initech.cache, initech.semantic_cache) == (False, False)
    assert config.cache.semantic == SemanticCacheConfig()
    assert config.cache.semantic == SemanticCacheConfig("text-embedding-3-small", 256, 0.92, 2000, 4)
    # the defaults' setting is inherited, and a tenant may turn it off
    inherited = parse_config(raw(budgets={"defaults": {"cache": "semantic"}},
                                 tenants={"a": {}, "b": {"cache": False}}), {})
    assert inherited.policy_for("a").semantic_cache and not inherited.policy_for("b").cache


def test_the_semantic_settings_are_read() -> None:
    settings = {"embeddings_model": "text-embedding-3-small", "dimensions": 512, "threshold": 0.95,
                "max_entries": 100, "max_messages": 2}
    config = parse_config(raw(cache={"ttl_s": 60, "semantic": settings}), {})
    assert config.cache.semantic == SemanticCacheConfig("text-embedding-3-small", 512, 0.95, 100, 2)
    view = masked(config)
    assert view["cache"]["semantic"]["threshold"] == 0.95 and view["tenants"]["acme"]["cache"] == "semantic"
    json.dumps(view)  # check-config prints it: plain data only


@pytest.mark.parametrize(("change", "field"), [
    ({"tenants": {"acme": {"cache": "fuzzy"}}}, "tenants.acme.cache"),
    ({"tenants": {"acme": {"cache": None}}}, "tenants.acme.cache"),
    ({"cache": {"semantic": {"threshold": 0.3}}}, "cache.semantic.threshold"),
    ({"cache": {"semantic": {"threshold": 1.5}}}, "cache.semantic.threshold"),
    ({"cache": {"semantic": {"dimensions": 0}}}, "cache.semantic.dimensions"),
    ({"cache": {"semantic": {"max_entries": 0}}}, "cache.semantic.max_entries"),
    ({"cache": {"semantic": {"max_messages": 0}}}, "cache.semantic.max_messages"),
    ({"cache": {"semantic": {"size": 3}}}, "cache.semantic.size"),
    ({"cache": {"semantic": {"embeddings_model": "text-embedding-3-large"}}}, "cache.semantic.embeddings_model"),
])
def test_bad_settings_name_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(raw(**change), {})
    assert info.value.path == field, str(info.value)


def test_an_unconfigured_embeddings_model_is_fine_while_no_tenant_uses_it() -> None:
    config = parse_config(raw(tenants={"acme": {"cache": True}},
                              cache={"semantic": {"embeddings_model": "nowhere"}}), {})
    assert config.cache.semantic.embeddings_model == "nowhere"
    with pytest.raises(ConfigError, match="names no configured model"):
        parse_config(raw(cache={"semantic": {"embeddings_model": "nowhere"}}), {})
