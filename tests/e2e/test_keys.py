"""Tenant keys made at runtime: two replicas on one real Redis, revocation, expiry, an outage, the CLI."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
import redis
import yaml

from guardproxy.config.settings import Config, hash_key
from tests.helpers import HI, TENANT_KEY, all_settled, config_dict, guardproxy, make_config, redis_int
from tests.redis_procs import RedisServer

ADMIN_KEY = "adm-keys-secret"
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def chat(url: str, key: str) -> int:
    """The status of one small chat call with ``key``."""
    reply = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                       json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 20})
    return reply.status_code


def create(url: str, tenant: str, **body: object) -> dict[str, str]:
    reply = httpx.post(f"{url}/admin/tenants/{tenant}/keys", headers=ADMIN, json={"name": "van 12", **body})
    assert reply.status_code == 201, reply.text
    created: dict[str, str] = reply.json()
    return created


@pytest.fixture
def config(upstream_url: str, redis_url: str) -> Config:
    return make_config(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})


def test_a_key_made_on_one_replica_works_on_the_other_and_revocation_reaches_both(
    config: Config, serve_proxy: Callable[..., str], redis_url: str
) -> None:
    a, b = serve_proxy(config), serve_proxy(config)
    made = create(a, "acme")
    assert re.fullmatch(r"gp-[A-Za-z0-9_-]{43}", made["key"])
    assert made["prefix"] == made["key"][:10] and made["key_id"].startswith("key_")
    # Only the digest is stored: the key itself is nowhere in Redis.
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        dump = "".join(str(v) for k in raw.keys("*keys*") for v in raw.hgetall(k).values())
        assert made["key"] not in dump and hash_key(made["key"]) in raw.hkeys("gp:keys")
    finally:
        raw.close()
    assert chat(b, made["key"]) == 200  # B never saw the key: one HGET finds it
    client = openai.OpenAI(base_url=b + "/v1", api_key=made["key"], max_retries=0)
    try:
        answer = client.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=20)
    finally:
        client.close()
    assert answer.choices[0].message.content
    all_settled(redis_url)
    assert redis_int(redis_url, "gp:{acme}:spend:month:" + datetime.now(UTC).strftime("%Y-%m")) > 0

    revoked = httpx.delete(f"{a}/admin/tenants/acme/keys/{made['key_id']}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    started = time.monotonic()
    assert chat(a, made["key"]) == 401  # the replica that revoked drops its cache at once
    while chat(b, made["key"]) != 401:  # B trusted its cache for at most a second
        assert time.monotonic() - started < 1.5, "a revoked key still worked after 1.5 s"
        time.sleep(0.05)
    assert time.monotonic() - started <= 1.5
    assert chat(a, made["key"]) == 401 and chat(b, made["key"]) == 401
    assert chat(b, TENANT_KEY) == 200  # proxy.yaml's keys are untouched


def test_listing_shows_metadata_and_last_use_but_never_the_key(
    config: Config, serve_proxy: Callable[..., str]
) -> None:
    url = serve_proxy(config)
    made = create(url, "newco", expires_at="2999-01-01T00:00:00Z")
    assert httpx.get(f"{url}/admin/tenants/newco/keys", headers=ADMIN).json()["data"][0]["last_used_at"] is None
    assert chat(url, made["key"]) == 200
    listed = httpx.get(f"{url}/admin/tenants/newco/keys", headers=ADMIN)
    assert listed.status_code == 200 and made["key"] not in listed.text
    (entry,) = listed.json()["data"]
    assert entry["key_id"] == made["key_id"] and entry["name"] == "van 12" and entry["prefix"] == made["prefix"]
    assert entry["expires_at"] == "2999-01-01T00:00:00Z" and entry["last_used_at"] is not None
    # A tenant that only exists through a runtime key is listed with its budget (proxy.yaml's defaults).
    tenants = httpx.get(f"{url}/admin/tenants", headers=ADMIN).json()["data"]
    assert "newco" in {t["tenant"] for t in tenants}
    models = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {made['key']}"})
    assert models.status_code == 200


def test_bad_requests_get_openai_errors(config: Config, serve_proxy: Callable[..., str]) -> None:
    url = serve_proxy(config)
    cases = [
        ("acme", {}, "name"),
        ("acme", {"name": "x", "expires_at": "2001-01-01T00:00:00Z"}, "expires_at"),
        ("acme", {"name": "x", "expires_at": "soon"}, "expires_at"),
        ("acme", {"name": "x", "scope": "all"}, "scope"),
        ("acme", {"name": "x" * 129}, "name"),
    ]
    for tenant, body, param in cases:
        reply = httpx.post(f"{url}/admin/tenants/{tenant}/keys", headers=ADMIN, json=body)
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert httpx.post(f"{url}/admin/tenants/-bad/keys", headers=ADMIN, json={"name": "x"}).status_code == 400
    assert httpx.post(f"{url}/admin/tenants/acme/keys", json={"name": "x"}).status_code == 401
    assert httpx.delete(f"{url}/admin/tenants/acme/keys/key_nope", headers=ADMIN).status_code == 404


def test_an_expired_key_is_refused(upstream_url: str, redis_url: str, serve_proxy: Callable[..., str]) -> None:
    now = [datetime.now(UTC)]
    config = make_config(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    url = serve_proxy(config, clock=lambda: now[0])
    made = create(url, "acme", expires_at=(now[0] + timedelta(hours=1)).isoformat())
    assert chat(url, made["key"]) == 200
    now[0] += timedelta(hours=2)
    assert chat(url, made["key"]) == 401


def test_an_unknown_key_while_the_store_is_down_is_503_not_401(
    upstream_url: str, serve_proxy: Callable[..., str]
) -> None:
    server = RedisServer()
    server.start()
    try:
        config = make_config(upstream_url, store={"redis_url": server.url}, admin={"api_key": ADMIN_KEY})
        url = serve_proxy(config)
        made = create(url, "acme")
        server.stop()
        time.sleep(1.1)  # past the positive cache
        reply = httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {made['key']}"},
                           json={"model": "gpt-4o-mini", "messages": HI})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "budget_store_unavailable"
        assert reply.headers["retry-after"] == "1"
    finally:
        server.stop()


@pytest.mark.parametrize("engine", ["redis", "sqlite"])
def test_the_cli_creates_lists_and_revokes_through_the_store(
    engine: str, upstream_url: str, request: pytest.FixtureRequest, serve_proxy: Callable[..., str], tmp_path: Path
) -> None:
    """On Redis and on the SQLite file alike: the CLI and the serving proxy share the store."""
    store = ({"redis_url": request.getfixturevalue("redis_url")} if engine == "redis"
             else {"url": f"sqlite://{tmp_path}/spend.db"})
    raw = config_dict(upstream_url, store=store)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(raw))
    url = serve_proxy(make_config(upstream_url, store=store))
    made = guardproxy("keys", "create", "acme", "--name", "night shift", "--expires-at", "2999-06-01T00:00:00Z",
                      "--config", str(path))
    assert made.returncode == 0, made.stderr
    key = re.search(r"^key:\s+(gp-\S+)$", made.stdout, re.M)
    key_id = re.search(r"^key_id:\s+(key_\S+)$", made.stdout, re.M)
    assert key and key_id
    assert chat(url, key.group(1)) == 200
    listed = guardproxy("keys", "list", "acme", "--config", str(path))
    assert listed.returncode == 0 and key_id.group(1) in listed.stdout and "night shift" in listed.stdout
    assert key.group(1) not in listed.stdout
    assert guardproxy("keys", "revoke", "acme", key_id.group(1), "--config", str(path)).returncode == 0
    time.sleep(1.05)
    assert chat(url, key.group(1)) == 401
    assert guardproxy("keys", "revoke", "acme", key_id.group(1), "--config", str(path)).returncode == 1
