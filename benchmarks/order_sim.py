"""What is each policy's order worth? An ideal-server replay of an e2e run.

Reads the ``results.json`` of ``pars-fast bench e2e``, rebuilds its exact request
stream from the recorded config, scores the prompts with the run's ranker, and
replays every load level (same arrival times) on an ideal non-preemptive server
with ``max_num_seqs`` slots, where a request holds its slot for ``max_tokens``
tokens at the FCFS burst's measured speed. That isolates the
ordering from the engine: if the engine's measured ratios match the replay's, the
scheduler did its job and what is left is ranking quality::

    python benchmarks/order_sim.py docs/e2e/results.json

Prints the ranker's Kendall tau on this very workload and, per ratio, the replay
next to the engine's measurement. PARS is replayed as PARSScheduler runs it: a request
keeps an FCFS key until a decision finds at least ``min_queue`` requests waiting beyond
the free slots, when every waiting one is scored (``gated``); the ungated replay (every
queue in score order) is what the order alone is worth.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def replay(arrivals: np.ndarray, durations: np.ndarray, keys: np.ndarray, slots: int) -> np.ndarray:
    """Completion times on ``slots`` identical slots; a free slot takes the lowest key that has arrived."""
    import heapq

    by_arrival = np.argsort(arrivals, kind="stable")
    free_at = [0.0] * slots
    waiting: list[tuple[float, int, int]] = []
    finish = np.empty(len(durations))
    nxt = 0
    now = 0.0
    for _ in range(len(durations)):
        # A slot that fell free before the time reached so far sat idle until then.
        now = max(now, heapq.heappop(free_at))
        if not waiting and nxt < len(by_arrival):  # idle slot: jump to the next arrival
            now = max(now, arrivals[by_arrival[nxt]])
        while nxt < len(by_arrival) and arrivals[by_arrival[nxt]] <= now:
            i = int(by_arrival[nxt])
            heapq.heappush(waiting, (float(keys[i]), i, i))
            nxt += 1
        _, _, i = heapq.heappop(waiting)
        finish[i] = now + durations[i]
        heapq.heappush(free_at, finish[i])
    return finish - arrivals


def gated(arrivals: np.ndarray, durations: np.ndarray, scores: np.ndarray, slots: int, aging: float, min_queue: int) -> np.ndarray:
    """PARSScheduler's order: unscored requests queue at the mean score (plus aging); when
    at least ``min_queue`` wait beyond the free slots, every unscored waiting one is scored."""
    import heapq

    n = len(arrivals)
    by_arrival = np.argsort(arrivals, kind="stable")
    mean = float(np.mean(scores))
    free_at = [0.0] * slots
    waiting: list[tuple[float, float, int]] = []
    unscored: set[int] = set()
    finish = np.empty(n)
    nxt = 0
    now = 0.0
    for _ in range(n):
        now = max(now, heapq.heappop(free_at))  # as in replay()
        if not waiting and nxt < n:
            now = max(now, arrivals[by_arrival[nxt]])
        while nxt < n and arrivals[by_arrival[nxt]] <= now:
            i = int(by_arrival[nxt])
            heapq.heappush(waiting, (mean + aging * arrivals[i], arrivals[i], i))
            unscored.add(i)
            nxt += 1
        free = 1 + sum(1 for f in free_at if f <= now)
        if unscored and len(waiting) - free >= min_queue:
            waiting = [((scores[i] + aging * arrivals[i]) if i in unscored else k, a, i) for k, a, i in waiting]
            heapq.heapify(waiting)
            unscored.clear()
        _, _, i = heapq.heappop(waiting)
        unscored.discard(i)
        finish[i] = now + durations[i]
        heapq.heappush(free_at, finish[i])
    return finish - arrivals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of a pars-fast bench e2e run")
    parser.add_argument("--ranker", help="ranker folder (default: the one the run used)")
    args = parser.parse_args(argv)

    from scipy.stats import kendalltau

    from pars_fast import Ranker
    from pars_fast.e2e.benchmark import BenchConfig, prepare_workload, resolve_model, resolve_ranker

    result = json.loads(args.results.read_text())
    meta = result["meta"]
    config = BenchConfig(**{k: v for k, v in meta["config"].items() if k in BenchConfig.__dataclass_fields__})
    # As the run did: its own model and ranker paths if they are still there, else rebuilt the same way.
    model = meta["model"] if Path(meta["model"]).is_dir() else resolve_model(config.model)
    workload = prepare_workload(config, model)
    lengths = np.array([job.max_tokens for job in workload.jobs], dtype=np.float64)

    from transformers import AutoTokenizer

    # The scheduler sees token ids and decodes them with the served model's tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.decode(job.prompt_token_ids, skip_special_tokens=True) for job in workload.jobs]
    ranker = args.ranker or (meta["ranker"] if Path(meta["ranker"]).is_dir() else resolve_ranker(config.ranker))
    scores = Ranker.load(ranker).score(prompts)

    slots = config.max_num_seqs
    aging = meta.get("aging") or 0.0
    min_queue = meta.get("min_queue") or 2 * slots
    runs = result["runs"]
    # One slot emits a token every token_s seconds: the measured capacity, all slots busy.
    token_s = slots / (result["capacity_rps"] * lengths.mean())
    print(f"{len(lengths)} requests, {slots} slots, {token_s * 1e3:.1f} ms per token per slot, aging {aging}/s, "
          f"min_queue {min_queue}; ranker Kendall tau on this workload: {kendalltau(scores, lengths)[0]:.3f}")
    print("| load | ratio | ideal replay | engine |")
    print("|---|---|---|---|")
    for load, fcfs_level in runs["fcfs"]["levels"].items():
        arrivals = np.empty(len(lengths))
        for r in fcfs_level["requests"]:
            arrivals[r["idx"]] = r["arrival"]
        keys = {  # what each scheduler orders by (PARSScheduler: score + aging x arrival)
            "fcfs": arrivals,
            "pars-ungated": scores + aging * arrivals,
            "sjf": lengths + aging * arrivals,
        }
        latency = {p: replay(arrivals, lengths * token_s, k, slots) for p, k in keys.items()}
        latency["pars"] = gated(arrivals, lengths * token_s, scores, slots, aging, min_queue)
        ideal = {p: (lat.mean(), (lat / lengths).mean()) for p, lat in latency.items()}
        engine = {
            p: (run["levels"][load]["summary"]["latency_mean"], run["levels"][load]["summary"]["norm_latency_mean"])
            for p, run in runs.items()
            if load in run["levels"]
        }
        for label, num, den, col in (
            ("FCFS/PARS mean latency", "fcfs", "pars", 0),
            ("FCFS/PARS mean latency, every queue ranked", "fcfs", "pars-ungated", 0),
            ("PARS/SJF mean latency", "pars", "sjf", 0),
            ("FCFS/SJF mean latency", "fcfs", "sjf", 0),
            ("FCFS/PARS mean norm. latency", "fcfs", "pars", 1),
        ):
            paired = result.get("comparisons", {}).get(load, {}).get(label)  # with --repeats: median of pairs
            if paired is not None:
                measured = f"{paired:.2f}×"
            else:
                measured = f"{engine[num][col] / engine[den][col]:.2f}×" if num in engine and den in engine else "–"
            if den == "pars-ungated":
                measured = "–"
            print(f"| {load} | {label} | {ideal[num][col] / ideal[den][col]:.2f}× | {measured} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
