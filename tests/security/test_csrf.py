"""Cross-site request forgery on the admin API, over a real socket with a real redis-server.

The issue's reproduction: a page on another site auto-submits
``<form method=POST enctype=text/plain action=".../admin/tenants/delta/spend">`` with a body shaped
as JSON; the browser adds the ``guardproxy_admin`` cookie (or the Basic credentials it signed in
with) and $1,000,000 was booked. What such a form, or a cross-site ``fetch``, can send is refused on
every route that changes state; the same routes still work for a script with the key in a header.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from guardproxy.config.settings import load_config
from tests.helpers import config_dict
from tests.security.wire import ADMIN_KEY, store_snapshot

BEARER = {"authorization": f"Bearer {ADMIN_KEY}"}
BASIC = {"authorization": "Basic " + base64.b64encode(f"admin:{ADMIN_KEY}".encode()).decode()}
COOKIE = {"cookie": f"guardproxy_admin={ADMIN_KEY}"}
# What enctype=text/plain makes of <input name='{"cost_usd": 1000000, "x": "' value='"}'>.
FORGED_SPEND = b'{"cost_usd": 1000000, "description": "x", "idempotency_key": "csrf", "x": "="}'
FORM = {"content-type": "text/plain"}

#: Every admin route that changes state: (method, path, a body it accepts).
WRITES = [
    ("POST", "/admin/tenants/delta/spend", FORGED_SPEND),
    ("PUT", "/admin/tenants/acme/budget", b'{"daily_usd": 1000000}'),
    ("DELETE", "/admin/tenants/acme/budget", b""),
    ("POST", "/admin/tenants/acme/keys", b'{"name": "attacker"}'),
    ("DELETE", "/admin/tenants/acme/keys/key_0123456789abcdef", b""),
    ("POST", "/admin/reload", b""),
]


@pytest.fixture
def proxy(upstream_url: str, redis_url: str, serve_proxy: Callable[..., str], tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config_dict(upstream_url, store={"redis_url": redis_url},
                                               admin={"api_key": ADMIN_KEY})))
    yield serve_proxy(load_config(path), config_path=path)


def send(url: str, method: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.request(method, url + path, content=body, headers=headers)


def spent(redis_url: str) -> int:
    """delta's spend, its day and month counters summed."""
    client = redis.Redis.from_url(redis_url)
    try:
        return sum(int(client.get(k) or 0) for k in client.scan_iter("gp:{delta}:spend:*"))
    finally:
        client.close()


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[f"{m} {p}" for m, p, _ in WRITES])
@pytest.mark.parametrize("browser", [
    # the forged form: the credential the browser keeps adding, as text/plain, with the site it came from
    {**COOKIE, **FORM, "origin": "https://evil.example", "sec-fetch-site": "cross-site"},
    {**BASIC, **FORM, "origin": "https://evil.example", "sec-fetch-site": "cross-site"},
    # an older browser: no Sec-Fetch-*, no Origin on the form post
    {**COOKIE, **FORM}, {**BASIC, **FORM},
    {**COOKIE, "content-type": "application/x-www-form-urlencoded"},
    {**BASIC, "content-type": "multipart/form-data; boundary=x"},
    # a sandboxed iframe's form: Origin null
    {**COOKIE, **FORM, "origin": "null"},
], ids=["cookie-form", "basic-form", "cookie-no-fetch-metadata", "basic-no-fetch-metadata", "cookie-urlencoded",
        "basic-multipart", "cookie-origin-null"])
def test_what_a_cross_site_form_can_send_changes_nothing(
    proxy: str, redis_url: str, method: str, path: str, body: bytes, browser: dict[str, str]
) -> None:
    before = store_snapshot(redis_url)
    answer = send(proxy, method, path, body, browser)
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    assert error["code"] == "csrf_refused" and error["type"] == "permission_error"
    assert store_snapshot(redis_url) == before and spent(redis_url) == 0


@pytest.mark.parametrize(("method", "path", "body"), WRITES, ids=[f"{m} {p}" for m, p, _ in WRITES])
@pytest.mark.parametrize("site", [
    {"origin": "https://evil.example"}, {"origin": "null"}, {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site"}, {"origin": "http://127.0.0.1:1"},
], ids=["origin", "origin-null", "cross-site", "same-site", "other-port"])
def test_another_origin_is_refused_even_with_the_key_in_a_header(
    proxy: str, redis_url: str, method: str, path: str, body: bytes, site: dict[str, str]
) -> None:
    before = store_snapshot(redis_url)
    answer = send(proxy, method, path, body, {**BEARER, "content-type": "application/json", **site})
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "csrf_refused", answer.text
    assert store_snapshot(redis_url) == before


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "", "text/json"])
def test_an_admin_body_must_be_declared_json(proxy: str, redis_url: str, content_type: str) -> None:
    headers = {**BEARER, "content-type": content_type} if content_type else BEARER
    answer = send(proxy, "POST", "/admin/tenants/delta/spend", FORGED_SPEND, headers)
    assert answer.status_code == 415 and answer.json()["error"]["code"] == "unsupported_media_type", answer.text
    assert spent(redis_url) == 0


def test_a_script_with_the_key_in_a_header_still_changes_state(proxy: str, redis_url: str) -> None:
    own_origin = proxy  # what the proxy's own origin sends (and what curl does not send at all)
    json_headers = {**BEARER, "content-type": "application/json; charset=utf-8"}
    booked = send(proxy, "POST", "/admin/tenants/delta/spend",
                  b'{"cost_usd": 0.5, "description": "batch", "idempotency_key": "ok"}', json_headers)
    assert booked.status_code == 201, booked.text
    assert spent(redis_url) == 2 * 500_000  # on the day and on the month
    put = send(proxy, "PUT", "/admin/tenants/acme/budget", b'{"daily_usd": 3}',
               {**json_headers, "origin": own_origin, "sec-fetch-site": "same-origin"})
    assert put.status_code == 200, put.text
    created = send(proxy, "POST", "/admin/tenants/acme/keys", b'{"name": "van"}', {"api-key": ADMIN_KEY,
                                                                                   "content-type": "application/json"})
    assert created.status_code == 201, created.text
    assert send(proxy, "DELETE", f"/admin/tenants/acme/keys/{created.json()['key_id']}", b"", BEARER).status_code == 200
    assert send(proxy, "DELETE", "/admin/tenants/acme/budget", b"", {**BEARER, "sec-fetch-site": "none"}).status_code \
        == 200
    assert send(proxy, "POST", "/admin/reload", b"", BEARER).status_code == 200


def test_the_cookie_and_basic_credentials_still_open_the_read_routes(proxy: str) -> None:
    for credential in (COOKIE, BASIC):
        for path in ("/admin/", "/admin/tenants", "/admin/tenants/acme", "/admin/reload"):
            answer = httpx.get(proxy + path, headers={**credential, "sec-fetch-site": "same-origin"})
            assert answer.status_code == 200, (path, answer.text)
