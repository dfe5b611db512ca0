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
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from footprint import FOOTPRINT_WORKERS, measure_serve  # noqa: E402
from measure import Memory, first_frame, hold_streams, measure, wrk, wrk_script  # noqa: E402
from report import Report, goals, goals_table, tables  # noqa: E402
from servers import ALL_TARGETS, GUARD, OPTIONAL_TARGETS, missing_tools, servers, smoke  # noqa: E402
from workload import MODES, PY_ROUTE  # noqa: E402

RESULTS_FILE = BENCH_DIR / "results" / "latest.json"



# -- the run ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rounds: int
    duration_s: float
    warm_up_s: float
    c1_duration_s: float
    first_frames: int
    streams: int
    #: Streams from the Python upstream (headers first, 4 frames 50 ms apart) per target and round.
    py_first_frames: int = 20


PLANS = {
    "full": Plan(rounds=3, duration_s=5, warm_up_s=2, c1_duration_s=3, first_frames=200, streams=1000,
                 py_first_frames=20),
    "quick": Plan(rounds=1, duration_s=1, warm_up_s=1, c1_duration_s=1, first_frames=20, streams=100,
                  py_first_frames=10),
}


def run(plan: Plan, wanted: Sequence[str], tmp: Path, compare: str | None = None) -> tuple[Report, list[str]]:
    report = Report()
    for mode in MODES:
        (tmp / f"{mode}.lua").write_text(wrk_script(mode))
    with servers(tmp, wanted, compare) as (targets, procs, py_upstream):
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
            # The Python upstream: its head first, then each frame (the direct figure, then each proxy).
            for target in [py_upstream, *targets[1:]]:
                print(f"  round {round_ + 1}: first frame, Python upstream {target.name}", flush=True)
                samples = first_frame(target, plan.py_first_frames, PY_ROUTE)
                report.py_first_frame_ms.setdefault(target.name, []).append([s * 1000 for s in samples])
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
        # What N workers cost the machine, as users start them (embedded store): PSS of every process.
        upstream = next(t.base_url for t in targets if t.name == "upstream")
        codes = [("guardproxy-embedded", REPO_DIR)]
        if compare:
            # servers() unpacked the revision there already
            codes.append((f"guardproxy-embedded@{compare}", tmp / f"ref-{compare.replace('/', '_')}"))
        for name, cwd in codes:
            print(f"  memory: {name} --workers {FOOTPRINT_WORKERS}, PSS", flush=True)
            report.footprints.append(measure_serve(procs, tmp, upstream, f"{name}-w{FOOTPRINT_WORKERS}",
                                                   FOOTPRINT_WORKERS, cwd))
        errors = [f"--- {t.name} ---\n{procs.log_tail(t.name)}" for t in targets
                  if any(x.errors for x in report.loads if x.target == t.name)]
    return report, [t.name for t in targets] + errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 round of 1 s, 100 streams (~1 min)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, help="seconds of each -c32 run (default 5)")
    parser.add_argument("--streams", type=int, help="streams held open at once for the memory figure (default 1000)")
    parser.add_argument("--targets", help=f"comma-separated subset of {','.join(ALL_TARGETS)} (upstream always runs), "
                                          f"or of {','.join(OPTIONAL_TARGETS)}")
    parser.add_argument("--compare", metavar="GIT_REF",
                        help=f"also run {GUARD} on this revision's code, in the same rounds (before/after)")
    args = parser.parse_args(argv)
    plan = PLANS["quick" if args.quick else "full"]
    plan = Plan(rounds=args.rounds or plan.rounds, duration_s=args.duration or plan.duration_s,
                warm_up_s=plan.warm_up_s, c1_duration_s=plan.c1_duration_s, first_frames=plan.first_frames,
                streams=plan.streams if args.streams is None else args.streams, py_first_frames=plan.py_first_frames)
    wanted = ALL_TARGETS if not args.targets else ("upstream", *args.targets.split(","))
    if unknown := set(wanted) - set(ALL_TARGETS) - set(OPTIONAL_TARGETS):
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
        "py_first_frame_ms": report.py_first_frame_ms,
    }, indent=2) + "\n")
    print(f"\nwritten to {RESULTS_FILE.relative_to(REPO_DIR)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("interrupted; every server this run started is stopped")
