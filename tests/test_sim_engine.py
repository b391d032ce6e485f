"""The simulator: vLLM's own scheduler (and PARSScheduler) stepped on a virtual clock.

Requests here are synthetic (random token ids, chosen lengths) so every expectation can
be worked out; tests/test_sim_cli.py runs the command on real data.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from vllm.v1.core.sched.scheduler import Scheduler

from pars_fast.clock import VirtualClock
from pars_fast.sim.costs import StepBatch
from pars_fast.sim.engine import Deployment, SimEngine, SimError
from pars_fast.sim.ranking import RankerCost, ScoreTable, sim_runtime
from pars_fast.sim.workload import SimRequest
from pars_fast.vllm import PARSScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from order_sim import replay  # noqa: E402  the ideal server the simulator must agree with


@dataclass(frozen=True)
class ConstantCost:
    """Every step takes ``seconds``, whatever it computes."""

    seconds: float = 0.01
    name: str = "constant"
    description: str = "constant step time"

    def step_s(self, batch: StepBatch) -> float:
        return self.seconds


@dataclass(frozen=True)
class PerTokenCost:
    """A step costs a fixed part plus a part per token computed (prefill is dearer)."""

    name: str = "per-token"
    description: str = "2 ms + 20 us a prefill token + 50 us a decode token"

    def step_s(self, batch: StepBatch) -> float:
        return 0.002 + 20e-6 * batch.prefill_tokens + 50e-6 * batch.decode_tokens


def requests(n: int, seed: int = 0, rate: float | None = None, prompt=(8, 200), output=(1, 120)) -> list[SimRequest]:
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n) if rate else np.zeros(n)
    t = np.cumsum(gaps) - gaps[0]
    return [
        SimRequest(i, i, f"prompt {i}", tuple(int(x) for x in rng.integers(100, 30_000, int(rng.integers(*prompt)))),
                   int(rng.integers(*output)), float(t[i]), None)
        for i in range(n)
    ]


def deployment(**kw) -> Deployment:
    args = dict(model="meta-llama/Meta-Llama-3.1-8B", gpu="h100_sxm", tp=1, num_blocks=20_000, max_num_seqs=8,
                max_num_batched_tokens=4096, max_model_len=4096)
    args.update(kw)
    return Deployment(**args)


def oracle_table(reqs: list[SimRequest], noise: float = 0.0, seed: int = 1) -> ScoreTable:
    """Scores that are the log true length, plus noise: a ranker of chosen quality."""
    rng = np.random.default_rng(seed)
    scores = np.log([r.output_tokens for r in reqs]) + noise * rng.standard_normal(len(reqs))
    emb = rng.standard_normal((len(reqs), 8)).astype(np.float32)
    return ScoreTable("synthetic", scores.astype(np.float64), emb)


def pars_engine(reqs, dep, cost, table=None, ranker_cost=RankerCost(0.0, 0.0, "free"), **pars) -> SimEngine:
    def sample_of(rid: str) -> int:
        return reqs[int(rid)].sample

    settings = {"ranker": "default" if table is not None else "oracle", "log_interval_s": 0, **pars}
    return SimEngine(PARSScheduler, dep, cost, pars=settings,
                     runtime=lambda clock: sim_runtime(clock, table, sample_of, ranker_cost))


def check_conservation(run, reqs) -> None:
    by_idx = {t.idx: t for t in run.timings}
    assert sorted(by_idx) == sorted(r.idx for r in reqs)  # every request, once
    for r in reqs:
        t = by_idx[r.idx]
        assert t.output_tokens == r.output_tokens  # exactly its true length
        assert t.arrival <= t.scheduled <= t.first_token <= t.finish


# ---------------------------------------------------------------------- fidelity to the ideal server


@pytest.mark.parametrize("policy", ["fcfs", "sjf"])
def test_constant_cost_matches_the_ideal_server_within_one_step(policy):
    """Unlimited KV, no chunking, a constant step: a request holds one of max_num_seqs
    slots for exactly its output tokens' steps (prefill + first token, then one per
    step), as on order_sim's ideal non-preemptive server."""
    # Arrivals on step boundaries: the engine adds requests between steps, so an arrival
    # mid-step would wait for the next boundary, which the ideal server does not. A step of
    # 2**-6 s keeps every boundary exact in binary floating point.
    step = 2.0**-6
    reqs = [replace(r, arrival_s=math.ceil(r.arrival_s / step) * step) for r in requests(300, rate=100.0)]
    dep = deployment(num_blocks=100_000, max_num_batched_tokens=100_000)
    if policy == "fcfs":
        engine = SimEngine(Scheduler, dep, ConstantCost(step))
    else:
        engine = pars_engine(reqs, dep, ConstantCost(step), aging=0.0)
    run = engine.run(reqs)
    check_conservation(run, reqs)
    arrivals = np.array([r.arrival_s for r in reqs])
    lengths = np.array([r.output_tokens for r in reqs], dtype=float)
    keys = arrivals if policy == "fcfs" else lengths
    ideal = replay(arrivals, lengths * step, keys, dep.max_num_seqs)
    sim = np.array([t.latency for t in sorted(run.timings, key=lambda t: t.idx)])
    assert np.abs(sim - ideal).max() <= step
    assert abs(sim.mean() - ideal.mean()) < step / 100
    assert ideal.mean() > 5 * step * lengths.mean() / 2  # a queue formed: order mattered


# ---------------------------------------------------------------------- conservation and preemption


@pytest.mark.parametrize("policy", ["fcfs", "pars", "pars-async"])
def test_kv_starved_run_preempts_and_every_request_still_finishes(policy):
    """A KV cache too small for the batch: vLLM preempts (its own code decides), and
    every preempted request is resumed and finishes with its true length."""
    reqs = requests(120, prompt=(64, 400), output=(50, 300))
    dep = deployment(num_blocks=120, max_num_seqs=16, async_scheduling=policy.endswith("async"))
    if policy == "fcfs":
        engine = SimEngine(Scheduler, dep, PerTokenCost())
    else:
        engine = pars_engine(reqs, dep, PerTokenCost(), table=oracle_table(reqs, noise=0.5))
    run = engine.run(reqs)
    assert run.preemptions > 0 and sum(t.preemptions for t in run.timings) == run.preemptions
    check_conservation(run, reqs)


def test_a_lost_request_is_an_error_not_a_result():
    """The conservation check is the engine's own: a request the scheduler never ran
    (here: vLLM is told it was aborted) makes the run fail loudly."""
    reqs = requests(20)
    engine = SimEngine(Scheduler, deployment(), ConstantCost())
    replica = engine.start()
    for r in reqs:
        replica.add(r)
    replica.run_until(0.0)
    replica._step()
    from vllm.v1.request import RequestStatus

    replica.sched.finish_requests(["5"], RequestStatus.FINISHED_ABORTED)
    replica.drain()
    replica.close()
    with pytest.raises(SimError, match="never finished"):
        replica.result()


def test_same_inputs_same_numbers():
    reqs = requests(200, rate=80.0)
    dep = deployment(num_blocks=400, async_scheduling=True)
    runs = [pars_engine(reqs, dep, PerTokenCost(), table=oracle_table(reqs, noise=0.8)).run(reqs) for _ in range(2)]
    a, b = ([(t.idx, t.scheduled, t.first_token, t.finish, t.preemptions) for t in run.timings] for run in runs)
    assert a == b and runs[0].steps == runs[1].steps


# ---------------------------------------------------------------------- PARS on simulated time


def test_pars_under_the_simulator_never_reads_real_time(monkeypatch):
    """Every time read in PARS's scheduler, worker, scorers, policy and online learner goes
    through the virtual clock: a read of the machine's clocks from any of them fails."""
    import time as time_module

    watched = ("pars_fast.vllm", "pars_fast.clock", "pars_fast.online", "pars_fast.aging", "pars_fast.queue", "pars_fast.traces")
    reads: list[str] = []

    def spy(name: str, real):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(watched):
                reads.append(f"{caller} called time.{name}")
            return real(*args, **kwargs)

        return wrapper

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "perf_counter_ns", "process_time"):
        monkeypatch.setattr(time_module, name, spy(name, getattr(time_module, name)))
    reqs = requests(150, rate=200.0)
    dep = deployment(num_blocks=300, async_scheduling=True)
    for worker in ("process", "inline"):
        run = pars_engine(reqs, dep, PerTokenCost(), table=oracle_table(reqs, noise=0.5),
                          ranker_cost=RankerCost(0.002, 0.001, "test"), worker=worker, min_queue=1).run(reqs)
        check_conservation(run, reqs)
        assert run.pars_stats["requests_scored"] > 0
    assert reads == []


def test_the_simulated_stack_imports_no_real_clock():
    """A static check beside the dynamic one: the scheduler's modules do not import time."""
    import pars_fast.vllm.book
    import pars_fast.vllm.policy
    import pars_fast.vllm.scheduler
    import pars_fast.vllm.scoring
    import pars_fast.vllm.worker

    for module in (pars_fast.vllm.scheduler, pars_fast.vllm.worker, pars_fast.vllm.scoring, pars_fast.vllm.policy,
                   pars_fast.vllm.book):
        assert "time" not in vars(module), module.__name__


def test_worker_latency_delays_when_scores_apply():
    """With the ranker in a (modelled) worker, scores land only after its batch's latency:
    until then the queue is served in arrival order; after, in score order."""
    latency = 0.5
    reqs = requests(80, output=(20, 40))  # a burst
    dep = deployment(max_num_seqs=2)
    table = oracle_table(reqs)
    pure = {"worker": "process", "min_queue": 1, "prompt_weight": 0}  # the order is the scores' alone
    fast = pars_engine(reqs, dep, ConstantCost(0.01), table=table, **pure).run(reqs)
    slow = pars_engine(reqs, dep, ConstantCost(0.01), table=table, **pure,
                       score_batch_max=128, ranker_cost=RankerCost(latency, 0.0, "slow")).run(reqs)

    def admitted_before(run, t):
        return [x.idx for x in sorted(run.timings, key=lambda x: (x.scheduled, x.idx)) if x.scheduled < t]

    early = admitted_before(slow, latency)
    assert len(early) > 2 and early == sorted(early)  # arrival order while the scores were on their way
    later = [x for x in sorted(slow.timings, key=lambda x: x.scheduled) if x.scheduled > latency + 0.05]
    assert [x.max_tokens for x in later[:10]] == sorted(x.max_tokens for x in later[:10])  # then shortest first
    assert admitted_before(fast, latency) != early  # with no latency, order from the first steps
    assert np.mean([x.latency for x in fast.timings]) < np.mean([x.latency for x in slow.timings])


def test_inline_ranking_cost_lengthens_the_steps():
    """Inline, the ranker's modelled cost is spent on the engine's clock (the step waits)."""
    reqs = requests(60, output=(5, 20))
    dep = deployment(max_num_seqs=2)
    table = oracle_table(reqs)
    free = pars_engine(reqs, dep, ConstantCost(0.01), table=table, worker="inline", min_queue=1).run(reqs)
    dear = pars_engine(reqs, dep, ConstantCost(0.01), table=table, worker="inline", min_queue=1,
                       ranker_cost=RankerCost(0.0, 0.004, "4 ms a prompt"),
                       fallback={"budget_s": 0.05, "max_share": None}).run(reqs)
    assert dear.makespan_s > free.makespan_s + 0.004 * 40
    assert dear.pars_stats["scoring_seconds"] == pytest.approx(0.004 * dear.pars_stats["requests_scored"])


# ---------------------------------------------------------------------- bad input


def test_a_bad_step_cost_stops_the_run_naming_the_step():
    @dataclass(frozen=True)
    class Broken:
        name: str = "broken"
        description: str = "NaN after 5 steps"
        calls: list = None

        def step_s(self, batch):
            self.calls.append(1)
            return math.nan if len(self.calls) > 5 else 0.01

    with pytest.raises(SimError, match=r"priced step 5 at nan"):
        SimEngine(Scheduler, deployment(), Broken(calls=[])).run(requests(30))
    with pytest.raises(SimError, match=r"priced step 0 at -0.1"):
        SimEngine(Scheduler, deployment(), ConstantCost(-0.1)).run(requests(3))


def test_prompts_that_do_not_fit_are_skipped_and_counted():
    reqs = requests(20, prompt=(10, 20), output=(5, 10))
    too_long = [replace(reqs[3], prompt_token_ids=tuple(range(100, 4200))), replace(reqs[7], output_tokens=4090)]
    reqs[3], reqs[7] = too_long
    run = SimEngine(Scheduler, deployment(), ConstantCost()).run(reqs)
    assert run.skipped == 2 and len(run.timings) == 18
    assert {t.idx for t in run.timings} == set(range(20)) - {3, 7}


@pytest.mark.parametrize("field,value", [("max_num_seqs", 0), ("num_blocks", -1), ("tp", 0), ("max_model_len", 0)])
def test_bad_deployment_settings_are_refused(field, value):
    with pytest.raises(SimError, match=field):
        deployment(**{field: value})


def test_idle_time_is_skipped_not_stepped():
    """Two requests an hour apart: two bursts of steps, nothing in between."""
    reqs = requests(2, output=(10, 11))
    reqs[1] = replace(reqs[1], arrival_s=3600.0)
    start = time.perf_counter()
    run = SimEngine(Scheduler, deployment(), ConstantCost(0.01)).run(reqs)
    assert run.steps == 20 and time.perf_counter() - start < 30
    assert run.timings[1].scheduled == 3600.0 and run.timings[1].finish == pytest.approx(3600.1)


def test_replicas_share_the_load():
    """Two engines behind a round-robin router each serve half (independently)."""
    reqs = requests(40, rate=50.0)
    engine = SimEngine(Scheduler, deployment(), ConstantCost())
    reps = [engine.start(), engine.start()]
    for r in reqs:
        for rep in reps:
            rep.run_until(r.arrival_s)
        reps[r.idx % 2].add(r)
    for rep in reps:
        rep.drain()
        rep.close()
    results = [rep.result() for rep in reps]
    assert [len(x.timings) for x in results] == [20, 20]
    assert {t.idx % 2 for t in results[0].timings} == {0}


def test_virtual_clock_refuses_to_go_back():
    clock = VirtualClock(5.0)
    clock.advance(1.0)
    assert clock.now() == clock.wall() == 6.0
    with pytest.raises(ValueError):
        clock.advance_to(2.0)
    with pytest.raises(ValueError):
        clock.advance(-1.0)
    with pytest.raises(ValueError):
        clock.advance(math.nan)
