"""Load-test guardproxy as users run it against bare pass-throughs, LiteLLM and the upstream, side by side.

    python bench/run.py [--quick] [--rounds 3] [--duration 5] [--targets a,b,...] [--streams 1000]

Starts on free loopback ports: a canned nginx upstream (chat answers and SSE streams with usage, written
into a temporary nginx.conf), a redis-server, the bare pass-throughs of ``bench/bare_proxy.py``, guardproxy
the way users start it (``guardproxy serve --config ...``, default settings; on Redis with one and two
workers, on the embedded (SQLite) store, and once with ``--log-level warning`` for what logging costs) and LiteLLM
when it is installed. Then, in interleaved rounds: ``wrk -t2 -c32`` (req/s, p50/p99, CPU per request from
/proc), ``wrk -t1 -c1`` (latency added over the direct upstream), the time to the first streamed frame;
and once at the end, RSS idle and with 1,000 streams open. Prints the tables and the issue's goals, and
writes everything to ``bench/results/latest.json``. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import clients  # noqa: E402  (bench/ is not a package)

RESULTS_FILE = BENCH_DIR / "results" / "latest.json"
START_TIMEOUT_S = 60
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

TENANT = "bench"
TENANT_KEY = "sk-bench-tenant-key"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello to the benchmark, briefly."},
]
MODES = ("plain", "stream")
# Each kind of answer has its own model on guardproxy and LiteLLM (each model its own upstream base URL),
# and its own path on nginx; the bare proxies pick the path from the x-bench-route header.
MODELS = {"plain": "bench-plain", "stream": "bench-stream", "slow": "bench-slow"}
COMPLETE_MARKERS = {"plain": '"stop"', "stream": "[DONE]"}
# A stream's words: one SSE frame each.
WORDS = ["Hello", ",", " bench", "mark", "!", " Nice", " to", " meet", " you", "."]
# The slow stream (1,000 open streams): the response head and first frame at once (nginx counts the head
# in limit_rate_after), then the rest at this many bytes/s, so a stream stays open for minutes.
SLOW_RATE_BYTES_S = 16
SLOW_HEAD_ALLOWANCE_BYTES = 512

BASELINE = "bare-httpx-aiohttp"
GUARD = "guardproxy-redis"


def request_body(route: str) -> dict[str, Any]:
    """What every target receives: a small chat request, streaming with usage asked by the client itself
    (so guardproxy forwards the caller's bytes unchanged)."""
    body: dict[str, Any] = {"model": MODELS[route], "messages": MESSAGES}
    if route != "plain":
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return body


def request_headers(route: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Authorization": f"Bearer {TENANT_KEY}", "x-bench-route": route}


# -- the canned upstream -------------------------------------------------------------------------------


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def canned_answer() -> bytes:
    """The upstream's non-streaming chat completion (usage included)."""
    return _dumps({
        "id": "chatcmpl-bench", "object": "chat.completion", "created": 1_700_000_000, "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 27, "completion_tokens": len(WORDS), "total_tokens": 27 + len(WORDS)},
        "system_fingerprint": "fp_bench",
    }).encode()


def canned_stream_frames() -> list[bytes]:
    """The upstream's streamed chat completion, frame by frame: role, words, finish, usage, [DONE]."""
    base = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gpt-4o-2024-08-06", "system_fingerprint": "fp_bench"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    chunks += [{**base, "choices": [{"index": 0, "delta": {"content": word}, "logprobs": None,
                                     "finish_reason": None}]} for word in WORDS]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [],
                   "usage": {"prompt_tokens": 27, "completion_tokens": len(WORDS), "total_tokens": 27 + len(WORDS)}})
    return [f"data: {_dumps(c)}\n\n".encode() for c in chunks] + [b"data: [DONE]\n\n"]


def _nginx_string(body: bytes) -> str:
    text = body.decode()
    if "$" in text:
        raise ValueError("nginx would expand $ in a canned body")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx_conf(tmp: Path, port: int) -> str:
    """One nginx process on ``127.0.0.1:port`` answering ``POST /<route>/v1/chat/completions`` from memory."""
    frames = canned_stream_frames()
    stream = b"".join(frames)
    return f"""\
daemon off;
master_process off;
worker_rlimit_nofile 16384;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/nginx-body;
  proxy_temp_path {tmp}/nginx-proxy;
  fastcgi_temp_path {tmp}/nginx-fastcgi;
  uwsgi_temp_path {tmp}/nginx-uwsgi;
  scgi_temp_path {tmp}/nginx-scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /plain/v1/chat/completions {{
      default_type application/json;
      add_header x-request-id req_bench;
      return 200 {_nginx_string(canned_answer())};
    }}
    location = /stream/v1/chat/completions {{
      default_type text/event-stream;
      add_header x-request-id req_bench;
      return 200 {_nginx_string(stream)};
    }}
    location = /slow/v1/chat/completions {{
      default_type text/event-stream;
      limit_rate_after {len(frames[0]) + SLOW_HEAD_ALLOWANCE_BYTES};
      limit_rate {SLOW_RATE_BYTES_S};
      return 200 {_nginx_string(stream)};
    }}
  }}
}}
"""


# -- configs of the proxies under test ------------------------------------------------------------------


def guardproxy_config(upstream: str, redis_url: str) -> dict[str, Any]:
    """One upstream per kind of answer, a model on each (bench-plain downgrading to bench-plain-mini), one
    tenant whose budget nothing here can reach. Every model counts tokens with o200k_base."""
    from guardproxy.config import hash_key  # after sys.path holds the repository

    gpt_4o = {"input": "2.50", "cached_input": "1.25", "output": "10.00"}
    return {
        "server": {"host": "127.0.0.1", "port": 8080},
        "store": {"redis_url": redis_url, "key_prefix": "gpbench"},
        "upstreams": {route: {"base_url": f"{upstream}/{route}/v1", "api_key": "sk-bench-upstream", "timeout_s": 600}
                      for route in MODELS},
        "models": {
            "bench-plain": {"upstream": "plain", **gpt_4o, "downgrade_to": "bench-plain-mini"},
            "bench-plain-mini": {"upstream": "plain", "input": "0.15", "cached_input": "0.075", "output": "0.60"},
            "bench-stream": {"upstream": "stream", **gpt_4o},
            "bench-slow": {"upstream": "slow", **gpt_4o},
        },
        "tenants": {TENANT: {"api_keys": [hash_key(TENANT_KEY)], "daily_usd": 1_000_000, "monthly_usd": 10_000_000}},
    }


def litellm_config(upstream: str) -> dict[str, Any]:
    """LiteLLM's proxy on the same routes, no database, no budgets; the tenant key is its master key (recent
    releases refuse to start without one)."""
    return {"general_settings": {"master_key": TENANT_KEY}, "model_list": [
        {"model_name": model, "litellm_params": {"model": f"openai/{model}", "api_base": f"{upstream}/{route}/v1",
                                                 "api_key": "sk-bench-upstream"}}
        for route, model in MODELS.items()
    ]}


def litellm_command() -> str | None:
    """LiteLLM's proxy command when LiteLLM is installed (next to this Python, or on PATH)."""
    if importlib.util.find_spec("litellm") is None and not os.environ.get("BENCH_LITELLM"):
        return None
    return os.environ.get("BENCH_LITELLM") or shutil.which(
        "litellm", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


# -- processes ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class ProcStat:
    pid: int
    session: int
    cpu_ticks: int
    rss_bytes: int


def parse_proc_stat(text: str) -> ProcStat:
    """The fields of ``/proc/<pid>/stat`` the bench uses (the command name may hold spaces and parens)."""
    pid = int(text.split(" ", 1)[0])
    rest = text[text.rindex(")") + 2:].split()
    # rest[0] is field 3 (state): session is field 6, utime/stime 14/15, rss (pages) 24.
    return ProcStat(pid=pid, session=int(rest[3]), cpu_ticks=int(rest[11]) + int(rest[12]),
                    rss_bytes=int(rest[21]) * PAGE_SIZE)


def session_stats(session: int) -> list[ProcStat]:
    """Every live process of a session (a target and the workers it forked)."""
    stats = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = parse_proc_stat(Path(entry.path, "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
        if stat.session == session:
            stats.append(stat)
    return stats


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Processes:
    """The servers this run started, each in its own session, with its output kept in a file."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, command: list[str], port: int, env: dict[str, str] | None = None,
              cwd: Path = REPO_DIR) -> None:
        with open(self.log_path(name), "wb") as log:
            proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd,
                env={**os.environ, **(env or {})}, start_new_session=True,
            )
        self.started[name] = proc
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _accepts(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on port {port} in {START_TIMEOUT_S} s:\n"
                                   f"{self.log_tail(name)}")
            time.sleep(0.05)

    def cpu_ticks(self, name: str) -> int:
        return sum(s.cpu_ticks for s in session_stats(self.started[name].pid))

    def worker_rss(self, name: str) -> list[int]:
        """RSS of each serving process: the workers a supervisor forked, or the one process."""
        leader = self.started[name].pid
        stats = [s for s in session_stats(leader) if "resource_tracker" not in _cmdline(s.pid)]
        workers = [s.rss_bytes for s in stats if s.pid != leader]
        return workers or [s.rss_bytes for s in stats if s.pid == leader]

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = self.log_path(name).read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def log_lines(self, name: str) -> int:
        with open(self.log_path(name), "rb") as f:
            return sum(1 for _ in f)

    def stop_all(self) -> None:
        """SIGTERM every session, then SIGKILL what is still alive after a few seconds."""
        for proc in reversed(self.started.values()):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in reversed(self.started.values()):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@dataclass(frozen=True)
class Target:
    """One system under load: its process in ``Processes`` and where it listens."""

    name: str
    base_url: str
    #: The upstream itself: each route is its own path; a proxy serves every route at /v1/chat/completions.
    direct: bool = False
    #: Also charge redis-server's CPU to it.
    uses_redis: bool = False

    def url(self, route: str) -> str:
        return f"{self.base_url}/{route}/v1/chat/completions" if self.direct else f"{self.base_url}/v1/chat/completions"


ALL_TARGETS = ("upstream", BASELINE, "bare-aiohttp", GUARD, "guardproxy-embedded", "guardproxy-embedded-w2",
               "guardproxy-redis-w2", "guardproxy-redis-quiet", "litellm")


def missing_tools() -> list[str]:
    """What the bench needs from the machine and does not find, each with how to install it."""
    missing = []
    for tool, package in (("wrk", "wrk"), ("nginx", "nginx-light"), ("redis-server", "redis-server")):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            missing.append(f"{tool} (apt-get install {package})")
    return missing


def checkout(ref: str, tmp: Path) -> Path:
    """The repository's ``guardproxy`` package at git ``ref``, unpacked in a directory under ``tmp``."""
    where = tmp / f"ref-{ref.replace('/', '_')}"
    where.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO_DIR), "archive", ref, "guardproxy"], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


@contextlib.contextmanager
def servers(tmp: Path, wanted: Sequence[str], compare: str | None = None,
            ) -> Iterator[tuple[list[Target], Processes]]:
    """Start nginx, redis-server and every wanted target; yields the targets that are up. With ``compare``
    (a git ref), also ``guardproxy-redis@<ref>``: the same command on that revision's code."""
    procs = Processes(tmp)
    py = sys.executable
    targets: list[Target] = []
    try:
        port = free_port()
        (tmp / "nginx.conf").write_text(nginx_conf(tmp, port))
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        procs.start("upstream", [nginx, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e",
                                 str(tmp / "nginx-error.log")], port)
        upstream = f"http://127.0.0.1:{port}"
        targets.append(Target("upstream", upstream, direct=True))

        for name, client in ((BASELINE, "httpx-aiohttp"), ("bare-aiohttp", "aiohttp")):
            if name in wanted:
                port = free_port()
                procs.start(name, [py, "-m", "uvicorn", "--factory", "bare_proxy:app_from_env", "--app-dir",
                                   str(BENCH_DIR), "--host", "127.0.0.1", "--port", str(port), "--log-level",
                                   "warning", "--no-access-log"], port,
                            {"BENCH_UPSTREAM_URL": upstream, "BENCH_CLIENT": client})
                targets.append(Target(name, f"http://127.0.0.1:{port}"))

        redis_port = free_port()
        procs.start("redis", [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no",
                              "--loglevel", "warning", "--dir", str(tmp)], redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        for store, url in (("redis", redis_url), ("embedded", "")):
            (tmp / f"guardproxy-{store}.yaml").write_text(json.dumps(guardproxy_config(upstream, url), indent=2))
        # guardproxy as users start it: `guardproxy serve --config ...`, default settings.
        variants: list[tuple[str, str, list[str], Path]] = [
            (GUARD, "redis", [], REPO_DIR), ("guardproxy-embedded", "embedded", [], REPO_DIR),
            ("guardproxy-redis-w2", "redis", ["--workers", "2"], REPO_DIR),
            # two workers on one SQLite file (each variant has a state folder, so a file, of its own)
            ("guardproxy-embedded-w2", "embedded", ["--workers", "2"], REPO_DIR),
            ("guardproxy-redis-quiet", "redis", ["--log-level", "warning"], REPO_DIR),
        ]
        if compare:
            # `python -m` puts its working directory first on sys.path: the revision's package is imported.
            revision = checkout(compare, tmp)
            variants.append((f"{GUARD}@{compare}", "redis", [], revision))
            wanted = [*wanted, f"{GUARD}@{compare}"]
            if "guardproxy-embedded" in wanted:
                variants.append((f"guardproxy-embedded@{compare}", "embedded", [], revision))
                wanted = [*wanted, f"guardproxy-embedded@{compare}"]
        for name, store, extra, cwd in variants:
            if name in wanted:
                port = free_port()
                # the SQLite store's file (no redis_url) and the journal: in the bench's own folder
                procs.start(name, [py, "-m", "guardproxy", "serve", "--config", str(tmp / f"guardproxy-{store}.yaml"),
                                   "--port", str(port), *extra], port, cwd=cwd,
                            env={"XDG_STATE_HOME": str(tmp / "state" / name)})
                targets.append(Target(name, f"http://127.0.0.1:{port}", uses_redis=store == "redis"))

        if "litellm" in wanted:
            command = litellm_command()
            if command is None:
                print("note: LiteLLM is not installed (pip install 'litellm[proxy]'); its rows are left out",
                      flush=True)
            else:
                port = free_port()
                (tmp / "litellm.yaml").write_text(json.dumps(litellm_config(upstream), indent=2))
                try:
                    procs.start("litellm", [command, "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1",
                                            "--port", str(port), "--num_workers", "1"], port,
                                {"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
                    targets.append(Target("litellm", f"http://127.0.0.1:{port}"))
                except RuntimeError as exc:
                    print(f"note: LiteLLM did not start; its rows are left out: {exc}", flush=True)
        yield targets, procs
    finally:
        procs.stop_all()


# -- measuring -------------------------------------------------------------------------------------------


def smoke(target: Target, route: str) -> None:
    """One request before the load: a target that fails it would only measure its error path."""
    request = urllib.request.Request(target.url(route), json.dumps(request_body(route)).encode(), method="POST",
                                     headers=request_headers(route))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read().decode()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"{target.name} answered {exc.code}: {exc.read()[:500]!r}") from None
    if COMPLETE_MARKERS[route] not in body:
        raise RuntimeError(f"{target.name} answered an incomplete {route} body: {body[:300]!r}")


def wrk_script(route: str) -> str:
    """POST the route's body on every request; ``done`` prints the summary as one JSON line, in µs.

    A 200 whose body lacks the mode's complete marker (a stream cut short, an error frame) is incomplete.
    """
    headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in request_headers(route).items())
    return f"""\
wrk.method = "POST"
wrk.body = [==[{_dumps(request_body(route))}]==]
{headers}

local threads = {{}}
setup = function(thread) table.insert(threads, thread) end
init = function(args) incomplete = 0 end
response = function(status, headers, body)
  if status == 200 and not string.find(body, [==[{COMPLETE_MARKERS[route]}]==], 1, true) then
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


def first_frame(target: Target, count: int) -> list[float]:
    """Seconds to the first streamed frame, ``count`` requests one after another."""
    body = _dumps(request_body("stream")).encode()
    return clients.first_frame_latencies(target.url("stream"), body, request_headers("stream"), count)


@dataclass(frozen=True)
class Memory:
    target: str
    workers: int
    idle_mb: float  # per worker (the largest), after one request of each kind
    after_load_mb: float  # per worker (the largest), idle again after the load
    streams_open: int
    streams_mb: float | None  # all workers together, with the streams open


def hold_streams(procs: Processes, target: Target, count: int) -> tuple[int, float]:
    body = _dumps(request_body("slow")).encode()

    def sample(opened: int) -> tuple[int, float]:
        return opened, sum(procs.worker_rss(target.name)) / 2**20

    return clients.hold_streams(target.url("slow"), body, request_headers("slow"), count, 60.0, sample)


# -- figures ---------------------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def paired(rounds: Sequence[dict[str, float]], target: str, base: str, op: str) -> float | None:
    """Median over rounds of ``target``'s figure over (``op="ratio"``) or minus (``"diff"``) ``base``'s in
    the same round: back-to-back runs, so a noisy moment on the machine hits both alike."""
    values = []
    for figures in rounds:
        if target in figures and base in figures:
            a, b = figures[target], figures[base]
            if op == "diff":
                values.append(a - b)
            elif b:
                values.append(a / b)
    return median(values)


@dataclass
class Report:
    loads: list[Load] = field(default_factory=list)
    first_frame_ms: dict[str, list[list[float]]] = field(default_factory=dict)  # target -> rounds -> samples
    memory: list[Memory] = field(default_factory=list)
    log_lines_per_request: dict[str, float] = field(default_factory=dict)

    def rounds_of(self, kind: str, mode: str, figure: str) -> list[dict[str, float]]:
        """Per round, target -> figure, in the order the loads ran (each target once per round)."""
        rounds: list[dict[str, float]] = []
        for load in self.loads:
            if (load.kind, load.mode) != (kind, mode):
                continue
            if not rounds or load.target in rounds[-1]:
                rounds.append({})
            rounds[-1][load.target] = getattr(load, figure)
        return rounds

    def combined(self, kind: str, mode: str, target: str) -> dict[str, Any] | None:
        runs = [x for x in self.loads if (x.kind, x.mode, x.target) == (kind, mode, target)]
        if not runs:
            return None
        store = [x.store_cpu_ms_per_request for x in runs if x.store_cpu_ms_per_request is not None]
        return {
            "requests_per_s": median([x.requests_per_s for x in runs]), "p50_ms": median([x.p50_ms for x in runs]),
            "p99_ms": median([x.p99_ms for x in runs]), "errors": sum(x.errors for x in runs),
            "cpu_ms_per_request": median([x.cpu_ms_per_request for x in runs]),
            "store_cpu_ms_per_request": median(store),
            "upstream_cpu_ms_per_request": median([x.upstream_cpu_ms_per_request for x in runs]),
            "wrk_cpu_ms_per_request": median([x.wrk_cpu_ms_per_request for x in runs]),
        }

    def first_frame_rounds(self, figure: str) -> list[dict[str, float]]:
        pick = (lambda s: statistics.median(s)) if figure == "p50" else (lambda s: _percentile(s, 0.99))
        rounds: list[dict[str, float]] = []
        for target, per_round in self.first_frame_ms.items():
            for i, samples in enumerate(per_round):
                while len(rounds) <= i:
                    rounds.append({})
                rounds[i][target] = pick(samples)
        return rounds


def _percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def tables(report: Report, targets: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The printed tables, and the same figures as data."""
    out: list[str] = []
    data: dict[str, Any] = {"throughput": [], "latency_c1": [], "first_frame": [], "memory": [], "ratios": {}}

    header = (f"{'mode':<7} {'target':<28} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'CPU ms/req':>10} "
              f"{'+redis':>7} {'errors':>6} {'vs ' + BASELINE:>22} {'vs bare-aiohttp':>16} {'vs upstream':>11}")
    out += ["Throughput, wrk -t2 -c32 (medians over rounds; ratios: medians of same-round ratios)", header,
            "-" * len(header)]
    for mode in MODES:
        for target in targets:
            row = report.combined("c32", mode, target)
            if row is None:
                continue
            rounds = report.rounds_of("c32", mode, "requests_per_s")
            row |= {"mode": mode, "target": target,
                    "vs_baseline": paired(rounds, target, BASELINE, "ratio"),
                    "vs_bare_aiohttp": paired(rounds, target, "bare-aiohttp", "ratio"),
                    "vs_upstream": paired(rounds, target, "upstream", "ratio")}
            data["throughput"].append(row)
            out.append(f"{mode:<7} {target:<28} {row['requests_per_s']:>7.0f} {row['p50_ms']:>7.2f} "
                       f"{row['p99_ms']:>7.2f} {row['cpu_ms_per_request']:>10.3f} "
                       f"{_fmt(row['store_cpu_ms_per_request'], '.3f'):>7} {row['errors']:>6} "
                       f"{_fmt(row['vs_baseline']):>22} {_fmt(row['vs_bare_aiohttp']):>16} "
                       f"{_fmt(row['vs_upstream']):>11}")

    cpus = os.cpu_count() or 1
    header = (f"{'mode':<7} {'target':<28} {'proxy':>7} {'redis':>7} {'nginx':>7} {'wrk':>7} {'total':>7} "
              f"{'ceiling req/s':>13} {'reached':>7}")
    out += ["", f"CPU ms per request at -c32, the whole machine (ceiling: {cpus} cores / total)", header,
            "-" * len(header)]
    for row in data["throughput"]:
        parts = [row["cpu_ms_per_request"], row["store_cpu_ms_per_request"] or 0.0,
                 row["upstream_cpu_ms_per_request"], row["wrk_cpu_ms_per_request"]]
        total = sum(parts)
        ceiling = cpus * 1000 / total if total else None
        row["machine_cpu_ms_per_request"] = total
        out.append(f"{row['mode']:<7} {row['target']:<28} " + " ".join(f"{p:>7.3f}" for p in parts) +
                   f" {total:>7.3f} {_fmt(ceiling, '.0f'):>13} "
                   f"{_fmt(row['requests_per_s'] / ceiling if ceiling else None):>7}")

    header = (f"{'mode':<7} {'target':<28} {'p50 ms':>7} {'p99 ms':>7} {'added p50':>9} {'added p99':>9} "
              f"{'CPU ms/req':>10}")
    out += ["", "Latency at concurrency 1, wrk -t1 -c1 (added: over the direct upstream, same round)", header,
            "-" * len(header)]
    for mode in MODES:
        for target in targets:
            row = report.combined("c1", mode, target)
            if row is None:
                continue
            row |= {"mode": mode, "target": target,
                    "added_p50_ms": paired(report.rounds_of("c1", mode, "p50_ms"), target, "upstream", "diff"),
                    "added_p99_ms": paired(report.rounds_of("c1", mode, "p99_ms"), target, "upstream", "diff")}
            data["latency_c1"].append(row)
            out.append(f"{mode:<7} {target:<28} {row['p50_ms']:>7.3f} {row['p99_ms']:>7.3f} "
                       f"{_fmt(row['added_p50_ms'], '+.3f'):>9} {_fmt(row['added_p99_ms'], '+.3f'):>9} "
                       f"{row['cpu_ms_per_request']:>10.3f}")

    if report.first_frame_ms:
        header = f"{'target':<28} {'p50 ms':>7} {'p99 ms':>7} {'added p50':>9} {'added p99':>9}"
        out += ["", "Streaming: time to the first data frame, one request at a time", header, "-" * len(header)]
        p50_rounds, p99_rounds = report.first_frame_rounds("p50"), report.first_frame_rounds("p99")
        for target in targets:
            if target not in report.first_frame_ms:
                continue
            row = {"target": target, "p50_ms": median([r[target] for r in p50_rounds]),
                   "p99_ms": median([r[target] for r in p99_rounds]),
                   "added_p50_ms": paired(p50_rounds, target, "upstream", "diff"),
                   "added_p99_ms": paired(p99_rounds, target, "upstream", "diff")}
            data["first_frame"].append(row)
            out.append(f"{target:<28} {_fmt(row['p50_ms'], '.3f'):>7} {_fmt(row['p99_ms'], '.3f'):>7} "
                       f"{_fmt(row['added_p50_ms'], '+.3f'):>9} {_fmt(row['added_p99_ms'], '+.3f'):>9}")

    if report.memory:
        header = (f"{'target':<28} {'workers':>7} {'idle MB/worker':>14} {'after load':>10} {'streams open':>12} "
                  f"{'MB with streams':>15}")
        out += ["", "Memory (RSS; with streams: every worker together)", header, "-" * len(header)]
        for m in report.memory:
            data["memory"].append(asdict(m))
            out.append(f"{m.target:<28} {m.workers:>7} {m.idle_mb:>14.1f} {m.after_load_mb:>10.1f} "
                       f"{m.streams_open:>12} {_fmt(m.streams_mb, '.1f'):>15}")

    ratios: dict[str, Any] = data["ratios"]
    for mode in MODES:
        rounds = report.rounds_of("c32", mode, "requests_per_s")
        ratios[f"workers_2_over_1_{mode}"] = paired(rounds, "guardproxy-redis-w2", GUARD, "ratio")
        ratios[f"quiet_over_default_{mode}"] = paired(rounds, "guardproxy-redis-quiet", GUARD, "ratio")
        ratios[f"embedded_over_redis_{mode}"] = paired(rounds, "guardproxy-embedded", GUARD, "ratio")
        ratios[f"embedded_workers_2_over_1_{mode}"] = paired(rounds, "guardproxy-embedded-w2", "guardproxy-embedded",
                                                             "ratio")
        for other in targets:
            if other.startswith(f"{GUARD}@"):
                ratios[f"this_over_{other.partition('@')[2]}_{mode}"] = paired(rounds, GUARD, other, "ratio")
    ratios["log_lines_per_request"] = report.log_lines_per_request
    out += ["", "Ratios of req/s at -c32 (same-round medians)"]
    for name, value in ratios.items():
        if isinstance(value, float):
            out.append(f"  {name:<32} {value:.2f}")
    if report.log_lines_per_request:
        out.append("  log lines per request (default settings): " +
                   ", ".join(f"{k} {v:.2f}" for k, v in report.log_lines_per_request.items()))
    return "\n".join(out), data


@dataclass(frozen=True)
class Goal:
    line: str
    value: float | None
    limit: float
    at_least: bool

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.limit if self.at_least else self.value <= self.limit


def goals(data: dict[str, Any], guard: str = GUARD) -> list[Goal]:
    """The issue's goal lines, each with this run's figure."""

    def pick(section: str, key: str, **where: str) -> float | None:
        for row in data[section]:
            if all(row.get(k) == v for k, v in where.items()):
                value = row.get(key)
                return None if value is None else float(value)
        return None

    memory = {m["target"]: m for m in data["memory"]}
    guard_memory = memory.get(guard, {})
    idle = guard_memory.get("idle_mb")
    if guard_memory.get("after_load_mb") is not None:
        idle = max(idle or 0.0, guard_memory["after_load_mb"])
    streams_mb = guard_memory.get("streams_mb") if guard_memory.get("streams_open", 0) >= 1000 else None
    ratios = data["ratios"]
    embedded = [ratios.get(f"embedded_over_redis_{m}") for m in MODES]
    return [
        Goal(f"{guard} / {BASELINE} req/s, plain", pick("throughput", "vs_baseline", mode="plain", target=guard),
             0.6, True),
        Goal(f"{guard} / {BASELINE} req/s, stream", pick("throughput", "vs_baseline", mode="stream", target=guard),
             0.6, True),
        Goal("added latency at c=1, p50 ms (plain)", pick("latency_c1", "added_p50_ms", mode="plain", target=guard),
             1.0, False),
        Goal("streaming time to first frame added, p50 ms", pick("first_frame", "added_p50_ms", target=guard),
             1.0, False),
        Goal("idle RSS per worker, MB (the larger of fresh and after load)", idle, 80.0, False),
        Goal("RSS with 1,000 streams open, MB", streams_mb, 150.0, False),
        Goal("--workers 2 / --workers 1 req/s, plain", ratios.get("workers_2_over_1_plain"), 1.85, True),
        Goal("embedded / Redis req/s (the lower of plain and stream)",
             min((e for e in embedded if e is not None), default=None), 1.0, True),
        Goal("embedded --workers 2 / --workers 1 req/s, plain", ratios.get("embedded_workers_2_over_1_plain"), 1.5,
             True),
    ]


def goals_table(items: Sequence[Goal]) -> str:
    lines = ["Goals (issue 10)"]
    for g in items:
        verdict = "n/a" if g.met is None else "met" if g.met else "NOT met"
        op = ">=" if g.at_least else "<="
        lines.append(f"  {g.line:<62} {_fmt(g.value):>8}  goal {op} {g.limit:<5g} {verdict}")
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int
    duration_s: float
    warm_up_s: float
    c1_duration_s: float
    first_frames: int
    streams: int


PLANS = {
    "full": Plan(rounds=3, duration_s=5, warm_up_s=2, c1_duration_s=3, first_frames=200, streams=1000),
    "quick": Plan(rounds=1, duration_s=1, warm_up_s=1, c1_duration_s=1, first_frames=20, streams=100),
}


def run(plan: Plan, wanted: Sequence[str], tmp: Path, compare: str | None = None) -> tuple[Report, list[str]]:
    report = Report()
    for mode in MODES:
        (tmp / f"{mode}.lua").write_text(wrk_script(mode))
    with servers(tmp, wanted, compare) as (targets, procs):
        names = [t.name for t in targets]
        print(f"up: {', '.join(names)}; {plan.rounds} round(s) of {plan.duration_s:g} s per run", flush=True)
        for target in targets:
            for mode in MODES:
                smoke(target, mode)
        idle = {t.name: procs.worker_rss(t.name) for t in targets}
        log_start = {t.name: procs.log_lines(t.name) for t in targets}
        requests_seen = dict.fromkeys(names, 0)
        for round_ in range(plan.rounds):
            for mode in MODES:
                for target in targets:
                    print(f"  round {round_ + 1}: c32 {mode:<6} {target.name}", flush=True)
                    if round_ == 0:
                        warm = wrk(target.url(mode), tmp / f"{mode}.lua", 2, 32, plan.warm_up_s)
                        requests_seen[target.name] += warm["requests"]
                    load = measure(procs, target, "c32", mode, tmp / f"{mode}.lua", plan.duration_s)
                    requests_seen[target.name] += load.requests
                    report.loads.append(load)
            for mode in MODES:
                for target in targets:
                    print(f"  round {round_ + 1}: c1  {mode:<6} {target.name}", flush=True)
                    load = measure(procs, target, "c1", mode, tmp / f"{mode}.lua", plan.c1_duration_s)
                    requests_seen[target.name] += load.requests
                    report.loads.append(load)
            for target in targets:
                print(f"  round {round_ + 1}: first frame {target.name}", flush=True)
                samples = first_frame(target, plan.first_frames)
                requests_seen[target.name] += len(samples)
                report.first_frame_ms.setdefault(target.name, []).append([s * 1000 for s in samples])
        for target in targets:
            lines = procs.log_lines(target.name) - log_start[target.name]
            if target.name.startswith("guardproxy") and requests_seen[target.name]:
                report.log_lines_per_request[target.name] = lines / requests_seen[target.name]
        time.sleep(1)
        after = {t.name: procs.worker_rss(t.name) for t in targets}
        for target in targets:
            print(f"  memory: {plan.streams} streams -> {target.name}", flush=True)
            opened, mb = hold_streams(procs, target, plan.streams) if plan.streams else (0, 0.0)
            report.memory.append(Memory(
                target=target.name, workers=len(after[target.name]), idle_mb=max(idle[target.name]) / 2**20,
                after_load_mb=max(after[target.name]) / 2**20, streams_open=opened,
                streams_mb=mb if opened else None,
            ))
            time.sleep(1)
        errors = [f"--- {t.name} ---\n{procs.log_tail(t.name)}" for t in targets
                  if any(x.errors for x in report.loads if x.target == t.name)]
    return report, [t.name for t in targets] + errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 1 s, 100 streams (~1 min)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, help="seconds of each -c32 run (default 5)")
    parser.add_argument("--streams", type=int, help="streams held open at once for the memory figure (default 1000)")
    parser.add_argument("--targets", help=f"comma-separated subset of {','.join(ALL_TARGETS)} (upstream always runs)")
    parser.add_argument("--compare", metavar="GIT_REF",
                        help=f"also run {GUARD} on this revision's code, in the same rounds (before/after)")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    plan = Plan(rounds=args.rounds or plan.rounds, duration_s=args.duration or plan.duration_s,
                warm_up_s=plan.warm_up_s, c1_duration_s=plan.c1_duration_s, first_frames=plan.first_frames,
                streams=plan.streams if args.streams is None else args.streams)
    wanted = ALL_TARGETS if not args.targets else ("upstream", *args.targets.split(","))
    if unknown := set(wanted) - set(ALL_TARGETS):
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if plan.rounds < 1 or plan.duration_s <= 0 or plan.streams < 0:
        parser.error("--rounds and --duration must be positive, --streams at least 0")
    if missing := missing_tools():
        print("bench: missing on this machine: " + "; ".join(missing), file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO_DIR))
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped either way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))

    with tempfile.TemporaryDirectory(prefix="guardproxy-bench-") as tmp_dir:
        report, names_and_errors = run(plan, wanted, Path(tmp_dir), args.compare)
    names = [n for n in names_and_errors if not n.startswith("---")]
    text, data = tables(report, names)
    goal_items = goals(data)
    print()
    print(text)
    print()
    print(goals_table(goal_items))
    for tail in names_and_errors[len(names):]:
        print(f"\nerrors under load; the end of its log:\n{tail}")
    RESULTS_FILE.parent.mkdir(exist_ok=True)
    RESULTS_FILE.write_text(json.dumps({
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"), "plan": asdict(plan),
        "cpus": os.cpu_count(), "python": platform.python_version(), **data,
        "goals": [asdict(g) | {"met": g.met} for g in goal_items],
        "loads": [asdict(x) for x in report.loads], "first_frame_ms": report.first_frame_ms,
    }, indent=2) + "\n")
    print(f"\nwritten to {RESULTS_FILE.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; every server this run started is stopped")
