"""The scheduler-path cost of scoring a batch with a ranker on the CPU, as a simulator RankerCost.

What it times is ``TextRankerScorer.score_jobs`` (pars_fast/vllm/scoring.py), the call the
scheduler (inline) or its worker makes: decode each prompt's token ids with the served
model's tokenizer, then score the texts (cheap features, MiniLM on the packed torch path,
kNN and head) with ``threads`` torch threads. The ranker is loaded as the scheduler loads it
on a CPU (``Ranker.load(..., backend="torch-int8")``, ``_serving_backend``). Prompts are
ShareGPT test-split first turns (``pars_fast.data.sharegpt_split``), tokenized once, untimed,
by the served tokenizer (Llama 3's by default, ``pars_fast.sim.workload.served_tokenizer``)
and cut at ``PROMPT_DECODE_CAP`` tokens as the scheduler cuts them.

Each of ``--reps`` rounds draws 32 prompts from a pool of the test split (seeded), and
each batch size n (1, 4, 8, 16, 32) scores the first n of them, so sizes are compared on
the same prompts and load drifts hit every size alike. Each batch is timed ``--repeat``
times and keeps its fastest (what is left is the work, not the waits of a shared machine);
the mean over rounds per size (a prompt's cost is skewed: the mean, not the median, is what
a batch costs on average) is fitted with ``per_batch_s + per_prompt_s * n`` by least squares. On stdout: that fit as JSON in the shape of
``pars_fast.sim.ranking.RankerCost`` (``per_batch_s``, ``per_prompt_s``, ``source``); on
stderr: the medians, the fit per size, prompts/s per thread, the load average.

Two clocks, both reported: ``cpu`` (the process's CPU time, the default for the fit) and
``wall``. With one thread on an idle core they agree; on a shared machine the wall clock
also counts the time the process waited for a core, which a server's dedicated cores do
not pay, so the CPU time is the better estimate of what one thread costs there.

Run:
    .venv/bin/python benchmarks/ranker_cost.py > results/ranker_cost.json
    .venv/bin/python benchmarks/ranker_cost.py --threads 2 --reps 40
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

SIZES = (1, 4, 8, 16, 32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranker", default="default", help="a ranker folder, or 'default' ($PARS_FAST_HOME/rankers/default)")
    ap.add_argument("--backend", default="torch-int8", help="what the scheduler uses on a CPU: torch-int8")
    ap.add_argument("--threads", type=int, default=1, help="torch threads while scoring (the scheduler's default: 1)")
    ap.add_argument("--model", default="meta-llama/Meta-Llama-3.1-8B", help="the served model, for its tokenizer")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="batch sizes")
    ap.add_argument("--reps", type=int, default=30, help="rounds: batches per size")
    ap.add_argument("--repeat", type=int, default=3, help="timings of each batch (the fastest counts)")
    ap.add_argument("--pool", type=int, default=1024, help="test prompts to draw batches from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="which clock the printed fit uses")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    from pars_fast.data import sharegpt_split
    from pars_fast.paths import default_ranker_dir
    from pars_fast.ranker import Ranker
    from pars_fast.sim.ranking import RankerCost
    from pars_fast.sim.workload import served_tokenizer, tokenizer_name
    from pars_fast.vllm.scoring import PROMPT_DECODE_CAP, ScoreJob, TextRankerScorer

    folder = default_ranker_dir() if args.ranker == "default" else Path(args.ranker)
    ranker = Ranker.load(folder, backend=args.backend, device="cpu")
    tokenizer = served_tokenizer(args.model)
    _, test = sharegpt_split()
    rng = np.random.default_rng(args.seed)
    pool = [test[i].prompt for i in rng.permutation(len(test))[: args.pool]]
    ids = tokenizer(pool, add_special_tokens=True)["input_ids"]
    jobs = [ScoreJob(f"p{i}", x[:PROMPT_DECODE_CAP], len(x)) for i, x in enumerate(ids)]
    scorer = TextRankerScorer(ranker, tokenizer, name=args.ranker, threads=args.threads)

    for n in (1, 8, 32):  # warm-up: first calls, allocator growth
        scorer.score_jobs([jobs[int(i)] for i in rng.choice(len(jobs), n, replace=False)])
    load_before = os.getloadavg()
    times: dict[str, dict[int, list[float]]] = {"cpu": {n: [] for n in sizes}, "wall": {n: [] for n in sizes}}
    decode: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.reps):
        drawn = [jobs[int(i)] for i in rng.choice(len(jobs), max(sizes), replace=False)]
        for n in sizes:
            best = {"cpu": np.inf, "wall": np.inf, "decode": np.inf}
            for _ in range(args.repeat):
                wall, cpu = time.perf_counter(), time.process_time()
                _, decode_s = scorer.score_jobs(drawn[:n])
                best["cpu"] = min(best["cpu"], time.process_time() - cpu)
                best["wall"] = min(best["wall"], time.perf_counter() - wall)
                best["decode"] = min(best["decode"], decode_s)
            times["cpu"][n].append(best["cpu"])
            times["wall"][n].append(best["wall"])
            decode[n].append(best["decode"])
    load_after = os.getloadavg()

    fits = {clock: _fit(sizes, [float(np.mean(t[n])) for n in sizes]) for clock, t in times.items()}
    per_batch, per_prompt = fits[args.clock]
    source = (
        f"measured: {args.ranker} ranker, {args.backend}, {args.threads} thread(s), decode ({tokenizer_name(tokenizer)}) "
        f"+ features + encoder + head, ShareGPT test prompts, batch sizes {','.join(map(str, sizes))} x {args.reps}, "
        f"fastest of {args.repeat} {args.clock} times per batch, mean per size, least squares; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load_before[0]:.1f}/{load_after[0]:.1f} (benchmarks/ranker_cost.py)"
    )
    cost = RankerCost(per_batch_s=round(per_batch, 6), per_prompt_s=round(per_prompt, 6), source=source)
    print(json.dumps(cost.to_dict(), indent=2))

    err = sys.stderr
    print(f"load average before {load_before}, after {load_after}; {os.cpu_count()} CPUs", file=err)
    print("batch  mean cpu ms (p20-p80)  mean wall ms (p20-p80)  decode ms  fit ms  prompts/s (cpu)", file=err)
    for n in sizes:
        c, w = np.array(times["cpu"][n]), np.array(times["wall"][n])
        print(
            f"{n:5d}  {c.mean() * 1e3:6.1f} ({np.percentile(c, 20) * 1e3:6.1f}-{np.percentile(c, 80) * 1e3:6.1f})  "
            f"{w.mean() * 1e3:6.1f} ({np.percentile(w, 20) * 1e3:6.1f}-{np.percentile(w, 80) * 1e3:6.1f})  "
            f"{np.mean(decode[n]) * 1e3:9.2f}  {cost.batch_s(n) * 1e3:6.1f}  {n / c.mean():9.1f}",
            file=err,
        )
    for clock, (b, p) in fits.items():
        print(f"fit ({clock}): {b * 1e3:.2f} ms per batch + {p * 1e3:.2f} ms per prompt "
              f"= {1 / p:.0f} prompts/s per thread at large batches", file=err)
    return 0


def _fit(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``(per_batch_s, per_prompt_s)`` of ``seconds ~ per_batch_s + per_prompt_s * n``."""
    n = np.asarray(sizes, dtype=np.float64)
    (per_batch, per_prompt), *_ = np.linalg.lstsq(np.stack([np.ones_like(n), n], axis=1), np.asarray(seconds), rcond=None)
    return float(per_batch), float(per_prompt)


if __name__ == "__main__":
    sys.exit(main())
