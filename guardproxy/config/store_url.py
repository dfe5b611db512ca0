"""``store.redis_url`` taken apart, without any Redis client: pure, so reading the config loads no I/O library.

``parse_store_url`` checks a URL and says how to fix a bad one; ``guardproxy.store.client`` builds the
client for the parsed URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote, urlsplit

Kind = Literal["redis", "sentinel", "cluster"]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
PLAIN_SCHEMES = ("redis", "rediss", "unix")
SCHEMES = PLAIN_SCHEMES + SENTINEL_SCHEMES + CLUSTER_SCHEMES


@dataclass(frozen=True)
class StoreURL:
    """A parsed ``store.redis_url``."""

    kind: Kind
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parse_store_url(url: str) -> StoreURL:
    """Check ``url`` and take it apart; ``ValueError`` says what is wrong and how to write it."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(
            "must start with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster:// "
            f"(or be empty for the embedded store), got {scheme + sep or url!r}"
        )
    if scheme in PLAIN_SCHEMES:
        return StoreURL("redis", url)
    tls = scheme.startswith("rediss")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError(f"{scheme}:// takes no ?query or #fragment")
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    nodes = tuple(_node(h, scheme) for h in hostlist.split(","))
    path = [p for p in parts.path.split("/") if p]
    if scheme in SENTINEL_SCHEMES:
        if not path or len(path) > 2:
            raise ValueError(f"{scheme}:// needs the master name as path: "
                             f"{scheme}://host:26379,host2:26379/mymaster[/db]")
        db = 0
        if len(path) == 2:
            if not path[1].isdigit():
                raise ValueError(f"the database after the master name must be a number, got {path[1]!r}")
            db = int(path[1])
        return StoreURL("sentinel", url, nodes, unquote(path[0]), db, username, password, tls)
    if path and path != ["0"]:
        raise ValueError(f"{scheme}:// has no databases (Redis Cluster has only db 0): drop {parts.path!r}")
    return StoreURL("cluster", url, nodes, "", 0, username, password, tls)


def _node(text: str, scheme: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        default = 26379 if scheme in SENTINEL_SCHEMES else 6379
        raise ValueError(f"each node of a {scheme}:// URL is host:port (e.g. 10.0.0.1:{default}), got {text!r}")
    return host.strip("[]"), int(port)
