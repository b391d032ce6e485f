"""PARS on vLLM's ``/metrics`` (``pars_fast.vllm.prometheus``).

``publish`` runs where the scheduler runs, in an engine-core process; ``/metrics`` is read
in the API server. So the unit tests publish from a fresh child process with
``PROMETHEUS_MULTIPROC_DIR`` set (as an engine core inherits it) and read the folder the
way vLLM's ``/metrics`` does (a ``MultiProcessCollector``). The engine tests scrape a
real server: ``pars-fast serve``, and vLLM's own OpenAI server with the variable set.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")  # comes with vLLM, which the exporter serves

from pars_fast.vllm.prometheus import COUNTERS, HISTOGRAMS, series_names

DASHBOARD = Path(__file__).resolve().parents[1] / "docs" / "grafana-pars-fast.json"

# Runs publish() in its own process, like an engine core, and after each call reads the
# folder as vLLM's /metrics does.
_PUBLISHER = r"""
import json, logging, os, sys
logging.basicConfig(level=logging.INFO)
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from pars_fast.vllm.prometheus import publish
texts = []
for stats, rank in json.load(sys.stdin):
    publish(stats, rank)
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)
    texts.append(generate_latest(registry).decode())
json.dump(texts, sys.stdout)
"""


def _publish(steps: list[tuple[dict, int]], folder: Path | None) -> tuple[list[dict], str]:
    """Publish each (stats, dp_rank) in a child process; the samples seen after each, and its stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    if folder is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    proc = subprocess.run(
        [sys.executable, "-c", _PUBLISHER],
        input=json.dumps(steps), capture_output=True, text=True, env=env, timeout=120, check=True,
    )  # fmt: skip
    return [_samples(text) for text in json.loads(proc.stdout)], proc.stderr


def _read(folder: Path) -> dict:
    """What /metrics shows for this folder, read here (another process than the writers)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))
    return _samples(generate_latest(registry).decode())


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} not exported; have {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


def _stats(**overrides) -> dict:
    """A pars_stats() dict as the scheduler builds it today (ScoringStats + SchedulerCounters + queue),
    plus the two event logs it does not record yet."""
    stats = {
        "requests_scored": 40, "requests_fallback": 5, "requests_skipped": 0, "batches": 7, "failed_batches": 2,
        "scoring_seconds": 0.75, "decode_seconds": 0.1, "max_batch_seconds": 0.31,
        "fallback_reasons": {"error": 3, "cool-down": 2}, "last_fallback_reason": "cool-down: ranker paused",
        "online": {"observed": 64, "censored": 3, "memory": 64, "weight": 0.625, "accuracy_base": 0.7,
                   "accuracy_online": 0.8, "accuracy_blend": None, "judged_pairs": 900, "resets": 0},
        "requests_unranked": 12, "scores_applied": 40, "scores_late": 0, "rekeyed_waiting": 30,
        "rekeyed_running": 2, "online_resets": 0, "share_limited_steps": 4,
        "worker": {"mode": "process", "pid": 123}, "ranker": "/rankers/sharegpt",
        "num_waiting": 9, "num_running": 4, "num_unscored": 1,
        "scoring_batch_seconds": {"count": 3, "recent": [0.004, 0.025, 0.3]},  # 0.025: on a bucket's bound
        "ranking_queue_depth": {"count": 2, "recent": [9, 128]},
    }  # fmt: skip
    stats.update(overrides)
    return stats


def test_publish_exports_every_counter_gauge_and_histogram_per_rank(tmp_path):
    (first, later), _ = _publish(
        [
            (_stats(), 1),
            # One second later: more of everything; 4 new batches, of which only the last
            # 2 are still in the recent window.
            (_stats(requests_scored=55, scoring_seconds=1.0, fallback_reasons={"error": 3, "cool-down": 2, "non-finite": 1},
                    scoring_batch_seconds={"count": 7, "recent": [0.05, 2.0]},
                    online={"weight": 0.5, "accuracy_base": 0.7, "accuracy_online": 0.8, "accuracy_blend": 0.9}), 1),
        ],
        tmp_path,
    )  # fmt: skip
    r = {"dp_rank": "1"}
    assert _value(first, "pars_fast_requests_scored_total", **r) == 40
    assert _value(first, "pars_fast_requests_unranked_total", **r) == 12
    assert _value(first, "pars_fast_share_limited_steps_total", **r) == 4
    assert _value(first, "pars_fast_scoring_batches_total", **r) == 7
    assert _value(first, "pars_fast_scoring_seconds_total", **r) == pytest.approx(0.75)
    assert _value(first, "pars_fast_requests_fallback_total", reason="error", **r) == 3
    assert _value(first, "pars_fast_requests_fallback_total", reason="cool-down", **r) == 2
    assert _value(first, "pars_fast_scoring_batch_max_seconds", **r) == pytest.approx(0.31)
    assert _value(first, "pars_fast_online_accuracy", predictor="base", **r) == pytest.approx(0.7)
    assert _value(first, "pars_fast_online_accuracy", predictor="online", **r) == pytest.approx(0.8)
    assert math.isnan(_value(first, "pars_fast_online_accuracy", predictor="blend", **r))  # None: not judged yet
    assert _value(first, "pars_fast_online_blend_weight", **r) == pytest.approx(0.625)
    assert _value(first, "pars_fast_scheduler_info", ranker="/rankers/sharegpt", worker="process", **r) == 1
    # Histograms: each recent event observed once, in its bucket.
    assert _value(first, "pars_fast_scoring_batch_seconds_count", **r) == 3
    assert _value(first, "pars_fast_scoring_batch_seconds_sum", **r) == pytest.approx(0.329)
    assert _value(first, "pars_fast_scoring_batch_seconds_bucket", le="0.005", **r) == 1
    assert _value(first, "pars_fast_scoring_batch_seconds_bucket", le="0.025", **r) == 2
    assert _value(first, "pars_fast_scoring_batch_seconds_bucket", le="0.25", **r) == 2
    assert _value(first, "pars_fast_scoring_batch_seconds_bucket", le="0.5", **r) == 3
    assert _value(first, "pars_fast_ranking_queue_depth_count", **r) == 2
    assert _value(first, "pars_fast_ranking_queue_depth_sum", **r) == 137
    assert _value(first, "pars_fast_ranking_queue_depth_bucket", le="8.0", **r) == 0
    assert _value(first, "pars_fast_ranking_queue_depth_bucket", le="16.0", **r) == 1
    assert _value(first, "pars_fast_ranking_queue_depth_bucket", le="64.0", **r) == 1
    assert _value(first, "pars_fast_ranking_queue_depth_bucket", le="128.0", **r) == 2
    # Counters follow the cumulative totals, not the sum of snapshots.
    assert _value(later, "pars_fast_requests_scored_total", **r) == 55
    assert _value(later, "pars_fast_scoring_seconds_total", **r) == pytest.approx(1.0)
    assert _value(later, "pars_fast_requests_fallback_total", reason="error", **r) == 3
    assert _value(later, "pars_fast_requests_fallback_total", reason="non-finite", **r) == 1
    assert _value(later, "pars_fast_online_accuracy", predictor="blend", **r) == pytest.approx(0.9)
    assert _value(later, "pars_fast_online_blend_weight", **r) == pytest.approx(0.5)
    # 4 new batches, 2 still visible: those 2 observed, 2 counted as missed.
    assert _value(later, "pars_fast_scoring_batch_seconds_count", **r) == 5
    assert _value(later, "pars_fast_scoring_batch_seconds_sum", **r) == pytest.approx(0.329 + 2.05)
    assert _value(later, "pars_fast_events_missed_total", series="pars_fast_scoring_batch_seconds", **r) == 2
    assert _value(later, "pars_fast_ranking_queue_depth_count", **r) == 2  # no new ranking step
    assert not any(labels and dict(labels).get("dp_rank") != "1" for _, labels in later)


def test_a_total_that_drops_is_a_restarted_source_and_its_new_count_is_added(tmp_path):
    # A scoring worker restarted after a hang reports its counts from zero again.
    steps = [(_stats(requests_scored=10, batches=2), 0), (_stats(requests_scored=3, batches=1), 0),
             (_stats(requests_scored=5, batches=1), 0)]  # fmt: skip
    snapshots, _ = _publish(steps, tmp_path)
    assert [_value(s, "pars_fast_requests_scored_total", dp_rank="0") for s in snapshots] == [10, 13, 15]
    assert [_value(s, "pars_fast_scoring_batches_total", dp_rank="0") for s in snapshots] == [2, 3, 3]


def test_ranks_in_separate_processes_are_separate_series_and_a_restart_keeps_counting(tmp_path):
    _publish([(_stats(requests_scored=7, online={}), 0)], tmp_path)
    _publish([(_stats(requests_scored=11, online={}), 1)], tmp_path)
    seen = _read(tmp_path)
    assert _value(seen, "pars_fast_requests_scored_total", dp_rank="0") == 7
    assert _value(seen, "pars_fast_requests_scored_total", dp_rank="1") == 11
    assert not any(name == "pars_fast_online_accuracy" for name, _ in seen)  # online off: no accuracy series
    # A new engine core for rank 0 (new pid) in a folder nobody emptied: its counts add to the
    # dead one's (counters only grow), its gauges win (newest write).
    _publish([(_stats(requests_scored=2, max_batch_seconds=0.05, online={}), 0)], tmp_path)
    seen = _read(tmp_path)
    assert _value(seen, "pars_fast_requests_scored_total", dp_rank="0") == 9
    assert _value(seen, "pars_fast_scoring_batch_max_seconds", dp_rank="0") == pytest.approx(0.05)


def test_without_a_multiprocess_folder_publish_writes_nothing_and_says_why(tmp_path):
    # An engine core of vLLM's single API server started without the variable.
    snapshots, err = _publish([(_stats(), 0), (_stats(requests_scored=41), 0)], None)
    assert "PROMETHEUS_MULTIPROC_DIR is not set" in err and err.count("not exported") == 1  # said once
    assert not any(name.startswith("pars_fast_") for s in snapshots for name, _ in s)


def test_bad_values_never_break_publish(tmp_path):
    snapshots, _ = _publish(
        [(_stats(requests_scored=float("nan"), scoring_batch_seconds={"count": "x"}, online=None, worker=None), 0),
         (_stats(requests_scored=4), 0)],
        tmp_path,
    )  # fmt: skip
    assert _value(snapshots[1], "pars_fast_requests_scored_total", dp_rank="0") == 4


def test_batched_observations_equal_observe_one_by_one():
    import random

    from prometheus_client import Histogram

    from pars_fast.vllm.prometheus import BATCH_SECONDS_BUCKETS, _observe_all

    rng = random.Random()
    # Fresh draws each run, plus every bound exactly (le is inclusive) and values past the last one.
    values = [10 ** rng.uniform(-4, 2) for _ in range(300)] + list(BATCH_SECONDS_BUCKETS) + [0.0, 1e6]
    one, batched = (Histogram("h", "h", buckets=BATCH_SECONDS_BUCKETS, registry=None) for _ in range(2))
    for value in values:
        one.observe(value)
    _observe_all(batched, values)
    samples = [[(s.name, s.labels, s.value) for s in h.collect()[0].samples if not s.name.endswith("_created")] for h in (one, batched)]
    assert samples[0][:-1] == samples[1][:-1]  # every bucket and the count
    assert samples[1][-1][2] == pytest.approx(samples[0][-1][2])  # the sum (summed in another order)


def _dashboard_queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return queries


def test_every_dashboard_query_names_a_series_the_exporter_exports(tmp_path):
    # Two snapshots, the second with histogram events past the recent window: every series has a sample.
    later = _stats(scoring_batch_seconds={"count": 9, "recent": [0.1]}, ranking_queue_depth={"count": 9, "recent": [5]})
    (_, exported), _ = _publish([(_stats(), 0), (later, 0)], tmp_path)
    names = {name for name, _ in exported}
    labels = {label for _, pairs in exported for label, _ in pairs}
    queries = _dashboard_queries()
    assert len(queries) >= 15
    used = set()
    for query in queries:
        series = set(re.findall(r"\bpars_fast_\w+", query))
        assert series, f"query names no pars_fast_ series: {query}"
        assert series <= names, f"{sorted(series - names)} in {query!r} are not exported: {sorted(names)}"
        used |= series
        for group in re.findall(r"\bby \(([^)]*)\)", query):  # grouping labels must exist
            assert {g.strip() for g in group.split(",")} <= labels | {"instance"}, query
        for label in re.findall(r"(\w+)=~?\"", query):
            assert label in labels | {"instance"}, query
    # And every family the exporter has is on the dashboard.
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert series_names() <= families | used, sorted(series_names() - families - used)


# --------------------------------------------------------------- real servers

N_REQUESTS = 6
MAX_TOKENS = 8


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape_after_traffic(cmd: list[str], env: dict, model: Path, out: Path, stats_file: Path | None) -> dict:
    """Start a server, send N_REQUESTS, wait until the engine is idle, scrape /metrics (saved in ``out``)."""
    port = int(cmd[cmd.index("--port") + 1])
    base = f"http://127.0.0.1:{port}"
    log_path = out / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                assert server.poll() is None, "server exited:\n" + log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "server did not come up:\n" + log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                        if resp.status == 200:
                            break
                except OSError:
                    time.sleep(1)
            prompts = [f"request {i} " + "word " * (3 * i) for i in range(N_REQUESTS)]
            body = json.dumps({"model": str(model), "prompt": prompts, "max_tokens": MAX_TOKENS, "ignore_eos": True})
            req = urllib.request.Request(base + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                assert json.loads(resp.read())["usage"]["completion_tokens"] == N_REQUESTS * MAX_TOKENS
            # The engine publishes when it goes idle, which can be just after the reply.
            deadline = time.monotonic() + 30
            while True:
                with urllib.request.urlopen(base + "/metrics", timeout=30) as resp:
                    text = resp.read().decode()
                if stats_file is not None:
                    stats = json.loads(stats_file.read_text())
                    idle = stats["num_running"] == 0 and stats["num_waiting"] == 0
                else:
                    idle = f'pars_fast_requests_scored_total{{dp_rank="0"}} {float(N_REQUESTS)}' in text
                if idle or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            (out / "metrics.txt").write_text(text)
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its engine core, which we started
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
    return _samples(text)


def _check_scrape(samples: dict) -> None:
    r = {"dp_rank": "0"}
    # The oracle ranker scores every arrival inline, before the step: all of them, no fallback.
    assert _value(samples, "pars_fast_requests_scored_total", **r) == N_REQUESTS
    assert _value(samples, "pars_fast_requests_unranked_total", **r) == 0
    assert _value(samples, "pars_fast_share_limited_steps_total", **r) == 0
    assert _value(samples, "pars_fast_scoring_batches_total", **r) >= 1
    assert _value(samples, "pars_fast_scheduler_info", ranker="oracle", worker="inline", **r) == 1
    assert not any(name == "pars_fast_requests_fallback_total" for name, _ in samples)
    # vLLM's own series are still served beside ours (multiprocess mode is on for them too).
    assert sum(v for (name, _), v in samples.items() if name == "vllm:request_success_total") == N_REQUESTS


def _server_args(model: Path, port: int) -> list[str]:
    return ["--model", str(model), "--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "2",
            "--enforce-eager", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    return {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.mark.engine
def test_pars_fast_serve_exports_pars_series_on_vllm_metrics(tiny_llama_dir, tmp_path):
    """`pars-fast serve` turns multiprocess mode on by itself: no variable to set."""
    stats_file = tmp_path / "stats.json"
    cmd = [sys.executable, "-m", "pars_fast.cli", "serve", "--ranker", "oracle", "--pars-stats-file", str(stats_file),
           *_server_args(tiny_llama_dir, _free_port())]  # fmt: skip
    samples = _scrape_after_traffic(cmd, _env(), tiny_llama_dir, tmp_path, stats_file)
    _check_scrape(samples)
    # The same snapshot as the stats file the engine wrote when it went idle.
    stats = json.loads(stats_file.read_text())
    assert stats["requests_scored"] == N_REQUESTS and stats["requests_fallback"] == 0
    for key, (name, _) in COUNTERS.items():  # every key the exporter reads is one the scheduler writes
        assert _value(samples, name, dp_rank="0") == pytest.approx(stats[key], rel=1e-9), key


@pytest.mark.engine
def test_vllm_own_server_exports_pars_series_with_a_multiprocess_folder(tiny_llama_dir, tmp_path):
    """vLLM's OpenAI server with --scheduler-cls: the operator sets PROMETHEUS_MULTIPROC_DIR
    (and no stats_file: the exporter does not need one)."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--scheduler-cls", "pars_fast.vllm.PARSScheduler",
           "--additional-config", json.dumps({"pars": {"ranker": "oracle"}}),
           *_server_args(tiny_llama_dir, _free_port())]  # fmt: skip
    samples = _scrape_after_traffic(cmd, {**_env(), "PROMETHEUS_MULTIPROC_DIR": str(folder)}, tiny_llama_dir, tmp_path, None)
    _check_scrape(samples)
