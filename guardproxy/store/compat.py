"""Where guardproxy builds on a library's internals, and the one error that says so when an upgrade breaks them.

guardproxy uses the private API of three libraries, each from one module only (its seam):

- redis-py, in ``store/client.py``: the pool's lean checkout, the Sentinel pool's connection lists and
  address lookup (one discovery shared by the connections opened together), the Sentinel connection's
  connect and read, the cluster client's connection class (speed and failover correctness, see that module);
- uvicorn, in ``http/slow_clients.py``: the HTTP protocols' hooks (slow-client deadlines);
- prometheus-client, in ``observe/metrics.py``: the value class chosen again in a forked worker.

Each seam imports what it uses inside ``internals(...)`` and names the attributes it reaches for at run
time with ``require(...)``. An upgrade that moves any of them then stops the import with
``IncompatibleLibrary``, naming the library, the version installed and the range the suite passed on,
instead of an ``AttributeError`` at start-up or, worse, in the middle of a call. The committed lock
(``requirements/*.lock``) installs versions inside the range; ``make test-latest`` tries the newest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from importlib import metadata


class IncompatibleLibrary(RuntimeError):
    """An installed library lacks internals guardproxy relies on: install the locked versions."""


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution``, or ``"not installed"``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _incompatible(distribution: str, tested: str, what: str) -> IncompatibleLibrary:
    return IncompatibleLibrary(
        f"{distribution} {installed_version(distribution)} is not compatible with guardproxy ({what}); "
        f"guardproxy relies on internals of {distribution} and is tested with {distribution}{tested}. "
        f"Install the locked versions (`make venv`, or `pip install --require-hashes --no-deps -r "
        f"requirements/runtime.lock`), or pin {distribution} inside that range."
    )


@contextlib.contextmanager
def internals(distribution: str, tested: str) -> Iterator[None]:
    """Run a seam's imports: a library that fails to import, or lacks a name, is ``IncompatibleLibrary``."""
    try:
        yield
    except (ImportError, AttributeError, TypeError) as exc:
        raise _incompatible(distribution, tested, f"{type(exc).__name__}: {exc}") from exc


def require(distribution: str, tested: str, **owners: tuple[object, tuple[str, ...]]) -> None:
    """Check that each owner has the attributes named, e.g. ``pool=(ConnectionPool, ("ensure_connection",))``;
    the first missing ones raise ``IncompatibleLibrary`` listing them all."""
    missing = [
        f"{label}.{name}" for label, (owner, names) in owners.items() for name in names if not hasattr(owner, name)
    ]
    if missing:
        raise _incompatible(distribution, tested, "missing " + ", ".join(missing))
