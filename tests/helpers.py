"""What many tests share, imported from here (never from another test module or a conftest): the test
tenants' keys, configs, and small readers of the store.

Fixtures (a real redis-server, the fake upstream, ``serve_proxy``) live in ``tests/conftest.py``.
"""

from __future__ import annotations

from typing import Any

import orjson
import redis

from guardproxy.config.settings import Config, hash_key, parse_config

TENANT_KEY = "tk-acme-secret"
OTHER_TENANT_KEY = "tk-globex-secret"
SERVICE_KEY = "sk-service-secret"

#: A small chat request body.
CHAT = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "Say hello to the dispatcher."}]})


def config_dict(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A test config as YAML would give it; ``overrides`` replace top-level sections."""
    raw: dict[str, Any] = {
        "upstreams": {"openai": {"base_url": f"{upstream_url}/v1", "api_key": "sk-upstream-secret"}},
        "models": {
            "gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.00, "max_output_tokens": 1000,
                       "downgrade_to": "gpt-4o-mini"},
            "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60, "max_output_tokens": 1000},
        },
        "tenants": {
            "acme": {"api_keys": [hash_key(TENANT_KEY)], "daily_usd": 1, "monthly_usd": 20},
            "globex": {"api_keys": [hash_key(OTHER_TENANT_KEY)], "timezone": "America/Chicago"},
        },
        "auth": {"service_keys": [hash_key(SERVICE_KEY)]},
    }
    raw.update(overrides)
    return raw


def make_config(upstream_url: str, **overrides: Any) -> Config:
    return parse_config(config_dict(upstream_url, **overrides), {})


def minimal() -> dict[str, Any]:
    """The smallest valid config: one upstream and one priced model."""
    return {
        "upstreams": {"openai": {"base_url": "https://api.openai.com/v1", "api_key": "sk-test"}},
        "models": {"gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.00}},
    }


def redis_int(url: str, key: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        value = client.get(key)
    finally:
        client.close()
    return int(value or 0)
