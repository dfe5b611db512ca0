"""What `guardproxy serve` costs in memory as users start it (embedded SQLite store, default settings):
idle RSS of one worker, and the total PSS of ``--workers 4`` (the supervisor and every worker).

    python bench/footprint.py [--compare GIT_REF] [--workers 4]

RSS counts every page a process maps, so pages that forked workers share are counted once per worker;
PSS (``/proc/<pid>/smaps_rollup``) splits each shared page between the processes that map it, so the PSS
of all the processes of one ``serve`` adds up to what the machine pays. Each figure is taken after one
request of each kind (plain and stream), then 2 s of rest. ``bench/run.py`` prints the same line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from servers import (  # noqa: E402
    Processes,
    Target,
    checkout,
    cmdline,
    free_port,
    guardproxy_config,
    servers,
    session_stats,
    smoke,
)
from workload import MODES  # noqa: E402

SETTLE_S = 2.0
#: ``bench/run.py``'s line: the total PSS of this many workers.
FOOTPRINT_WORKERS = 4
#: The goals of the memory issue (#26).
IDLE_RSS_GOAL_MB = 80.0
TOTAL_PSS_GOAL_MB = 300.0


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup``'s ``Name:   123 kB`` lines, in bytes."""
    figures = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            figures[name] = int(parts[0]) * 1024
    return figures


def rollup(pid: int) -> dict[str, int]:
    try:
        return parse_smaps_rollup(Path(f"/proc/{pid}/smaps_rollup").read_text())
    except OSError:
        return {}


@dataclass(frozen=True)
class Footprint:
    target: str
    workers: int
    #: RSS and PSS of each worker (the session's processes but its leader), MB.
    worker_rss_mb: list[float]
    worker_pss_mb: list[float]
    #: PSS of the leader (the supervisor with --workers N, the only process otherwise) and of helpers
    #: (multiprocessing's resource tracker), MB.
    leader_pss_mb: float
    others_pss_mb: float

    @property
    def total_pss_mb(self) -> float:
        return self.leader_pss_mb + self.others_pss_mb + sum(self.worker_pss_mb)

    @property
    def idle_rss_mb(self) -> float:
        """The largest worker's RSS."""
        return max(self.worker_rss_mb)


def footprint(procs: Processes, name: str, workers: int) -> Footprint:
    """The memory of every process of ``name``'s session, as ``/proc`` tells it now."""
    leader = procs.started[name].pid
    rss, pss, others = [], [], 0.0
    leader_pss = 0.0
    for stat in session_stats(leader):
        mb = rollup(stat.pid).get("Pss", 0) / 2**20
        if stat.pid == leader:
            leader_pss = mb
        elif "resource_tracker" in cmdline(stat.pid):
            others += mb
        else:
            rss.append(stat.rss_bytes / 2**20)
            pss.append(mb)
    if not rss:  # one process: it is the worker
        rss, pss, leader_pss = [rollup(leader).get("Rss", 0) / 2**20], [leader_pss], 0.0
    return Footprint(target=name, workers=workers, worker_rss_mb=rss, worker_pss_mb=pss, leader_pss_mb=leader_pss,
                     others_pss_mb=others)


def measure_serve(procs: Processes, tmp: Path, upstream: str, name: str, workers: int,
                  cwd: Path = REPO_DIR) -> Footprint:
    """Start ``guardproxy serve --workers N`` on the embedded store, one request of each kind, rest, measure,
    stop it."""
    config = tmp / "guardproxy-footprint.yaml"
    if not config.exists():
        # the Python upstream's route is not called here: the canned upstream stands in for it
        config.write_text(json.dumps(guardproxy_config(upstream, "", upstream), indent=2))
    port = free_port()
    procs.start(name, [sys.executable, "-m", "guardproxy", "serve", "--config", str(config), "--port", str(port),
                       *(["--workers", str(workers)] if workers > 1 else [])], port, cwd=cwd,
                env={"XDG_STATE_HOME": str(tmp / "state" / name)})
    try:
        target = Target(name, f"http://127.0.0.1:{port}")
        # every worker: one request of each kind per worker's worth of connections (the kernel spreads them)
        for _ in range(workers):
            for mode in MODES:
                smoke(target, mode)
        time.sleep(SETTLE_S)
        return footprint(procs, name, workers)
    finally:
        procs.stop(name)


def line(f: Footprint) -> str:
    return (f"{f.target:<34} workers {f.workers}: total PSS {f.total_pss_mb:6.1f} MB (leader {f.leader_pss_mb:.1f}, "
            f"workers {' '.join(f'{x:.1f}' for x in f.worker_pss_mb)}, other {f.others_pss_mb:.1f}); "
            f"worker RSS {' '.join(f'{x:.1f}' for x in f.worker_rss_mb)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--compare", metavar="GIT_REF", help="also measure this revision's code (before/after)")
    parser.add_argument("--workers", type=int, default=FOOTPRINT_WORKERS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_DIR))
    results: list[Footprint] = []
    with tempfile.TemporaryDirectory(prefix="guardproxy-footprint-") as tmp_dir, \
            servers(Path(tmp_dir), ["upstream"]) as (targets, procs, _py_upstream):
        tmp = Path(tmp_dir)
        upstream = targets[0].base_url
        codes = [("guardproxy-embedded", REPO_DIR)]
        if args.compare:
            codes.append((f"guardproxy-embedded@{args.compare}", checkout(args.compare, tmp)))
        for name, cwd in codes:
            for workers in (1, args.workers):
                results.append(measure_serve(procs, tmp, upstream, f"{name}-w{workers}", workers, cwd))
                print(line(results[-1]), flush=True)
    print(json.dumps([asdict(r) | {"total_pss_mb": r.total_pss_mb} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
