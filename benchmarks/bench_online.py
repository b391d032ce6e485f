"""Microbenchmarks: the online learner's cost on the engine thread, at a GPU server's scale.

With the ranker inline, ``PARSScheduler._flush_observations`` calls
``OnlineLearner.observe`` on the engine thread for every finished request that was
scored. At 256 running requests many finish in one step. Shapes: a full memory of
2048 embeddings of 384 dimensions (MiniLM), a full window of 256 judged requests, k = 32.

Providers, side by side on the same learner state:
    pars_fast     the learner as it is: kNN similarities as one dot product per memory row
                  on the calling thread; the 3 accuracies and 11 blend weights judged in
                  one pass (known_pair_accuracies: one known-pair bitset, a sort per predictor)
    pair_matrix   the learner as it was: kNN through a BLAS matrix product (OpenBLAS threads);
                  14 calls of known_pair_accuracy, each building [256, 256] float matrices

Read the minimum and the median: on a shared machine the maximum is mostly time the
process waited for a core. ``OPENBLAS_NUM_THREADS=1`` separates what BLAS threads cost
the old kNN from its arithmetic.

Operations (µs per call):
    observe          one finish that does not re-choose the blend weight (7 in 8)
    observe_update   one finish that does (every 8th: 3 accuracies + 11 blend weights)
    step_16          16 finishes in one step, back to back (two of them re-choose)
    knn_row          the kNN lookup of one embedding (inside every observe)
    update_weight    re-choosing the blend weight alone

Run:
    .venv/bin/python -m pytest benchmarks/bench_online.py --benchmark-only \\
        --benchmark-json=results/bench_online.json
    .venv/bin/python benchmarks/bench_online.py results/bench_online.json   # table
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
from functools import cache

import numpy as np
import pytest

from pars_fast.online import OnlineConfig, OnlineLearner, known_pair_accuracy

DIM, MEMORY, WINDOW = 384, 2048, 256
STEP_FINISHES = 16
PROVIDERS = ["pars_fast", "pair_matrix"]
OPS = ["observe", "observe_update", "step_16", "knn_row", "update_weight"]
ROUNDS = {"pars_fast": 400, "pair_matrix": 40}


class PairMatrixLearner(OnlineLearner):
    """The learner before the one-pass weight update (same state, old computations)."""

    def _knn(self, emb):
        if self._emb is None or self._size == 0:
            return np.full(len(emb), self._labels.mean if self._labels.n else 0.0)
        q = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        sims = q @ self._emb[: self._size].T
        k = min(self.config.k, self._size)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(sims, top, axis=1) / self.config.temperature
        w = np.exp(s - s.max(axis=1, keepdims=True))
        return (w * self._y[top]).sum(axis=1) / w.sum(axis=1)

    def _update_weight(self):
        c = self.config
        arr = self._judged[: min(self._num_judged, c.window)]
        length, exact = arr[:, 3], arr[:, 4].astype(bool)
        for col, name in ((0, "base"), (1, "online"), (2, "blend")):
            self.accuracy[name], self.known_pairs = known_pair_accuracy(arr[:, col], length, exact, c.delta)
        if self.known_pairs == 0:
            return
        best_w, best_acc = 0.0, -1.0
        for w in (i / 10 for i in range(11)):
            acc = known_pair_accuracy(self._blend(arr[:, 0], arr[:, 1], w), length, exact, c.delta)[0]
            if acc > best_acc + 1e-9:
                best_w, best_acc = w, acc
        self.weight = 0.5 * (self.weight + best_w)
        self._weight_updates += 1


@cache
def _traffic(n: int = 8192) -> tuple:
    """ShareGPT-like finishes: log length 0.8 log(prompt) + noise, 10% capped by max_tokens,
    normalized random embeddings (the cost does not depend on what they mean)."""
    rng = np.random.default_rng(0)
    prompt = rng.integers(5, 4000, n)
    y = 0.8 * np.log1p(prompt) + rng.normal(0, 0.6, n)
    lengths = np.maximum(1, np.expm1(y)).astype(int)
    base = 0.5 * y + rng.normal(0, 0.8, n)
    emb = rng.normal(size=(n, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return prompt, lengths, base, emb, rng.random(n) < 0.1


@cache
def _warm_learner() -> OnlineLearner:
    """A learner past warm-up: memory and window full."""
    prompt, lengths, base, emb, capped = _traffic()
    learner = OnlineLearner(OnlineConfig(memory=MEMORY, window=WINDOW), dim=DIM)
    for i in range(MEMORY + WINDOW):
        f, o = learner.score(base[i : i + 1], emb[i : i + 1], prompt[i : i + 1])
        learner.observe(base[i], o[0], f[0], emb[i], int(prompt[i]), int(lengths[i]), bool(capped[i]))
    return learner


def _learner(provider: str) -> OnlineLearner:
    learner = PairMatrixLearner.__new__(PairMatrixLearner) if provider == "pair_matrix" else OnlineLearner.__new__(OnlineLearner)
    learner.__dict__.update(copy.deepcopy(_warm_learner().__dict__))
    return learner


def _finish_args(learner: OnlineLearner, i: int) -> tuple:
    """What the scheduler passes to observe for finish i (scored when it arrived)."""
    prompt, lengths, base, emb, capped = _traffic()
    i %= len(prompt)
    f, o = learner.score(base[i : i + 1], emb[i : i + 1], prompt[i : i + 1])
    return base[i], o[0], f[0], emb[i], int(prompt[i]), int(lengths[i]), bool(capped[i])


def _step(learner: OnlineLearner, finishes: list[tuple]) -> None:
    for args in finishes:
        learner.observe(*args)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_online(benchmark, provider: str, op: str) -> None:
    learner = _learner(provider)
    counter = iter(range(MEMORY + WINDOW, 10**9))
    emb = _traffic()[3]

    if op in ("observe", "observe_update"):
        fn = learner.observe

        def setup():
            # observe re-chooses the weight when the count it reaches is a multiple of 8
            learner.observed = 8 * (learner.observed // 8) + (7 if op == "observe_update" else 0)
            return _finish_args(learner, next(counter)), {}

    elif op == "step_16":
        fn = _step

        def setup():
            learner.observed = 8 * (learner.observed // 8)  # 16 finishes: the 8th and the 16th re-choose
            return (learner, [_finish_args(learner, next(counter)) for _ in range(STEP_FINISHES)]), {}

    elif op == "knn_row":
        fn = learner._knn

        def setup():
            i = next(counter) % len(emb)
            return (emb[i : i + 1],), {}

    else:
        fn = learner._update_weight

        def setup():
            return (), {}

    benchmark.group = op
    benchmark.extra_info.update(
        provider=provider,
        op=op,
        per_round=STEP_FINISHES if op == "step_16" else 1,
        shapes=f"dim {DIM}, memory {MEMORY}, window {WINDOW}, k {learner.config.k}",
        loadavg_1m=os.getloadavg()[0],
        cpus=os.cpu_count(),
        numpy=np.__version__,
        openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
    )
    benchmark.pedantic(fn, setup=setup, rounds=ROUNDS[provider], iterations=1)


# ------------------------------------------------------------ table --


def summarize(path: str) -> str:
    """A markdown table from a --benchmark-json file: median and max per call, each provider."""
    data = json.load(open(path))
    rows: dict[tuple[str, str], dict] = {}
    load = []
    for b in data["benchmarks"]:
        info = b["extra_info"]
        rows[(info["op"], info["provider"])] = b["stats"]
        load.append(info["loadavg_1m"])
        shapes = info["shapes"]
    machine = data.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical CPUs, load average {min(load):.1f}-{max(load):.1f} "
        f"during the run; Python {platform.python_version()}, NumPy {np.__version__}; {shapes}.",
        "",
        "| operation | pars_fast median | pars_fast max | pair_matrix median | pair_matrix max | median ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for op in OPS:
        new, old = rows.get((op, "pars_fast")), rows.get((op, "pair_matrix"))
        if new is None:
            continue
        cells = [f"{new['median'] * 1e6:,.0f} µs", f"{new['max'] * 1e6:,.0f} µs"]
        cells += [f"{old['median'] * 1e6:,.0f} µs", f"{old['max'] * 1e6:,.0f} µs", f"{old['median'] / new['median']:.1f}×"] if old else ["—"] * 3
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/bench_online.py BENCHMARK_JSON")
    print(summarize(sys.argv[1]))
