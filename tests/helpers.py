"""What many tests share, imported from here (never from another test module or a conftest): the test
tenants' keys, configs, prices and prompts, small readers and writers of the store, waiting for
settlement, SDK bursts, and the proxy, the CLI and a browser as processes.

Fixtures (a real redis-server, the fake upstream, ``serve_proxy``) live in ``tests/conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import openai
import orjson
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from guardproxy.budget.periods import periods_at
from guardproxy.budget.pricing import Price, Usage, cost_micros
from guardproxy.budget.records import Reservation
from guardproxy.config.settings import Config, hash_key, parse_config
from guardproxy.store.journal import Entry
from guardproxy.store.layout import Keys
from guardproxy.store.redis import BudgetStore
from guardproxy.store.sqlite import SqliteClient
from tests.servers import free_port, no_proxy_env, running_proxy, serve_in_thread

TENANT_KEY = "tk-acme-secret"
OTHER_TENANT_KEY = "tk-globex-secret"
SERVICE_KEY = "sk-service-secret"

#: Makes an ``openai`` client for a proxy URL (the ``sdk`` fixture of tests/e2e/conftest.py).
Sdk = Callable[[str], openai.OpenAI]

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


# --- the admin API and metrics ---

ADMIN_KEY = "adm-secret-key"


ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one series in a Prometheus text scrape (labels in any order)."""
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match and match.group(1) == name:
            found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            if found == labels:
                return float(match.group(3))
    raise AssertionError(f"no series {name}{labels}")



# --- a headless browser ---

WINDOW = (1200, 900)


def chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("chromium is not installed: `apt-get update && apt-get install -y chromium` (.ci/run does it)")
    return binary


def run_chromium(url: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    width, height = WINDOW
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        "--no-proxy-server", "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={width},{height}",
        *args, url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=90, env=no_proxy_env(), check=False)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    return done



# --- spend already made ---

#: acme's daily budget in these tests: 20,000 micro-USD (soft cap 16,000). The worst case of HI is
#: 10,033 on gpt-4o and 602 on gpt-4o-mini (1,000 output tokens each).
DAILY_MICROS = 20_000


def spend(url: str, micros: int, tenant: str = "acme", tz: str = "UTC") -> None:
    """Spend already made today, in the tenant's timezone ``tz`` (as if by earlier calls)."""
    client = redis.Redis.from_url(url)
    try:
        for key in keys(tenant, tz):
            client.incrby(key, micros)
    finally:
        client.close()



# --- a webhook receiver ---

class Receiver:
    """A webhook endpoint that records every POST (path, headers, JSON body)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self._lock = threading.Lock()

        async def record(request: Request) -> Response:
            body = await request.json()
            with self._lock:
                self.posts.append((request.url.path, dict(request.headers), body))
            return Response(status_code=204)

        self.app = Starlette(routes=[Route("/{path}", record, methods=["POST"])])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serving(self) -> Any:
        return serve_in_thread(self.app, port=self.port)

    def bodies(self, path: str) -> list[Any]:
        with self._lock:
            return [body for p, _, body in self.posts if p == path]


def alert_config(upstream_url: str, redis_url: str, receiver: Receiver) -> dict[str, Any]:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    # no soft cap: gpt-4o until it no longer fits, then gpt-4o-mini (a downgrade) until nothing fits
    raw["tenants"]["acme"].update(daily_usd=0.01, monthly_usd=1, soft_cap=1.0)
    raw["alerts"] = {
        "thresholds": [0.25, 0.5, 0.75],
        "webhooks": [
            {"url": receiver.url + "/json", "format": "json", "headers": {"authorization": "Bearer hook-secret"}},
            {"url": receiver.url + "/slack", "format": "slack", "events": ["threshold", "blocked"]},
        ],
    }
    return raw



# --- spend read back ---

def spent(redis_url: str) -> int:
    return redis_int(redis_url, keys()[0])



# --- prices, prompts, budget keys and waiting for settlement ---

GPT4O = Price(2_500_000, 1_250_000, 10_000_000)


MINI = Price(150_000, 75_000, 600_000)


HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello to the dispatcher."}]


# 3 tokens of message framing + "user" + 6 of text (Say| hello| to| the| dispatcher|.) + 3 of reply primer.
HI_PROMPT_TOKENS = 13


def keys(tenant: str = "acme", tz: str = "UTC") -> tuple[str, str]:
    p = periods_at(datetime.now(UTC), ZoneInfo(tz))
    return f"gp:{{{tenant}}}:spend:day:{p.day}", f"gp:{{{tenant}}}:spend:month:{p.month}"


def reserved(url: str, tenant: str = "acme") -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.get(f"gp:{{{tenant}}}:reserved") or 0) + int(client.zcard(f"gp:{{{tenant}}}:resv"))
    finally:
        client.close()


def wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def all_settled(url: str, tenant: str = "acme") -> None:
    """Complete answers settle right after they are sent (``answers.SettledAfterSending``): wait until
    no call of ``tenant`` holds a reservation, so that its spend and audit log are final."""
    wait_for(lambda: reserved(url, tenant) == 0)


def settled(url: str, key: str, expected: int) -> None:
    """Streams settle after their last byte reaches the client: wait for the charge to land."""
    try:
        wait_for(lambda: redis_int(url, key) == expected and reserved(url) == 0)
    except AssertionError:
        assert redis_int(url, key) == expected and reserved(url) == 0



# --- the guardproxy command ---

def guardproxy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "guardproxy", *args], capture_output=True, text=True, timeout=120,
        env={**no_proxy_env(), **(env or {})},
    )



# --- an SDK burst, a proxy process ---

PRICES = {"gpt-4o": GPT4O, "gpt-4o-mini": MINI}


# The fake answers as many tokens as asked, so each call costs exactly its reserved worst case.
CALL = {"model": "gpt-4o", "messages": HI, "max_tokens": 50}


FULL_LENGTH = {"x-fake-completion-tokens": "1000"}


async def sdk_calls(urls: list[str], count: int, headers: dict[str, str] = FULL_LENGTH
                    ) -> list[int | openai.RateLimitError]:
    """``count`` concurrent gpt-4o calls spread over ``urls`` with the real SDK (no retries): each
    admitted call's cost (its usage at the price of the model that answered), or the 429 it got."""
    clients = [openai.AsyncOpenAI(base_url=u + "/v1", api_key=TENANT_KEY, max_retries=0) for u in urls]

    async def one(i: int) -> int | openai.RateLimitError:
        try:
            raw = await clients[i % len(clients)].chat.completions.with_raw_response.create(
                model="gpt-4o", messages=HI, max_tokens=50, extra_headers=headers
            )
        except openai.RateLimitError as exc:
            return exc
        usage = raw.parse().usage
        assert usage is not None
        price: Price = PRICES[raw.headers["x-guardproxy-model"]]
        return cost_micros(Usage(usage.prompt_tokens, usage.completion_tokens), price)

    try:
        return await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        for client in clients:
            await client.close()
        await asyncio.sleep(0.1)  # let the closed transports release their sockets before the loop ends


async def burst(urls: list[str], count: int) -> tuple[list[int], int]:
    """``count`` concurrent calls spread over ``urls``; the cost of each admitted call, and the 429 count."""
    results = await sdk_calls(urls, count)
    return [r for r in results if isinstance(r, int)], sum(1 for r in results if not isinstance(r, int))


@contextlib.contextmanager
def proxy_process(config: dict[str, Any], tmp_path: Path, workers: int = 1) -> Iterator[str]:
    """``guardproxy serve`` as its own process; yields its base URL."""
    with running_proxy(config, tmp_path, "--log-level", "warning", "--workers", str(workers)) as proxy:
        yield proxy.url



# --- spend set outright ---

def set_day_spend(redis_url: str, day_micros: int) -> None:
    """Make acme's spend today ``day_micros``."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(keys()[0], day_micros)
    finally:
        client.close()



# --- fleets: several agents, several replicas ---

SECOND_KEY = "tk-acme-second-agent"


OTHER_QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Which technician is closest to job 4711?"}]


def fleet_config(upstream_url: str, redis_url: str, **acme: Any) -> dict[str, Any]:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["acme"]["api_keys"].append(hash_key(SECOND_KEY))
    raw["tenants"]["acme"].update(acme)
    # Events are queued only while a webhook is set; nothing listens there (delivery retries quietly).
    raw["alerts"] = {"webhooks": [{"url": "http://127.0.0.1:9/hook"}]}
    return raw


def start(raw: dict[str, Any], serve_proxy: Callable[..., str]) -> str:
    config: Config = parse_config(raw, {})
    return serve_proxy(config)


#: The SDK clients a test made, closed after it (an unclosed one's sockets warn whenever it is collected,
#: possibly in another test).
_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()


def sdk(url: str, key: str = TENANT_KEY) -> openai.OpenAI:
    # The SDK's own retries stay on: the brake's 429 says x-should-retry: false, so it does not resend.
    client = openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=2)
    _clients.append(client)
    return client


async def fleet_burst(urls: list[str], count: int) -> list[int | str]:
    """``count`` identical calls at once, alternating over ``urls``: 200, or the 429's code."""
    clients = [openai.AsyncOpenAI(base_url=u + "/v1", api_key=TENANT_KEY, max_retries=0) for u in urls]

    async def one(i: int) -> int | str:
        try:
            await clients[i % len(clients)].chat.completions.create(model="gpt-4o", messages=HI, max_tokens=20)
        except openai.RateLimitError as exc:
            return str(exc.code)
        return 200

    try:
        return list(await asyncio.gather(*(one(i) for i in range(count))))
    finally:
        for client in clients:
            await client.close()
        await asyncio.sleep(0.1)  # let the closed transports release their sockets before the loop ends


def loop_alerts(url: str) -> list[dict[str, Any]]:
    listed = httpx.get(url + "/admin/alerts", headers=ADMIN).json()["data"]
    return [a for a in listed if a["event"] == "loop"]


def _day_of_calls(url: str) -> None:
    """A small day of agent traffic: cached prompts, reasoning, two keys, jobs, a stream, a refusal of the
    upstream (costs nothing) and spend booked from elsewhere."""
    first, second = sdk(url), sdk(url, SECOND_KEY)
    for i in range(4):
        question: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"Dispatch {i}: who is free?"}]
        first.chat.completions.create(
            model="gpt-4o", messages=question,
            max_tokens=300, extra_headers={"x-fake-cached-tokens": "7", "x-fake-reasoning-tokens": str(3 * i),
                                           "x-fake-completion-tokens": str(11 + i), "x-guardproxy-job": f"WO-{i}"})
    for chunk in second.chat.completions.create(model="gpt-4o-mini", messages=HI, max_tokens=50, stream=True,
                                                stream_options={"include_usage": True}):
        assert chunk is not None
    with pytest.raises(openai.InternalServerError):
        sdk(url).with_options(max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=OTHER_QUESTION, extra_headers={"x-fake-fail": "500"})
    booked = httpx.post(url + "/admin/tenants/acme/spend", headers=ADMIN, json={
        "cost_usd": "0.012345", "description": "nightly batch", "idempotency_key": "batch-2026-12-06"})
    assert booked.status_code == 201, booked.text



# --- reloads ---

def raw_config(upstream_url: str, redis_url: str, acme_daily_usd: float) -> dict[str, Any]:
    raw = config_dict(upstream_url, store={"redis_url": redis_url}, admin={"api_key": ADMIN_KEY})
    raw["tenants"]["acme"]["daily_usd"] = acme_daily_usd
    return raw


def chat(url: str, key: str = TENANT_KEY) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": "gpt-4o-mini", "messages": HI, "max_tokens": 20})


def status(url: str) -> dict[str, Any]:
    reply = httpx.get(url + "/admin/reload", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    found: dict[str, Any] = reply.json()
    return found


@contextlib.contextmanager
def served(path: Path, workers: int = 1) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    with running_proxy(path, path.parent, "--workers", str(workers)) as proxy:
        yield proxy.process, proxy.url, proxy.log_path


def workers_on(url: str, sha: str, count: int, timeout_s: float = 8.0) -> set[int]:
    """Pids of workers seen serving the config with ``sha``; waits until ``count`` of them are seen."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < count and time.monotonic() < deadline:
        found = status(url)  # a fresh connection each time, so each worker gets some
        if found["config_sha256"] == sha:
            seen.add(found["pid"])
        time.sleep(0.01)
    return seen


def file_sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()



# --- the SQLite store file, read from another process ---

def sqlite_read(path: Path, work: Any) -> Any:
    """``work(store)`` on the file, from the test (another process of the file)."""

    async def go() -> Any:
        store = BudgetStore(SqliteClient(path))
        try:
            return await work(store)
        finally:
            await store.aclose()

    return asyncio.run(go())


def sqlite_spent(path: Path) -> tuple[int, int, int, int]:
    """Day spend, month spend, micros reserved and live reservations of acme."""
    day, month = keys()
    k = Keys("gp", "acme")

    async def work(store: BudgetStore) -> tuple[int, int, int, int]:
        c = store.client
        return (int(await c.get(day) or 0), int(await c.get(month) or 0), int(await c.get(k.reserved) or 0),
                int(await c.zcard(k.reservations)))

    result: tuple[int, int, int, int] = sqlite_read(path, work)
    return result



# --- journal entries ---

def entry(i: int, charge: int = 100) -> Entry:
    record: dict[str, str | int] = {"request_id": f"req_{i}", "outcome": "completed", "cost_micros": charge}
    return Entry(Reservation(f"r{i}", "acme", "2026-11-22", "2026-11", 500), charge, record)



# --- the Lua scripts against their Python twins ---

TENANT = "acme"


PERIODS = periods_at(datetime(2026, 11, 22, 12, tzinfo=UTC), ZoneInfo("UTC"))


HOUR_MS = 3_600_000


def new_store() -> BudgetStore:
    """A SQLite store in memory, of its own."""
    return BudgetStore(SqliteClient(":memory:"), "gp")

