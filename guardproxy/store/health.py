"""What guardproxy checks of its Redis beyond "it answers": eviction, persistence and silent resets.

Spend lives in Redis, so two server settings decide whether a cap holds (docs/operations.md):

- ``maxmemory-policy`` must be ``noeviction``: any other policy lets Redis evict spend counters when
  memory runs short, and an evicted counter is a tenant whose spend restarted at zero. It is read at
  start-up and every ``POLICY_CHECK_S``; on anything else admissions are refused (503, with the fix
  in the message) or, with ``store.on_evicting_policy: warn``, only warned about.
- a Redis restarted without persistence comes back empty: every tenant's spend is reset. guardproxy
  writes a marker key once (``{prefix}:{gp-store}:marker``, no TTL) and looks for it every
  ``MARKER_CHECK_S``; a marker it has seen that is gone means the data is gone. It then records the
  reset in the store (``{prefix}:{gp-store}:reset``, so every replica and every process started later
  refuses too) and refuses admissions until an operator acknowledges it (``POST
  /admin/store/acknowledge-reset`` or ``guardproxy store acknowledge-reset``), which writes a new
  marker. A restart with AOF or RDB brings the marker back with the data: nothing is refused (the
  server's ``run_id`` changes, which is logged). The marker last seen is also kept in the journal
  directory, so a process restarted together with Redis still knows there was one.

  On Redis Cluster each primary restarts on its own, so one marker would watch one shard only: the
  marker is also written in ``MARKER_BUCKETS`` keys spread over the hash slots (``{prefix}:{gp-store-N}:marker``,
  each in its own range of ``16384 / MARKER_BUCKETS`` slots, so every shard holding such a range holds
  one and keeps it through a reshard), laid once per marker (``{prefix}:{gp-store}:marker-laid`` names
  the marker they were laid for). A store failure makes only the admissions of tenants on the failing
  shard check that shard's markers first; every check is bounded by ``CHECK_TIMEOUT_S``, so a dead
  shard slows nobody else's calls.

Each problem shows in ``/readyz`` (503 while admissions are refused; an evicting policy only warned
about is a ``warnings`` entry), in the gauge ``guardproxy_store_problem{problem=...}``, in ``GET
/admin/store`` and as a ``store`` alert event (once per problem); a Redis without persistence is logged,
in the gauge and in ``GET /admin/store``.
"""

from __future__ import annotations

import binascii
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from guardproxy.errors import StoreUnavailable
from guardproxy.store.client import mask_password
from guardproxy.store.redis import BudgetStore
from guardproxy.store.redis.base import text, translated

#: The pseudo-tenant whose alert stream carries the store's own events (eviction, a reset), delivered by
#: observe/alerts.py like any tenant's.
STORE_EVENTS_TENANT = "_store"

log = logging.getLogger("guardproxy.store_health")

#: How often the marker is looked for (one GET pair per process).
MARKER_CHECK_S = 1.0
#: No marker check (after a store failure or periodic) takes longer; a shard that does not answer by
#: then is taken as failing (its tenants' admissions fail, the others go on).
CHECK_TIMEOUT_S = 1.0
#: On Redis Cluster, the marker is also kept in this many keys, one per range of hash slots.
MARKER_BUCKETS = 64
CLUSTER_SLOTS = 16384
#: The scope of a plain Redis (or Sentinel) store: everything is on one server.
WHOLE_STORE = ""
#: How often ``INFO`` is read for the eviction policy, persistence and run id.
POLICY_CHECK_S = 5.0
#: Above this share of Redis's ``maxmemory`` the response cache stores nothing more.
CACHE_MEMORY_SHARE = 0.8
#: A store-level alert event of one kind fires at most once per this long.
STORE_ALERT_EVERY_S = 86400
#: The problems ``guardproxy_store_problem`` reports, by label.
PROBLEMS = ("evicting_policy", "reset", "no_persistence")
FIX_POLICY = "CONFIG SET maxmemory-policy noeviction (and the same in redis.conf / your provider's settings)"


def key_slot(tag: str) -> int:
    """Redis Cluster's hash slot of a key whose hash tag is ``tag`` (CRC16/XMODEM, as the server)."""
    return binascii.crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS


@functools.cache
def bucket_tags() -> tuple[str, ...]:
    """One hash tag per range of ``CLUSTER_SLOTS / MARKER_BUCKETS`` slots: the first ``gp-store-N`` in it."""
    width = CLUSTER_SLOTS // MARKER_BUCKETS
    found: dict[int, str] = {}
    n = 0
    while len(found) < MARKER_BUCKETS:
        tag = f"gp-store-{n}"
        found.setdefault(key_slot(tag) // width, tag)
        n += 1
    return tuple(found[b] for b in range(MARKER_BUCKETS))


def bucket_marker_keys(prefix: str) -> list[str]:
    """The cluster's per-slot-range copies of the store marker."""
    return [f"{prefix}:{{{tag}}}:marker" for tag in bucket_tags()]


@dataclass(frozen=True)
class ServerFacts:
    """What ``INFO`` says of each server (one for plain Redis and Sentinel, one per primary on Cluster)."""

    policies: Mapping[str, str]
    run_ids: Mapping[str, str]
    #: Servers with neither AOF nor RDB snapshots configured (``None``: could not be read).
    unpersisted: tuple[str, ...] | None
    #: The largest share of ``maxmemory`` used on any server (0 without a maxmemory).
    memory_share: float = 0.0


class StoreHealth:
    """Watches the store for settings and events that would let a budget be exceeded silently.

    ``refusal()`` is what admissions check (``None``: admit); ``problems()`` and ``warnings()`` are
    ``/readyz``'s; ``on_problem(name, active)`` hears each problem as it starts or ends (the gauge).
    """

    def __init__(
        self, store: BudgetStore, *, refuse_evicting: Callable[[], bool], marker_file: Path | None = None,
        store_url: str = "", on_problem: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.store = store
        self.refuse_evicting = refuse_evicting
        self.marker_file = marker_file
        self.store_url = mask_password(store_url)
        self.on_problem = on_problem
        self.marker_key = f"{store.prefix}:{{gp-store}}:marker"
        self.reset_key = f"{store.prefix}:{{gp-store}}:reset"
        self.cluster = isinstance(store.client, RedisCluster)
        #: Which marker the cluster's bucket markers were laid for (``marker-laid``), as last read.
        self.laid_key = f"{store.prefix}:{{gp-store}}:marker-laid"
        self.bucket_keys = bucket_marker_keys(store.prefix) if self.cluster else []
        self._laid_for: str | None = None
        self.known_marker: str | None = self._remembered_marker()
        self.reset: str | None = None
        self.evicting: str | None = None
        self.unpersisted: str | None = None
        self.run_ids: dict[str, str] = {}
        self.memory_share = 0.0
        self._next_info = 0.0
        #: Scopes (cluster node names; ``WHOLE_STORE`` elsewhere) that failed a command since their markers
        #: were last checked (a restart breaks connections).
        self._suspects: set[str] = set()
        #: The marker check running after a store failure, per scope, which other admissions wait for.
        self._checking: dict[str, anyio.Event] = {}

    # -- what the rest of the proxy reads ----------------------------------------------------------

    def refusal(self) -> str | None:
        """Why admissions are refused now, with the fix; ``None`` when they are not."""
        if self.reset is not None:
            return (f"The budget store lost its data ({self.reset}), so spend counters restarted at zero and "
                    "budgets cannot be enforced. An operator must rebuild the spend and acknowledge the reset "
                    "(POST /admin/store/acknowledge-reset or `guardproxy store acknowledge-reset`).")
        if self.evicting is not None and self.refuse_evicting():
            return (f"The budget store may evict spend counters ({self.evicting}), so budgets cannot be "
                    f"enforced. Fix: {FIX_POLICY}.")
        return None

    def problems(self) -> dict[str, str]:
        """``/readyz``'s failing checks (this replica refuses admissions)."""
        refusal = self.refusal()
        return {"store_safety": refusal} if refusal else {}

    def warnings(self) -> dict[str, str]:
        """What ``/readyz`` mentions while still ready."""
        out = {}
        if self.evicting is not None and not self.refuse_evicting():
            out["evicting_policy"] = (f"{self.evicting}: spend counters may be evicted and budgets exceeded "
                                      f"(store.on_evicting_policy: warn). Fix: {FIX_POLICY}")
        return out

    def notes(self) -> dict[str, str]:
        """``warnings`` and what else an operator should know (``GET /admin/store``), not in ``/readyz``."""
        out = self.warnings()
        if self.unpersisted is not None:
            out["no_persistence"] = (f"{self.unpersisted}: a restart of Redis resets every tenant's spend "
                                     "(admissions are then refused until acknowledged); enable appendonly yes")
        return out

    def scope_of(self, tenant: str | None) -> str:
        """Where ``tenant``'s keys live: its cluster node's name, or ``WHOLE_STORE``; any node unknown yet
        (or no tenant) is the whole store too."""
        client = self.store.client
        if not self.cluster or tenant is None or not isinstance(client, RedisCluster):
            return WHOLE_STORE
        return self._node_name(client, self.store.keys(tenant).base) or WHOLE_STORE

    @staticmethod
    def _node_name(client: RedisCluster, key: str) -> str | None:
        try:
            node = client.get_node_from_key(key)
        except (redis_errors.RedisClusterException, LookupError):  # no slot map yet, or the slot uncovered
            return None
        return None if node is None else str(node.name)

    def suspect(self, tenant: str | None = None) -> None:
        """The store just failed a command of ``tenant`` (``None``: any): the next admission of a tenant in
        the same scope checks the markers there first (``recheck``)."""
        self._suspects.add(self.scope_of(tenant))

    async def recheck(self, tenant: str | None = None) -> None:
        """After a store failure, check the markers of ``tenant``'s scope before admitting it again, so that
        calls after a restart are not admitted on reset counters until the next periodic check. One check
        per scope at a time: callers that arrive while it runs wait for its end and go on with its result
        (a reset found refuses them; a store still failing fails their admission), instead of queueing a
        check each behind it. Free (a set lookup) while the store has not failed; on Cluster a tenant on a
        shard that did not fail never waits for a check of another. Bounded by ``CHECK_TIMEOUT_S``."""
        if not self._suspects:
            return
        scope = self.scope_of(tenant)
        if scope not in self._suspects and WHOLE_STORE not in self._suspects:
            return
        if WHOLE_STORE in self._suspects:
            scope = WHOLE_STORE
        running = self._checking.get(scope)
        if running is not None:
            await running.wait()
            return
        self._checking[scope] = done = anyio.Event()
        try:
            await self._check_marker(None if scope == WHOLE_STORE else scope)
            self._suspects.discard(scope)
        except StoreUnavailable:  # still failing: the admission says so itself
            if self.cluster and scope == WHOLE_STORE:
                # The shards that did not answer were marked suspect on their own: only their tenants
                # check again (the others must not read every shard's markers at each admission).
                self._suspects.discard(WHOLE_STORE)
        finally:
            done.set()
            del self._checking[scope]

    # -- checks ------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Check at once, then in the background until the block ends."""
        with contextlib.suppress(StoreUnavailable):
            await self.check()
        async with anyio.create_task_group() as group:
            group.start_soon(self._loop)
            try:
                yield
            finally:
                group.cancel_scope.cancel()

    async def _loop(self) -> None:
        while True:
            await anyio.sleep(MARKER_CHECK_S)
            try:
                await self.check()
            except StoreUnavailable:
                # /readyz says so through its own check; tried again next tick. On Cluster the markers
                # that could not be read already marked their shards suspect, and only those.
                if not self.cluster:
                    self.suspect()
            except Exception:  # the watcher must outlive any one failure; it is logged
                log.exception("store health: unexpected error (continuing)")

    async def check(self) -> None:
        """One round: the markers every time, ``INFO`` every ``POLICY_CHECK_S`` (a server that cannot
        answer ``INFO``, e.g. a dead cluster shard, does not keep the others' markers from being read)."""
        unanswered: StoreUnavailable | None = None
        if time.monotonic() >= self._next_info:
            try:
                facts = None
                with anyio.move_on_after(CHECK_TIMEOUT_S):
                    facts = await self.server_facts()
                if facts is None:
                    raise StoreUnavailable(f"budget store unavailable: no INFO within {CHECK_TIMEOUT_S} s")
                self._next_info = time.monotonic() + POLICY_CHECK_S
                await self._judge(facts)
            except StoreUnavailable as exc:
                unanswered = exc
        await self._check_marker()
        if unanswered is not None:
            raise unanswered

    async def server_facts(self) -> ServerFacts:
        client = self.store.client
        async with translated():
            if isinstance(client, RedisCluster):
                raw: Any = await client.info(target_nodes=RedisCluster.PRIMARIES)
                infos = {"node": raw} if isinstance(raw, dict) and "run_id" in raw else {
                    str(node): info for node, info in dict(raw).items()}
            else:
                infos = {"redis": await client.info()}
            unpersisted: list[str] = []
            known = True
            for node, info in infos.items():
                if int(info.get("aof_enabled", 0)):
                    continue
                try:
                    saves = await client.config_get("save") if not isinstance(client, RedisCluster) else {"save": "?"}
                except redis_errors.ResponseError:  # CONFIG disabled (managed Redis): not known
                    known = False
                    break
                if not str(saves.get("save", "")).strip():
                    unpersisted.append(node)
        return ServerFacts(
            policies={node: str(info.get("maxmemory_policy", "")) for node, info in infos.items()},
            run_ids={node: str(info.get("run_id", "")) for node, info in infos.items()},
            unpersisted=tuple(unpersisted) if known else None,
            memory_share=max((int(info.get("used_memory", 0)) / int(info["maxmemory"])
                              for info in infos.values() if int(info.get("maxmemory", 0) or 0) > 0), default=0.0),
        )

    def cache_room(self) -> bool:
        """Whether the response cache may store more: not while Redis is past ``CACHE_MEMORY_SHARE`` of
        its ``maxmemory`` (as of the last ``INFO``), so that cached bytes never push the ledger out."""
        return self.memory_share < CACHE_MEMORY_SHARE

    async def _judge(self, facts: ServerFacts) -> None:
        self.memory_share = facts.memory_share
        for node, run_id in facts.run_ids.items():
            before = self.run_ids.get(node)
            if before and before != run_id:
                log.warning("store: Redis %s restarted (run_id %s -> %s); its data is checked against the marker",
                            node, before[:8], run_id[:8])
        self.run_ids = dict(facts.run_ids)
        bad = {node: policy for node, policy in facts.policies.items() if policy and policy != "noeviction"}
        evicting = ", ".join(f"maxmemory-policy is {p}" + ("" if node == "redis" else f" on {node}")
                             for node, p in sorted(bad.items())) or None
        if evicting != self.evicting:
            self.evicting = evicting
            self._tell("evicting_policy", evicting is not None)
            if evicting is not None:
                what = "refusing admissions" if self.refuse_evicting() else "only warning (on_evicting_policy: warn)"
                log.error("store: %s: Redis may evict spend counters and budgets would be exceeded; %s. Fix: %s",
                          evicting, what, FIX_POLICY)
                await self._alert("evicting_policy", f"{evicting}: spend counters may be evicted; {what}. "
                                  f"Fix: {FIX_POLICY}", key=evicting)
            else:
                log.warning("store: maxmemory-policy is noeviction again")
        if facts.unpersisted is not None:
            unpersisted = (f"Redis {', '.join(facts.unpersisted)} has neither AOF nor RDB snapshots"
                           if facts.unpersisted else None)
            if unpersisted != self.unpersisted:
                self.unpersisted = unpersisted
                self._tell("no_persistence", unpersisted is not None)
                if unpersisted:
                    log.warning("store: %s: a restart of Redis would reset every tenant's spend", unpersisted)

    async def _read(self, keys: list[str]) -> dict[str, bytes | Exception | None]:
        """Each key's value, or the error reading it; all within ``CHECK_TIMEOUT_S`` (a key not read by
        then is a ``StoreUnavailable``)."""
        client = self.store.client
        out: dict[str, bytes | Exception | None] = {}

        async def one(key: str) -> None:
            try:
                async with translated():
                    value: bytes | None = await client.get(key)  # type: ignore[assignment]
                out[key] = value
            except StoreUnavailable as exc:
                out[key] = exc

        with anyio.move_on_after(CHECK_TIMEOUT_S):
            async with anyio.create_task_group() as group:
                for key in keys:
                    group.start_soon(one, key)
        for key in keys:
            out.setdefault(key, StoreUnavailable(f"budget store unavailable: no answer for {key} "
                                                 f"within {CHECK_TIMEOUT_S} s"))
        return out

    async def _check_marker(self, scope: str | None = None) -> None:
        """Read the markers (and the reset record) of ``scope`` (a cluster node's name; ``None``: all) and
        judge them; raises ``StoreUnavailable`` when some could not be read (after judging the others,
        and marking their scopes suspect)."""
        keys = [self.reset_key, self.marker_key, *([self.laid_key] if self.cluster else []), *self.bucket_keys]
        client = self.store.client
        if scope is not None and isinstance(client, RedisCluster):
            keys = [k for k in keys if self._node_name(client, k) == scope]
        read = await self._read(keys)
        failed = [k for k, v in read.items() if isinstance(v, Exception)]
        try:
            await self._judge_markers({k: v for k, v in read.items() if not isinstance(v, Exception)})
        finally:
            if failed:
                if isinstance(client, RedisCluster):
                    self._suspects.update(self._node_name(client, k) or WHOLE_STORE for k in failed)
                error = read[failed[0]]
                assert isinstance(error, Exception)
                raise error

    async def _judge_markers(self, read: Mapping[str, bytes | None]) -> None:
        client = self.store.client
        if read.get(self.reset_key) is not None:
            self._enter_reset(text(read[self.reset_key] or b""))
            return
        if self.marker_key in read:
            marker = read[self.marker_key]
            if marker is None:
                if self.known_marker is None:
                    # Never seen one: a new store. NX: processes starting together agree on one marker.
                    fresh = f"{uuid.uuid4().hex}:{int(time.time())}"
                    async with translated():
                        await client.set(self.marker_key, fresh, nx=True)
                        seen_now = await client.get(self.marker_key)
                    if seen_now is not None:
                        self._remember(text(seen_now))
                        await self._lay_buckets(text(seen_now), None)
                    return
                await self._lost(f"its marker {self.known_marker[:8]} is gone")
                return
            seen = text(marker)
            if self.known_marker is not None and seen != self.known_marker:
                log.warning("store: a new store marker (%s, was %s): a reset was acknowledged or this is another "
                            "store", seen[:8], self.known_marker[:8])
            self._remember(seen)
            if self.reset is not None:
                log.warning("store: the reset was acknowledged; admitting again")
                self.reset = None
                self._tell("reset", False)
            if self.laid_key in read:
                laid = read[self.laid_key]
                await self._lay_buckets(seen, None if laid is None else text(laid))
        if self._laid_for is None or self._laid_for != self.known_marker:
            return  # the bucket markers are not known to be there: nothing to judge by them
        gone = [k for k in self.bucket_keys if k in read and read[k] is None]
        if gone:
            where = ""
            if isinstance(client, RedisCluster):
                where = " on " + ", ".join(sorted({self._node_name(client, k) or "?" for k in gone}))
            await self._lost(f"its marker {self.known_marker[:8]}{where} is gone ({len(gone)} of "
                             f"{len(self.bucket_keys)} slot ranges)")

    async def _lay_buckets(self, marker: str, laid: str | None) -> None:
        """On Cluster, write ``marker`` into every bucket key unless they were laid for it already."""
        if not self.cluster:
            return
        if laid != marker:
            client = self.store.client
            laid_now = False
            with anyio.move_on_after(CHECK_TIMEOUT_S * 5):
                async with translated():
                    for key in self.bucket_keys:
                        await client.set(key, marker)
                    await client.set(self.laid_key, marker)
                laid_now = True
            if not laid_now:
                raise StoreUnavailable("budget store unavailable: the cluster's markers could not be laid in time")
        self._laid_for = marker

    async def _lost(self, gone: str) -> None:
        """The store lost data: record the reset for every process, alert, refuse."""
        client = self.store.client
        runs = ", ".join(f"run_id {r[:8]}" for r in self.run_ids.values())
        what = (f"{gone}: Redis restarted without persistence, was flushed "
                f"or evicted it; detected {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by "
                f"{socket.gethostname()} pid {os.getpid()}{'; ' + runs if runs else ''}")
        try:
            async with translated():
                first = await client.set(self.reset_key, what, nx=True)
            if first:
                await self._alert("reset", f"The budget store lost its data ({what}); admissions are refused "
                                  "until an operator rebuilds the spend and acknowledges the reset.", key="reset")
            async with translated():
                recorded = await client.get(self.reset_key)
        except StoreUnavailable:  # the record's shard is down: this process refuses all the same
            recorded = None
        self._enter_reset(text(recorded) if recorded is not None else what)

    def _enter_reset(self, what: str) -> None:
        if self.reset is None:
            log.error("store: the budget store lost its data (%s); refusing admissions until the reset is "
                      "acknowledged (docs/operations.md)", what)
            self._tell("reset", True)
        self.reset = what

    async def acknowledge_reset(self) -> str:
        """End a reset for every replica: a new marker, the reset record gone; returns the marker."""
        return await acknowledge_reset(self.store)

    # -- helpers -----------------------------------------------------------------------------------

    def _tell(self, problem: str, active: bool) -> None:
        if self.on_problem is not None:
            self.on_problem(problem, active)

    async def _alert(self, problem: str, message: str, *, key: str) -> None:
        """Queue a ``store`` alert event, at most once per ``key`` and ``STORE_ALERT_EVERY_S`` for the store."""
        client = self.store.client
        k = self.store.keys(STORE_EVENTS_TENANT)
        once = f"{k.base}:fired:{problem}:{key}"
        with contextlib.suppress(StoreUnavailable):
            async with translated():
                if not await client.set(once, "1", nx=True, ex=STORE_ALERT_EVERY_S):
                    return
                now_ms = int(time.time() * 1000)
                entry = await client.xadd(k.alerts, {"event": "store", "tenant": "", "problem": problem,
                                                     "message": message[:500], "at_ms": now_ms},
                                          maxlen=1000, approximate=True)
                await client.zadd(k.alerts_due, {text(entry): now_ms})
                await client.expire(k.alerts, 400 * 86400)

    def _remembered_marker(self) -> str | None:
        if self.marker_file is None:
            return None
        try:
            url, _, marker = self.marker_file.read_text(encoding="utf-8").strip().partition("\n")
        except OSError:
            return None
        return marker or None if url == f"{self.store_url} {self.store.prefix}" else None

    def _remember(self, marker: str) -> None:
        if marker == self.known_marker:
            return
        self.known_marker = marker
        if self.marker_file is None:
            return
        try:
            self.marker_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.marker_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(f"{self.store_url} {self.store.prefix}\n{marker}\n", encoding="utf-8")
            tmp.replace(self.marker_file)
        except OSError as exc:
            log.warning("store: cannot keep the store marker in %s (%s); a Redis reset during a restart of "
                        "this process would go unnoticed", self.marker_file, exc)


async def acknowledge_reset(store: BudgetStore) -> str:
    """Write a new store marker (on Cluster, into every slot range too) and drop the reset record;
    returns the new marker."""
    marker = f"{uuid.uuid4().hex}:{int(time.time())}"
    base = f"{store.prefix}:{{gp-store}}"
    async with translated():
        # In this order: a failure in between leaves the reset recorded (still refusing), never lost.
        if isinstance(store.client, RedisCluster):
            for key in bucket_marker_keys(store.prefix):
                await store.client.set(key, marker)
            await store.client.set(f"{base}:marker-laid", marker)
        await store.client.set(f"{base}:marker", marker)
        await store.client.delete(f"{base}:reset")
    return marker
