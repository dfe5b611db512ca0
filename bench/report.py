"""From measurements to the tables and the goals: medians over rounds, paired ratios, the report."""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

from footprint import IDLE_RSS_GOAL_MB, TOTAL_PSS_GOAL_MB, Footprint  # noqa: E402
from measure import Load, Memory  # noqa: E402
from servers import BASELINE, GUARD, PY_UPSTREAM  # noqa: E402
from workload import MODES  # noqa: E402

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
    #: The same from the Python upstream (its head first, then each frame).
    py_first_frame_ms: dict[str, list[list[float]]] = field(default_factory=dict)
    memory: list[Memory] = field(default_factory=list)
    log_lines_per_request: dict[str, float] = field(default_factory=dict)
    #: ``serve --workers N`` on the embedded store: PSS of every process (bench/footprint.py).
    footprints: list[Footprint] = field(default_factory=list)

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

    def first_frame_rounds(self, figure: str, python: bool = False) -> list[dict[str, float]]:
        pick = (lambda s: statistics.median(s)) if figure == "p50" else (lambda s: _percentile(s, 0.99))
        rounds: list[dict[str, float]] = []
        for target, per_round in (self.py_first_frame_ms if python else self.first_frame_ms).items():
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
    data: dict[str, Any] = {"throughput": [], "latency_c1": [], "first_frame": [], "py_first_frame": [], "memory": [],
                            "ratios": {}}

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

    for python in (False, True):
        samples = report.py_first_frame_ms if python else report.first_frame_ms
        if not samples:
            continue
        direct = PY_UPSTREAM if python else "upstream"
        header = (f"{'target':<28} {'p50 ms':>7} {'p99 ms':>7} {'added p50':>9} {'added p99':>9} "
                  f"{'over bare-aiohttp p50':>21}")
        title = ("Streaming from a Python upstream (aiohttp: the head, then 4 frames 50 ms apart): time to the first "
                 "data frame" if python else "Streaming: time to the first data frame, one request at a time")
        out += ["", title + f" (added: over {direct}; over bare-aiohttp: the bare chunk-by-chunk relay, same round)",
                header, "-" * len(header)]
        p50_rounds, p99_rounds = report.first_frame_rounds("p50", python), report.first_frame_rounds("p99", python)
        for target in [PY_UPSTREAM, *targets] if python else targets:
            if target not in samples:
                continue
            row = {"target": target, "p50_ms": median([r[target] for r in p50_rounds if target in r]),
                   "p99_ms": median([r[target] for r in p99_rounds if target in r]),
                   "added_p50_ms": paired(p50_rounds, target, direct, "diff"),
                   "added_p99_ms": paired(p99_rounds, target, direct, "diff"),
                   "over_bare_p50_ms": paired(p50_rounds, target, "bare-aiohttp", "diff")}
            data["py_first_frame" if python else "first_frame"].append(row)
            out.append(f"{target:<28} {_fmt(row['p50_ms'], '.3f'):>7} {_fmt(row['p99_ms'], '.3f'):>7} "
                       f"{_fmt(row['added_p50_ms'], '+.3f'):>9} {_fmt(row['added_p99_ms'], '+.3f'):>9} "
                       f"{_fmt(row['over_bare_p50_ms'], '+.3f'):>21}")

    if report.memory:
        header = (f"{'target':<28} {'workers':>7} {'idle MB/worker':>14} {'after load':>10} {'streams open':>12} "
                  f"{'MB with streams':>15}")
        out += ["", "Memory (RSS; with streams: every worker together)", header, "-" * len(header)]
        for m in report.memory:
            data["memory"].append(asdict(m))
            out.append(f"{m.target:<28} {m.workers:>7} {m.idle_mb:>14.1f} {m.after_load_mb:>10.1f} "
                       f"{m.streams_open:>12} {_fmt(m.streams_mb, '.1f'):>15}")

    data["footprint"] = []
    if report.footprints:
        out += ["", "Memory as the machine pays it: PSS (/proc/<pid>/smaps_rollup) of every process of "
                "serve --workers N, embedded store, idle after a request of each kind per worker"]
        for f in report.footprints:
            data["footprint"].append(asdict(f) | {"total_pss_mb": f.total_pss_mb})
            out.append(f"  {f.target:<36} total {f.total_pss_mb:6.1f} MB: supervisor {f.leader_pss_mb:.1f}, workers "
                       f"{' '.join(f'{x:.1f}' for x in f.worker_pss_mb)}, other {f.others_pss_mb:.1f}; "
                       f"RSS per worker {max(f.worker_rss_mb):.1f}")

    ratios: dict[str, Any] = data["ratios"]
    for mode in MODES:
        rounds = report.rounds_of("c32", mode, "requests_per_s")
        ratios[f"workers_2_over_1_{mode}"] = paired(rounds, "guardproxy-redis-w2", GUARD, "ratio")
        ratios[f"quiet_over_default_{mode}"] = paired(rounds, "guardproxy-redis-quiet", GUARD, "ratio")
        ratios[f"embedded_over_redis_{mode}"] = paired(rounds, "guardproxy-embedded", GUARD, "ratio")
        ratios[f"embedded_workers_2_over_1_{mode}"] = paired(rounds, "guardproxy-embedded-w2", "guardproxy-embedded",
                                                             "ratio")
        ratios[f"over_litellm_{mode}"] = paired(rounds, GUARD, "litellm", "ratio")
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
    embedded_memory = memory.get("guardproxy-embedded", {})
    embedded_idle = embedded_memory.get("idle_mb")
    footprint = next((f for f in data.get("footprint", []) if "@" not in f["target"]), None)
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
        Goal("first frame over the bare relay (bare-aiohttp), nginx stream, p50 ms",
             pick("first_frame", "over_bare_p50_ms", target=guard), 0.5, False),
        Goal("first frame over the bare relay, Python upstream, p50 ms",
             pick("py_first_frame", "over_bare_p50_ms", target=guard), 0.5, False),
        Goal(f"{guard} / litellm req/s, plain", ratios.get("over_litellm_plain"), 10.0, True),
        Goal("idle RSS per worker, MB (the larger of fresh and after load)", idle, 80.0, False),
        Goal("RSS with 1,000 streams open, MB", streams_mb, 150.0, False),
        Goal("--workers 2 / --workers 1 req/s, plain", ratios.get("workers_2_over_1_plain"), 1.85, True),
        Goal("embedded / Redis req/s (the lower of plain and stream)",
             min((e for e in embedded if e is not None), default=None), 0.9, True),
        Goal("embedded minus Redis: added latency at c=1, p50 ms (plain)", _minus(
            pick("latency_c1", "added_p50_ms", mode="plain", target="guardproxy-embedded"),
            pick("latency_c1", "added_p50_ms", mode="plain", target=guard)), 0.0, False),
        Goal("embedded --workers 2 / --workers 1 req/s, plain", ratios.get("embedded_workers_2_over_1_plain"), 1.5,
             True),
        Goal("idle RSS of one worker, embedded store, MB", embedded_idle, IDLE_RSS_GOAL_MB, False),
        Goal(f"total PSS of --workers {footprint['workers'] if footprint else 4}, embedded store, MB",
             footprint["total_pss_mb"] if footprint else None, TOTAL_PSS_GOAL_MB, False),
    ]


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def goals_table(items: Sequence[Goal]) -> str:
    lines = ["Goals (issues 10, 20 and 26)"]
    for g in items:
        verdict = "n/a" if g.met is None else "met" if g.met else "NOT met"
        op = ">=" if g.at_least else "<="
        lines.append(f"  {g.line:<62} {_fmt(g.value):>8}  goal {op} {g.limit:<5g} {verdict}")
    return "\n".join(lines)
