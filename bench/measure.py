"""Measuring one target: wrk's load (req/s, latency, CPU per request), the first streamed frame, memory."""

from __future__ import annotations

import json
import resource
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import clients  # noqa: E402  (bench/ is not a package)
from servers import CLK_TCK, CONF_DIR, Processes, Target  # noqa: E402
from workload import COMPLETE_MARKERS, dumps, request_body, request_headers  # noqa: E402


def wrk_script(route: str) -> str:
    """POST the route's body on every request; ``done`` prints the summary as one JSON line, in µs.

    A 200 whose body lacks the mode's complete marker (a stream cut short, an error frame) is incomplete.
    """
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in request_headers(route).items())
    return string.Template((CONF_DIR / "summary.lua").read_text()).substitute(
        body=dumps(request_body(route)), headers=headers, marker=COMPLETE_MARKERS[route],
    )


@dataclass(frozen=True)
class Load:
    """One wrk run against one target."""

    kind: str  # "c32" or "c1"
    mode: str
    target: str
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms_per_request: float
    store_cpu_ms_per_request: float | None
    #: The rest of the machine's work per request: the nginx upstream and wrk itself.
    upstream_cpu_ms_per_request: float
    wrk_cpu_ms_per_request: float


def wrk(url: str, script: Path, threads: int, connections: int, duration_s: float) -> dict[str, Any]:
    wrk_bin = shutil.which("wrk") or "/usr/bin/wrk"
    command = [wrk_bin, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
               "--latency", "-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            summary: dict[str, Any] = json.loads(line.removeprefix("BENCH "))
            return summary
    raise RuntimeError(f"wrk printed no summary (status {done.returncode}):\n{done.stdout}\n{done.stderr}")


def measure(procs: Processes, target: Target, kind: str, mode: str, script: Path, duration_s: float) -> Load:
    threads, connections = (2, 32) if kind == "c32" else (1, 1)
    cpu_before = procs.cpu_ticks(target.name)
    redis_before = procs.cpu_ticks("redis")
    nginx_before = procs.cpu_ticks("upstream")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = wrk(target.url(mode), script, threads, connections, duration_s)
    cpu = procs.cpu_ticks(target.name) - cpu_before
    redis_cpu = procs.cpu_ticks("redis") - redis_before
    nginx_cpu = procs.cpu_ticks("upstream") - nginx_before
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    wrk_cpu_s = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    n = max(1, s["requests"])
    return Load(
        kind=kind, mode=mode, target=target.name, requests=s["requests"],
        requests_per_s=s["requests"] / (s["duration_us"] / 1e6), p50_ms=s["p50_us"] / 1000,
        p99_ms=s["p99_us"] / 1000,
        errors=s["status"] + s["connect"] + s["read"] + s["write"] + s["timeout"] + s["incomplete"],
        cpu_ms_per_request=cpu * 1000 / CLK_TCK / n,
        store_cpu_ms_per_request=redis_cpu * 1000 / CLK_TCK / n if target.uses_redis else None,
        upstream_cpu_ms_per_request=0.0 if target.direct else nginx_cpu * 1000 / CLK_TCK / n,
        wrk_cpu_ms_per_request=wrk_cpu_s * 1000 / n,
    )


def first_frame(target: Target, count: int, route: str = "stream") -> list[float]:
    """Seconds to the first streamed frame, ``count`` requests one after another on one connection."""
    body = dumps(request_body(route)).encode()
    return clients.first_frame_latencies(target.url(route), body, request_headers(route), count)


@dataclass(frozen=True)
class Memory:
    target: str
    workers: int
    idle_mb: float  # per worker (the largest), after one request of each kind
    after_load_mb: float  # per worker (the largest), idle again after the load
    streams_open: int
    streams_mb: float | None  # all workers together, with the streams open


def hold_streams(procs: Processes, target: Target, count: int) -> tuple[int, float]:
    body = dumps(request_body("slow")).encode()

    def sample(opened: int) -> tuple[int, float]:
        return opened, sum(procs.worker_rss(target.name)) / 2**20

    return clients.hold_streams(target.url("slow"), body, request_headers("slow"), count, 60.0, sample)
