"""guardproxy's CPU per request, and where it goes: a deterministic profile (cProfile) of one worker.

    python bench/cpu_profile.py [--mode plain] [--store redis] [--seconds 8] [--top 25] [--compare main]

Starts the bench's servers (canned nginx, the Python upstream, redis-server), then ``guardproxy serve`` as
users start it (default settings, on ``--store redis`` or ``embedded``) twice: once plain, loaded by
``wrk -t1 -c4`` (``--connections``) for the CPU per request from /proc (less noise-sensitive than req/s
on a shared machine), once under ``python -m cProfile`` with the same load, whose functions are printed
by own time and by cumulative time. ``--compare REF`` measures that
revision's CPU per request in the same run, interleaved (3 rounds each).
"""

from __future__ import annotations

import argparse
import pstats
import signal
import statistics
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from measure import wrk, wrk_script  # noqa: E402
from servers import CLK_TCK, REPO_DIR, Target, checkout, free_port, servers, smoke  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=("plain", "stream"), default="plain")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--compare", metavar="GIT_REF")
    parser.add_argument("--connections", type=int, default=4, help="wrk's concurrent connections (default 4)")
    parser.add_argument("--store", choices=("redis", "embedded"), default="redis",
                        help="the store guardproxy runs on: the bench's redis-server, or the embedded SQLite file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_DIR))
    with tempfile.TemporaryDirectory(prefix="guardproxy-cpu-") as tmp_dir:
        tmp = Path(tmp_dir)
        script = tmp / "load.lua"
        script.write_text(wrk_script(args.mode))
        with servers(tmp, ["upstream"]) as (_, procs, _py):
            config = str(tmp / f"guardproxy-{args.store}.yaml")
            trees = {"this": REPO_DIR}
            if args.compare:
                trees[f"@{args.compare}"] = checkout(args.compare, tmp)
            targets: dict[str, Target] = {}
            for label, tree in trees.items():
                port = free_port()
                procs.start(label, [sys.executable, "-m", "guardproxy", "serve", "--config", config, "--port",
                                    str(port)], port, cwd=tree, env={"XDG_STATE_HOME": str(tmp / "state" / label)})
                targets[label] = Target(label, f"http://127.0.0.1:{port}")
                smoke(targets[label], args.mode)
                wrk(targets[label].url(args.mode), script, 1, args.connections, 2)  # warm-up
            per_request: dict[str, list[float]] = {label: [] for label in targets}
            for _ in range(3):
                for label, target in targets.items():
                    before = procs.cpu_ticks(label)
                    done = wrk(target.url(args.mode), script, 1, args.connections, args.seconds)
                    per_request[label].append((procs.cpu_ticks(label) - before) * 1000 / CLK_TCK
                                              / max(1, done["requests"]))
            print(f"CPU ms per request, {args.mode}, wrk -t1 -c{args.connections} "
                  "(3 interleaved rounds; median, then each round):")
            for label, values in per_request.items():
                print(f"  {label:<16} {statistics.median(values):.3f}   " + " ".join(f"{v:.3f}" for v in values))
            port = free_port()
            out = tmp / "guardproxy.prof"
            procs.start("profiled", [sys.executable, "-m", "cProfile", "-o", str(out), "-m", "guardproxy", "serve",
                                     "--config", config, "--port", str(port)], port,
                        env={"XDG_STATE_HOME": str(tmp / "state" / "profiled")})
            profiled = Target("profiled", f"http://127.0.0.1:{port}")
            smoke(profiled, args.mode)
            done = wrk(profiled.url(args.mode), script, 1, args.connections, args.seconds)
            procs.started["profiled"].send_signal(signal.SIGINT)  # uvicorn shuts down, cProfile writes its file
            procs.started["profiled"].wait(30)
        stats = pstats.Stats(str(out))
        print(f"\ncProfile of one worker over {done['requests']} {args.mode} requests (times include the "
              "profiler's overhead):")
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
