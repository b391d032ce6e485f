"""How fast is the simulator? ``pars-fast sim`` at its target size, and its cost per step.

Run (10-15 minutes; marked slow, so ``make bench`` leaves it out)::

    .venv/bin/python -m pytest benchmarks/bench_sim.py -m slow --benchmark-only -s

``test_sim_speed_target``: 10,000 ShareGPT test requests x 5 loads x 4 policies (FCFS,
PARS, oracle SJF, prompt length) on simulated Llama-3.1-8B / one H100 (aiconfigurator
step costs), both cores (``jobs=2``): the target is 10 minutes of wall time on this
2-core machine. It prints, per run, the simulator's wall time per step next to the time
spent inside the scheduler's own ``schedule()`` (vLLM's, or PARSScheduler's): the
simulator is a loop around the real scheduler, so that share is what it cannot shed.

``test_sim_step_cost`` (quick, not slow): the same per-step split on one FCFS run of
2,000 requests, for ``make bench``.
"""

from __future__ import annotations

import os
import time

import pytest

MODEL, GPU = "meta-llama/Meta-Llama-3.1-8B", "h100_sxm"


def _report(result: dict, benchmark) -> None:
    rows = []
    for policy, run in result["runs"].items():
        for load, level in run["levels"].items():
            t = level["timing"]
            rows.append((policy, load, level["steps"], t["wall_s"], t["step_us"], t["schedule_us_per_step"]))
    print(f"\n{'policy':>14} {'load':>6} {'steps':>7} {'wall s':>7} {'sim us/step':>12} {'schedule() us/step':>19}")
    for policy, load, steps, wall, step_us, sched_us in rows:
        print(f"{policy:>14} {load:>6} {steps:>7} {wall:>7.1f} {step_us:>12.0f} {sched_us:>19.0f}")
    benchmark.extra_info["runs"] = [dict(zip(("policy", "load", "steps", "wall_s", "step_us", "schedule_us"), r)) for r in rows]
    benchmark.extra_info["loadavg"] = os.getloadavg()


@pytest.mark.slow
def test_sim_speed_target(benchmark):
    from pars_fast.sim.benchmark import SimConfig, parse_rates, run_sim

    config = SimConfig(model=MODEL, gpu=GPU, n=10_000, rates=parse_rates("0.5,1,1.5,2,burst"), burst_n=10_000,
                       policies=("fcfs", "pars", "sjf", "prompt-length"), jobs=2, progress=False)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = benchmark.pedantic(lambda: run_sim(config, log=lambda m: None), rounds=1, iterations=1)
    wall = time.perf_counter() - start
    print(f"\n10,000 requests x 5 loads x 4 policies: {wall / 60:.1f} min wall (target 10), load before {load_before:.1f}")
    _report(result, benchmark)
    benchmark.extra_info["wall_min"] = wall / 60


def test_sim_step_cost(benchmark):
    from pars_fast.sim.benchmark import SimConfig, parse_rates, run_sim

    config = SimConfig(model=MODEL, gpu=GPU, n=2000, rates=parse_rates("burst"), policies=("fcfs",), jobs=1,
                       progress=False, cost="linear")
    result = benchmark.pedantic(lambda: run_sim(config, log=lambda m: None), rounds=1, iterations=1)
    _report(result, benchmark)
