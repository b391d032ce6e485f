"""The ideal-server replay behind benchmarks/order_sim.py and benchmarks/ranking_needed.py.

Both scripts turn a ranker's scores into "what this order is worth"; these tests pin
the replay to latencies worked out by hand.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


order_sim = _load("order_sim")
ranking_needed = _load("ranking_needed")


def test_one_slot_burst_runs_in_key_order():
    arrivals = np.zeros(3)
    durations = np.array([3.0, 1.0, 2.0])
    # FCFS (ties broken by index): finishes at 3, 4, 6.
    assert order_sim.replay(arrivals, durations, arrivals, 1).tolist() == [3.0, 4.0, 6.0]
    # Shortest first: 1 at 1, 2 at 3, 0 at 6.
    assert order_sim.replay(arrivals, durations, durations, 1).tolist() == [6.0, 1.0, 3.0]


def test_an_idle_slot_waits_for_the_next_arrival_and_two_slots_share_the_work():
    arrivals = np.array([0.0, 10.0])
    durations = np.array([1.0, 1.0])
    assert order_sim.replay(arrivals, durations, arrivals, 1).tolist() == [1.0, 1.0]
    arrivals = np.zeros(3)
    durations = np.array([4.0, 4.0, 1.0])
    # Two slots: 0 and 1 start at once, 2 waits for the first free slot (t = 4).
    assert order_sim.replay(arrivals, durations, arrivals, 2).tolist() == [4.0, 4.0, 5.0]


def test_gated_order_is_fcfs_below_min_queue_and_score_order_above():
    rng = np.random.default_rng(0)
    n = 60
    arrivals = np.sort(rng.exponential(0.2, n).cumsum())
    durations = rng.uniform(0.5, 3.0, n)
    scores = np.log(durations) + rng.normal(0, 0.3, n)
    fcfs = order_sim.replay(arrivals, durations, arrivals, 4)
    ranked = order_sim.replay(arrivals, durations, scores, 4)
    never = order_sim.gated(arrivals, durations, scores, 4, aging=0.0, min_queue=10**9)
    always = order_sim.gated(arrivals, durations, scores, 4, aging=0.0, min_queue=-(10**9))
    np.testing.assert_allclose(never, fcfs)
    np.testing.assert_allclose(always, ranked)
    assert ranked.mean() < fcfs.mean()  # a queue forms, and a good order shortens it


def test_needed_tau_interpolates_the_crossing():
    curve = [(1.4, 0.2, [1.1]), (0.9, 0.4, [1.2, 1.2]), (0.5, 0.6, [1.4])]
    assert ranking_needed.needed_tau(curve, 1.3) == "Kendall tau >= 0.50 on the stream"
    assert ranking_needed.needed_tau(curve, 1.05) == "Kendall tau >= 0.20 or less"
    assert ranking_needed.needed_tau(curve, 1.5) == "more than the oracle order gives"


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_a_better_ranker_is_worth_more_on_the_ideal_server(sigma):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 512, 200).astype(float)
    stream = {"lengths": lengths}
    args = type("Args", (), {"token_ms": 7.8, "max_num_seqs": 8, "aging": 0.0, "min_queue": 1})()
    rate = 3 * 8 / (lengths.mean() * 7.8e-3)
    arrivals = np.concatenate([[0.0], rng.exponential(1 / rate, 199).cumsum()])
    fcfs, sjf = ranking_needed.baselines(stream, arrivals, args)
    good = fcfs / ranking_needed.pars_latency(stream, arrivals, np.log(lengths) + sigma * rng.standard_normal(200), args)
    noise = fcfs / ranking_needed.pars_latency(stream, arrivals, rng.standard_normal(200), args)
    assert good > 1.2 > noise * 1.1
    assert fcfs / sjf >= good - 1e-9
