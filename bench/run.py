"""Load-test guardproxy against a bare pass-through and the upstream itself, side by side in one run.

    python bench/run.py [--duration 10] [--connections 32] [--stream | --plain] [--redis] [--rounds 1]

Starts, each as its own uvicorn process (one worker, uvloop, httptools) on a free loopback port, the fake
upstream, the bare pass-through of ``bench/bare_proxy.py`` and guardproxy (plus a redis-server with
``--redis``); then sends each target the same wrk load, non-streaming and streaming, and prints req/s,
p50/p99 latency, errors, and each target's req/s as a ratio of the bare pass-through's and the upstream's.
The table is also written to ``bench/results/latest.json``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "results" / "latest.json"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
WRK_THREADS = 2
WARM_UP_S = 2
START_TIMEOUT_S = 30

TENANT = "bench"
TENANT_KEY = "sk-bench-tenant-key"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the benchmark, briefly."},
]
# The client asks for usage itself, so guardproxy forwards its bytes unchanged and every target's
# upstream answers the very same stream.
BODIES: dict[str, dict[str, Any]] = {
    "plain": {"model": "gpt-4o", "messages": MESSAGES},
    "stream": {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
}
# What every complete answer of each mode contains.
COMPLETE_MARKERS = {"plain": '"finish_reason":"stop"', "stream": "data: [DONE]"}
TARGETS = ("upstream", "bare", "bare-aiohttp", "guardproxy")


@dataclass(frozen=True)
class Result:
    mode: str
    target: str
    requests: int
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    #: 200 answers without their mode's complete marker.
    incomplete: int

    @property
    def errors(self) -> int:
        return self.non_2xx + self.socket_errors + self.incomplete


# -- processes ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Processes:
    """The servers this run started, each in its own process group, with its stderr kept in a file."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None) -> None:
        with open(self.stderr_path(name), "wb") as stderr:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, cwd=REPO_DIR,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )
        self.started.append((name, proc))
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{self.stderr_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on port {port} in {START_TIMEOUT_S} s")
            time.sleep(0.05)

    def uvicorn(self, name: str, factory: str, port: int, env: dict[str, str] | None = None) -> str:
        """Serve ``factory`` on ``127.0.0.1:port``; returns the base URL."""
        command = [
            sys.executable, "-m", "uvicorn", "--factory", factory, "--app-dir", str(BENCH_DIR),
            "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--log-level", "warning", "--no-access-log", "--timeout-graceful-shutdown", "2",
        ]
        self.start(name, command, port, env)
        return f"http://127.0.0.1:{port}"

    def stderr_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def stderr_tail(self, name: str, lines: int = 30) -> str:
        text = self.stderr_path(name).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop_all(self) -> None:
        """SIGTERM every process group, then SIGKILL what is still alive after a few seconds."""
        for _, proc in reversed(self.started):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def guardproxy_config(upstream_url: str, port: int, redis_url: str) -> dict[str, Any]:
    """One upstream, gpt-4o downgrading to gpt-4o-mini, one tenant whose budget nothing here can reach."""
    from guardproxy.config import hash_key  # after sys.path holds the repository

    return {
        "server": {"host": "127.0.0.1", "port": port},
        "store": {"redis_url": redis_url, "key_prefix": "gpbench"},
        "upstreams": {"fake": {"base_url": f"{upstream_url}/v1", "api_key": "sk-fake-upstream", "timeout_s": 60}},
        "models": {
            "gpt-4o": {"input": "2.50", "cached_input": "1.25", "output": "10.00", "downgrade_to": "gpt-4o-mini"},
            "gpt-4o-mini": {"input": "0.15", "cached_input": "0.075", "output": "0.60"},
        },
        "tenants": {TENANT: {"api_keys": [hash_key(TENANT_KEY)], "daily_usd": 1_000_000, "monthly_usd": 10_000_000}},
    }


@contextlib.contextmanager
def servers(tmp: Path, use_redis: bool) -> Iterator[tuple[dict[str, str], Processes]]:
    """Start the upstream, the bare proxy and guardproxy (and Redis); yields each target's base URL."""
    procs = Processes(tmp)
    try:
        upstream = procs.uvicorn("upstream", "fake_server:app", free_port())
        bare = procs.uvicorn("bare", "bare_proxy:app_from_env", free_port(),
                             {"BENCH_UPSTREAM_URL": f"{upstream}/v1"})
        # The same pass-through on the httpx-aiohttp transport guardproxy uses: the like-for-like baseline.
        bare_aiohttp = procs.uvicorn("bare-aiohttp", "bare_proxy:app_from_env", free_port(),
                                     {"BENCH_UPSTREAM_URL": f"{upstream}/v1", "BENCH_TRANSPORT": "aiohttp"})
        redis_url = ""
        if use_redis:
            redis_port = free_port()
            procs.start("redis", [
                "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--loglevel", "warning",
            ], redis_port)
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
        port = free_port()
        config_path = tmp / "proxy.yaml"  # JSON is YAML
        config_path.write_text(json.dumps(guardproxy_config(upstream, port, redis_url), indent=2))
        guard = procs.uvicorn("guardproxy", "guardproxy.app:app_from_env", port,
                              {"GUARDPROXY_CONFIG": str(config_path)})
        yield {"upstream": f"{upstream}/v1", "bare": f"{bare}/v1", "bare-aiohttp": f"{bare_aiohttp}/v1",
               "guardproxy": f"{guard}/v1"}, procs
    finally:
        procs.stop_all()


# -- load -----------------------------------------------------------------------------------------------


def wrk_script(body: dict[str, Any], complete_marker: str) -> str:
    """POST ``body`` on every request; ``done`` prints the summary as one JSON line, in microseconds.

    A 200 whose body lacks ``complete_marker`` (a stream cut short, an error frame) counts as incomplete.
    """
    return f"""\
wrk.method = "POST"
wrk.body = [==[{json.dumps(body, separators=(",", ":"))}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {TENANT_KEY}"

local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
init = function(args) incomplete = 0 end
response = function(status, headers, body)
  if status == 200 and not string.find(body, [==[{complete_marker}]==], 1, true) then
    incomplete = incomplete + 1
  end
end

done = function(summary, latency, requests)
  local bad = 0
  for _, thread in ipairs(threads) do bad = bad + thread:get("incomplete") end
  local e = summary.errors
  io.write(string.format(
    'BENCH {{"requests":%d,"duration_us":%d,"p50_us":%.1f,"p99_us":%.1f,' ..
    '"status":%d,"connect":%d,"read":%d,"write":%d,"timeout":%d,"incomplete":%d}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout, bad))
end
"""


def smoke(url: str, body: dict[str, Any]) -> None:
    """One request before the load: a target that fails it would only measure its error path."""
    request = urllib.request.Request(
        f"{url}/chat/completions", json.dumps(body).encode(), method="POST",
        headers={"content-type": "application/json", "authorization": f"Bearer {TENANT_KEY}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{url} answered {exc.code}: {exc.read()[:500]!r}") from None


def wrk(url: str, script: Path, connections: int, duration_s: int) -> dict[str, Any]:
    command = [WRK, f"-t{WRK_THREADS}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s", "--latency",
               "-s", str(script), f"{url}/chat/completions"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            summary: dict[str, Any] = json.loads(line.removeprefix("BENCH "))
            return summary
    raise RuntimeError(f"wrk printed no summary (status {done.returncode}):\n{done.stdout}\n{done.stderr}")


def measure(mode: str, target: str, url: str, script: Path, connections: int, duration_s: int,
            warm_up: bool) -> Result:
    if warm_up:
        smoke(url, BODIES[mode])
        wrk(url, script, connections, WARM_UP_S)
    s = wrk(url, script, connections, duration_s)
    return Result(
        mode=mode, target=target, requests=s["requests"],
        requests_per_s=s["requests"] / (s["duration_us"] / 1e6),
        p50_ms=s["p50_us"] / 1000, p99_ms=s["p99_us"] / 1000,
        non_2xx=s["status"], socket_errors=s["connect"] + s["read"] + s["write"] + s["timeout"],
        incomplete=s["incomplete"],
    )


def combine(rounds: list[Result]) -> Result:
    """One figure per target from its rounds: the median of each, errors summed."""
    first = rounds[0]
    return Result(
        mode=first.mode, target=first.target, requests=sum(r.requests for r in rounds),
        requests_per_s=statistics.median(r.requests_per_s for r in rounds),
        p50_ms=statistics.median(r.p50_ms for r in rounds), p99_ms=statistics.median(r.p99_ms for r in rounds),
        non_2xx=sum(r.non_2xx for r in rounds), socket_errors=sum(r.socket_errors for r in rounds),
        incomplete=sum(r.incomplete for r in rounds),
    )


# -- report ---------------------------------------------------------------------------------------------


def _runs_of(rounds: list[list[Result]], mode: str, target: str) -> list[Result]:
    return [next(r for r in runs if (r.mode, r.target) == (mode, target)) for runs in rounds]


def _ratio(rounds: list[list[Result]], mode: str, target: str, base: str) -> float | None:
    """Median over rounds of target's req/s over base's in the same round (they ran back to back)."""
    pairs = zip(_runs_of(rounds, mode, target), _runs_of(rounds, mode, base), strict=True)
    ratios = [mine.requests_per_s / theirs.requests_per_s for mine, theirs in pairs if theirs.requests_per_s]
    return statistics.median(ratios) if ratios else None


def report(rounds: list[list[Result]], modes: list[str]) -> list[dict[str, Any]]:
    """A row per mode and target, with its req/s as a ratio of the bare pass-through's and the upstream's."""
    rows = []
    for mode in modes:
        for target in TARGETS:
            combined = combine(_runs_of(rounds, mode, target))
            rows.append({
                **asdict(combined), "errors": combined.errors,
                "vs_bare": _ratio(rounds, mode, target, "bare"),
                "vs_bare_aiohttp": _ratio(rounds, mode, target, "bare-aiohttp"),
                "vs_upstream": _ratio(rounds, mode, target, "upstream"),
            })
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    def ratio(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f}"

    header = f"{'mode':<7} {'target':<13} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} " \
             f"{'vs bare':>8} {'vs bare-aiohttp':>16} {'vs upstream':>12}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['mode']:<7} {r['target']:<13} {r['requests_per_s']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['errors']:>7} {ratio(r['vs_bare']):>8} {ratio(r['vs_bare_aiohttp']):>16} {ratio(r['vs_upstream']):>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per target and mode (default 10)")
    parser.add_argument("--connections", type=int, default=32, help="concurrent wrk connections (default 32)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--stream", action="store_true", help="streaming requests only (default: both)")
    only.add_argument("--plain", action="store_true", help="non-streaming requests only (default: both)")
    parser.add_argument("--redis", action="store_true", help="guardproxy on a redis-server this run starts")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the targets in turn this many times and report medians (default 1)")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.connections < 1 or args.rounds < 1:
        parser.error("--duration, --connections and --rounds must be at least 1")
    modes = ["stream"] if args.stream else ["plain"] if args.plain else ["plain", "stream"]
    if not Path(WRK).exists():
        parser.error(f"wrk not found ({WRK}); install it with apt-get install wrk")
    sys.path.insert(0, str(REPO_DIR))
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped either way; SIGINT is restored in case a
    # shell started this in the background with it ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    rounds: list[list[Result]] = []
    with tempfile.TemporaryDirectory(prefix="guardproxy-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        with servers(tmp, args.redis) as (urls, procs):
            store = "redis" if args.redis else "embedded"
            print(f"servers up; guardproxy store: {store}; {args.connections} connections, "
                  f"{args.duration} s per run after {WARM_UP_S} s warm-up, wrk -t{WRK_THREADS}, "
                  f"{args.rounds} round(s)", flush=True)
            for mode in modes:
                (tmp / f"{mode}.lua").write_text(wrk_script(BODIES[mode], COMPLETE_MARKERS[mode]))
            # Rounds interleave the targets, so a noisy moment on the machine hits all of them.
            for round_ in range(args.rounds):
                runs: list[Result] = []
                rounds.append(runs)
                for mode in modes:
                    for target in TARGETS:
                        print(f"  round {round_ + 1}: {mode:<6} -> {target} ...", flush=True)
                        runs.append(measure(mode, target, urls[target], tmp / f"{mode}.lua", args.connections,
                                            args.duration, warm_up=round_ == 0))
            guard_log = procs.stderr_tail("guardproxy")

    rows = report(rounds, modes)
    print()
    print(table(rows))
    if any(r["target"] == "guardproxy" and r["errors"] for r in rows):
        print(f"\nguardproxy had errors under load; the end of its stderr:\n{guard_log}")
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps({
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "store": store, "connections": args.connections, "duration_s": args.duration,
        "warm_up_s": WARM_UP_S, "wrk_threads": WRK_THREADS, "cpus": os.cpu_count(),
        "rounds": args.rounds, "python": platform.python_version(), "results": rows,
        "rounds_detail": [[asdict(r) for r in runs] for runs in rounds],
    }, indent=2) + "\n")
    print(f"\nwritten to {RESULTS_FILE.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; every server this run started is stopped")
