"""What a worker loads at start-up: heavy optional modules only when the config asks for them.

A fresh interpreter does what ``guardproxy serve --workers N`` does (imports the CLI, builds the
configured models' encodings in the supervisor, which then forks), then builds the app and runs its
lifespan on the default store (SQLite, in a temporary state folder), and reports ``sys.modules`` and
how many threads the supervisor had when it would fork. Each module below costs every worker
megabytes and start-up time (bench/README.md, "Memory"); numpy also starts OpenBLAS's threads, which a
process must not have when it forks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import config_dict

PROBE = """
import asyncio, json, os, sys
import guardproxy.cli  # what `guardproxy serve` imports
from guardproxy import supervisor
from guardproxy.app import create_app
from guardproxy.config.settings import load_config

config = load_config(sys.argv[1])
supervisor.preload(config.models)
threads_at_fork = len(os.listdir("/proc/self/task"))
app = create_app(config, config_path=sys.argv[1])


async def main() -> None:
    async with app.router.lifespan_context(app):
        pass


asyncio.run(main())
print(json.dumps({"threads_at_fork": threads_at_fork, "modules": sorted(sys.modules)}))
"""

#: Module -> what needs it (it is imported then, and only then).
OPTIONAL = {
    "numpy": "the semantic cache (a tenant with cache: semantic)",
    "pyarrow": "the Parquet export",
    "genai_prices": "a model left unpriced in proxy.yaml (the price catalog)",
    "opentelemetry.sdk.trace": "tracing (telemetry.otlp_endpoint)",
    "opentelemetry.exporter": "tracing (telemetry.otlp_endpoint)",
    "fakeredis": "nothing at run time",
    "hypothesis": "nothing at run time",
}


def start_up(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    config = tmp_path / "proxy.yaml"
    config.write_text(json.dumps(config_dict("http://127.0.0.1:9", **overrides)))  # every model priced
    done = subprocess.run([sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "XDG_STATE_HOME": str(tmp_path / "state"),
                               "HOME": str(tmp_path)}, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_start_up_leaves_optional_modules_out(tmp_path: Path) -> None:
    modules = set(start_up(tmp_path)["modules"])
    assert "guardproxy.http.semantic" in modules  # the probe did load the app and its semantic cache module
    assert "tiktoken" in modules and "sqlite3" in modules
    loaded = {name: why for name, why in OPTIONAL.items() if name in modules}
    assert loaded == {}, f"imported at start-up, though only needed for: {loaded}"


def test_supervisor_has_one_thread_when_it_forks(tmp_path: Path) -> None:
    """The supervisor forks its workers: a thread alive then (OpenBLAS's, a pool's) would be missing in
    every worker, holding whatever lock it held."""
    assert start_up(tmp_path)["threads_at_fork"] == 1


def test_the_semantic_cache_imports_numpy_when_used() -> None:
    """The lazy import is where it is used: the index works (and so imports numpy) on first use."""
    done = subprocess.run([sys.executable, "-c", (
        "import sys; from guardproxy.http.semantic import TenantIndex, normalised\n"
        "assert 'numpy' not in sys.modules\n"
        "index = TenantIndex(4, 3); print(len(index), round(float(normalised([3.0, 4.0, 0.0])[0]), 4))\n"
        "assert 'numpy' in sys.modules")], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "0.6"]
