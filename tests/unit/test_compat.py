"""The seams on library internals (guardproxy/store/compat.py) fail loudly, naming the library and its version."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import values as prometheus_values
from redis.asyncio.connection import ConnectionPool

from guardproxy.observe import metrics
from guardproxy.store import client as store_client
from guardproxy.store import compat


def test_the_installed_versions_have_every_internal_the_seams_use() -> None:
    store_client.check_internals()


def test_a_missing_internal_names_the_library_its_version_and_the_tested_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(ConnectionPool, "ensure_connection")
    with pytest.raises(compat.IncompatibleLibrary) as caught:
        store_client.check_internals()
    message = str(caught.value)
    assert f"redis {compat.installed_version('redis')} is not compatible" in message
    assert "ConnectionPool.ensure_connection" in message
    assert f"redis{store_client.REDIS_TESTED}" in message
    assert "requirements/runtime.lock" in message


def test_a_release_that_breaks_on_import_stops_guardproxy_with_the_library_named(tmp_path: Path) -> None:
    """A stand-in redis 4.9.9 that fails at import with an AttributeError inside its own modules (as a
    fakeredis release once did on a new redis) is first on the path: importing the store's client names
    it, not a traceback."""
    package = tmp_path / "redis"
    package.mkdir()
    (package / "__init__.py").write_text(
        "raise AttributeError(\"'method_descriptor' object has no attribute '__closure__'\")\n")
    info = tmp_path / "redis-4.9.9.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: redis\nVersion: 4.9.9\n")
    run = subprocess.run(
        [sys.executable, "-c", "import guardproxy.store.client"], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("guardproxy.store.compat.IncompatibleLibrary: redis 4.9.9 is not compatible"), run.stderr
    assert f"redis{store_client.REDIS_TESTED}" in last
    assert "__closure__" in last


def test_the_metrics_seam_names_prometheus_client_when_a_release_drops_what_after_fork_uses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    metrics.check_internals()
    monkeypatch.delattr(prometheus_values, "get_value_class")
    with pytest.raises(compat.IncompatibleLibrary) as caught:
        metrics.after_fork()
    assert "prometheus-client" in str(caught.value) and "values.get_value_class" in str(caught.value)
