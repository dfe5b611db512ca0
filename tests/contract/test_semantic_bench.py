"""bench/semantic_cache.py runs (small) against the suite's real redis-server and measures what it says."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "semantic_cache.py"

pytestmark = pytest.mark.anyio


def _load() -> object:
    spec = importlib.util.spec_from_file_location("bench_semantic_cache", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_the_bench_fills_a_tenant_syncs_a_replica_and_times_a_miss(redis_url: str) -> None:
    bench = _load()
    results = await bench.bench(redis_url, 300, 32, 50)  # type: ignore[attr-defined]
    assert set(results) == {"lookup", "lookup, process CPU", "lookup after a write", "store", "sync",
                            "plain-python search"}
    for median, p99 in results.values():
        assert 0 < median <= p99
