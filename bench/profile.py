"""Where guardproxy's CPU goes under load: py-spy samples one ``guardproxy serve`` worker while wrk loads it.

    python bench/profile.py [--target guardproxy-redis] [--mode plain] [--seconds 10] [--flame out.svg]

Starts the same servers as ``bench/run.py`` (canned nginx upstream, redis-server, the target with default
settings), puts ``wrk -t2 -c32`` on it, records the event-loop thread with ``py-spy record`` (``pip install
py-spy``, not a dependency of the project) and prints the share of samples per component (by the innermost
frame that belongs to a known library: exclusive, summing to 100 %) and the inclusive share of a few steps.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import measure
import servers
import workload

# The first match, from the innermost frame outwards, names a sample's component.
COMPONENTS = [
    ("logging", ("(logging/",)),
    ("redis-py", ("(redis/",)),
    ("sqlite3 (embedded store)", ("(sqlite3/", "(guardproxy/sqlite_")),
    ("httpx API layer", ("(httpx/", "(httpx_aiohttp/", "(httpcore/")),
    ("aiohttp", ("(aiohttp/", "(yarl/", "(multidict/")),
    ("tiktoken", ("(tiktoken/", "(guardproxy/budget/tokens.py")),
    ("prometheus", ("(prometheus_client/",)),
    ("uvicorn+httptools", ("(uvicorn/", "(httptools/")),
    ("starlette", ("(starlette/",)),
    ("anyio", ("(anyio/",)),
    ("orjson/json", ("(json/", "orjson")),
    ("guardproxy", ("(guardproxy/",)),
    ("asyncio/uvloop", ("(asyncio/", "uvloop")),
]
# Inclusive shares: samples with any frame matching.
STEPS = [
    ("settle (store round trip + bookkeeping)", "settle (guardproxy/http/settlement.py"),
    ("admit (store round trip)", "admit_attempt (guardproxy/http/admission.py"),
    ("store client calls (admit + settle + other)", "(guardproxy/store/redis/"),
    ("forward to upstream (send)", "Upstream.send (guardproxy/http/upstream.py"),
    ("read a whole answer (read)", "Upstream.read (guardproxy/http/upstream.py"),
    ("relay of a stream", "(guardproxy/http/relay.py"),
    ("token estimate", "estimate (guardproxy/http/admission.py"),
    ("auth (tenant resolve)", "(guardproxy/http/auth.py"),
    ("logging", "(logging/"),
    ("metrics", "(prometheus_client/"),
]


def component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in COMPONENTS:
            if any(n in frame for n in needles):
                return name
    return "other"


def summarize(collapsed: str) -> str:
    """Shares of a py-spy ``--format raw`` (collapsed stacks: ``frame;frame;... count``) recording."""
    by_component: collections.Counter[str] = collections.Counter()
    by_step: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")  # py-spy leaves idle samples out unless asked (--idle)
        total += count
        by_component[component(frames)] += count
        for name, needle in STEPS:
            if any(needle in f for f in frames):
                by_step[name] += count
    lines = [f"{total} busy samples of the event-loop thread", "", "exclusive, by component:"]
    lines += [f"  {name:<34} {100 * n / total:5.1f} %" for name, n in by_component.most_common()]
    lines += ["", "inclusive, by step:"]
    lines += [f"  {name:<44} {100 * by_step[name] / total:5.1f} %" for name, _ in STEPS]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--target", default=servers.GUARD, choices=[t for t in servers.ALL_TARGETS if t != "upstream"])
    parser.add_argument("--mode", default="plain", choices=workload.MODES)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--flame", help="also write a flame graph (SVG) here")
    parser.add_argument("--raw", help="keep the collapsed stacks here")
    parser.add_argument("--summarize", help="only summarize collapsed stacks kept earlier with --raw")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(Path(args.summarize).read_text()))
        return 0
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        sys.exit("py-spy not found: pip install py-spy (into this venv; not a project dependency)")
    sys.path.insert(0, str(servers.REPO_DIR))
    with tempfile.TemporaryDirectory(prefix="guardproxy-profile-") as tmp_dir:
        tmp = Path(tmp_dir)
        (tmp / "load.lua").write_text(measure.wrk_script(args.mode))
        with servers.servers(tmp, ["upstream", args.target]) as (targets, procs, _):
            target = next(t for t in targets if t.name == args.target)
            servers.smoke(target, args.mode)
            measure.wrk(target.url(args.mode), tmp / "load.lua", 2, 32, 2)
            pid = max(procs.started[args.target].pid, *[s.pid for s in servers.session_stats(
                procs.started[args.target].pid)])  # the (last started) worker
            load = threading.Thread(target=measure.wrk, args=(target.url(args.mode), tmp / "load.lua", 2, 32,
                                                          args.seconds + 3))
            load.start()
            raw = tmp / "stacks.txt"
            subprocess.run([py_spy, "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate", "200",
                            "--format", "raw", "--output", str(raw), "--nonblocking"], check=True,
                           capture_output=True)
            if args.flame:
                subprocess.run([py_spy, "record", "--pid", str(pid), "--duration", "2", "--output", args.flame,
                                "--nonblocking"], check=False, capture_output=True)
            load.join()
            collapsed = raw.read_text()
            if args.raw:
                Path(args.raw).write_text(collapsed)
    print(f"{args.target}, {args.mode}, wrk -t2 -c32, default settings")
    print(summarize(collapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
