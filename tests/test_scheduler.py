"""PARSScheduler on a real vLLM V1 scheduler, driven without a model.

Each test builds vLLM's own ``Scheduler`` machinery from a real ``VllmConfig`` (the
tiny Llama folder; KV blocks sized per test) and loops ``schedule() -> fake model
output -> update_from_output()`` (``pars_fast.sim.harness``), as the engine core does.
Stub rankers are module attributes named ``f"{__name__}:Class"``, the same import
route a user's ranker takes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time

import numpy as np
import pytest
from transformers import AutoTokenizer
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from pars_fast.clock import VirtualClock
from pars_fast.queue import ScoredRequestQueue
from pars_fast.vllm import PARSAsyncScheduler, PARSConfig, PARSConfigError, PARSScheduler
from pars_fast.vllm.policy import MIN_FINISHES
from pars_fast.vllm.runtime import SchedulerRuntime
from pars_fast.vllm.scoring import PROMPT_DECODE_CAP
from pars_fast.sim.harness import (
    BatchQueue,
    RequestFactory,
    admission_order,
    finish_order,
    make_scheduler,
    make_vllm_config,
    run_until_idle,
    step,
)

# ---------------------------------------------------------------------- stub rankers


class NumberRanker:
    """Scores a prompt by the first integer in it; records every batch it is given."""

    calls: list[list[str]] = []

    def score(self, prompts: list[str]) -> np.ndarray:
        NumberRanker.calls.append(list(prompts))
        return np.array([_first_number(p) for p in prompts], dtype=np.float32)


def _first_number(text: str) -> float:
    match = re.search(r"\d+", text)
    return float(match.group()) if match else 0.0


class RaisingRanker:
    calls = 0

    def score(self, prompts: list[str]) -> np.ndarray:
        RaisingRanker.calls += 1
        raise RuntimeError("ranker exploded")


class NaNRanker:
    """NaN for prompts that say "nan", else the number in them."""

    def score(self, prompts: list[str]) -> np.ndarray:
        return np.array([math.nan if "nan" in p else _first_number(p) for p in prompts], dtype=np.float32)


class ShortRanker:
    """Returns one score too few."""

    def score(self, prompts: list[str]) -> np.ndarray:
        return np.zeros(len(prompts) - 1, dtype=np.float32)


# Simulated time for the tests that are about time (budgets, costs, shares): the scheduler
# reads it (``pars_runtime``), and the stub rankers below spend it instead of sleeping.
CLOCK = VirtualClock()


class SlowRanker:
    """Takes 0.2 s (simulated) per batch."""

    calls = 0

    def score(self, prompts: list[str]) -> np.ndarray:
        SlowRanker.calls += 1
        CLOCK.advance(0.2)
        return np.array([_first_number(p) for p in prompts], dtype=np.float32)


def spec(cls: type) -> str:
    return f"{__name__}:{cls.__name__}"


@pytest.fixture(autouse=True)
def _reset_stub_rankers():
    global CLOCK
    CLOCK = VirtualClock(1_000.0)
    NumberRanker.calls = []
    RaisingRanker.calls = 0
    SlowRanker.calls = 0


# ---------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


@pytest.fixture(scope="module")
def factory():
    return RequestFactory(block_size=16)


@pytest.fixture
def build(tiny_llama_dir):
    """build(cls, pars=None, virtual=False, **config) -> scheduler on the tiny Llama
    (``virtual``: on the simulated CLOCK instead of the machine's)."""

    def _build(cls=PARSScheduler, pars=None, virtual=False, **kwargs):
        extra = {"pars_runtime": SchedulerRuntime(clock=CLOCK)} if virtual else {}
        return make_scheduler(cls, make_vllm_config(tiny_llama_dir, pars=pars, **kwargs), **extra)

    return _build


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assert_empty(sched: Scheduler) -> None:
    assert not sched.has_requests()
    assert sched.get_num_unfinished_requests() == 0
    assert not sched.requests and not sched.running
    assert len(sched.waiting) == 0 and len(sched.kv_holding_waiting) == 0
    assert sched.kv_cache_manager.usage == 0.0


# ---------------------------------------------------------------------- order


@pytest.mark.parametrize("cls", [PARSScheduler, Scheduler], ids=["pars", "vllm-fcfs"])
def test_admission_follows_oracle_scores(build, factory, cls):
    """One slot: PARS admits shortest max_tokens first; vLLM's FCFS admits in arrival order."""
    sched = build(cls, pars={"ranker": "oracle"}, max_num_seqs=1)
    rng = random.Random(0)
    lengths = rng.sample(range(1, 60), 12)
    t0 = time.time()
    reqs = [factory.make([7] * rng.randint(1, 40), n, arrival_time=t0 + i * 1e-3) for i, n in enumerate(lengths)]
    for r in reqs:
        sched.add_request(r)
    results = run_until_idle(sched)
    by_length = [r.request_id for r in sorted(reqs, key=lambda r: r.max_tokens)]
    arrival = [r.request_id for r in reqs]
    assert admission_order(results) == (by_length if cls is PARSScheduler else arrival)
    assert sorted(finish_order(results)) == sorted(arrival)
    assert_empty(sched)


def test_queues_and_policy_replaced(build):
    sched = build(pars={"ranker": "oracle"})
    assert isinstance(sched.waiting, ScoredRequestQueue)
    assert isinstance(sched.kv_holding_waiting, ScoredRequestQueue)
    assert sched.policy == SchedulingPolicy.PRIORITY  # vLLM preempts the max-priority (longest) request


def test_text_ranker_sees_whole_prompts_decoded_by_the_served_tokenizer(build, factory, tokenizer):
    """The engine core has token ids only: they are decoded with the served model's tokenizer,
    whole (a ranker's cheap features read the whole text; its encoder cuts what it reads)."""
    sched = build(pars={"ranker": spec(NumberRanker), "worker": "inline", "fallback": {"budget_s": None}}, max_num_seqs=1)
    assert sched._decode_cap == PROMPT_DECODE_CAP
    sched._decode_cap = cap = 300  # small enough for the tiny model's context
    numbers = [5, 42, 17, 3, 29, 11]
    filler = " the quick brown fox jumps over the lazy dog" * 20
    reqs = [factory.make(prompt_ids(tokenizer, f"task {n} :{filler}"), 3) for n in numbers]
    huge = factory.make(prompt_ids(tokenizer, "task 99 " + "word " * (cap + 100)), 3)
    for r in [*reqs, huge]:
        sched.add_request(r)
    results = run_until_idle(sched)
    assert len(NumberRanker.calls) == 1  # one batch for the burst
    expected = [tokenizer.decode(r.prompt_token_ids, skip_special_tokens=True) for r in reqs]
    assert NumberRanker.calls[0][:-1] == expected
    assert 128 < len(reqs[0].prompt_token_ids) < cap  # more than an encoder reads
    # A huge prompt is decoded up to the cap only.
    assert NumberRanker.calls[0][-1] == tokenizer.decode(huge.prompt_token_ids[:cap], skip_special_tokens=True)
    assert len(huge.prompt_token_ids) > cap
    assert admission_order(results) == [r.request_id for _, r in sorted(zip(numbers + [99], reqs + [huge]), key=lambda p: p[0])]
    stats = sched.pars_stats()
    assert stats["requests_scored"] == len(reqs) + 1 and stats["requests_fallback"] == 0
    assert stats["decode_seconds"] > 0 and stats["scoring_seconds"] >= stats["decode_seconds"]
    assert_empty(sched)


def test_small_queues_stay_fcfs_until_min_queue(build, factory, tokenizer):
    """Ranking starts once min_queue requests wait beyond the free slots ("auto": twice
    max_num_seqs); a shallower queue keeps arrival order and costs no ranker call."""
    sched = build(pars={"ranker": spec(NumberRanker), "worker": "inline"}, max_num_seqs=2)
    assert sched.pars_stats()["min_queue"] == 4
    t0 = time.time()
    small = [factory.make(prompt_ids(tokenizer, f"n {n}"), 2, arrival_time=t0 + i * 1e-3) for i, n in enumerate([9, 5, 1, 7, 3])]
    for r in small:  # 5 waiting, 2 free: 3 beyond, under 4
        sched.add_request(r)
    results = run_until_idle(sched)
    assert NumberRanker.calls == [] and admission_order(results) == [r.request_id for r in small]
    deep = [factory.make(prompt_ids(tokenizer, f"n {n}"), 2, arrival_time=t0 + 1 + i * 1e-3) for i, n in enumerate([9, 5, 1, 7, 3, 8])]
    for r in deep:  # 6 waiting, 2 free: 4 beyond
        sched.add_request(r)
    results = run_until_idle(sched)
    assert sum(map(len, NumberRanker.calls)) == 6
    assert admission_order(results) == [r.request_id for _, r in sorted(zip([9, 5, 1, 7, 3, 8], deep), key=lambda p: p[0])]
    stats = sched.pars_stats()
    assert stats["requests_unranked"] == 5 and stats["requests_scored"] == 6
    assert_empty(sched)


def test_prompt_weight_adds_the_prompts_cost_to_the_score(build, factory, tokenizer):
    """prompt_weight w keys a request by score + w * log2(prompt tokens): a long prompt
    queues behind a short one with a slightly higher score. Before its score comes, the
    mean score plus the same term, so the prompt orders unscored requests too."""
    numbers, fillers = [1, 2, 3], [120, 20, 0]  # low scores on long prompts
    t0 = time.time()

    def order(weight: float, min_queue: int = 1) -> tuple[list[int], PARSScheduler]:
        sched = build(
            pars={"ranker": spec(NumberRanker), "worker": "inline", "fallback": {"budget_s": None},
                  "min_queue": min_queue, "prompt_weight": weight, "aging": 0},
            max_num_seqs=1,
        )
        reqs = [
            factory.make(prompt_ids(tokenizer, f"n {n}" + " x" * k), 2, arrival_time=t0 + i * 1e-3)
            for i, (n, k) in enumerate(zip(numbers, fillers))
        ]
        holder = factory.make(prompt_ids(tokenizer, "n 0"), 2, arrival_time=t0 - 1)  # holds the one slot
        for r in [holder, *reqs]:
            sched.add_request(r)
        ids = admission_order(run_until_idle(sched))
        assert ids[0] == holder.request_id
        return [numbers[[r.request_id for r in reqs].index(i)] for i in ids[1:]], sched

    assert order(0.0)[0] == [1, 2, 3]  # the score alone
    got, sched = order(1.0)  # log2 tokens ~ 7, 4.5, 1.6: keys ~ 8, 6.5, 4.6
    assert got == [3, 2, 1]
    assert sched.pars_stats()["requests_scored"] == 4  # with the holder
    assert sched.pars_stats()["prompt_weight"] == 1.0
    assert_empty(sched)
    # Never ranked (min_queue not reached): arrival order for w = 0, prompt order for w > 0.
    got, sched = order(0.0, min_queue=50)
    assert got == [1, 2, 3] and sched.pars_stats()["requests_scored"] == 0
    got, sched = order(1.0, min_queue=50)
    assert got == [3, 2, 1] and sched.pars_stats()["requests_scored"] == 0


def test_prompt_weight_leaves_the_reference_rankers_pure(build, factory):
    """Oracle SJF stays the output-length reference whatever prompt_weight says."""
    sched = build(pars={"ranker": "oracle", "prompt_weight": 5.0}, max_num_seqs=1)
    assert sched.pars_stats()["prompt_weight"] == 0
    t0 = time.time()
    reqs = [factory.make([3] * p, n, arrival_time=t0 + i * 1e-3) for i, (p, n) in enumerate([(2, 9), (60, 3), (30, 6)])]
    for r in reqs:
        sched.add_request(r)
    assert admission_order(run_until_idle(sched)) == [reqs[1].request_id, reqs[2].request_id, reqs[0].request_id]
    assert_empty(sched)


@pytest.mark.parametrize("mode, expected", [("inline", 6), ("thread", 6), ("process", 1)])
def test_auto_min_queue_follows_where_the_ranker_runs(build, mode, expected):
    """In a worker process ranking costs the engine nothing, so "auto" ranks any backlog;
    where it takes the engine core's time, only a backlog of two full batches."""
    sched = build(pars={"ranker": spec(NumberRanker), "worker": mode}, max_num_seqs=3)
    try:
        assert sched.pars_stats()["min_queue"] == expected
        assert sched.pars_stats()["worker"]["mode"] == mode
    finally:
        sched.shutdown()


def test_one_batch_per_step_and_nothing_for_scored_requests(build, factory, tokenizer):
    sched = build(pars={"ranker": spec(NumberRanker), "worker": "inline", "fallback": {"budget_s": None}}, max_num_seqs=1)
    for n in range(10):
        sched.add_request(factory.make(prompt_ids(tokenizer, f"number {n}"), 4))
    step(sched)
    assert [len(c) for c in NumberRanker.calls] == [10]
    for _ in range(5):  # no arrivals: the ranker is not called again
        step(sched)
    assert len(NumberRanker.calls) == 1
    for n in range(3):
        sched.add_request(factory.make(prompt_ids(tokenizer, f"number {n}"), 4))
    step(sched)
    assert [len(c) for c in NumberRanker.calls] == [10, 3]
    run_until_idle(sched)
    assert sched.pars_stats()["batches"] == 2
    assert_empty(sched)


def test_score_batch_max_caps_each_batch(build, factory, tokenizer):
    sched = build(pars={"ranker": spec(NumberRanker), "worker": "inline", "fallback": {"budget_s": None}, "score_batch_max": 4}, max_num_seqs=1)
    for n in range(10):
        sched.add_request(factory.make(prompt_ids(tokenizer, f"number {n}"), 2))
    step(sched)
    assert [len(c) for c in NumberRanker.calls] == [4, 4, 2]  # no budget: all of them, before the step
    run_until_idle(sched)
    assert sched.pars_stats()["requests_scored"] == 10
    assert_empty(sched)


class TimedRanker:
    """Takes ``SECONDS_PER_PROMPT`` (simulated) per prompt."""

    SECONDS_PER_PROMPT = 0.01
    calls: list[int] = []

    def score(self, prompts: list[str]) -> np.ndarray:
        TimedRanker.calls.append(len(prompts))
        CLOCK.advance(self.SECONDS_PER_PROMPT * len(prompts))
        return np.array([_first_number(p) for p in prompts], dtype=np.float32)


def test_inline_budget_bounds_what_ranking_adds_to_a_step(build, factory, tokenizer):
    """budget_s: each step scores what fits (chunks sized from the measured cost per
    prompt); the rest wait, unscored, for the next step. Nothing is dropped.

    At 10 ms a prompt and budget_s 0.1, the first step scores chunks of 1 (the cost is
    not known yet), 4, 2, 1, 1 prompts: 90 ms; each later step 5 + 2 + 1 + 1 (half of
    what is left, each time)."""
    TimedRanker.calls = []
    budget = 0.1
    pars = {"ranker": spec(TimedRanker), "worker": "inline", "fallback": {"budget_s": budget, "max_share": None}}
    sched = build(pars=pars, virtual=True, max_num_seqs=1)
    reqs = [factory.make(prompt_ids(tokenizer, f"n {n}"), 1) for n in range(60)]
    for r in reqs:
        sched.add_request(r)
    step_ranking_s = []
    results = []
    while sched.has_requests():
        start = CLOCK.now()
        results.append(step(sched))
        if CLOCK.now() > start:
            step_ranking_s.append(CLOCK.now() - start)
    assert TimedRanker.calls[:9] == [1, 4, 2, 1, 1, 5, 2, 1, 1]
    assert step_ranking_s[:2] == pytest.approx([0.09, 0.09])
    assert max(step_ranking_s) <= budget
    stats = sched.pars_stats()
    # The last few were admitted with nothing left behind them: no score needed.
    assert stats["requests_scored"] == sum(TimedRanker.calls) >= 50 and stats["requests_fallback"] == 0
    assert stats["requests_scored"] + stats["requests_unranked"] == 60
    assert sorted(finish_order(results)) == sorted(r.request_id for r in reqs)
    assert_empty(sched)


class ColdStartRanker:
    """Its first call is slow (a cold start: 80 ms), every later prompt costs 2 ms (simulated)."""

    calls: list[int] = []

    def score(self, prompts: list[str]) -> np.ndarray:
        CLOCK.advance(0.08 if not ColdStartRanker.calls else 0.002 * len(prompts))
        ColdStartRanker.calls.append(len(prompts))
        return np.array([_first_number(p) for p in prompts], dtype=np.float32)


def test_one_slow_first_call_does_not_keep_the_ranker_out(build, factory, tokenizer):
    """A cold first prompt measured at 80 ms, over half of budget_s = 0.1: one prompt still
    fits a step, so the scheduler scores it, the cost estimate comes down, and the queue
    is ranked (it used to stay FCFS for good)."""
    ColdStartRanker.calls = []
    pars = {"ranker": spec(ColdStartRanker), "worker": "inline", "fallback": {"budget_s": 0.1, "max_share": None}}
    sched = build(pars=pars, virtual=True, max_num_seqs=1)
    reqs = [factory.make(prompt_ids(tokenizer, f"n {n}"), 1) for n in range(40)]
    for r in reqs:
        sched.add_request(r)
    results = run_until_idle(sched)
    # 80 ms, then one prompt (estimate 80 ms: one fits the next step), then chunks grow as
    # the estimate (an EWMA) falls: 0.8 * 0.08 + 0.2 * 0.002 = 0.0644 s, ...
    assert ColdStartRanker.calls[:3] == [1, 1, 1] and max(ColdStartRanker.calls) >= 3
    assert sched.pars_stats()["requests_scored"] >= 30 and sched.pars_stats()["lockout_steps"] == 0
    assert sorted(finish_order(results)) == sorted(r.request_id for r in reqs)
    assert_empty(sched)


class StallOnceRanker:
    """Its first call stalls 0.6 s (simulated), every later prompt costs 2 ms."""

    calls: list[int] = []

    def score(self, prompts: list[str]) -> np.ndarray:
        CLOCK.advance(0.6 if not StallOnceRanker.calls else 0.002 * len(prompts))
        StallOnceRanker.calls.append(len(prompts))
        return np.array([_first_number(p) for p in prompts], dtype=np.float32)


def test_one_stall_over_the_budget_does_not_lock_the_ranker_out_for_good(build, factory, tokenizer, caplog):
    """The first prompt took 0.6 s, six times budget_s: the estimate says no prompt fits any
    step, so nothing would ever re-measure it. A probe (one prompt, its cost replacing the
    estimate) does; then the queue is ranked again. The stall itself is over the 3x-budget
    time limit, so the ranker first rests retry_after_s (arrivals then keep FCFS keys)."""
    StallOnceRanker.calls = []
    pars = {"ranker": spec(StallOnceRanker), "worker": "inline",
            "fallback": {"budget_s": 0.1, "max_share": None, "retry_after_s": 1.0}}
    sched = build(pars=pars, virtual=True, max_num_seqs=1)
    reqs, results = [], []
    with caplog.at_level(logging.WARNING, logger="pars_fast"):
        for i in range(150):  # two arrivals a step, one admitted: the queue deepens
            for _ in range(2):
                reqs.append(factory.make(prompt_ids(tokenizer, f"n {len(reqs)}"), 1, arrival_time=CLOCK.wall()))
                sched.add_request(reqs[-1])
            results.append(step(sched))
            CLOCK.advance(0.05)  # the model's step
        results += run_until_idle(sched)
    stats = sched.pars_stats()
    assert StallOnceRanker.calls[:2] == [1, 1]  # the stall, then (rest over) the probe
    assert stats["lockout_steps"] == 1 and stats["probes"] == 1
    assert stats["requests_scored"] > 100  # ranking came back
    assert stats["fallback_reasons"]["over time limit"] == 1 and stats["fallback_reasons"]["cool-down"] > 0
    assert sorted(finish_order(results)) == sorted(r.request_id for r in reqs)
    assert_empty(sched)


@pytest.mark.parametrize("max_share", [0.1, None])
def test_max_share_stops_ranking_that_costs_more_than_it_can_gain(build, factory, tokenizer, max_share):
    """fallback.max_share: once the engine's seconds per finished request are known, a
    ranker whose prompt costs more than max_share of that stops scoring inline: the queue
    is served in FCFS order, nothing lost. Without the cap it scores every waiting request."""
    TimedRanker.calls = []
    pars = {"ranker": spec(TimedRanker), "worker": "inline", "min_queue": 1,
            "fallback": {"budget_s": 0.05, "max_share": max_share}}
    sched = build(pars=pars, virtual=True, max_num_seqs=1)
    reqs = [factory.make(prompt_ids(tokenizer, f"n {n}"), 1) for n in range(200)]
    for r in reqs:
        sched.add_request(r)
    results = []
    while sched.has_requests():  # a request per step: 10 ms of "model" each, 10 ms per prompt ranked
        results.append(step(sched))
        CLOCK.advance(0.01)
    stats = sched.pars_stats()
    # Under the 50 ms budget a step ranks 4 prompts (1 + 2 + 1, then 2 + 1 + 1).
    if max_share is None:
        # All but those admitted (at the mean score) before their turn to be scored came.
        assert stats["share_limited_steps"] == 0 and stats["requests_scored"] >= 150
    else:  # ranked until MIN_FINISHES measured the engine (10 ms a request: 1 ms allowed), then FCFS
        assert 0 < stats["requests_scored"] <= 4 * (MIN_FINISHES + 1) and stats["share_limited_steps"] > 100
    assert stats["requests_scored"] + stats["requests_unranked"] == 200 and stats["requests_fallback"] == 0
    # Idle, the engine measures afresh: the next burst is ranked again (and warm-ups or an
    # earlier workload never decide for the next one).
    more = [factory.make(prompt_ids(tokenizer, f"n {n}"), 1) for n in range(4)]
    for r in more:
        sched.add_request(r)
    results += run_until_idle(sched)
    assert sched.pars_stats()["requests_scored"] > stats["requests_scored"]
    assert sorted(finish_order(results)) == sorted(r.request_id for r in reqs + more)
    assert_empty(sched)


class ThreadCountingRanker:
    """Records torch's intra-op thread count while it scores."""

    seen: list[int] = []

    def score(self, prompts: list[str]) -> np.ndarray:
        import torch

        ThreadCountingRanker.seen.append(torch.get_num_threads())
        return np.zeros(len(prompts), dtype=np.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_ranker_scores_with_the_configured_threads_and_restores_torch(build, factory, tokenizer, threads):
    import torch

    ThreadCountingRanker.seen = []
    before = torch.get_num_threads()
    sched = build(pars={"ranker": spec(ThreadCountingRanker), "worker": "inline", "fallback": {"budget_s": None}, "min_queue": 1, "threads": threads}, max_num_seqs=1)
    for text in ("hello", "world"):  # two for one slot: their order matters, so they are scored
        sched.add_request(factory.make(prompt_ids(tokenizer, text), 2))
    step(sched)
    assert ThreadCountingRanker.seen == [threads]
    assert torch.get_num_threads() == before  # the engine process keeps its own setting
    run_until_idle(sched)
    assert_empty(sched)


def test_client_priority_does_not_override_scores(build, factory):
    sched = build(pars={"ranker": "oracle"}, max_num_seqs=1)
    t0 = time.time()
    long_vip = factory.make([1] * 8, 50, arrival_time=t0, priority=-1000)
    short = factory.make([1] * 8, 2, arrival_time=t0 + 1e-3)
    sched.add_request(long_vip)
    sched.add_request(short)
    assert admission_order(run_until_idle(sched)) == [short.request_id, long_vip.request_id]


# ---------------------------------------------------------------------- aborts and counts


def test_unscored_requests_are_counted_and_abortable(build, factory, tokenizer):
    sched = build(pars={"ranker": spec(NumberRanker), "worker": "inline", "fallback": {"budget_s": None}, "min_queue": 1}, max_num_seqs=2)
    reqs = [factory.make(prompt_ids(tokenizer, f"job {n}"), 3) for n in range(6)]
    for r in reqs:
        sched.add_request(r)
    # Not scored yet, but vLLM already counts them.
    assert sched.get_request_counts() == (0, 6)
    assert sched.get_num_unfinished_requests() == 6 and sched.has_requests()
    aborted = sched.finish_requests([reqs[1].request_id, reqs[4].request_id], RequestStatus.FINISHED_ABORTED)
    assert {r.request_id for r in aborted} == {reqs[1].request_id, reqs[4].request_id}
    assert sched.get_num_unfinished_requests() == 4
    results = run_until_idle(sched)
    assert NumberRanker.calls == [[f"job {n}" for n in (0, 2, 3, 5)]]  # aborted ones never scored
    assert sorted(finish_order(results)) == sorted(r.request_id for i, r in enumerate(reqs) if i not in (1, 4))
    assert_empty(sched)


# ---------------------------------------------------------------------- fallback


def test_raising_ranker_falls_back_to_fcfs(build, factory, tokenizer, caplog):
    sched = build(pars={"ranker": spec(RaisingRanker), "worker": "inline", "fallback": {"budget_s": None, "retry_after_s": 0}}, max_num_seqs=1)
    rng = random.Random(1)
    t0 = time.time()
    reqs, results = [], []
    with caplog.at_level(logging.WARNING, logger="pars_fast"):
        for _ in range(3):  # three batches, three ranker failures
            for _ in range(4):
                r = factory.make(prompt_ids(tokenizer, f"n {rng.randint(0, 99)}"), 3, arrival_time=t0 + len(reqs) * 1e-3)
                reqs.append(r)
                sched.add_request(r)
            results.append(step(sched))
        results += run_until_idle(sched)
    assert RaisingRanker.calls == 3
    assert sorted(finish_order(results)) == sorted(r.request_id for r in reqs)
    stats = sched.pars_stats()
    assert stats["requests_fallback"] == 12 and stats["requests_scored"] == 0
    assert stats["failed_batches"] == 3 and stats["fallback_reasons"] == {"error": 12}
    assert "ranker exploded" in stats["last_fallback_reason"]
    warnings = [r for r in caplog.records if "falling back to FCFS" in r.getMessage()]
    assert len(warnings) == 1 and "ranker exploded" in warnings[0].getMessage()
    assert_empty(sched)


def test_raising_ranker_serves_in_arrival_order(build, factory, tokenizer):
    sched = build(pars={"ranker": spec(RaisingRanker), "worker": "inline"}, max_num_seqs=1)
    t0 = time.time()
    numbers = [50, 3, 20, 7, 90, 1, 33]
    reqs = [factory.make(prompt_ids(tokenizer, f"n {n}"), 2, arrival_time=t0 + i * 1e-3) for i, n in enumerate(numbers)]
    for r in reqs:
        sched.add_request(r)
    results = run_until_idle(sched)
    assert admission_order(results) == [r.request_id for r in reqs]
    assert finish_order(results) == [r.request_id for r in reqs]
    assert_empty(sched)


def test_nan_scores_fall_back_per_request(build, factory, tokenizer):
    sched = build(pars={"ranker": spec(NaNRanker), "worker": "inline"}, max_num_seqs=1)
    texts = ["n 30", "nan 1", "n 10", "n 20", "nan 2"]
    t0 = time.time()
    reqs = [factory.make(prompt_ids(tokenizer, t), 2, arrival_time=t0 + i * 1e-3) for i, t in enumerate(texts)]
    for r in reqs:
        sched.add_request(r)
    order = admission_order(run_until_idle(sched))
    ids = {t: r.request_id for t, r in zip(texts, reqs)}
    # Scored ones by score; the NaN ones keep FCFS order, placed at the mean score (20).
    scored = [o for o in order if o not in (ids["nan 1"], ids["nan 2"])]
    assert scored == [ids["n 10"], ids["n 20"], ids["n 30"]]
    assert order.index(ids["nan 1"]) < order.index(ids["nan 2"])
    stats = sched.pars_stats()
    assert stats["requests_scored"] == 3 and stats["requests_fallback"] == 2
    assert stats["fallback_reasons"] == {"non-finite": 2} and stats["failed_batches"] == 0
    assert_empty(sched)


def test_wrong_length_output_falls_back(build, factory, tokenizer):
    sched = build(pars={"ranker": spec(ShortRanker), "worker": "inline", "fallback": {"budget_s": None}}, max_num_seqs=1)
    t0 = time.time()
    reqs = [factory.make(prompt_ids(tokenizer, f"n {n}"), 2, arrival_time=t0 + i * 1e-3) for i, n in enumerate([9, 1, 5])]
    for r in reqs:
        sched.add_request(r)
    assert admission_order(run_until_idle(sched)) == [r.request_id for r in reqs]
    stats = sched.pars_stats()
    assert stats["fallback_reasons"] == {"bad output": 3} and "shape" in stats["last_fallback_reason"]


def test_over_budget_batch_falls_back_then_ranker_rests(build, factory, tokenizer):
    pars = {"ranker": spec(SlowRanker), "worker": "inline", "fallback": {"budget_s": 0.05, "retry_after_s": 600}}
    sched = build(pars=pars, virtual=True, max_num_seqs=1)
    t0 = CLOCK.wall()
    first = [factory.make(prompt_ids(tokenizer, f"n {n}"), 2, arrival_time=t0 + i * 1e-3) for i, n in enumerate([9, 1, 5])]
    for r in first:
        sched.add_request(r)
    step(sched)
    later = [factory.make(prompt_ids(tokenizer, f"n {n}"), 2, arrival_time=t0 + 1 + i * 1e-3) for i, n in enumerate([4, 2])]
    for r in later:
        sched.add_request(r)
    results = run_until_idle(sched)
    assert SlowRanker.calls == 1  # the second batch is not sent to a ranker that just failed
    stats = sched.pars_stats()
    # The first chunk (one prompt: its cost is not known yet) ran over; the rest went FCFS.
    assert stats["fallback_reasons"] == {"over time limit": 1, "cool-down": 4}
    assert [first[0].request_id] + admission_order(results) == [r.request_id for r in first + later]


def test_on_error_raise_propagates(build, factory, tokenizer):
    sched = build(pars={"ranker": spec(RaisingRanker), "worker": "inline", "min_queue": 1, "fallback": {"on_error": "raise"}}, max_num_seqs=1)
    for n in (1, 2):
        sched.add_request(factory.make(prompt_ids(tokenizer, f"n {n}"), 2))
    with pytest.raises(RuntimeError, match="ranker exploded"):
        sched.schedule()


# ---------------------------------------------------------------------- preemption


@pytest.mark.parametrize("cls", [PARSScheduler, Scheduler], ids=["pars", "vllm-fcfs"])
def test_preemption_evicts_longest_predicted(build, factory, cls):
    """Long request A runs first, short B joins; when KV runs out PARS evicts A, vLLM FCFS evicts B."""
    sched = build(cls, pars={"ranker": "oracle"}, max_num_seqs=4, num_blocks=7, block_size=16)
    t0 = time.time()
    a = factory.make([3] * 16, 60, arrival_time=t0)
    b = factory.make([4] * 16, 40, arrival_time=t0 + 1e-3)
    sched.add_request(a)
    results = [step(sched)]
    sched.add_request(b)
    results += run_until_idle(sched)
    preempted = [rid for r in results for rid in r.preempted]
    assert preempted, "the KV cache was meant to run out"
    assert preempted[0] == (a.request_id if cls is PARSScheduler else b.request_id)
    assert sorted(finish_order(results)) == sorted([a.request_id, b.request_id])
    assert_empty(sched)


# ---------------------------------------------------------------------- soak


def _check_invariants(sched: Scheduler) -> None:
    running = {r.request_id for r in sched.running}
    waiting = [r.request_id for r in sched.waiting]
    holding = [r.request_id for r in sched.kv_holding_waiting]
    queued = waiting + holding
    assert len(queued) == len(set(queued)), "a request is queued twice"
    assert not running & set(queued), "a request is both running and waiting"
    assert running | set(queued) == set(sched.requests), "a request is lost or a stranger is queued"
    assert len(sched.waiting) == len(waiting) and len(sched.kv_holding_waiting) == len(holding)


@pytest.mark.parametrize(
    "cls,pars,events",
    [
        (PARSScheduler, {"ranker": "oracle", "score_batch_max": 3}, 4000),
        (PARSScheduler, {"ranker": spec(NumberRanker), "worker": "inline"}, 2000),
        (PARSScheduler, {"ranker": spec(NumberRanker), "worker": "thread"}, 2000),
        (PARSAsyncScheduler, {"ranker": "oracle"}, 1500),
    ],
    ids=["oracle", "text-ranker", "text-ranker-worker", "async"],
)
def test_random_soak_nothing_lost_or_duplicated(tiny_llama_dir, factory, tokenizer, cls, pars, events):
    """Random adds, aborts, external finishes and steps on a small KV cache (so preemption
    happens); the async variant keeps two steps in flight (vLLM's batch queue), so aborts
    and finishes land between a step's scheduling and its output.

    Exact accounting at the end: every request ends once (served, stopped from outside or
    aborted), and once in PARS's counters: scored, a fallback, unranked (finished without
    a score), or skipped (its job was cancelled before the worker reached it). Every score
    the ranker produced was applied to its request, or dropped because it came back after
    the request was gone."""
    vllm_config = make_vllm_config(
        tiny_llama_dir, pars=pars, max_num_seqs=6, num_blocks=24, block_size=16, async_scheduling=cls is PARSAsyncScheduler
    )
    sched = make_scheduler(PARSScheduler, vllm_config)
    assert type(sched) is cls
    engine = BatchQueue(sched, size=2 if cls is PARSAsyncScheduler else 1)
    rng = random.Random(1234)
    added: list[str] = []
    served: list[str] = []  # finished by the engine
    stopped: list[str] = []  # finished by finish_requests(FINISHED_STOPPED)
    aborted: list[str] = []
    live: set[str] = set()
    num_preempted = 0

    def finish(ids: list[str], status: RequestStatus, into: list[str]) -> None:
        done = [r.request_id for r in sched.finish_requests(ids, status)]
        into.extend(done)
        live.difference_update(done)

    def note(res) -> None:
        nonlocal num_preempted
        num_preempted += len(res.preempted)
        served.extend(rid for rid, _ in res.finished)
        live.difference_update(rid for rid, _ in res.finished)

    for _ in range(events):
        roll = rng.random()
        if roll < 0.2:
            # Outputs long against 23 usable blocks of 16 tokens: running requests outgrow the cache.
            text = f"task {rng.randint(0, 500)} " + "word " * rng.randint(0, 20)
            r = factory.make(prompt_ids(tokenizer, text), rng.randint(1, 160))
            sched.add_request(r)
            added.append(r.request_id)
            live.add(r.request_id)
        elif roll < 0.27 and live:
            finish([rng.choice(sorted(live))], RequestStatus.FINISHED_ABORTED, aborted)
        elif roll < 0.30 and live:
            finish([rng.choice(sorted(live))], RequestStatus.FINISHED_STOPPED, stopped)
        else:
            note(engine.step())
            _check_invariants(sched)
    for res in engine.run_until_idle():
        note(res)
    assert num_preempted > 0, "the KV cache was meant to force preemptions"
    assert engine.max_in_flight == engine.size
    ended = served + stopped + aborted
    assert len(ended) == len(set(ended)), "a request ended twice"
    assert sorted(served + stopped) == sorted(set(added) - set(aborted)), "a request never finished"
    assert len(ended) == len(added) and aborted and stopped

    assert sched.wait_for_scores(60)  # the worker answered every job: scores, or "skipped" for cancelled ones
    step(sched)  # an empty step reads those answers (the next arrival's step would)
    assert sched.sync_worker(60)
    stats = sched.pars_stats()
    assert stats["requests_fallback"] == 0 and stats["requests_scored"] > 0
    assert (
        stats["requests_scored"] + stats["requests_fallback"] + stats["requests_unranked"] + stats["requests_skipped"]
        == len(added)
    ), "a request was counted twice, or not at all"
    assert stats["scores_applied"] + stats["scores_late"] == stats["requests_scored"]
    # A request freed with its job at the worker cancels the job: skipped, or its score is late.
    assert stats["requests_skipped"] + stats["scores_late"] == stats["worker"].get("jobs_cancelled", 0)
    assert stats["worker"].get("in_flight", 0) == 0
    assert sched._book.index_sizes() == {"records": 0, "waiting_unscored": 0, "running_unscored": 0}
    assert_empty(sched)
    sched.shutdown()


def test_aging_bounds_the_wait_of_a_long_request(build, factory):
    """A long request against a steady stream of short ones: starved without aging, bounded with it."""
    long_len, short_len, dt, horizon = 40, 2, 1.0, 400  # dt: simulated seconds between arrivals

    def first_admission(aging: float) -> int | None:
        sched = build(pars={"ranker": "oracle", "aging": aging}, max_num_seqs=1)
        t0 = time.time()
        long_req = factory.make([5] * 8, long_len, arrival_time=t0)
        sched.add_request(long_req)
        for i in range(horizon):  # one short arrival per step, faster than one slot serves them
            sched.add_request(factory.make([6] * 8, short_len, arrival_time=t0 + (i + 1) * dt))
            if long_req.request_id in step(sched).admitted:
                return i
        return None

    assert first_admission(0.0) is None  # no aging: starved for the whole horizon
    # Aging 1.0/s: short i (score 2, arrives at i + 1 s) is ahead of the long one (score 40,
    # at 0 s) while 2 + (i + 1) < 40, i.e. for i = 0..36; short 37 ties and loses on arrival
    # time. Each short holds the one slot for 2 steps, so the 37 of them fill steps 0..73.
    assert first_admission(1.0) == 74


# ---------------------------------------------------------------------- async, config, stats


def test_async_scheduling_picks_async_variant(build, factory):
    sched = build(pars={"ranker": "oracle"}, max_num_seqs=1, async_scheduling=True)
    assert isinstance(sched, PARSAsyncScheduler) and isinstance(sched, AsyncScheduler)
    assert isinstance(build(pars={"ranker": "oracle"}), PARSScheduler)
    assert not isinstance(build(pars={"ranker": "oracle"}), AsyncScheduler)
    t0 = time.time()
    reqs = [factory.make([2] * 5, n, arrival_time=t0 + i * 1e-3) for i, n in enumerate([9, 3, 6])]
    for r in reqs:
        sched.add_request(r)
    assert admission_order(run_until_idle(sched)) == [reqs[1].request_id, reqs[2].request_id, reqs[0].request_id]
    assert_empty(sched)


@pytest.mark.parametrize(
    "pars,match",
    [
        ({"ranker": "oracle", "agin": 1}, r"unknown key\(s\) \['agin'\]"),
        ({"ranker": "/nonexistent/ranker"}, "ranker folder not found: '/nonexistent/ranker'"),
        ({"ranker": "oracle", "aging": "fast"}, r'\["aging"\]: expected a number'),
        ({"ranker": "oracle", "prompt_weight": -1}, r'\["prompt_weight"\]'),
        ({"ranker": "oracle", "score_batch_max": 0}, "positive integer"),
        ({"ranker": "oracle", "threads": 0}, r'\["threads"\]: expected a positive integer'),
        ({"ranker": "oracle", "fallback": {"budget": 1}}, r"fallback.*unknown key"),
        ({"ranker": "no_such_module_xyz:Ranker"}, "cannot import 'no_such_module_xyz'"),
        ({"ranker": f"{__name__}:NoSuchRanker"}, "has no attribute 'NoSuchRanker'"),
        ({"ranker": "oracle", "stats_file": "/tmp/{rank}.json"}, r"only \{pid\} and \{dp_rank\}"),
        ({"ranker": "oracle", "worker": "gpu"}, r'\["worker"\]: expected one of'),
        ({"ranker": "oracle", "device": "tpu"}, r'\["device"\]: expected'),
        ({"ranker": "oracle", "cpus": []}, r'\["cpus"\]: expected'),
        ({"ranker": "oracle", "cpus": "1-x"}, r'\["cpus"\]: expected'),
        ({"ranker": "oracle", "nice": 40}, r"niceness in 0..19"),
        ({"ranker": "oracle", "fallback": {"deadline_s": 0}}, r"deadline_s: expected a number > 0"),
        ({"ranker": "oracle", "min_queue": 0}, r'\["min_queue"\]: expected a positive integer'),
    ],
)
def test_bad_config_fails_when_the_scheduler_is_built(build, pars, match):
    with pytest.raises(PARSConfigError, match=match):
        build(pars=pars)


def test_config_precedence_and_env_mirror():
    env = {"PARS_FAST_RANKER": "oracle", "PARS_FAST_AGING": "0.5", "PARS_FAST_FALLBACK": '{"budget_s": 2}'}
    config = PARSConfig.from_sources({"aging": 0.25}, env)
    assert config.ranker == "oracle" and config.aging == 0.25  # the dict wins over the environment
    assert config.fallback.budget_s == 2.0 and config.fallback.on_error == "fcfs"
    assert PARSConfig.from_sources({}, {}).ranker == "default"
    assert PARSConfig.from_sources({}, {}).threads == 1
    assert PARSConfig.from_sources({}, {}).device == "cpu"  # even where CUDA is available: GPU memory is vLLM's
    assert PARSConfig.from_sources({}, {"PARS_FAST_DEVICE": "auto"}).device == "auto"
    assert PARSConfig.from_sources({}, {"PARS_FAST_THREADS": "2"}).threads == 2
    assert PARSConfig.from_sources({"threads": None}, {"PARS_FAST_THREADS": "2"}).threads is None
    with pytest.raises(PARSConfigError, match="PARS_FAST_SCORE_BATCH_MAX"):
        PARSConfig.from_sources({}, {"PARS_FAST_SCORE_BATCH_MAX": "many"})
    with pytest.raises(PARSConfigError, match="must be an object"):
        PARSConfig.from_sources("oracle", {})  # type: ignore[arg-type]
    assert PARSConfig.from_sources(PARSConfig(ranker="oracle").to_dict(), {}) == PARSConfig(ranker="oracle")
    assert PARSConfig.from_sources({"cpus": "1,3-4"}, {}).cpus == (1, 3, 4)
    assert PARSConfig.from_sources({"cpus": [2, 0]}, {}).cpus == (0, 2)
    # Where scoring runs: model-free rankers inline, text rankers in a worker process.
    assert PARSConfig(ranker="oracle").worker_mode() == "inline"
    assert PARSConfig(ranker="prompt-length").worker_mode() == "inline"
    assert PARSConfig(ranker="default").worker_mode() == "process"  # spare CPUs unknown (a GPU server)
    assert PARSConfig(ranker="default").worker_mode(spare_cpus=True) == "process"
    assert PARSConfig(ranker="default").worker_mode(spare_cpus=False) == "inline"  # CPU backend, no spare core
    assert PARSConfig(ranker="default", worker="thread").worker_mode(spare_cpus=False) == "thread"


def test_stats_file_tracks_the_counters(build, factory, tmp_path):
    path = tmp_path / "stats" / "pars-{dp_rank}.json"
    written = tmp_path / "stats" / "pars-0.json"
    sched = build(pars={"ranker": "oracle", "stats_file": str(path)}, max_num_seqs=1)
    start = json.loads(written.read_text())  # written at start-up
    assert start["requests_scored"] == 0 and start["ranker"] == "oracle" and start["worker"] == {"mode": "inline"}
    for n in (5, 2, 9):
        sched.add_request(factory.make([1] * 4, n))
    step(sched)  # within STATS_FILE_INTERVAL_S of the last write: not rewritten yet
    assert json.loads(written.read_text())["requests_scored"] == 0
    sched._next_stats_write = 0.0  # as if STATS_FILE_INTERVAL_S had passed
    step(sched)
    mid = json.loads(written.read_text())
    assert mid["requests_scored"] == 3 and mid["batches"] == 1 and mid["num_running"] == 1
    sched._next_stats_write = math.inf
    run_until_idle(sched)  # the last finish rewrites it, interval or not
    final = json.loads(written.read_text())
    assert final["num_waiting"] == 0 and final["num_running"] == 0 and final["requests_scored"] == 3
    assert final["time"] > mid["time"]
    sched.shutdown()


# ---------------------------------------------------------------------- pars-fast serve (no server)


def _serve_args(argv: list[str]):
    import argparse

    from pars_fast import serve

    parser = argparse.ArgumentParser(prog="pars-fast serve")
    serve.configure_parser(parser)
    return parser.parse_args(argv)


def test_serve_merges_pars_options_into_vllm_args():
    from pars_fast.serve import SCHEDULER_CLS, build_vllm_argv

    args = _serve_args(
        [
            "--model", "M", "--ranker", "oracle", "--max-num-seqs", "4",
            "--additional-config", '{"other": 1, "pars": {"aging": 0.5, "ranker": "prompt-length"}}',
            "--pars-fallback", '{"budget_s": 2}', "--port", "8123",
        ]
    )  # fmt: skip
    argv = build_vllm_argv(args)
    assert argv[:6] == ["--model", "M", "--max-num-seqs", "4", "--port", "8123"]  # vLLM's own, untouched
    assert argv[argv.index("--scheduler-cls") + 1] == SCHEDULER_CLS
    extra = json.loads(argv[argv.index("--additional-config") + 1])
    assert extra["other"] == 1
    pars = extra["pars"]
    assert set(pars) == {"aging", "ranker", "fallback"}
    assert pars["aging"] == 0.5 and pars["ranker"] == "oracle"  # a flag wins over --additional-config
    assert pars["fallback"]["budget_s"] == 2.0
    # The engine reads what the user asked for: the flag's budget, every other fallback key as if unset.
    asked = PARSConfig.from_sources({"aging": 0.5, "ranker": "oracle", "fallback": {"budget_s": 2}}, {})
    assert PARSConfig.from_sources(pars, {}) == asked


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "M", "--ranker", "/no/such/ranker"], "ranker folder not found"),
        (["--model", "M", "--additional-config", '{"pars": {"agin": 1}}'], "unknown key"),
        (["--model", "M", "--scheduler-cls", "my.Scheduler"], "conflicts with pars-fast serve"),
        (["--model", "M", "--pars-fallback", "{oops"], "expected a JSON object"),
    ],
)
def test_serve_rejects_bad_config_before_starting(argv, message, capsys):
    from pars_fast.serve import run

    assert run(_serve_args(argv)) == 2
    assert message in capsys.readouterr().err
