"""PARSScheduler with its ranker in a background worker (a thread or a child process).

The scheduler never waits on the worker: scores come back between steps. These tests
drive a real vLLM ``Scheduler`` without a model (``pars_fast.sim.harness``) and use
``wait_for_scores`` where they need the worker to have answered. Stub rankers are
imported by name (``f"{__name__}:Class"``), in the worker process too.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer
from vllm.v1.request import RequestStatus
from pars_fast.sim.harness import RequestFactory, admission_order, finish_order, make_scheduler, make_vllm_config, run_until_idle, step

from pars_fast.vllm import PARSConfig, PARSConfigError, PARSScheduler
from pars_fast.vllm.runtime import SchedulerRuntime
from pars_fast.vllm.worker import STOP_TIMEOUT_S

MODES = ["thread", "process"]


def _first_number(text: str) -> float:
    match = re.search(r"\d+", text)
    return float(match.group()) if match else 0.0


class NumberRanker:
    """Scores a prompt by the first integer in it."""

    def score(self, prompts: list[str]) -> np.ndarray:
        return np.array([_first_number(p) for p in prompts], dtype=np.float32)


class SlowRanker(NumberRanker):
    """Takes ``PARS_TEST_SLOW_S`` seconds (default 0.3) per batch."""

    def score(self, prompts: list[str]) -> np.ndarray:
        time.sleep(float(os.environ.get("PARS_TEST_SLOW_S", "0.3")))
        return super().score(prompts)


class RaisingRanker:
    def score(self, prompts: list[str]) -> np.ndarray:
        raise RuntimeError("ranker exploded")


class NotARanker:
    """Has no score method."""


class HangOnceRanker(NumberRanker):
    """Hangs (60 s) on its first batch ever, then scores normally: the marker file
    ``PARS_TEST_HANG_MARKER`` remembers the hang across worker restarts."""

    def score(self, prompts: list[str]) -> np.ndarray:
        marker = Path(os.environ["PARS_TEST_HANG_MARKER"])
        if not marker.exists():
            marker.write_text("hung")
            time.sleep(60)
        return super().score(prompts)


def spec(cls: type) -> str:
    return f"{__name__}:{cls.__name__}"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def factory():
    return RequestFactory(block_size=16)


@pytest.fixture
def build(tiny_llama_dir):
    """build(mode, ranker_cls, pars=None, runtime=None, **vllm) -> scheduler (``runtime``: its
    ``pars_runtime``); shut down after the test."""
    made: list[PARSScheduler] = []

    def _build(mode, ranker_cls=NumberRanker, pars=None, runtime=None, **kwargs):
        # min_queue 1: rank every queue, however short (these tests are about the worker).
        config = {"ranker": spec(ranker_cls), "worker": mode, "min_queue": 1, **(pars or {})}
        extra = {} if runtime is None else {"pars_runtime": runtime}
        sched = make_scheduler(PARSScheduler, make_vllm_config(tiny_llama_dir, pars=config, **kwargs), **extra)
        made.append(sched)
        return sched

    yield _build
    for sched in made:
        sched.shutdown()


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def add_numbered(sched, factory, tokenizer, numbers, max_tokens=3, t0=None, filler=""):
    t0 = time.time() if t0 is None else t0
    reqs = [
        factory.make(prompt_ids(tokenizer, f"task {n} {filler}"), max_tokens, arrival_time=t0 + i * 1e-3)
        for i, n in enumerate(numbers)
    ]
    for r in reqs:
        sched.add_request(r)
    return reqs


def assert_empty(sched) -> None:
    assert not sched.has_requests() and not sched.requests and not sched.running
    assert len(sched.waiting) == 0 and len(sched.kv_holding_waiting) == 0
    assert sched.kv_cache_manager.usage == 0.0


def by_number(reqs, numbers):
    return [r.request_id for _, r in sorted(zip(numbers, reqs), key=lambda p: p[0])]


# ---------------------------------------------------------------------- order


@pytest.mark.parametrize("mode", MODES)
def test_burst_is_ordered_once_scores_arrive(build, factory, tokenizer, mode):
    """One slot, a burst of 8: the first step admits in arrival order (no score yet, and the
    step does not wait); once the worker answers, the rest go in score order."""
    sched = build(mode, max_num_seqs=1)
    numbers = [50, 3, 20, 7, 90, 1, 33, 12]
    reqs = add_numbered(sched, factory, tokenizer, numbers)
    first = step(sched)
    assert first.admitted == [reqs[0].request_id]
    assert sched.wait_for_scores(30)
    results = run_until_idle(sched)
    assert admission_order(results) == by_number(reqs[1:], numbers[1:])
    stats = sched.pars_stats()
    # The waiting 7 and the running one (its score orders preemption) went to the worker.
    assert stats["worker"]["jobs_submitted"] == 8 and stats["requests_scored"] == 8
    assert stats["scores_applied"] == 8 and stats["rekeyed_running"] == 1 and stats["requests_fallback"] == 0
    assert stats["worker"]["mode"] == mode and stats["worker"]["in_flight"] == 0
    assert_empty(sched)


@pytest.mark.parametrize("mode", MODES)
def test_light_load_never_calls_the_ranker(build, factory, tokenizer, mode):
    """Requests admitted at once, with nothing queued behind them, are never scored."""
    sched = build(mode, max_num_seqs=4)
    done = []
    for wave in range(3):
        reqs = add_numbered(sched, factory, tokenizer, [wave * 10 + i for i in range(3)])
        done += reqs
        run_until_idle(sched)
    stats = sched.pars_stats()
    assert stats["worker"]["jobs_submitted"] == 0 and stats["requests_scored"] == 0 and stats["batches"] == 0
    assert stats["requests_unranked"] == len(done) == 9
    assert_empty(sched)


def test_admitted_unscored_then_scored_then_preempted(build, factory, tokenizer):
    """A long request is admitted before any score exists; once a queue forms it is scored
    in the background, and when the KV cache runs out, vLLM preempts it, by that score."""
    sched = build("thread", max_num_seqs=2, num_blocks=9, block_size=16)
    filler = "alpha beta gamma delta " * 3
    t0 = time.time()
    (long_req,) = add_numbered(sched, factory, tokenizer, [900], max_tokens=90, t0=t0, filler=filler)
    results = [step(sched)]
    assert results[0].admitted == [long_req.request_id]
    assert sched.pars_stats()["worker"]["jobs_submitted"] == 0  # nothing waited: nothing to rank
    short, queued = add_numbered(sched, factory, tokenizer, [10, 20], max_tokens=40, t0=t0 + 1, filler=filler)
    results.append(step(sched))  # admits `short`; `queued` waits: all three go to the worker
    assert sched.pars_stats()["worker"]["jobs_submitted"] == 3
    assert sched.wait_for_scores(30)
    results += run_until_idle(sched)
    preempted = [rid for r in results for rid in r.preempted]
    assert preempted and preempted[0] == long_req.request_id  # the highest score, not the newest
    stats = sched.pars_stats()
    assert stats["rekeyed_running"] == 2 and stats["requests_scored"] == 3
    assert sorted(finish_order(results)) == sorted([long_req.request_id, short.request_id, queued.request_id])
    assert_empty(sched)


# ---------------------------------------------------------------------- late scores, failures


def test_score_arriving_after_abort_or_finish_is_dropped(build, factory, tokenizer, monkeypatch):
    monkeypatch.setenv("PARS_TEST_SLOW_S", "0.5")
    sched = build("thread", SlowRanker, max_num_seqs=1)
    reqs = add_numbered(sched, factory, tokenizer, [5, 9, 1, 7], max_tokens=1)
    # Admits reqs[0] and hands all four to the worker; reqs[0] (one token) finishes in
    # this same step, long before the worker's slow batch is done.
    results = [step(sched)]
    assert reqs[0].request_id in {rid for rid, _ in results[0].finished}
    time.sleep(0.1)  # the worker is inside its batch now
    sched.finish_requests([reqs[2].request_id], RequestStatus.FINISHED_ABORTED)
    assert sched.wait_for_scores(30)
    results += run_until_idle(sched)
    stats = sched.pars_stats()
    assert stats["worker"]["jobs_cancelled"] == 2  # the aborted one and the finished one
    # The aborted one was in the batch being scored: its score came back and was dropped.
    # (reqs[0]'s cancel may reach the worker before or after it starts that batch.)
    assert 1 <= stats["scores_late"] <= 2
    assert stats["scores_late"] + stats["requests_skipped"] == 2  # every job answered once
    assert stats["scores_applied"] == 2  # only the two that were still waiting
    assert sorted(finish_order(results)) == sorted(r.request_id for i, r in enumerate(reqs) if i != 2)
    assert_empty(sched)


@pytest.mark.parametrize("mode", MODES)
def test_raising_worker_falls_back_to_fcfs(build, factory, tokenizer, mode):
    sched = build(mode, RaisingRanker, max_num_seqs=1)
    numbers = [50, 3, 20, 7]
    reqs = add_numbered(sched, factory, tokenizer, numbers)
    results = [step(sched)]
    assert sched.wait_for_scores(30)
    results += run_until_idle(sched)
    assert admission_order(results) == [r.request_id for r in reqs]  # arrival order
    stats = sched.pars_stats()
    assert stats["requests_fallback"] == 4 and stats["requests_scored"] == 0
    assert stats["fallback_reasons"] == {"error": 4} and "ranker exploded" in stats["last_fallback_reason"]
    assert_empty(sched)


@pytest.mark.parametrize("mode", MODES)
def test_hung_worker_is_given_up_then_restarted(build, factory, tokenizer, mode, tmp_path, monkeypatch):
    monkeypatch.setenv("PARS_TEST_HANG_MARKER", str(tmp_path / "hung"))
    pars = {"fallback": {"deadline_s": 0.5, "retry_after_s": 0.2}}
    sched = build(mode, HangOnceRanker, pars=pars, max_num_seqs=1)
    first = add_numbered(sched, factory, tokenizer, [50, 3, 20, 7], max_tokens=2)
    results = [step(sched)]
    time.sleep(0.7)  # past the deadline with the worker stuck
    results.append(step(sched))
    stats = sched.pars_stats()
    assert stats["worker"]["hung"] == 1 and stats["worker"]["jobs_given_up"] == 4
    assert stats["fallback_reasons"] == {"worker lost": 4}
    time.sleep(0.3)  # past retry_after_s: the next step starts a new worker
    results.append(step(sched))
    assert sched.pars_stats()["worker"]["restarts"] == 1
    later = add_numbered(sched, factory, tokenizer, [40, 4, 30], max_tokens=2, t0=time.time() + 10)
    results.append(step(sched))
    assert sched.wait_for_scores(60)
    results += run_until_idle(sched)
    order = admission_order(results)
    # The given-up ones kept arrival order; the new worker scored the later ones.
    assert order[: len(first)] == [r.request_id for r in first]
    # The first of the later ones may be admitted before any score is back; the other two
    # wait for the restarted worker and go in score order.
    later_order = [rid for rid in order if rid in {r.request_id for r in later}]
    rest = [rid for rid in by_number(later, [40, 4, 30]) if rid != later_order[0]]
    assert later_order[1:] == rest
    assert sorted(finish_order(results)) == sorted(r.request_id for r in first + later)
    assert_empty(sched)


def test_dead_worker_process_is_replaced(build, factory, tokenizer):
    pars = {"fallback": {"retry_after_s": 0.0}}
    sched = build("process", pars=pars, max_num_seqs=1)
    pid = sched.pars_stats()["worker"]["pid"]
    os.kill(pid, 9)
    time.sleep(0.2)
    reqs = add_numbered(sched, factory, tokenizer, [30, 10, 20])
    results = [step(sched), step(sched)]  # notices the death, then restarts the worker
    assert sched.pars_stats()["worker"]["died"] == 1
    assert sched.wait_for_scores(60)
    results += run_until_idle(sched)
    assert sched.pars_stats()["worker"]["restarts"] == 1
    assert sorted(finish_order(results)) == sorted(r.request_id for r in reqs)
    assert_empty(sched)


@pytest.mark.parametrize("mode", MODES)
def test_slow_worker_never_holds_a_step(build, factory, tokenizer, mode, monkeypatch):
    """Steps run while the worker is busy (arrival order meanwhile); its scores land later."""
    monkeypatch.setenv("PARS_TEST_SLOW_S", "0.5")
    sched = build(mode, SlowRanker, max_num_seqs=1)
    numbers = [50, 3, 20, 7, 90, 1]
    reqs = add_numbered(sched, factory, tokenizer, numbers, max_tokens=1)
    durations, results = [], []
    for _ in range(3):
        start = time.perf_counter()
        results.append(step(sched))
        durations.append(time.perf_counter() - start)
    assert max(durations) < 0.25  # none waited for the 0.5 s batch
    assert admission_order(results) == [r.request_id for r in reqs[:3]]
    assert sched.wait_for_scores(30)
    results += run_until_idle(sched)
    assert admission_order(results)[3:] == by_number(reqs[3:], numbers[3:])
    assert_empty(sched)


@pytest.mark.parametrize("mode", MODES)
def test_shutdown_with_a_batch_in_flight(build, factory, tokenizer, mode, monkeypatch):
    monkeypatch.setenv("PARS_TEST_SLOW_S", "2")
    sched = build(mode, SlowRanker, max_num_seqs=1)
    add_numbered(sched, factory, tokenizer, [5, 4, 3])
    step(sched)
    worker = sched._worker
    assert worker.in_flight == 3
    pid = sched.pars_stats()["worker"]["pid"]
    start = time.monotonic()
    sched.shutdown()
    assert time.monotonic() - start < STOP_TIMEOUT_S + 2
    assert not worker.alive and worker.in_flight == 0
    if mode == "process":
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


# ---------------------------------------------------------------------- placement and start-up


def test_process_worker_is_pinned_and_niced(build):
    sched = build("process", pars={"cpus": [0], "nice": 7})
    worker = sched.pars_stats()["worker"]
    assert worker["cpus"] == [0]
    stat = Path(f"/proc/{worker['pid']}/stat").read_text().rsplit(")", 1)[1].split()
    assert int(stat[16]) == 7  # field 19 of /proc/PID/stat: nice


def test_process_worker_runs_on_the_cpus_the_model_leaves_free(build, monkeypatch):
    """On vLLM's CPU backend the model worker's OpenMP threads are bound to their own cores
    (here, by VLLM_CPU_OMP_THREADS_BIND, to the first CPU this process may use): a process
    worker is pinned to every other CPU, and really runs there."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("vLLM's CPU binding applies to its CPU backend only")
    ours = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", str(ours[0]))
    sched = build("process")
    worker = sched.pars_stats()["worker"]
    if len(ours) == 1:  # nothing but the model's CPU: left unpinned
        assert "cpus" not in worker or worker["cpus"] is None
        return
    assert worker["cpus"] == ours[1:]
    assert sorted(os.sched_getaffinity(worker["pid"])) == ours[1:]


def test_without_a_spare_cpu_a_process_worker_shares_the_engine_cores():
    """vLLM's CPU backend on two cores binds the model to one and reserves the other for the
    engine core: no CPU is spare, so a process worker (when asked for) shares the engine
    core's, never the model's. Configured CPUs win; off the CPU backend it is not pinned."""
    from pars_fast.vllm.scheduler import _CpuPlacement, _worker_cpus

    ours = sorted(os.sched_getaffinity(0))
    model = frozenset(ours[:1])
    config = PARSConfig(ranker="default", worker="process")
    assert _worker_cpus(config, _CpuPlacement(model, frozenset(ours[1:]), spare=())) == (ours[1:] or None)
    assert _worker_cpus(config, _CpuPlacement(model, frozenset(), spare=(7, 9))) == [7, 9]
    assert _worker_cpus(PARSConfig(ranker="default", worker="process", cpus=(3,)), None) == [3]
    assert _worker_cpus(config, None) is None


@pytest.mark.parametrize("spare", [False, True], ids=["no-spare-cpu", "spare-cpus"])
def test_auto_placement_scores_inline_without_a_spare_core(build, factory, tokenizer, spare):
    """worker "auto": with no CPU left beside the model's and the engine core's (vLLM's CPU
    backend on a small machine), the ranker scores inline, before the step: the first
    admission is already the shortest. With spare CPUs (a GPU server) it scores in a
    process, and the step never waits for it: the first admission is the first arrival,
    the rest follow the scores."""
    sched = build("auto", runtime=SchedulerRuntime(spare_cpus=spare), max_num_seqs=1)
    assert sched.pars_stats()["worker"]["mode"] == ("process" if spare else "inline")
    numbers = [50, 3, 20, 7]
    reqs = add_numbered(sched, factory, tokenizer, numbers)
    first = step(sched)
    if spare:
        assert first.admitted == [reqs[0].request_id]
        assert sched.wait_for_scores(60)
        rest = by_number(reqs[1:], numbers[1:])
    else:
        assert first.admitted == [by_number(reqs, numbers)[0]]
        rest = by_number(reqs, numbers)[1:]
    assert admission_order(run_until_idle(sched)) == rest
    assert_empty(sched)


def test_worker_start_failure_stops_the_engine_start(build):
    with pytest.raises(PARSConfigError, match="scoring worker failed to start.*has no score"):
        build("process", pars={"ranker": spec(NotARanker)})


def test_missing_default_ranker_says_what_to_run(build, tmp_path, monkeypatch):
    monkeypatch.setenv("PARS_FAST_HOME", str(tmp_path))
    with pytest.raises(PARSConfigError, match="pars-fast train"):
        build("process", pars={"ranker": "default"})


# ---------------------------------------------------------------------- online adaptation


@pytest.mark.parametrize("mode", ["thread", "inline"])
def test_online_learns_from_finished_requests_and_resets(build, factory, tokenizer, mode):
    """Scored requests are judged and learned from when they finish; reset_prefix_cache()
    (vLLM's cache-reset cascade, e.g. after a weight update) makes the learner forget."""
    pars = {"online": {"trust_length_caps": True, "min_observations": 8}}
    sched = build(mode, pars=pars, max_num_seqs=1)
    rng = np.random.default_rng(0)
    numbers = rng.integers(1, 100, 24).tolist()
    # Output length grows with the number in the prompt: the base ranker is right.
    reqs = add_numbered(sched, factory, tokenizer, numbers, max_tokens=1)
    for r, n in zip(reqs, numbers):
        r.max_tokens = 1 + n // 10
    step(sched)
    assert sched.wait_for_scores(30)
    run_until_idle(sched)
    assert sched.sync_worker(30)
    online = sched.pars_stats()["online"]
    assert online["observed"] == 24 and online["censored"] == 0  # caps trusted: exact labels
    assert online["accuracy_base"] > 0.9 and online["judged_pairs"] > 0
    assert sched.reset_prefix_cache() is True
    assert sched.sync_worker(30)
    online = sched.pars_stats()["online"]
    assert online["observed"] == 0 and online["resets"] == 1 and online["memory"] == 0
    assert sched.pars_stats()["online_resets"] == 1
    assert_empty(sched)


def test_online_learns_unscored_requests_when_idle(build, factory, tokenizer):
    sched = build("thread", max_num_seqs=8)
    reqs = add_numbered(sched, factory, tokenizer, [3, 1, 2], max_tokens=2)
    run_until_idle(sched)
    assert sched.pars_stats()["requests_scored"] == 0  # never needed a score...
    assert sched.sync_worker(30)
    online = sched.pars_stats()["online"]
    assert online["observed"] == len(reqs) and online["pending_unscored"] == 0  # ...but taught the learner
    assert online["censored"] == len(reqs)  # stopped by max_tokens, caps not trusted: "at least" labels
    off = build("thread", pars={"online": False}, max_num_seqs=8)
    add_numbered(off, factory, tokenizer, [3, 1], max_tokens=2)
    run_until_idle(off)
    assert off.sync_worker(30) and "online" not in off.pars_stats()


def test_aborted_requests_teach_nothing(build, factory, tokenizer):
    sched = build("thread", max_num_seqs=1)
    reqs = add_numbered(sched, factory, tokenizer, [5, 6, 7], max_tokens=2)
    step(sched)
    sched.finish_requests([r.request_id for r in reqs[1:]], RequestStatus.FINISHED_ABORTED)
    run_until_idle(sched)
    assert sched.sync_worker(30)
    assert sched.pars_stats()["online"]["observed"] == 1
    assert_empty(sched)


# ---------------------------------------------------------------------- traces


def test_trace_rows_for_every_finished_request(build, factory, tokenizer, tmp_path):
    import json

    path = tmp_path / "trace.jsonl"
    sched = build("thread", pars={"trace": {"path": str(path), "prompts": True}}, max_num_seqs=1)
    numbers = [30, 10, 20]
    reqs = add_numbered(sched, factory, tokenizer, numbers, max_tokens=3, t0=time.time() - 1)
    step(sched)
    assert sched.wait_for_scores(30)
    extra = add_numbered(sched, factory, tokenizer, [99], max_tokens=3, t0=time.time() - 1)
    sched.finish_requests([extra[0].request_id], RequestStatus.FINISHED_ABORTED)
    run_until_idle(sched)
    sched.shutdown()  # flushes the writer
    rows = {row["request_id"]: row for row in map(json.loads, path.read_text().splitlines())}
    assert set(rows) == {r.request_id for r in reqs + extra}
    for r, n in zip(reqs, numbers):
        row = rows[r.request_id]
        assert row["finish_reason"] == "length" and row["output_tokens"] == 3
        assert row["prompt_tokens"] == len(r.prompt_token_ids) and row["prompt"].startswith(f"task {n}")
        assert row["score"] == float(n) and row["queue_wait_s"] >= 0 and row["ranker"].endswith(":NumberRanker")
        assert row["finish_time"] >= row["arrival_time"]
    aborted = rows[extra[0].request_id]
    assert aborted["finish_reason"] == "abort" and aborted["output_tokens"] == 0 and aborted["queue_wait_s"] is None
    assert sched.pars_stats()["trace"]["rows"] == 4
