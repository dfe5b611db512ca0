"""``guardproxy store status|acknowledge-reset|rebuild``: the store's health, and recovery after a reset.

``rebuild`` books the spend a reset lost from the ``call settled`` lines of JSON logs
(``server.log_format: json``; logger ``guardproxy.observe.calls``): each call is settled again under the id
``rebuild:<request id>`` on its own day and month, so running it twice (or over overlapping files)
charges each call once. Calls whose request id is already in the tenant's call log in the store (a
settlement the journal wrote after the reset) are skipped. Run it before acknowledging the reset,
while admissions are refused (docs/operations.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from guardproxy.budget.periods import periods_at
from guardproxy.budget.records import Outcome, Reservation
from guardproxy.config.settings import TENANT_ID, Config
from guardproxy.errors import StoreUnavailable
from guardproxy.store.health import StoreHealth, acknowledge_reset
from guardproxy.store.ledger import level_caps
from guardproxy.store.redis import BudgetStore
from guardproxy.store.redis.base import text


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    config_option: Callable[[argparse.ArgumentParser], None],
) -> Any:
    """``guardproxy store status|acknowledge-reset|rebuild``; returns the actions, for ``store copy``."""
    store = commands.add_parser("store", help="the budget store: its health, recovery after a reset, a copy")
    actions = store.add_subparsers(dest="store_command", required=True)
    status = actions.add_parser("status", help="eviction policy, persistence, an unacknowledged reset")
    ack = actions.add_parser("acknowledge-reset", help="admit again after a reset (every replica within 1 s)")
    rebuild = actions.add_parser("rebuild", help="book the spend a reset lost, from JSON call logs")
    rebuild.add_argument("--calls-log", action="append", required=True, type=Path,
                         help="a JSON log file of guardproxy (repeatable); its call_settled lines are booked")
    rebuild.add_argument("--dry-run", action="store_true", help="print what would be booked, book nothing")
    for parser in (status, ack, rebuild):
        config_option(parser)
    return actions


@dataclass(frozen=True)
class LoggedCall:
    tenant: str
    request_id: str
    at: datetime
    cost_micros: int
    model: str
    prompt_tokens: int
    completion_tokens: int


def logged_calls(lines: Iterable[bytes]) -> list[LoggedCall]:
    """The charged ``call_settled`` entries among JSON log ``lines`` (anything else is skipped)."""
    calls = []
    for line in lines:
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or entry.get("event") != "call_settled":
            continue
        try:
            call = LoggedCall(str(entry["tenant"]), str(entry["request_id"]),
                              datetime.fromisoformat(str(entry["time"]).replace("Z", "+00:00")),
                              int(entry["cost_micros"]), str(entry.get("model") or ""),
                              int(entry.get("prompt_tokens") or 0), int(entry.get("completion_tokens") or 0))
        except (KeyError, ValueError, TypeError):
            continue
        if call.cost_micros > 0 and TENANT_ID.fullmatch(call.tenant):
            calls.append(call)
    return calls


async def rebuild(store: BudgetStore, config: Config, calls: list[LoggedCall], dry_run: bool) -> dict[str, int]:
    """Book ``calls`` once each; returns the micros booked per tenant by this run."""
    booked: dict[str, int] = {}
    in_store: dict[str, set[str]] = {}
    for call in calls:
        if call.tenant not in in_store:
            logged = await store.recent_calls(call.tenant, max(1, store.calls_kept))
            in_store[call.tenant] = {c.get("request_id", "") for c in logged}
        if call.request_id in in_store[call.tenant]:
            continue  # written to the store after the reset (the journal): already counted
        periods = periods_at(call.at, config.policy_for(call.tenant).zone)
        rid = "rebuild:" + hashlib.sha256(call.request_id.encode()).hexdigest()[:32]
        if dry_run:
            if await store.settled_charge(call.tenant, periods.day, rid) is None:
                booked[call.tenant] = booked.get(call.tenant, 0) + call.cost_micros
            continue
        record: dict[str, str | int] = {
                  "request_id": call.request_id, "requested_model": call.model, "model": call.model,
                  "prompt_tokens": call.prompt_tokens, "completion_tokens": call.completion_tokens,
                  "cached_tokens": 0, "cost_micros": call.cost_micros, "outcome": Outcome.EXTERNAL.value,
                  "description": "rebuilt after a store reset"}
        # every level of its time it belongs to (the global cap, the tenant's hour and week, its model's)
        levels = tuple(cap for cap in level_caps(config, call.tenant, call.at, [call.model]) if cap.binds(call.model))
        settled = await store.settle(Reservation(rid, call.tenant, periods.day, periods.month, 0, levels=levels),
                                     call.cost_micros, record)
        if settled.applied:
            booked[call.tenant] = booked.get(call.tenant, 0) + call.cost_micros
    return booked


async def _run(config: Config, args: argparse.Namespace) -> int:
    store = BudgetStore.from_config(config.store)
    try:
        if args.store_command == "acknowledge-reset":
            fresh = await acknowledge_reset(store)
            print(f"reset acknowledged: new store marker {fresh[:8]}; every replica admits again within a second")
            return 0
        if args.store_command == "rebuild":
            lines: list[bytes] = []
            for path in args.calls_log:
                lines.extend(path.read_bytes().splitlines())
            calls = logged_calls(lines)
            booked = await rebuild(store, config, calls, args.dry_run)
            verb = "would book" if args.dry_run else "booked"
            for tenant, micros in sorted(booked.items()):
                print(f"{tenant}: {verb} {micros} micro-USD")
            print(f"{len(calls)} charged calls read; {verb} {sum(booked.values())} micro-USD for {len(booked)} tenants")
            return 0
        health = StoreHealth(store, refuse_evicting=lambda: config.store.on_evicting_policy == "refuse")
        facts = await health.server_facts()
        reset: bytes | None = await store.client.get(health.reset_key)  # type: ignore[assignment]
        marker: bytes | None = await store.client.get(health.marker_key)  # type: ignore[assignment]
        for node, policy in sorted(facts.policies.items()):
            print(f"{node}: maxmemory-policy {policy}" + ("" if policy == "noeviction" else "  <- must be noeviction"))
        persisted = "unknown" if facts.unpersisted is None else ("none on " + ", ".join(facts.unpersisted)
                                                                 if facts.unpersisted else "yes")
        print(f"persistence: {persisted}")
        print(f"marker: {text(marker) if marker else 'none'}")
        print(f"reset: {text(reset) if reset else 'none'}")
        return 1 if reset else 0
    except StoreUnavailable as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 1
    finally:
        await store.aclose()


def main(config: Config, args: argparse.Namespace) -> int:
    if config.store.embedded:
        print("guardproxy: the embedded store lives inside the proxy process; set store.redis_url", file=sys.stderr)
        return 2
    return asyncio.run(_run(config, args))
