"""What every part of ``BudgetStore`` shares: the client, the key names, replicated writes and the
scripts, loaded once; how a reply reads as text and how a lost reply is told from a failed command.

Redis errors become ``StoreUnavailable`` in exactly one place, ``translated`` (its table is
``store_client.unavailable``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib import resources
from typing import Any

from redis import exceptions as redis_errors
from redis.commands.core import AsyncScript

from guardproxy.errors import StoreUnavailable
from guardproxy.store import client as store_client
from guardproxy.store.client import StoreClient, StoreConnection
from guardproxy.store.layout import Keys
from guardproxy.store.sqlite import Script as SqliteScript
from guardproxy.store.sqlite import SqliteClient

DAY_KEY_TTL_S = 40 * 86400
MONTH_KEY_TTL_S = 400 * 86400


@functools.cache
def script_source(name: str) -> str:
    """What the store sends for the script ``lua/<name>``: ``lua/shared.lua`` (the steps several
    scripts take, written once), then the script's own text; one script, atomic as before. Read once
    per process, not per store."""
    lua = resources.files("guardproxy.store").joinpath("lua")
    return lua.joinpath("shared.lua").read_text(encoding="utf-8") + lua.joinpath(name).read_text(encoding="utf-8")


#: ``async with translated():`` turns the store's "unavailable" errors into ``StoreUnavailable``.
translated = store_client.translated


def reply_lost(error: StoreUnavailable) -> bool:
    """The command may have run after all: the store failed while its reply was awaited (a timeout),
    not before the command was sent."""
    return isinstance(error.__cause__, (redis_errors.TimeoutError, TimeoutError))


def text(value: bytes | str) -> str:
    """A Redis reply as text."""
    return value.decode() if isinstance(value, bytes) else value


class StoreBase:
    """The state every part of the store reads: the client, the key prefix and hash tag, the scripts."""

    def __init__(
        self, client: StoreClient | SqliteClient, prefix: str = "gp", *, calls_kept: int = 1000,
        connection: StoreConnection | None = None, min_replica_acks: int = 0, replica_ack_timeout_ms: int = 500,
        hash_tag: str = "",
    ) -> None:
        self.client = client
        #: One Redis Cluster hash tag for every tenant's ledger keys (``store.hash_tag``), or ``""``.
        self.hash_tag = hash_tag
        self.connection = connection
        self.min_replica_acks = min_replica_acks
        self.replica_ack_timeout_ms = replica_ack_timeout_ms
        self.prefix = prefix
        self.calls_kept = calls_kept
        self._admit = client.register_script(script_source("admit.v5.lua"))
        self._settle = client.register_script(script_source("settle.v4.lua"))
        self._renew = client.register_script(script_source("renew.v1.lua"))
        self._claim = client.register_script(script_source("claim.v1.lua"))
        self._loop = client.register_script(script_source("loop.v1.lua"))
        self._velocity = client.register_script(script_source("velocity.v1.lua"))

    def keys(self, tenant: str) -> Keys:
        return Keys(self.prefix, tenant, self.hash_tag)

    async def _replicated(self, write: Callable[[Any], Any], script: AsyncScript | SqliteScript | None = None) -> Any:
        """Run ``write`` and, with ``min_replica_acks``, ``WAIT`` for replicas in the same round trip.

        Too few acknowledgements raise ``StoreUnavailable``: after a failover a write only the old primary
        took is lost, so it must not count as written. ``script`` is loaded and the write run again when
        the server does not know it (a new primary). Errors leave unwrapped, for ``translated``.
        """
        try:
            return await self._replicated_once(write)
        except redis_errors.NoScriptError:
            if script is None:
                raise
            await self.client.script_load(script.script)
            return await self._replicated_once(write)

    async def _replicated_once(self, write: Callable[[Any], Any]) -> Any:
        if not self.min_replica_acks:
            return await write(self.client)
        async with self.client.pipeline(transaction=False) as pipe:
            write(pipe)
            pipe.wait(self.min_replica_acks, self.replica_ack_timeout_ms)
            result, acked = await pipe.execute()
        if int(acked) < self.min_replica_acks:
            if self.connection is not None:
                await self.connection.rediscover()
            raise StoreUnavailable(f"budget store unavailable: {acked} of {self.min_replica_acks} replicas "
                                   f"confirmed the write within {self.replica_ack_timeout_ms} ms")
        return result
