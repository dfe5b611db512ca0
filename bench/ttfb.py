"""Time to the first streamed byte, side by side: guardproxy over the bare chunk-by-chunk relay, on both
upstreams (the canned nginx stream, whose first frame rides with the head, and the Python upstream, which
sends its head first), in many short interleaved rounds. A quicker, finer A/B than ``run.py``'s full plan.

    python bench/ttfb.py [--rounds 15] [--streams 15] [--compare main] [--targets bare-aiohttp,guardproxy-redis]

Each round runs ``--streams`` streams one after another on one kept-alive connection per target and
upstream (the targets' order rotating from round to round); a round's figure is the median of its streams,
the result the median over rounds of each target's figure minus the bare relay's in the same round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from measure import first_frame  # noqa: E402
from servers import GUARD, PY_UPSTREAM, REPO_DIR, servers, smoke  # noqa: E402
from workload import PY_ROUTE  # noqa: E402

BARE = "bare-aiohttp"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--streams", type=int, default=15, help="streams per target, upstream and round")
    parser.add_argument("--targets", default=f"{BARE},{GUARD}")
    parser.add_argument("--compare", metavar="GIT_REF", help=f"also {GUARD} on this revision's code")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO_DIR))
    wanted = ["upstream", *args.targets.split(",")]
    with tempfile.TemporaryDirectory(prefix="guardproxy-ttfb-") as tmp_dir, \
            servers(Path(tmp_dir), wanted, args.compare) as (targets, _, py_upstream):
        proxies = targets[1:]
        for target in proxies:
            smoke(target, "stream")
        per_route: dict[str, dict[str, list[float]]] = {"stream": {}, PY_ROUTE: {}}
        for round_ in range(args.rounds):
            shift = round_ % len(proxies)
            order = proxies[shift:] + proxies[:shift]
            for route, direct in (("stream", targets[0]), (PY_ROUTE, py_upstream)):
                for target in [direct, *order]:
                    samples = first_frame(target, args.streams, route)
                    per_route[route].setdefault(target.name, []).append(statistics.median(samples) * 1000)
    for route, figures in per_route.items():
        direct = PY_UPSTREAM if route == PY_ROUTE else "upstream"
        print(f"\n{route}: first data byte, p50 ms (median over {args.rounds} rounds of {args.streams} streams); "
              f"added over {direct} and over {BARE}, paired by round")
        for name, values in figures.items():
            line = f"  {name:<28} {statistics.median(values):7.3f}"
            bases = [direct, BARE] + ([f"{GUARD}@{args.compare}"] if args.compare else [])
            for base in bases:
                if base in figures and name != base:
                    diff = statistics.median([a - b for a, b in zip(values, figures[base], strict=True)])
                    line += f"   over {base}: {diff:+.3f}"
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
