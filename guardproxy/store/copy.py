"""``guardproxy store copy --from URL --to URL``: move every budget from one store to another, mid-month.

Both stores keep the same keys in the same shapes (``layout.Keys``), so a copy is key by key: each live
key under the prefix (the current and earlier periods' spend and settled-markers, overrides, runtime
keys, jobs, external spend's booking days, the call log, alert events, known tenants) is written to the
destination with its value and its remaining TTL; stream entries keep their ids. Run it with the proxies
stopped (a reservation in flight would be copied as held until its lease runs out). The destination must
hold nothing under the prefix yet, so nothing is merged by accident.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from typing import Any

from guardproxy.config.settings import StoreConfig
from guardproxy.config.store_url import sqlite_path
from guardproxy.errors import StoreUnavailable
from guardproxy.store.redis import BudgetStore
from guardproxy.store.redis.base import text, translated


def add_action(actions: Any) -> None:
    """``guardproxy store copy``, beside the store command's other actions."""
    copy = actions.add_parser("copy", help="copy every tenant's spend, overrides, keys, jobs and logs")
    copy.add_argument("--from", dest="source", required=True, metavar="URL",
                      help="sqlite:///path/spend.db, redis://…, redis+sentinel://… or redis+cluster://…")
    copy.add_argument("--to", dest="target", required=True, metavar="URL", help="the store to copy into (empty)")
    copy.add_argument("--key-prefix", default=StoreConfig.key_prefix, help="store.key_prefix (default gp)")


def open_store(url: str, prefix: str) -> BudgetStore:
    if url.startswith("sqlite:"):
        return BudgetStore.from_config(StoreConfig(sqlite_file=str(sqlite_path(url)), key_prefix=prefix))
    return BudgetStore.from_config(StoreConfig(redis_url=url, key_prefix=prefix))


@dataclass
class Copied:
    keys: int = 0
    entries: int = 0


async def _keys(store: BudgetStore) -> list[str]:
    found: set[str] = set()
    async with translated():
        async for key in store.client.scan_iter(match=f"{store.prefix}:*"):
            found.add(text(key))
    return sorted(found)


async def copy_store(source: BudgetStore, target: BudgetStore) -> Copied:
    """Copy every key under ``source.prefix`` into ``target`` (which must have none); returns the count."""
    if await _keys(target):
        raise ValueError(f"the destination already holds keys under {target.prefix}: (copy into an empty store)")
    done = Copied()
    src: Any = source.client  # either engine: both answer the same commands
    dst: Any = target.client
    for key in await _keys(source):
        async with translated():
            kind, ttl_ms = text(await src.type(key)), int(await src.pttl(key))
            if kind == "none" or ttl_ms == -2:  # expired since the scan
                continue
            pipe = dst.pipeline(transaction=False)
            if kind == "string":
                pipe.set(key, await src.get(key))
            elif kind == "hash":
                pipe.hset(key, mapping=await src.hgetall(key))
            elif kind == "zset":
                pipe.zadd(key, dict(await src.zrange(key, 0, -1, withscores=True)))
            elif kind == "set":
                pipe.sadd(key, *await src.smembers(key))
            elif kind == "stream":
                entries = await src.xrange(key)
                for entry_id, fields in entries:
                    pipe.xadd(key, fields, id=entry_id)
                done.entries += len(entries)
            else:
                raise ValueError(f"{key} is a {kind}: no store key is")
            if ttl_ms > 0:
                pipe.pexpire(key, ttl_ms)
            await pipe.execute()
        done.keys += 1
    return done


async def _copy(source_url: str, target_url: str, prefix: str) -> Copied:
    source, target = open_store(source_url, prefix), open_store(target_url, prefix)
    try:
        return await copy_store(source, target)
    finally:
        await source.aclose()
        await target.aclose()


def main(args: argparse.Namespace) -> int:
    try:
        copied = asyncio.run(_copy(args.source, args.target, args.key_prefix))
    except (StoreUnavailable, ValueError) as exc:
        print(f"guardproxy: {exc}", file=sys.stderr)
        return 1
    print(f"copied {copied.keys} keys ({copied.entries} log entries)")
    return 0
