"""PARSScheduler in the request states vLLM reaches besides "waiting" and "running".

Each test drives vLLM's real ``Scheduler`` without a model (``pars_fast.sim.harness``):

* streaming-input sessions (``Request(resumable=True)``, then the same id with the next
  chunk): a paused session (``WAITING_FOR_STREAMING_REQ``) holds its slot and KV; its
  next chunk grows the prompt and resets ``arrival_time`` (vLLM's
  ``_update_request_as_session``);
* P/D disaggregation with vLLM's real NIXL connector (its scheduler side needs no NIXL
  library and no peer; the harness plays its worker side): a decode node's requests
  wait for their remote KV (``WAITING_FOR_REMOTE_KVS``), a prefill node's finished
  requests stay in ``Scheduler.requests`` until the decode node has read their blocks;
* the engine going idle: every per-request record PARS keeps drains.

Each test states which wrong behaviour it catches; each was run against that behaviour
(the scheduler before the request book, e4dd69f, or the one fix reverted) and failed there.
"""

from __future__ import annotations

import json
import re
import threading

import numpy as np
import pytest
from transformers import AutoTokenizer
from vllm.v1.request import RequestStatus

import pars_fast.vllm.worker as worker_module
from pars_fast.aging import PRIORITY_UNITS_PER_SCORE
from pars_fast.clock import VirtualClock
from pars_fast.sim.harness import (
    REMOTE_DECODE_PARAMS,
    BatchQueue,
    RequestFactory,
    finish_order,
    make_scheduler,
    make_vllm_config,
    remote_prefill_params,
    run_until_idle,
    step,
)
from pars_fast.vllm import PARSScheduler
from pars_fast.vllm.runtime import SchedulerRuntime

EMPTY_BOOK = {"records": 0, "waiting_unscored": 0, "running_unscored": 0}

# Simulated time: the scheduler reads it (``pars_runtime``), TimedRanker spends it.
CLOCK = VirtualClock()


# ---------------------------------------------------------------------- stub rankers


def _task_number(text: str) -> float:
    """The number after the last "task" in a prompt (a session's latest chunk), else 0."""
    found = re.findall(r"task (\d+)", text)
    return float(found[-1]) if found else 0.0


class TaskRanker:
    """Scores a prompt by its last "task N"; records every batch it is given."""

    calls: list[list[str]] = []

    def score(self, prompts: list[str]) -> np.ndarray:
        TaskRanker.calls.append(list(prompts))
        return np.array([_task_number(p) for p in prompts], dtype=np.float32)


class GatedRanker(TaskRanker):
    """A TaskRanker that waits for ``gate`` before it answers: the test decides when a
    score in flight comes back, without sleeping."""

    gate = threading.Event()

    def score(self, prompts: list[str]) -> np.ndarray:
        scores = super().score(prompts)
        assert GatedRanker.gate.wait(60), "the test never opened the gate"
        return scores


class TimedRanker(TaskRanker):
    """Takes 10 ms (simulated) per prompt."""

    def score(self, prompts: list[str]) -> np.ndarray:
        CLOCK.advance(0.01 * len(prompts))
        return super().score(prompts)


class NaNRanker(TaskRanker):
    """NaN for prompts that say "nan", else their task number."""

    def score(self, prompts: list[str]) -> np.ndarray:
        scores = super().score(prompts)
        return np.where(["nan" in p for p in prompts], np.nan, scores)


def spec(cls: type) -> str:
    return f"{__name__}:{cls.__name__}"


@pytest.fixture(autouse=True)
def _reset_stubs():
    global CLOCK
    CLOCK = VirtualClock(1_000.0)
    TaskRanker.calls = []
    GatedRanker.gate.set()


# ---------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def factory():
    return RequestFactory(block_size=16)


@pytest.fixture
def build(tiny_llama_dir):
    """build(pars, virtual=True, **config) -> PARSScheduler on the tiny Llama (``virtual``:
    on the simulated CLOCK; a worker thread or process needs the machine's); shut down
    after the test."""
    made: list[PARSScheduler] = []

    def _build(pars, virtual=True, **kwargs):
        extra = {"pars_runtime": SchedulerRuntime(clock=CLOCK)} if virtual else {}
        sched = make_scheduler(PARSScheduler, make_vllm_config(tiny_llama_dir, pars=pars, **kwargs), **extra)
        made.append(sched)
        return sched

    yield _build
    for sched in made:
        sched.shutdown()


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def step_until(sched, done, max_steps: int = 50) -> list:
    results = []
    for _ in range(max_steps):
        if done():
            return results
        results.append(step(sched))
    pytest.fail(f"not reached in {max_steps} steps")


def paused(*sessions) -> bool:
    return all(s.status == RequestStatus.WAITING_FOR_STREAMING_REQ for s in sessions)


def assert_drained(sched) -> None:
    """Nothing left anywhere: vLLM's queues and KV cache, and PARS's records."""
    assert not sched.has_requests() and not sched.requests and not sched.running
    assert len(sched.waiting) == 0 and len(sched.kv_holding_waiting) == 0
    assert sched.num_waiting_for_streaming_input == 0
    assert sched.kv_cache_manager.usage == 0.0
    assert sched._book.index_sizes() == EMPTY_BOOK


# ---------------------------------------------------------------------- streaming-input sessions


def test_a_sessions_next_chunk_is_scored_again_on_its_new_prompt(build, factory):
    """Oracle scores (a chunk's max_tokens), no aging. Sessions A and B get first-chunk keys
    2 and 4, so A is ahead. Their next chunks ask for 40 and 3 tokens: ordered by what they
    ask now, B goes first. Both wait in kv_holding_waiting (they keep their KV), and a step's
    8 tokens fit one chunk, so the queue's order is the admission order.
    Catches: a session keeping its first chunk's key (e4dd69f: A first)."""
    sched = build({"ranker": "oracle", "aging": 0.0}, max_num_seqs=2, max_num_batched_tokens=8)
    t0 = CLOCK.wall()
    a = factory.make([3] * 8, 2, request_id="A", arrival_time=t0, resumable=True)
    b = factory.make([4] * 8, 4, request_id="B", arrival_time=t0 + 1, resumable=True)
    sched.add_request(a)
    sched.add_request(b)
    turn = step_until(sched, lambda: paused(a, b))
    assert sorted(finish_order(turn)) == ["A", "B"]  # each turn's end, as the client sees it
    assert (a.priority, b.priority) == (2 * PRIORITY_UNITS_PER_SCORE, 4 * PRIORITY_UNITS_PER_SCORE)

    sched.add_request(factory.make([5] * 8, 40, request_id="A", arrival_time=t0 + 10, resumable=True))
    sched.add_request(factory.make([6] * 8, 3, request_id="B", arrival_time=t0 + 11, resumable=True))
    assert a.num_prompt_tokens > 8 and a.arrival_time == t0 + 10  # vLLM grew the prompt, reset the arrival
    assert [r.request_id for r in sched.kv_holding_waiting] == ["A", "B"]  # before scoring: by arrival
    assert step(sched).admitted == ["B"]
    assert step(sched).admitted == ["A"]
    assert (a.priority, b.priority) == (40 * PRIORITY_UNITS_PER_SCORE, 3 * PRIORITY_UNITS_PER_SCORE)
    assert sched.pars_stats()["sessions_rescored"] == 2

    for rid in ("A", "B"):  # resumable=False: the session ends after this turn
        sched.add_request(factory.make([], 1, request_id=rid, arrival_time=t0 + 20))
    run_until_idle(sched)
    assert_drained(sched)


def test_a_sessions_next_chunk_queues_at_its_new_arrival_time(build, factory):
    """No ranking (min_queue out of reach), aging 1 score unit per second: keys are FCFS
    keys, ``aging * (arrival - t0)``. A opens at t0, B at t0 + 1; B's next chunk arrives
    at t0 + 10, A's at t0 + 11, so B is the earlier arrival now and goes first.
    Catches: the key of the session's first arrival (e4dd69f: A first)."""
    pars = {"ranker": spec(TaskRanker), "worker": "inline", "min_queue": 1000, "aging": 1.0, "prompt_weight": 0}
    sched = build(pars, max_num_seqs=2, max_num_batched_tokens=8)
    t0 = CLOCK.wall()
    a = factory.make([3] * 8, 2, request_id="A", arrival_time=t0, resumable=True)
    b = factory.make([4] * 8, 2, request_id="B", arrival_time=t0 + 1, resumable=True)
    sched.add_request(a)
    sched.add_request(b)
    step_until(sched, lambda: paused(a, b))
    sched.add_request(factory.make([5] * 8, 2, request_id="B", arrival_time=t0 + 10, resumable=True))
    sched.add_request(factory.make([6] * 8, 2, request_id="A", arrival_time=t0 + 11, resumable=True))
    assert (a.priority, b.priority) == (11 * PRIORITY_UNITS_PER_SCORE, 10 * PRIORITY_UNITS_PER_SCORE)
    assert step(sched).admitted == ["B"]
    assert step(sched).admitted == ["A"]
    assert TaskRanker.calls == []  # FCFS keys only: the order above is the arrival times'
    for rid in ("A", "B"):
        sched.add_request(factory.make([], 1, request_id=rid, arrival_time=t0 + 20))
    run_until_idle(sched)
    assert_drained(sched)


def test_a_score_on_its_way_for_a_sessions_old_prompt_is_dropped(build, factory, tokenizer):
    """Thread worker, one slot. Session S ("task 5") runs, X ("task 9") waits; both go to
    the worker, which holds its answers (the gate). S's turn ends, and its next chunk
    ("task 1") arrives while its old prompt's score is on its way. That score (5) is
    dropped when it lands; S is scored again on its grown prompt once a queue forms
    behind it (Y), and keyed by that score (1).
    Catches: applying the stale score (e4dd69f: S keyed 5, never scored again)."""
    pars = {"ranker": spec(GatedRanker), "worker": "thread", "min_queue": 1, "aging": 0.0, "online": False, "prompt_weight": 0}
    sched = build(pars, virtual=False, max_num_seqs=1)
    t0 = CLOCK.wall()
    s = factory.make(ids_of(tokenizer, "task 5"), 2, request_id="S", arrival_time=t0, resumable=True)
    x = factory.make(ids_of(tokenizer, "task 9"), 2, request_id="X", arrival_time=t0 + 1)
    GatedRanker.gate.clear()
    sched.add_request(s)
    sched.add_request(x)
    assert step(sched).admitted == ["S"]
    assert sched.pars_stats()["worker"]["in_flight"] == 2  # X waiting, S running (its score orders preemption)
    step_until(sched, lambda: paused(s))  # the worker is still holding both scores
    sched.add_request(factory.make(ids_of(tokenizer, "task 1"), 2, request_id="S", arrival_time=t0 + 10, resumable=True))
    GatedRanker.gate.set()
    assert sched.wait_for_scores(60)
    assert step(sched).admitted == ["S"]  # it kept its KV: vLLM resumes it first
    stats = sched.pars_stats()
    assert stats["scores_late"] == 1 and stats["scores_applied"] == 1  # S's stale 5 dropped, X's 9 applied
    assert s.priority != 5 * PRIORITY_UNITS_PER_SCORE
    sched.add_request(factory.make(ids_of(tokenizer, "task 7"), 2, request_id="Y", arrival_time=t0 + 12))
    step(sched)  # X and Y wait: the unscored ones, S among them, go to the worker
    assert sched.wait_for_scores(60)
    step(sched)
    prompts_of_s = [p for call in TaskRanker.calls for p in call if p.startswith("task 5")]
    assert len(prompts_of_s) == 2 and prompts_of_s[1].endswith("task 1")  # the old prompt, then the grown one
    assert s.priority == 1 * PRIORITY_UNITS_PER_SCORE
    sched.add_request(factory.make([], 1, request_id="S", arrival_time=t0 + 20))
    run_until_idle(sched)
    assert sched.wait_for_scores(60)
    assert_drained(sched)


def test_paused_sessions_are_not_counted_twice_toward_queue_depth(build, factory, tokenizer):
    """Four slots, min_queue 2. Two sessions pause (they hold two slots) and two requests
    arrive: two free slots admit both at once, so their order cannot matter and nothing is
    ranked. Two more arrivals, with every slot taken, are a queue two deep: ranked.
    Catches: a paused session counted as waiting and as holding a slot (e4dd69f: 2 + 2
    waiting against 2 free slots counted as 2 beyond, and the first pair was ranked)."""
    pars = {"ranker": spec(TaskRanker), "worker": "inline", "min_queue": 2, "fallback": {"budget_s": None}}
    sched = build(pars, max_num_seqs=4)
    t0 = CLOCK.wall()
    sessions = [
        factory.make(ids_of(tokenizer, f"session {i}"), 1, request_id=f"S{i}", arrival_time=t0 + i, resumable=True)
        for i in range(2)
    ]
    for s in sessions:
        sched.add_request(s)
    step_until(sched, lambda: paused(*sessions))
    assert sched.num_waiting_for_streaming_input == 2 and len(sched.kv_holding_waiting) == 2
    assert sched.pars_stats()["num_waiting"] == 0  # they wait for their clients, not for a slot

    first = [factory.make(ids_of(tokenizer, f"task {n}"), 30, arrival_time=t0 + 5 + i) for i, n in enumerate([8, 2])]
    for r in first:
        sched.add_request(r)
    assert sorted(step(sched).admitted) == sorted(r.request_id for r in first)
    assert TaskRanker.calls == []

    later = [factory.make(ids_of(tokenizer, f"task {n}"), 2, arrival_time=t0 + 9 + i) for i, n in enumerate([6, 4])]
    for r in later:
        sched.add_request(r)
    step(sched)
    assert sorted(TaskRanker.calls[0][:2]) == ["task 4", "task 6"]  # the waiting ones, first

    for s in sessions:
        sched.add_request(factory.make([], 1, request_id=s.request_id, arrival_time=t0 + 20))
    run_until_idle(sched)
    assert_drained(sched)


# ---------------------------------------------------------------------- P/D disaggregation (NIXL connector)


@pytest.mark.parametrize("mode", ["inline", "thread", "async"])
def test_requests_waiting_for_remote_kv_are_never_sent_for_scoring(build, factory, tokenizer, mode):
    """A decode node (kv_consumer): requests whose prefill ran on a prefill node wait for
    their KV (WAITING_FOR_REMOTE_KVS) and then run ahead of the queue, so a score would
    order nothing. With one slot and a deep queue, the local requests are ranked and the
    remote ones never reach the ranker; everyone is served once. ``async``: inline, under
    async scheduling with two steps in flight (vLLM then also defers freeing a consumer's
    blocks until the step that may write them is done).
    Catches: remote-prefill requests scored like any other (e4dd69f)."""
    # No online learner: a worker's learner embeds finished unscored requests (the remote ones
    # too) with the ranker when it is idle, which is learning, not ranking.
    pars = {"ranker": spec(TaskRanker), "worker": "thread" if mode == "thread" else "inline", "min_queue": 1,
            "fallback": {"budget_s": None}, "online": False}
    sched = build(pars, virtual=mode != "thread", max_num_seqs=1, kv_connector="NixlConnector", kv_role="kv_consumer",
                  async_scheduling=mode == "async")
    engine = BatchQueue(sched, size=2 if mode == "async" else 1)
    t0 = CLOCK.wall()
    reqs = []
    for i in range(4):
        reqs.append(factory.make(ids_of(tokenizer, f"local task {10 - i}"), 3, arrival_time=t0 + 2 * i))
        reqs.append(factory.make(ids_of(tokenizer, f"remote task {i}"), 3, arrival_time=t0 + 2 * i + 1,
                                 kv_transfer_params=remote_prefill_params(f"prefill-{i}")))
    for r in reqs:
        sched.add_request(r)
    remote = [r for r in reqs if r.kv_transfer_params]
    results, seen_waiting_for_kv = [], set()
    while engine.busy:
        results.append(engine.step())
        seen_waiting_for_kv |= {r.request_id for r in remote if r.status == RequestStatus.WAITING_FOR_REMOTE_KVS}
        if mode == "thread":
            assert sched.wait_for_scores(60)
    assert seen_waiting_for_kv == {r.request_id for r in remote}  # the state under test was reached
    assert engine.max_in_flight == engine.size
    scored = [p for call in TaskRanker.calls for p in call]
    assert scored and not [p for p in scored if p.startswith("remote")]
    stats = sched.pars_stats()
    assert stats["remote_kv_unranked"] == 4 and stats["requests_fallback"] == 0
    assert sorted(finish_order(results)) == sorted(r.request_id for r in reqs)
    assert_drained(sched)


@pytest.mark.parametrize("scheduling", ["sync", "async"])
def test_the_engine_going_idle_is_seen_while_the_connector_holds_finished_blocks(build, factory, tokenizer, tmp_path, scheduling):
    """A prefill node (kv_producer): a finished request stays in ``Scheduler.requests``
    until the decode node has read its KV blocks, a step later here. The engine is idle at
    the last finish all the same: the stats file shows the final counts then, and the
    measure behind fallback.max_share starts afresh, so the next burst is ranked again
    (the first burst measured 10 ms of engine time per request against 10 ms per prompt
    ranked: FCFS, once MIN_FINISHES were known).
    ``async``: two steps in flight (vLLM's batch queue).
    Catches: an idle test on ``not Scheduler.requests`` (e4dd69f), false while the
    connector holds blocks: no final stats, and the next burst stays FCFS."""
    path = tmp_path / "stats.json"
    pars = {"ranker": spec(TimedRanker), "worker": "inline", "min_queue": 1, "stats_file": str(path),
            "fallback": {"budget_s": 0.05, "max_share": 0.1}}
    sched = build(pars, max_num_seqs=1, kv_connector="NixlConnector", kv_role="kv_producer",
                  async_scheduling=scheduling == "async")
    engine = BatchQueue(sched, size=2 if scheduling == "async" else 1)

    def burst(n: int, t: float) -> list:
        reqs = [factory.make(ids_of(tokenizer, f"task {i}"), 1, arrival_time=t, kv_transfer_params=REMOTE_DECODE_PARAMS)
                for i in range(n)]
        for r in reqs:
            sched.add_request(r)
        return reqs

    first = burst(200, CLOCK.wall())
    finished: list[str] = []
    while len(finished) < len(first):
        finished += [rid for rid, _ in engine.step().finished]
        CLOCK.advance(0.01)  # the model's step
    assert finished[-1] in sched.requests and sched.get_request_counts() == (0, 0)  # its blocks are held
    written = json.loads(path.read_text())  # the step before wrote num_running 1: only the idle write says 0
    assert written["num_running"] == 0 and written["num_waiting"] == 0
    assert written["time"] == pytest.approx(CLOCK.wall() - 0.01)  # at the last finish
    stats = sched.pars_stats()
    assert written["requests_scored"] == stats["requests_scored"] and written["requests_unranked"] == stats["requests_unranked"]
    assert stats["share_limited_steps"] > 0  # the first burst ended in FCFS order
    engine.run_until_idle()  # the decode node reads the blocks
    assert not sched.requests and engine.max_in_flight == engine.size
    before = stats["requests_scored"]
    second = burst(4, CLOCK.wall())
    engine.run_until_idle()
    assert sched.pars_stats()["requests_scored"] > before
    assert all(r.is_finished() for r in first + second)
    assert_drained(sched)


# ---------------------------------------------------------------------- idle: everything drains


def _capture_worker_scorers(monkeypatch) -> list:
    """The scorers a thread worker builds (the same ``build_scorer``, kept for the test)."""
    built: list = []
    real = worker_module.build_scorer

    def build_and_keep(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(worker_module, "build_scorer", build_and_keep)
    return built


@pytest.mark.parametrize("mode", ["inline", "thread", "process"])
def test_everything_drains_to_empty_when_the_engine_goes_idle(build, factory, tokenizer, mode, monkeypatch):
    """A deep queue with preemptions (a small KV cache), aborts of waiting, running and
    scored requests, and the online learner on. When the last request is gone, PARS holds
    nothing for any of them: the request book's maps are empty, every job the worker got
    was answered, and the online learner keeps no per-request record (it forgets each
    request when told it finished).

    The learner's records are read where they live: inline, on the scheduler's scorer; in
    a worker thread, on the scorer that thread built. A worker process's are in another
    interpreter, which exposes only counters: there every finished request must have been
    learned from (observed) and none may wait to be."""
    built = _capture_worker_scorers(monkeypatch) if mode == "thread" else []
    pars = {"ranker": spec(TaskRanker), "worker": mode, "min_queue": 1, "fallback": {"budget_s": None},
            "online": {"min_observations": 4}}
    sched = build(pars, virtual=mode == "inline", max_num_seqs=2, num_blocks=6)
    rng = np.random.default_rng(7)
    t0 = CLOCK.wall()
    reqs, aborted, results = [], [], []
    for wave in range(4):
        for i in range(6):
            n = int(rng.integers(1, 99))
            reqs.append(factory.make(ids_of(tokenizer, f"task {n} " + "word " * int(rng.integers(0, 12))),
                                     int(rng.integers(24, 60)), arrival_time=t0 + wave + i * 1e-3))
            sched.add_request(reqs[-1])
        for _ in range(3):
            results.append(step(sched))
        live = sorted(rid for rid, r in sched.requests.items() if not r.is_finished())
        gone = sched.finish_requests(live[:2], RequestStatus.FINISHED_ABORTED)  # waiting or running, scored or not
        aborted += [r.request_id for r in gone]
    results += run_until_idle(sched)
    assert any(r.preempted for r in results), "the KV cache was meant to force preemptions"
    assert sorted(finish_order(results)) == sorted(r.request_id for r in reqs if r.request_id not in aborted)
    assert sched._book.index_sizes() == EMPTY_BOOK  # at once, not after another step

    assert sched.wait_for_scores(60)  # every job sent was answered ...
    step(sched)  # ... and the next step reads the answers (the engine's next arrival would)
    assert sched.sync_worker(60)
    stats = sched.pars_stats()
    assert stats["worker"].get("in_flight", 0) == 0
    assert stats["requests_scored"] > 0 and stats["requests_fallback"] == 0
    online = stats["online"]
    if mode == "inline":
        assert sched._inline_online._records == {}
    else:  # every finished request taught the learner once (unscored ones embedded by sync_worker)
        assert online["observed"] == len(reqs) - len(aborted) and online["pending_unscored"] == 0
    if mode == "thread":
        (scorer,) = built
        assert scorer._records == {}
    assert_drained(sched)


def test_inline_fallbacks_leave_no_online_record(build, factory, tokenizer):
    """Inline, a NaN score is a per-request fallback (FCFS key for good); the learner scored
    the batch and keeps a record for each prompt in it, so it must hear that those requests
    finished too."""
    pars = {"ranker": spec(NaNRanker), "worker": "inline", "min_queue": 1, "fallback": {"budget_s": None}}
    sched = build(pars, max_num_seqs=1)
    for i, text in enumerate(["task 3", "nan task 1", "task 2", "nan task 4"]):
        sched.add_request(factory.make(ids_of(tokenizer, text), 2, arrival_time=CLOCK.wall() + i))
    run_until_idle(sched)
    assert sched.sync_worker(60)
    assert sched.pars_stats()["requests_fallback"] == 2
    assert sched._inline_online._records == {}
    assert_drained(sched)
