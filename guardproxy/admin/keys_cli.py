"""``guardproxy keys create|list|revoke``: runtime tenant keys through the store the config names."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from datetime import UTC, datetime

from guardproxy.config.settings import TENANT_ID, Config
from guardproxy.errors import StoreUnavailable
from guardproxy.store.keys import KeyRing, key_budget_from_json, parse_expiry
from guardproxy.store.redis import BudgetStore


def add_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    config_option: Callable[[argparse.ArgumentParser], None],
) -> None:
    keys = commands.add_parser("keys", help="tenant API keys kept in the store (no restart needed)")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="create a key; it is printed once")
    create.add_argument("tenant")
    create.add_argument("--name", required=True, help="a label, e.g. the contractor the key is for")
    create.add_argument("--expires-at", help="ISO 8601 time after which the key stops working")
    for flag, window in (("--hourly-usd", "hour"), ("--daily-usd", "day"), ("--weekly-usd", "week"),
                         ("--monthly-usd", "month")):
        create.add_argument(flag, metavar="USD", help=f"cap the key's own spend per {window} (the tenant's timezone)")
    create.add_argument("--models", metavar="ID,ID", help="the only model ids the key may ask for (comma-separated)")
    listing = actions.add_parser("list", help="a tenant's keys (never the keys themselves)")
    listing.add_argument("tenant")
    revoke = actions.add_parser("revoke", help="revoke a key: 401 on every replica within a second")
    revoke.add_argument("tenant")
    revoke.add_argument("key_id")
    for parser in (create, listing, revoke):
        config_option(parser)


def main(config: Config, args: argparse.Namespace) -> int:
    if not TENANT_ID.fullmatch(args.tenant):
        print(f"guardproxy: {args.tenant!r} is not a tenant id (1-64 of letters, digits, '.', '_', '-')",
              file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(config, args))
    except StoreUnavailable as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 2


async def _run(config: Config, args: argparse.Namespace) -> int:
    store = BudgetStore.from_config(config.store)
    try:
        ring = KeyRing(store)
        if args.keys_command == "create":
            expires_at = parse_expiry(args.expires_at, datetime.now(UTC))
            budget = key_budget_from_json({
                "hourly_usd": args.hourly_usd, "daily_usd": args.daily_usd, "weekly_usd": args.weekly_usd,
                "monthly_usd": args.monthly_usd,
                "models": [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None,
            })
            unknown = [m for m in (budget.models if budget else ()) if m not in config.models]
            if unknown:
                raise ValueError(f"--models: {unknown[0]!r} is not a configured model")
            key, info = await ring.create(args.tenant, args.name, expires_at, budget)
            print(f"key:        {key}")
            print(f"key_id:     {info.key_id}")
            print(f"tenant:     {info.tenant}")
            print(f"name:       {info.name}")
            print(f"expires_at: {info.as_json()['expires_at'] or 'never'}")
            for field, value in info.as_json().items():
                if field.endswith("_usd") and value is not None:
                    print(f"{field + ':':<12}{value}")
            if budget is not None and budget.models:
                print(f"models:     {', '.join(budget.models)}")
            print("The key is shown only this once; only its sha256 is stored.", file=sys.stderr)
            return 0
        if args.keys_command == "list":
            rows = [k.as_json() for k in await ring.list(args.tenant)]
            print(f"{'KEY_ID':<22} {'PREFIX':<11} {'CREATED':<21} {'EXPIRES':<21} {'LAST USED':<21} NAME")
            for r in rows:
                print(f"{r['key_id']:<22} {r['prefix']:<11} {r['created_at']:<21} {r['expires_at'] or '-':<21} "
                      f"{r['last_used_at'] or '-':<21} {r['name']}")
            return 0
        info_or_none = await ring.revoke(args.tenant, args.key_id)
        if info_or_none is None:
            print(f"guardproxy: tenant {args.tenant!r} has no key {args.key_id!r}", file=sys.stderr)
            return 1
        print(f"revoked {args.key_id} ({info_or_none.name}) of tenant {args.tenant}")
        return 0
    finally:
        await store.aclose()
