"""The servers the benchmark starts on free loopback ports: the canned nginx upstream, redis-server, the
bare pass-throughs, guardproxy as users start it, LiteLLM; their processes and what they cost (/proc)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from workload import (  # noqa: E402
    COMPLETE_MARKERS,
    MODELS,
    PY_ROUTE,
    SLOW_HEAD_ALLOWANCE_BYTES,
    SLOW_RATE_BYTES_S,
    TENANT,
    TENANT_KEY,
    canned_answer,
    canned_stream_frames,
    request_body,
    request_headers,
)

CONF_DIR = BENCH_DIR / "conf"
START_TIMEOUT_S = 60
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

BASELINE = "bare-httpx-aiohttp"
GUARD = "guardproxy-redis"



def _nginx_string(body: bytes) -> str:
    text = body.decode()
    if "$" in text:
        raise ValueError("nginx would expand $ in a canned body")
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx_conf(tmp: Path, port: int) -> str:
    """One nginx process on ``127.0.0.1:port`` answering ``POST /<route>/v1/chat/completions`` from memory."""
    frames = canned_stream_frames()
    stream = b"".join(frames)
    return string.Template((CONF_DIR / "nginx.conf").read_text()).substitute(
        tmp=tmp, port=port, plain_body=_nginx_string(canned_answer()), stream_body=_nginx_string(stream),
        slow_after=len(frames[0]) + SLOW_HEAD_ALLOWANCE_BYTES, slow_rate=SLOW_RATE_BYTES_S,
    )


# -- configs of the proxies under test ------------------------------------------------------------------


def upstream_roots(upstream: str, py_upstream: str) -> dict[str, str]:
    """Where each route's answers come from: nginx, and the Python upstream for ``pystream``."""
    return {route: py_upstream if route == PY_ROUTE else upstream for route in MODELS}


def guardproxy_config(upstream: str, redis_url: str, py_upstream: str) -> dict[str, Any]:
    """One upstream per kind of answer, a model on each (bench-plain downgrading to bench-plain-mini), one
    tenant whose budget nothing here can reach. Every model counts tokens with o200k_base."""
    from guardproxy.config.settings import hash_key  # after sys.path holds the repository

    gpt_4o = {"input": "2.50", "cached_input": "1.25", "output": "10.00"}
    return {
        "server": {"host": "127.0.0.1", "port": 8080},
        "store": {"redis_url": redis_url, "key_prefix": "gpbench"},
        "upstreams": {route: {"base_url": f"{root}/{route}/v1", "api_key": "sk-bench-upstream", "timeout_s": 600}
                      for route, root in upstream_roots(upstream, py_upstream).items()},
        "models": {
            "bench-plain": {"upstream": "plain", **gpt_4o, "downgrade_to": "bench-plain-mini"},
            "bench-plain-mini": {"upstream": "plain", "input": "0.15", "cached_input": "0.075", "output": "0.60"},
            "bench-stream": {"upstream": "stream", **gpt_4o},
            "bench-slow": {"upstream": "slow", **gpt_4o},
            "bench-pystream": {"upstream": PY_ROUTE, **gpt_4o},
        },
        "tenants": {TENANT: {"api_keys": [hash_key(TENANT_KEY)], "daily_usd": 1_000_000, "monthly_usd": 10_000_000}},
    }


def litellm_config(upstream: str, py_upstream: str) -> dict[str, Any]:
    """LiteLLM's proxy on the same routes, no database, no budgets; the tenant key is its master key (recent
    releases refuse to start without one)."""
    roots = upstream_roots(upstream, py_upstream)
    return {"general_settings": {"master_key": TENANT_KEY}, "model_list": [
        {"model_name": model, "litellm_params": {"model": f"openai/{model}", "api_base": f"{roots[route]}/{route}/v1",
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


def cmdline(pid: int) -> str:
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
        stats = [s for s in session_stats(leader) if "resource_tracker" not in cmdline(s.pid)]
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

    def stop(self, name: str) -> None:
        """SIGTERM one session, SIGKILL it if it is still alive after a few seconds."""
        proc = self.started.pop(name)
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()

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


#: The Python upstream (``bench/py_upstream.py``): measured only for the first streamed frame, not under wrk.
PY_UPSTREAM = "upstream-py"

#: Only when asked (``--targets``): the bare relay with guardproxy's coalesced writes.
COALESCED = "bare-aiohttp-coalesced"
OPTIONAL_TARGETS = (COALESCED,)

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
            ) -> Iterator[tuple[list[Target], Processes, Target]]:
    """Start nginx, the Python upstream, redis-server and every wanted target; yields the targets that are
    up, the processes and the Python upstream (not a wrk target). With ``compare`` (a git ref), also
    ``guardproxy-redis@<ref>``: the same command on that revision's code."""
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
        port = free_port()
        procs.start(PY_UPSTREAM, [py, str(BENCH_DIR / "py_upstream.py"), str(port)], port)
        py_upstream = f"http://127.0.0.1:{port}"
        py_target = Target(PY_UPSTREAM, py_upstream, direct=True)

        bare = ((BASELINE, "httpx-aiohttp", []), ("bare-aiohttp", "aiohttp", []),
                # the bare relay on guardproxy's uvicorn protocol: its writes coalesced (http/coalesce.py)
                (COALESCED, "aiohttp", ["--http", "guardproxy.http.slow_clients:GuardedHttpToolsProtocol"]))
        for name, client, extra in bare:
            if name in wanted:
                port = free_port()
                procs.start(name, [py, "-m", "uvicorn", "--factory", "bare_proxy:app_from_env", "--app-dir",
                                   str(BENCH_DIR), "--host", "127.0.0.1", "--port", str(port), "--log-level",
                                   "warning", "--no-access-log", *extra], port,
                            {"BENCH_UPSTREAM_URL": upstream, "BENCH_CLIENT": client,
                             "BENCH_PY_UPSTREAM_URL": py_upstream})
                targets.append(Target(name, f"http://127.0.0.1:{port}"))

        redis_port = free_port()
        procs.start("redis", [shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no",
                              "--loglevel", "warning", "--dir", str(tmp)], redis_port)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        for store, url in (("redis", redis_url), ("embedded", "")):
            (tmp / f"guardproxy-{store}.yaml").write_text(json.dumps(guardproxy_config(upstream, url, py_upstream),
                                                                                  indent=2))
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
                (tmp / "litellm.yaml").write_text(json.dumps(litellm_config(upstream, py_upstream), indent=2))
                try:
                    procs.start("litellm", [command, "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1",
                                            "--port", str(port), "--num_workers", "1"], port,
                                {"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
                    targets.append(Target("litellm", f"http://127.0.0.1:{port}"))
                except RuntimeError as exc:
                    print(f"note: LiteLLM did not start; its rows are left out: {exc}", flush=True)
        yield targets, procs, py_target
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
