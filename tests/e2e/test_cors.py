"""CORS: browser preflights answered for the configured origins only; none at all by default."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from guardproxy.config.settings import parse_config
from guardproxy.config.validation import ConfigError
from tests.helpers import HI, TENANT_KEY, chromium, config_dict, run_chromium
from tests.servers import free_port, serve_in_thread

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


PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
fetch("%(proxy)s/v1/chat/completions", {
  method: "POST",
  headers: {"Authorization": "Bearer %(key)s", "Content-Type": "application/json"},
  body: JSON.stringify({model: "gpt-4o-mini", messages: [{role: "user", content: "hi"}]}),
}).then(r => { document.getElementById("out").textContent =
    "status=" + r.status + " state=" + r.headers.get("x-guardproxy-budget-state"); })
  .catch(e => { document.getElementById("out").textContent = "blocked " + e.name; });
</script></body></html>"""


def test_a_browser_page_calls_the_proxy_from_an_allowed_origin_only(
    upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path
) -> None:
    chromium()
    allowed_port, other_port = free_port(), free_port()
    raw = config_dict(upstream_url, store={"redis_url": redis_url},
                      server={"cors_allow_origins": [f"http://127.0.0.1:{allowed_port}"]})
    proxy = serve_proxy(parse_config(raw, {}))

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(PAGE % {"proxy": proxy, "key": TENANT_KEY})

    app = Starlette(routes=[Route("/", page)])
    with serve_in_thread(app, port=allowed_port) as allowed, serve_in_thread(app, port=other_port) as other:
        ok = run_chromium(allowed + "/", tmp_path / "allowed", "--dump-dom", "--virtual-time-budget=10000").stdout
        refused = run_chromium(other + "/", tmp_path / "other", "--dump-dom", "--virtual-time-budget=10000").stdout
    assert "status=200 state=active" in ok, ok[-500:]
    assert "blocked TypeError" in refused, refused[-500:]
