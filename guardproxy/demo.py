"""``guardproxy demo``: a scripted day of agent traffic against a built-in fake upstream.

Needs no key, no network and no Redis: the fake OpenAI upstream and guardproxy (on a SQLite
store in a temporary file) are served by uvicorn on loopback inside this process, and the agents are the real ``openai``
SDK. Two tenants' agents burst until their budgets stop them, so the output shows spend rising,
the downgrade at the soft cap and the 429 at the hard cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, TextIO

import openai
import uvicorn
from starlette.applications import Starlette

from guardproxy.app import create_app
from guardproxy.budget.periods import utc_now
from guardproxy.config.settings import Config, hash_key, parse_config
from guardproxy.observe.state import TenantState, read_states
from guardproxy.store.redis import BudgetStore
from guardproxy.testing.fake_upstream import create_fake_upstream

BAR_WIDTH = 24


@dataclass(frozen=True)
class Agent:
    tenant: str
    key: str
    task: str


AGENTS = (
    Agent("acme-hvac", "gp-demo-acme-hvac", "Dispatch: reschedule tomorrow's furnace tune-ups around the storm."),
    Agent("bobs-plumbing", "gp-demo-bobs-plumbing", "Support: answer a customer asking about a leaking water heater."),
)


def demo_config(upstream_url: str, folder: str) -> Config:
    """The demo's config; its store (and journal) in ``folder``, a temporary one."""
    return parse_config({
        "store": {"url": f"sqlite://{folder}/spend.db", "journal_dir": f"{folder}/journal"},
        "upstreams": {"fake-openai": {"base_url": f"{upstream_url}/v1", "api_key": "sk-demo-not-a-real-key"}},
        "models": {
            "gpt-4o": {"input": 2.50, "cached_input": 1.25, "output": 10.00, "max_output_tokens": 4096,
                       "downgrade_to": "gpt-4o-mini"},
            "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60, "max_output_tokens": 4096},
        },
        "tenants": {
            "acme-hvac": {"api_keys": [hash_key(AGENTS[0].key)], "daily_usd": 0.05, "monthly_usd": 1,
                          "timezone": "America/Chicago"},
            "bobs-plumbing": {"api_keys": [hash_key(AGENTS[1].key)], "daily_usd": 0.03, "monthly_usd": 1,
                              "timezone": "America/New_York"},
        },
    }, {})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def _serve(app: Starlette) -> AsyncIterator[str]:
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def bar(ratio: float) -> str:
    filled = min(BAR_WIDTH, round(ratio * BAR_WIDTH))
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + f"] {ratio * 100:5.1f}%"


async def run_demo(
    out: TextIO = sys.stdout, *, pause_s: float = 0.15, max_rounds: int = 60, seed: int = 7
) -> Counter[str]:
    """Play the traffic until every tenant has been refused twice (or ``max_rounds``); returns the
    number of calls allowed / downgraded / rejected."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()

    def say(line: str = "") -> None:
        print(line, file=out, flush=True)

    with tempfile.TemporaryDirectory(prefix="guardproxy-demo-") as folder:
        return await _play(folder, rng, outcomes, say, pause_s, max_rounds)


async def _play(folder: str, rng: random.Random, outcomes: Counter[str], say: Any, pause_s: float,
                max_rounds: int) -> Counter[str]:
    async with _serve(create_fake_upstream()) as upstream_url:
        config = demo_config(upstream_url, folder)
        store = BudgetStore.from_config(config.store)  # the proxy's, read for the budget bars
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(store.aclose)
            proxy_url = await stack.enter_async_context(_serve(create_app(config, store=store)))
            say(f"guardproxy demo: proxy {proxy_url}/v1 -> fake OpenAI upstream {upstream_url}/v1 "
                "(SQLite store in a temporary file)")
            for agent in AGENTS:
                policy = config.policy_for(agent.tenant)
                say(f"  tenant {agent.tenant:14} daily budget ${policy.daily_micros / 1e6:.2f}, downgrade at "
                    f"{policy.soft_cap:.0%}, refuse past {policy.hard_cap:.0%} ({policy.timezone})")
            say()
            clients = {a.tenant: openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key=a.key, max_retries=2)
                       for a in AGENTS}
            refused: Counter[str] = Counter()
            try:
                for round_no in range(1, max_rounds + 1):
                    for agent in AGENTS:
                        if refused[agent.tenant] < 2:
                            outcome = await _call(clients[agent.tenant], agent, rng, store, config, say,
                                                  round_no)
                            outcomes[outcome] += 1
                            refused[agent.tenant] += outcome == "rejected"
                    if all(refused[a.tenant] >= 2 for a in AGENTS):
                        break
                    await asyncio.sleep(pause_s)
            finally:
                for client in clients.values():
                    await client.close()
            states = await read_states(store, config, [a.tenant for a in AGENTS], utc_now())
            _summary(states, outcomes, say)
    return outcomes


async def _call(client: openai.AsyncOpenAI, agent: Agent, rng: random.Random, store: BudgetStore,
                config: Config, say: Any, round_no: int) -> str:
    answer_tokens = rng.randint(300, 900)
    started = time.monotonic()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", max_tokens=1000, messages=[{"role": "user", "content": agent.task}],
            extra_headers={"x-fake-completion-tokens": str(answer_tokens)},
        )
    except openai.RateLimitError as error:
        retry_s = int(error.response.headers.get("retry-after", "0"))
        say(f"{round_no:3} {agent.tenant:14} gpt-4o       -> 429 {error.code}: daily budget spent, resets in "
            f"{retry_s // 3600}h{retry_s % 3600 // 60:02d}m (x-should-retry: false, so the SDK did not retry)")
        return "rejected"
    answer = raw.parse()
    sent = raw.headers["x-guardproxy-model"]
    usage = answer.usage
    tokens = f"{usage.prompt_tokens}+{usage.completion_tokens} tok" if usage else ""
    (state,) = await read_states(store, config, [agent.tenant], utc_now())
    arrow = f"-> {sent}" + (" (downgraded)" if sent != "gpt-4o" else "")
    say(f"{round_no:3} {agent.tenant:14} gpt-4o {arrow:27} {tokens:15} day {bar(state.day.utilization)} "
        f"{state.state:11} {(time.monotonic() - started) * 1000:4.0f} ms")
    return "downgraded" if sent != "gpt-4o" else "allowed"


def _summary(states: list[TenantState], outcomes: Counter[str], say: Any) -> None:
    say()
    say(f"{'tenant':14} {'state':11} {'spent today':>12} {'limit':>7}  utilization")
    for s in states:
        say(f"{s.tenant:14} {s.state:11} {'$' + format(s.day.spent / 1e6, '.6f'):>12} "
            f"{'$' + format(s.day.limit / 1e6, '.2f'):>7}  {bar(s.day.utilization)}")
    say()
    say(f"calls: {outcomes['allowed']} allowed, {outcomes['downgraded']} downgraded at the soft cap, "
        f"{outcomes['rejected']} refused with 429 at the hard cap")


def main(short: bool = False) -> int:
    # Keep the output to the story.
    logging.getLogger("guardproxy").setLevel(logging.ERROR)
    asyncio.run(run_demo(pause_s=0.0 if short else 0.15))
    return 0
