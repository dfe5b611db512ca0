"""CORS: browser preflights answered for the configured origins only; none at all by default."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from guardproxy.config import parse_config
from guardproxy.validation import ConfigError
from tests.conftest import TENANT_KEY, config_dict
from tests.e2e.test_chat import HI

APP = "https://dispatch.example.com"
PREFLIGHT = {"access-control-request-method": "POST",
             "access-control-request-headers": "authorization, content-type, x-stainless-os"}


def test_a_preflight_from_an_allowed_origin_succeeds_and_another_origin_gets_nothing(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]
) -> None:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, server={"cors_allow_origins": [APP]})
    url = serve_proxy(parse_config(raw, {}))
    allowed = httpx.options(url + "/v1/chat/completions", headers={"origin": APP, **PREFLIGHT})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "x-stainless-os" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers

    other = httpx.options(url + "/v1/chat/completions", headers={"origin": "https://evil.example", **PREFLIGHT})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers

    call = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                      headers={"origin": APP, "authorization": f"Bearer {TENANT_KEY}"})
    assert call.status_code == 200 and call.headers["access-control-allow-origin"] == APP
    exposed = {h.strip() for h in call.headers["access-control-expose-headers"].split(",")}
    assert {"x-guardproxy-budget-state", "x-guardproxy-model", "x-ratelimit-remaining-requests",
            "x-request-id"} <= exposed
    assert "x-guardproxy-budget-state" in call.headers
    foreign = httpx.post(url + "/v1/chat/completions", json={"model": "gpt-4o-mini", "messages": HI},
                         headers={"origin": "https://evil.example", "authorization": f"Bearer {TENANT_KEY}"})
    assert "access-control-allow-origin" not in foreign.headers


def test_without_origins_there_are_no_cors_headers_and_options_is_not_special(
    upstream_url: str, serve_proxy: Callable[..., str]
) -> None:
    url = serve_proxy(parse_config(config_dict(upstream_url), {}))
    preflight = httpx.options(url + "/v1/chat/completions", headers={"origin": APP, **PREFLIGHT})
    assert preflight.status_code == 405
    assert not [h for h in preflight.headers if h.startswith("access-control-")]
    models = httpx.get(url + "/v1/models", headers={"origin": APP, "authorization": f"Bearer {TENANT_KEY}"})
    assert models.status_code == 200 and not [h for h in models.headers if h.startswith("access-control-")]


@pytest.mark.parametrize("origin", ["https://app.example.com/", "app.example.com", ""])
def test_an_origin_that_is_not_one_is_a_config_error(origin: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config_dict("http://127.0.0.1:9", server={"cors_allow_origins": [origin]}), {})
    assert info.value.path == "server.cors_allow_origins[0]"
