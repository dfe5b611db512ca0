"""The benchmark's own pure parts (bench/workload.py, servers.py, report.py, clients.py): what it serves,
parses and concludes.

The load itself is not run here (it takes minutes and measures nothing a test could assert).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType

import orjson

from guardproxy.budget.pricing import Usage
from guardproxy.http.endpoints import CHAT
from guardproxy.http.sse import SSEParser

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


workload = _load("workload")
servers = _load("servers")
report = _load("report")
clients = _load("clients")
footprint = _load("footprint")


def _nginx_unescape(quoted: str) -> bytes:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), quoted[1:-1]).encode()


def test_the_canned_stream_is_what_guardproxy_charges_for() -> None:
    frames = workload.canned_stream_frames()
    watcher = CHAT.watcher(CHAT.parse(orjson.dumps(workload.request_body("stream"))))
    parser = SSEParser()
    relayed = b"".join(watcher.process(frame) for frame in parser.feed(b"".join(frames)) + parser.close())
    assert watcher.done
    assert watcher.usage == Usage(27, len(workload.WORDS))
    assert "".join(watcher.texts) == "".join(workload.WORDS)
    assert relayed == b"".join(frames)  # the client asked for usage itself: every byte passes unchanged


def test_the_canned_answer_carries_usage_and_the_complete_marker() -> None:
    answer = workload.canned_answer()
    usage, texts = CHAT.answer_usage(json.loads(answer))
    assert usage == Usage(27, len(workload.WORDS))
    assert texts == ["".join(workload.WORDS)]
    assert workload.COMPLETE_MARKERS["plain"].encode() in answer
    assert workload.COMPLETE_MARKERS["stream"].encode() in workload.canned_stream_frames()[-1]


def test_nginx_serves_each_route_from_memory_with_the_bodies_escaped(tmp_path: Path) -> None:
    conf = servers.nginx_conf(tmp_path, 12345)
    assert "listen 127.0.0.1:12345" in conf
    served = dict(re.findall(r"location = /(\w+)/v1/chat/completions \{.*?return 200 ('(?:\\.|[^'])*');", conf,
                             flags=re.S))
    assert set(served) == {"plain", "stream", "slow"}
    assert _nginx_unescape(served["plain"]) == workload.canned_answer()
    assert _nginx_unescape(served["stream"]) == b"".join(workload.canned_stream_frames())
    # The slow stream sends its head and first frame at once, then the rest slowly (minutes).
    frames = workload.canned_stream_frames()
    allowance = len(frames[0]) + workload.SLOW_HEAD_ALLOWANCE_BYTES
    assert f"limit_rate_after {allowance};" in conf
    assert (len(b"".join(frames)) - allowance) / workload.SLOW_RATE_BYTES_S > 60


def test_every_route_has_a_model_and_upstream_on_guardproxy_and_litellm() -> None:
    from guardproxy.config.settings import parse_config

    config = parse_config(servers.guardproxy_config("http://127.0.0.1:1", "", "http://127.0.0.1:2"), {})
    for route, model in workload.MODELS.items():
        root = "http://127.0.0.1:2" if route == workload.PY_ROUTE else "http://127.0.0.1:1"
        assert config.upstreams[config.models[model].upstream].base_url.rstrip("/") == f"{root}/{route}/v1"
        assert workload.request_body(route)["model"] == model
    litellm = {m["model_name"]: m["litellm_params"]["api_base"]
               for m in servers.litellm_config("http://n", "http://p")["model_list"]}
    assert litellm == {model: f"http://{'p' if route == workload.PY_ROUTE else 'n'}/{route}/v1"
                       for route, model in workload.MODELS.items()}


def test_proc_stat_of_this_process() -> None:
    stat = servers.parse_proc_stat(Path("/proc/self/stat").read_text())
    assert stat.pid == os.getpid()
    assert stat.session == os.getsid(0)
    assert stat.cpu_ticks >= 0
    assert stat.rss_bytes > 1 << 20
    # A command name with spaces and parentheses does not shift the fields.
    odd = "42 (a) b (c)) S 1 42 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 100 1000 3 " + " ".join(["0"] * 28)
    expected = servers.ProcStat(pid=42, session=7, cpu_ticks=11, rss_bytes=3 * servers.PAGE_SIZE)
    assert servers.parse_proc_stat(odd) == expected


def test_a_response_is_complete_by_its_length_or_its_last_chunk() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5"
    assert not clients.response_complete(head, b"data")
    assert clients.response_complete(head, b"data:")
    chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked"
    assert not clients.response_complete(chunked, b"5\r\ndata:\r\n")
    assert clients.response_complete(chunked, b"5\r\ndata:\r\n0\r\n\r\n")
    assert not clients.response_complete(b"HTTP/1.1 200 OK\r\nConnection: close", b"anything")
    request = clients.request_bytes("http://127.0.0.1:9/v1/x", b"{}", {"A": "b"})
    assert request == b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:9\r\nContent-Length: 2\r\nA: b\r\n\r\n{}"


def test_ratios_and_differences_pair_runs_of_the_same_round() -> None:
    rounds = [{"a": 10.0, "b": 20.0}, {"a": 30.0, "b": 30.0}, {"a": 5.0, "b": 10.0}, {"a": 1.0}]
    assert report.paired(rounds, "a", "b", "ratio") == 0.5
    assert report.paired(rounds, "a", "b", "diff") == -5.0
    assert report.paired(rounds, "a", "missing", "ratio") is None


def test_goals_read_the_guardproxy_rows_and_judge_each_line() -> None:
    data = {
        "throughput": [{"mode": "plain", "target": servers.GUARD, "vs_baseline": 0.7},
                       {"mode": "stream", "target": servers.GUARD, "vs_baseline": 0.5}],
        "latency_c1": [{"mode": "plain", "target": servers.GUARD, "added_p50_ms": 0.9},
                       {"mode": "plain", "target": "guardproxy-embedded", "added_p50_ms": 1.5}],
        "first_frame": [{"target": servers.GUARD, "added_p50_ms": 1.2, "over_bare_p50_ms": 0.4}],
        "py_first_frame": [{"target": servers.GUARD, "added_p50_ms": 2.0, "over_bare_p50_ms": 0.7}],
        "memory": [{"target": servers.GUARD, "idle_mb": 70.0, "after_load_mb": 85.0, "streams_open": 999,
                    "streams_mb": 100.0},
                   {"target": "guardproxy-embedded", "idle_mb": 90.0, "after_load_mb": 95.0, "streams_open": 0}],
        "footprint": [{"target": "guardproxy-embedded-w4", "workers": 4, "total_pss_mb": 210.0},
                      {"target": "guardproxy-embedded@main-w4", "workers": 4, "total_pss_mb": 490.0}],
        "ratios": {"workers_2_over_1_plain": 1.9, "embedded_over_redis_plain": 1.2,
                   "embedded_over_redis_stream": 0.8, "embedded_workers_2_over_1_plain": 1.4,
                   "over_litellm_plain": 10.5},
    }
    verdicts = [(g.value, g.met) for g in report.goals(data)]
    assert verdicts == [
        (0.7, True), (0.5, False), (0.9, True), (1.2, False),
        (0.4, True), (0.7, False), (10.5, True),  # over the bare relay (nginx, Python upstream); over LiteLLM
        (85.0, False),  # the larger of fresh and after load
        (None, None),  # fewer than 1,000 streams were open: no figure
        (1.9, True), (0.8, False),
        (0.6, False),  # the embedded store's added latency at c=1 over Redis's
        (1.4, False),
        (90.0, False),  # the embedded store's worker, fresh
        (210.0, True),  # this code's --workers 4, not the compared revision's
    ]


def test_smaps_rollup_figures_in_bytes_and_the_total_pss_of_every_process() -> None:
    text = ("55d0c0a00000-7ffd4b5fe000 ---p 00000000 00:00 0                          [rollup]\n"
            "Rss:              105852 kB\nPss:               45594 kB\nPss_Dirty:         43831 kB\n")
    figures = footprint.parse_smaps_rollup(text)
    assert figures == {"Rss": 105852 * 1024, "Pss": 45594 * 1024, "Pss_Dirty": 43831 * 1024}
    f = footprint.Footprint(target="t", workers=2, worker_rss_mb=[100.0, 104.0], worker_pss_mb=[40.0, 41.5],
                            leader_pss_mb=43.0, others_pss_mb=6.5)
    assert (f.total_pss_mb, f.idle_rss_mb) == (131.0, 104.0)


def test_first_frames_are_paired_with_the_bare_relay_on_both_upstreams() -> None:
    """guardproxy's share over the bare relay is the median of same-round differences of round medians,
    on nginx's stream and on the Python upstream's (whose direct figure is its own target)."""
    rep = report.Report()
    rep.first_frame_ms = {"upstream": [[0.1, 0.1], [0.1, 0.1]], "bare-aiohttp": [[0.5, 0.7], [0.9, 0.9]],
                          servers.GUARD: [[1.0, 1.2], [1.3, 1.5]]}
    rep.py_first_frame_ms = {servers.PY_UPSTREAM: [[0.4], [0.4]], "bare-aiohttp": [[1.6], [1.0]],
                             servers.GUARD: [[2.0], [2.6]]}
    text, data = report.tables(rep, ["upstream", "bare-aiohttp", servers.GUARD])
    nginx = {row["target"]: row for row in data["first_frame"]}
    python = {row["target"]: row for row in data["py_first_frame"]}
    assert abs(nginx[servers.GUARD]["over_bare_p50_ms"] - 0.5) < 1e-9  # rounds: 1.1-0.6, 1.4-0.9
    assert abs(nginx[servers.GUARD]["added_p50_ms"] - 1.15) < 1e-9
    assert abs(python[servers.GUARD]["over_bare_p50_ms"] - 1.0) < 1e-9  # rounds: 0.4, 1.6
    assert abs(python[servers.GUARD]["added_p50_ms"] - 1.9) < 1e-9
    assert set(python) == {servers.PY_UPSTREAM, "bare-aiohttp", servers.GUARD}
    assert "Python upstream" in text
    goals = {g.line: g.value for g in report.goals(data)}
    share = python[servers.GUARD]["over_bare_p50_ms"]
    assert goals["first frame over the bare relay, Python upstream, p50 ms"] == share
