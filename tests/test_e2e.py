"""A miniature end-to-end benchmark on real vLLM engines (tiny CPU Llama).

One run serves the whole module, through the CLI (``python -m pars_fast.cli bench e2e``,
in its own process: its stderr must be free of leak warnings at exit): 30
requests, FCFS / PARS / oracle SJF, a burst and Poisson arrivals at 2x the measured
capacity, each served twice (``--repeats 2``). The three engines start in parallel
(~1-2 min on 2 cores), the twelve levels take about a minute.

PARS uses a small ranker trained here (head mode, ~10-30 s) on synthetic prompts
whose wording tells their length class, so it can rank without the default ranker
(which takes minutes to train). The workload is a JSONL of held-apart prompts of the
same kind: the JSONL route of the benchmark.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from pars_fast.cli import main
from pars_fast.data import Sample, save_jsonl
from pars_fast.e2e.metrics import SUMMARY_KEYS
from pars_fast.e2e.workload import arrival_offsets

pytestmark = pytest.mark.engine

N = 30
POLICIES = ("fcfs", "pars", "sjf")
LOADS = ("burst", "2x")
SEED = 3
REPEATS = 2

TOPICS = [
    "the ocean", "tax law", "a red bicycle", "quantum computers", "medieval castles", "jazz music",
    "volcanoes", "the stock market", "honey bees", "chess openings", "coffee", "the moon landing",
    "rust programming", "ancient rome", "climate policy", "sourdough bread", "electric cars", "poetry",
    "black holes", "football tactics", "origami", "the french revolution", "deep sea fish", "vaccines",
]
# (template, response length range): the wording says how long the answer is.
KINDS = [
    ("answer yes or no only: is {} interesting?", (3, 10)),
    ("give a short two sentence summary of {}.", (24, 48)),
    ("write a long, detailed essay with many sections, examples and a conclusion about {}.", (200, 320)),
]


def _samples(n_per_kind: int, rng: np.random.Generator, topics: list[str]) -> list[Sample]:
    out = []
    for template, (lo, hi) in KINDS:
        for i in range(n_per_kind):
            out.append(Sample(template.format(topics[i % len(topics)]), int(rng.integers(lo, hi + 1))))
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    path = tmp_path_factory.mktemp("pars_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARS_FAST_HOME", str(path))  # never touch (or need) a real default ranker
        yield path


@pytest.fixture(scope="module")
def ranker_dir(home, tmp_path_factory):
    from pars_fast.training import TrainConfig, train

    rng = np.random.default_rng(0)
    # Train on the first 16 topics; the benchmark's prompts use the other 8.
    config = TrainConfig(loss="pairwise", mode="head", epochs=20, batch_size=32)
    result = train(_samples(64, rng, TOPICS[:16]), config, progress=False)
    path = tmp_path_factory.mktemp("ranker") / "synthetic"
    result.ranker.save(path)
    return path


@pytest.fixture(scope="module")
def cli(home, ranker_dir, tiny_llama_dir, tmp_path_factory):
    """The CLI run, in its own process as a user runs it (Python's resource tracker
    reports leaks on that process's stderr when it exits); returns (the finished
    process, output folder)."""
    out = tmp_path_factory.mktemp("e2e")
    data = save_jsonl(_samples(N // 3, np.random.default_rng(1), TOPICS[16:]), out / "requests.jsonl")
    argv = [
        "bench", "e2e",
        "--model", str(tiny_llama_dir),
        "--data", str(data),
        "--n", str(N),
        "--loads", ",".join(LOADS),
        "--policies", ",".join(POLICIES),
        "--ranker", str(ranker_dir),
        "--aging", "0",
        "--max-num-seqs", "4",  # 30 requests on 4 slots: a real queue, where order matters
        "--max-model-len", "512",
        "--seed", str(SEED),
        "--repeats", str(REPEATS),
        "--timeout", "600",
        "--no-progress",
        "--out", str(out),
    ]
    proc = subprocess.run([sys.executable, "-m", "pars_fast.cli", *argv], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc, out


@pytest.fixture(scope="module")
def run(cli):
    """(result dict from results.json, output folder)."""
    _, out = cli
    return json.loads((out / "results.json").read_text()), out


def test_engines_are_stopped_not_killed(cli):
    """Each policy's engine core and model worker exit on their own at the end, so they
    release their shared memory and semaphores. A process killed instead leaves them to
    Python's resource tracker, which warns at exit ("leaked shared_memory objects"): vLLM
    kills its engine core 5 s after asking it to stop unless given longer, and on a busy
    2-core machine its shutdown takes longer."""
    proc, out = cli
    for warning in ("resource_tracker", "leaked semaphore", "leaked shared_memory"):
        assert warning not in proc.stderr, proc.stderr[-5000:]
    for policy in POLICIES:
        log = (out / "logs" / f"{policy}.log").read_text()
        assert "[shutdown]" in log, policy  # the log covers the shutdown
        assert "force killing" not in log, (policy, [line for line in log.splitlines() if "[shutdown]" in line])


def test_every_request_completes_once_with_its_full_length(run):
    result, _ = run
    lengths = [s["response_len"] for s in map(json.loads, (run[1] / "requests.jsonl").read_text().splitlines())]
    assert result["policies"] == list(POLICIES) and result["loads"] == list(LOADS)
    for policy in POLICIES:
        for load in LOADS:
            reqs = result["runs"][policy]["levels"][load]["requests"]
            assert sorted(r["idx"] for r in reqs) == list(range(N)), (policy, load)
            assert all(r["output_tokens"] == r["max_tokens"] for r in reqs), (policy, load)
            # Same work under every policy: the multiset of lengths is the workload's.
            assert sorted(r["max_tokens"] for r in reqs) == sorted(lengths), (policy, load)
            assert all(r["preemptions"] == 0 for r in reqs)


def test_json_summary_has_every_metric(run):
    result, _ = run
    for policy in POLICIES:
        for load in LOADS:
            summary = result["runs"][policy]["levels"][load]["summary"]
            assert set(SUMMARY_KEYS) <= set(summary), (policy, load)
            for key in SUMMARY_KEYS:
                if key == "scoring_ms_per_request" and policy == "fcfs":
                    assert summary[key] is None  # FCFS scores nothing
                    continue
                assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), (policy, load, key)
            assert summary["n"] == N
            assert summary["latency_p50"] <= summary["latency_p90"] <= summary["latency_p99"]
            assert summary["ttft_mean"] <= summary["latency_mean"]
            assert len(result["runs"][policy]["levels"][load]["loadavg"]) == 2  # machine load recorded
    assert set(result["comparisons"]["burst"]) >= {"FCFS/PARS mean latency", "PARS/SJF mean latency"}
    assert result["meta"]["environment"]["torch"] and result["meta"]["complete"] is True


def test_oracle_sjf_beats_fcfs_in_a_burst(run):
    result, _ = run
    burst = {p: result["runs"][p]["levels"]["burst"]["summary"] for p in POLICIES}
    # Each engine's latencies in units of its own makespan: the engines' speeds differ from
    # run to run on a shared machine (by 20% here), the order's effect is what is tested.
    rel = {p: s["latency_mean"] / s["makespan_s"] for p, s in burst.items()}
    # Shortest-first minimizes the mean completion time of jobs queued together.
    assert rel["sjf"] <= rel["fcfs"], burst
    # PARS's first admissions go before any score is back (the step never waits for the
    # ranker), so in a burst this small it gains less than SJF, but it must not lose.
    assert rel["pars"] <= 1.05 * rel["fcfs"], burst


def test_pars_leaves_the_long_requests_for_last(run):
    """Once the worker's scores are in, the essays (their prompts say so) wait for the rest."""
    result, _ = run
    long_len = KINDS[-1][1][0]
    for policy, at_least in (("pars", 7), ("fcfs", 0)):
        reqs = sorted(result["runs"][policy]["levels"]["burst"]["requests"], key=lambda r: (r["scheduled"], r["idx"]))
        last = reqs[-(N // 3) :]  # the last third admitted; a third of the requests are essays
        n_long = sum(r["max_tokens"] >= long_len for r in last)
        assert n_long >= at_least, (policy, [r["max_tokens"] for r in last])


def test_sjf_serves_a_burst_shortest_first(run):
    result, _ = run
    reqs = result["runs"]["sjf"]["levels"]["burst"]["requests"]
    # Once every request is queued, each free slot goes to the shortest one waiting.
    all_queued = max(r["queued"] for r in reqs)
    # Requests admitted in one engine step share its timestamp; order within a step is moot.
    later = sorted((r for r in reqs if r["scheduled"] > all_queued), key=lambda r: (r["scheduled"], r["max_tokens"]))
    assert len(later) >= N - 8  # only the first slots were filled while requests still arrived
    lengths = [r["max_tokens"] for r in later]
    assert lengths == sorted(lengths)


def test_schedulers_scored_the_requests_that_waited(run):
    result, _ = run
    for policy, ranker in (("pars", "synthetic"), ("sjf", "oracle")):
        for load in LOADS:
            level = result["runs"][policy]["levels"][load]
            stats = level["pars_stats"]
            # Each request was scored; or admitted with nothing queued behind it (no score needed);
            # or finished before the worker got to it.
            assert stats["requests"] + stats["unranked"] + stats["skipped"] == N, (policy, load, stats)
            assert stats["fallback"] == 0, (policy, load, stats)
            assert stats["requests"] >= N // 2, (policy, load, stats)  # 4 slots: most of them queued
            assert str(stats["ranker"]).endswith(ranker)
            assert level["summary"]["scoring_ms_per_request"] > 0
    # vLLM's CPU backend leaves no spare core (the model's, and the engine core's), so the
    # ranker scores inline, as the oracle does (tests/test_scheduler_engine.py runs a worker process).
    assert result["runs"]["pars"]["levels"]["burst"]["pars_stats"]["worker"]["mode"] == "inline"
    assert result["runs"]["sjf"]["levels"]["burst"]["pars_stats"]["worker"]["mode"] == "inline"
    # The online learner starts every level from nothing: reset before each one (repeats too).
    levels = result["runs"]["pars"]["levels"]
    resets = [r["pars_stats"]["online"]["resets"] for load in LOADS for r in levels[load]["repeats"]]
    assert resets == list(range(1, len(LOADS) * REPEATS + 1))


def test_repeats_are_kept_and_summarized(run):
    result, out = run
    for policy in POLICIES:
        for load in LOADS:
            level = result["runs"][policy]["levels"][load]
            means = [r["summary"]["latency_mean"] for r in level["repeats"]]
            assert len(means) == REPEATS
            assert level["summary"]["latency_mean"] == pytest.approx(np.median(means))
    for load in LOADS:
        for label, (lo, hi) in result["comparison_ranges"][load].items():
            assert lo <= result["comparisons"][load][label] <= hi, (load, label)
    assert f"served {REPEATS} times per policy" in (out / "results.md").read_text()


def test_poisson_level_runs_at_a_multiple_of_the_measured_capacity(run):
    result, _ = run
    capacity = result["capacity_rps"]
    # The median over every burst (policies and repeats) of the tokens/s served with every slot busy, per request.
    bursts = [r for p in POLICIES for r in result["runs"][p]["levels"]["burst"]["repeats"]]
    mean_tokens = np.mean([r["max_tokens"] for r in result["runs"]["fcfs"]["levels"]["burst"]["requests"]])
    assert capacity == pytest.approx(np.median([r["saturated_tps"] for r in bursts]) / mean_tokens)
    # Per burst, the saturated rate beats the burst's overall rate: its half-empty tail is left out.
    # (Across bursts the median need not: one engine can run a burst faster than another's median.)
    for burst in bursts:
        assert burst["saturated_tps"] / mean_tokens > burst["summary"]["throughput_rps"]
    expected = arrival_offsets(N, 2 * capacity, SEED)
    for policy in POLICIES:
        level = result["runs"][policy]["levels"]["2x"]
        assert level["rate_rps"] == pytest.approx(2 * capacity)
        reqs = sorted(level["requests"], key=lambda r: r["idx"])
        assert np.allclose([r["arrival"] for r in reqs], expected)
        lateness = np.array([r["submit"] - r["arrival"] for r in reqs])
        # Sent when due (never early; late only by the client's event-loop delay).
        assert lateness.min() >= -1e-3 and lateness.max() < 2.0, lateness


def test_report_files(run):
    _, out = run
    for name in ("e2e_latency_cdf.png", "e2e_latency_bars.png"):
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    md = (out / "results.md").read_text()
    assert all(f"| burst | {p} |" in md for p in POLICIES)
    assert (out / "logs" / "pars.log").is_file()


def test_cli_rejects_bad_options(capsys, tmp_path):
    assert main(["bench", "e2e", "--policies", "fcfs,lifo", "--out", str(tmp_path)]) == 1
    assert "unknown policies ['lifo']" in capsys.readouterr().err
    bad_variant = ["bench", "e2e", "--policies", "fcfs,pars-x", "--variant", 'pars-x={"workr": "thread"}', "--out", str(tmp_path)]
    assert main(bad_variant) == 1
    assert "unknown key(s) ['workr']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--variant", "pars-x=notjson"])
    assert "not JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "e2e", "--loads", "burst,fast"])
    assert "bad load" in capsys.readouterr().err


def test_missing_ranker_is_a_clear_error_before_any_engine_starts(home, tiny_llama_dir, tmp_path, capsys):
    data = save_jsonl(_samples(2, np.random.default_rng(0), TOPICS), tmp_path / "r.jsonl")
    argv = ["bench", "e2e", "--model", str(tiny_llama_dir), "--data", str(data), "--n", "4",
            "--ranker", str(tmp_path / "no-such-ranker"), "--out", str(tmp_path / "out")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "ranker folder not found" in err and "no-such-ranker" in err
    assert not (tmp_path / "out" / "logs" / "fcfs.log").exists()  # failed before starting engines


def test_a_failing_engine_reports_its_log_instead_of_hanging(tmp_path):
    from pars_fast.e2e.runner import EngineSettings, PolicyEngine, PolicySpec, RunError, RunSpec

    spec = RunSpec(PolicySpec("fcfs"), EngineSettings(model=str(tmp_path / "no-such-model")), [[101, 102]], [3])
    handle = PolicyEngine(spec, tmp_path / "fcfs.log", timeout_s=300)
    handle.start()
    try:
        with pytest.raises(RunError, match=r"policy 'fcfs' failed to start its engine") as info:
            handle.wait_ready()
        assert str(tmp_path / "fcfs.log") in str(info.value)
        assert "no-such-model" in (tmp_path / "fcfs.log").read_text()
    finally:
        handle.close()
