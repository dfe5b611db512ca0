"""Real Redis topologies for tests: a primary, a replica and three Sentinels; a 3-shard Redis Cluster.

Every process listens on a free loopback port, in its own temporary directory, and every wait is
bounded. ``stop()`` ends exactly the processes it started.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from tests.servers import free_port

MASTER_NAME = "gpmaster"
START_TIMEOUT_S = 20.0


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 < 65536 and _free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed: `apt-get install -y {package}` (.ci/run does it)")
    return path


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float = START_TIMEOUT_S) -> None:
    """Poll ``condition`` (errors count as "not yet") until it holds; ``TimeoutError`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class RedisProc:
    """One ``redis-server`` (or ``redis-sentinel``) process on a free loopback port."""

    def __init__(self, *args: str, sentinel: bool = False, port: int | None = None, workdir: str | None = None):
        self.port = port or free_port()
        self.dir = workdir or tempfile.mkdtemp(prefix="gp-redis-")
        self.args = args
        self.sentinel = sentinel
        self.process: subprocess.Popen[bytes] | None = None

    def client(self, **kw: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kw)

    def start(self) -> None:
        if self.sentinel:
            conf = Path(self.dir) / "sentinel.conf"
            conf.write_text("\n".join([f"port {self.port}", "bind 127.0.0.1", f"dir {self.dir}", *self.args]) + "\n")
            command = [_binary("redis-sentinel", "redis-sentinel"), str(conf)]
        else:
            command = [_binary("redis-server", "redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
                       "--save", "", "--dir", self.dir, *self.args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        try:
            wait_for(f"redis on port {self.port}", lambda: bool(client.ping()))
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the process dies without a word to its peers."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
            self.process = None


class SentinelSet:
    """A primary, ``replicas`` replicas, three Sentinels watching them (quorum 2), fast failure detection.

    ``server_args``: options of every redis-server (e.g. ``--appendonly yes --min-replicas-to-write 1``).
    """

    def __init__(self, replicas: int = 1, server_args: tuple[str, ...] = ("--appendonly", "no")) -> None:
        self.primary = RedisProc(*server_args)
        self.replicas = [RedisProc(*server_args, "--replicaof", "127.0.0.1", str(self.primary.port))
                         for _ in range(replicas)]
        config = [
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.primary.port} 2",
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
            f"sentinel failover-timeout {MASTER_NAME} 4000",
            f"sentinel parallel-syncs {MASTER_NAME} 1",
        ]
        self.sentinels = [RedisProc(*config, sentinel=True) for _ in range(3)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    @property
    def servers(self) -> list[RedisProc]:
        return [self.primary, *self.replicas]

    def start(self) -> None:
        self.primary.start()
        for replica in self.replicas:
            replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self.wait_healthy()

    def wait_healthy(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every Sentinel knows the primary, its replica (in sync) and the two other Sentinels."""
        def healthy() -> bool:
            port = self.master_port()
            for sentinel in self.sentinels:
                with sentinel.client(decode_responses=True) as c:
                    state = c.sentinel_master(MASTER_NAME)
                    replicas = c.sentinel_slaves(MASTER_NAME)
                    if (int(state["port"]) != port or int(state["num-other-sentinels"]) < 2
                            or len(replicas) < len(self.replicas)):
                        return False
                    if any(r["is_sdown"] or r["is_odown"] for r in replicas):
                        return False
            with self.master_client() as primary:
                info = primary.info("replication")
                return bool(info["role"] == "master" and info["connected_slaves"] >= len(self.replicas)
                            and all(info[f"slave{i}"]["state"] == "online" for i in range(len(self.replicas))))
        wait_for("a healthy Sentinel set", healthy, timeout_s)

    def master_port(self) -> int:
        for sentinel in self.sentinels:
            with contextlib.suppress(redis.RedisError), sentinel.client(decode_responses=True) as c:
                _, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                return int(port)
        raise RuntimeError("no Sentinel answers")

    def master_client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.master_port(), socket_timeout=5)

    def failover(self, timeout_s: float = 20.0) -> int:
        """``SENTINEL FAILOVER``; returns once a new primary is named and writable. Its port."""
        old = self.master_port()
        with self.sentinels[0].client() as c:
            c.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)

        def promoted() -> bool:
            port = self.master_port()
            if port == old:
                return False
            with redis.Redis(host="127.0.0.1", port=port, socket_timeout=5) as c:
                return bool(c.info("replication")["role"] == "master")
        wait_for("the Sentinel failover", promoted, timeout_s)
        return self.master_port()

    def flush(self) -> None:
        with self.master_client() as c:
            c.flushall()
            c.wait(len(self.replicas), 2000)

    def stop(self) -> None:
        for proc in [*self.sentinels, *self.replicas, self.primary]:
            proc.stop()


class RedisCluster3:
    """Three cluster-mode redis-server primaries, slots split evenly (no replicas).

    ``full_coverage=False``: ``cluster-require-full-coverage no``, the shards that live keep serving
    their slots while another is down (with ``yes``, Redis's default, the whole cluster answers CLUSTERDOWN).
    """

    def __init__(self, full_coverage: bool = True) -> None:
        self.nodes = [
            RedisProc("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                      "--cluster-node-timeout", "1000", "--appendonly", "no",
                      "--cluster-require-full-coverage", "yes" if full_coverage else "no", port=cluster_port())
            for _ in range(3)
        ]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run(
            [_binary("redis-cli", "redis-tools"), "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=START_TIMEOUT_S,
        )
        self.wait_ok()

    def wait_ok(self, timeout_s: float = START_TIMEOUT_S) -> None:
        def ok() -> bool:
            for node in self.nodes:
                with node.client(decode_responses=True) as c:
                    if c.execute_command("CLUSTER", "INFO").find("cluster_state:ok") < 0:
                        return False
            return True
        wait_for("cluster_state:ok on every node", ok, timeout_s)

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)

    def node_of(self, key: str) -> RedisProc:
        """The node serving ``key``'s hash slot."""
        with self.client() as c:
            node = c.get_node_from_key(key)
            assert node is not None
            return next(n for n in self.nodes if n.port == int(node.port))

    def move_slot_of(self, key: str, target: RedisProc) -> None:
        """Migrate ``key``'s hash slot, with its keys, to ``target``: what a reshard does, slot by slot."""
        source = self.node_of(key)
        with self.client() as cluster:
            slot = cluster.keyslot(key)
        with source.client() as src, target.client() as dst:
            source_id, target_id = _node_id(src), _node_id(dst)
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            for node in self.nodes:
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok()

    def flush(self) -> None:
        for node in self.nodes:
            with node.client() as c:
                c.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _node_id(client: redis.Redis) -> str:
    return str(client.execute_command("CLUSTER", "MYID").decode())  # type: ignore[no-untyped-call]


def tenants_on_every_shard(cluster: RedisCluster3, prefix: str = "tenant", count: int = 1) -> list[str]:
    """``count`` tenant names per shard, chosen by their ``{tenant}`` hash slot."""
    with cluster.client() as c:
        found: dict[int, list[str]] = {n.port: [] for n in cluster.nodes}
        for i in range(10_000):
            name = f"{prefix}{i}"
            node = c.get_node_from_key(f"gp:{{{name}}}:x")
            assert node is not None
            if len(found[int(node.port)]) < count:
                found[int(node.port)].append(name)
            if all(len(v) == count for v in found.values()):
                return [t for v in found.values() for t in v]
    raise RuntimeError("could not spread tenants over every shard")


class RedisServer:
    """A throwaway redis-server process on a free loopback port; ``persistent``: with an AOF, so that a
    restart keeps the data (without, a restarted Redis is empty and guardproxy refuses until told)."""

    def __init__(self, *, persistent: bool = False) -> None:
        self.persistent = persistent
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: `apt-get install -y redis-server` (.ci/run does it)")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="gp-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "yes" if self.persistent else "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None
