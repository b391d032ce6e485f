"""How good must the ranker be? The Kendall tau an order needs for a given speed-up.

Draws request streams exactly as ``pars-fast bench e2e`` does (same data, clipping and
Poisson arrivals; one stream per seed) and replays each on the ideal server of
``order_sim.py`` (``max_num_seqs`` slots, a request holds its slot for ``max_tokens``
tokens, no preemption) under FCFS, oracle SJF and PARSScheduler's gated order, scored by

* noisy oracles, ``log(length) + sigma * N(0, 1)``: the curve from Kendall tau on the
  stream to FCFS/PARS mean latency, and the tau where it first reaches ``--target``;
* real rankers (``--ranker``, repeatable: ``default``, ``prompt-length`` or a folder),
  on the very same streams and arrivals.

No engine runs, so it answers in about a minute which ranking quality an end-to-end
target asks for, before anyone trains for it::

    python benchmarks/ranking_needed.py --ranker default --ranker prompt-length --streams 8

Times are in units of one token per slot (``--token-ms``; the e2e capacity of
docs/e2e/repeats measured 7.8 ms), which matters only for PARSScheduler's aging.

``--sim``: the same curve at GPU scale, on the simulator instead of the ideal server
(``pars_fast.sim``: vLLM's own scheduler and KV cache manager, ``PARSScheduler`` with
its shipped defaults and the ranker's modelled cost, GPU step costs), one stream of
``--n`` ShareGPT test requests in the served model's tokenizer, loads as multiples of
the simulated capacity (``burst``: the whole stream at once)::

    python benchmarks/ranking_needed.py --sim --n 3000 --loads 1.5,burst --ranker default --ranker prompt-length
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from order_sim import gated, replay  # noqa: E402  (a sibling script, not a package)

SIGMAS = (0.0, 0.3, 0.5, 0.7, 0.9, 1.1, 1.4, 1.8, 2.5)


def kendall_tau(scores: np.ndarray, lengths: np.ndarray) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(scores, lengths)[0])


def draw_streams(args: argparse.Namespace) -> list[dict]:
    """One stream per seed: lengths, prompt lengths and the prompts as the scheduler decodes them."""
    from transformers import AutoTokenizer

    from pars_fast.e2e.benchmark import resolve_model
    from pars_fast.e2e.workload import build_workload, load_samples

    model = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = load_samples(args.data, tokenizer)
    streams = []
    for seed in range(args.streams):
        workload = build_workload(
            samples,
            tokenizer,
            args.n,
            seed=seed,
            max_model_len=args.max_model_len,
            max_prompt_tokens=args.max_prompt_tokens,
            max_response_tokens=args.max_response_tokens,
            source=args.data,
        )
        streams.append(
            {
                "seed": seed,
                "lengths": np.array([job.max_tokens for job in workload.jobs], dtype=np.float64),
                "prompt_lengths": np.array([len(job.prompt_token_ids) for job in workload.jobs], dtype=np.float64),
                "prompts": [tokenizer.decode(job.prompt_token_ids, skip_special_tokens=True) for job in workload.jobs],
            }
        )
    return streams


def ranker_scores(name: str, streams: list[dict]) -> list[np.ndarray]:
    if name == "prompt-length":
        return [s["prompt_lengths"] for s in streams]
    from pars_fast import Ranker
    from pars_fast.e2e.benchmark import resolve_ranker

    ranker = Ranker.load(resolve_ranker(name))
    return [np.asarray(ranker.score(s["prompts"]), dtype=np.float64) for s in streams]


def baselines(stream: dict, arrivals: np.ndarray, args: argparse.Namespace) -> tuple[float, float]:
    """FCFS and oracle-SJF mean latency of one stream at one load: the same for every score."""
    lengths = stream["lengths"]
    durations = lengths * args.token_ms / 1e3
    fcfs = replay(arrivals, durations, arrivals, args.max_num_seqs).mean()
    sjf = replay(arrivals, durations, lengths + args.aging * arrivals, args.max_num_seqs).mean()
    return float(fcfs), float(sjf)


def pars_latency(stream: dict, arrivals: np.ndarray, scores: np.ndarray, args: argparse.Namespace) -> float:
    """Mean latency of PARSScheduler's gated order by ``scores``."""
    durations = stream["lengths"] * args.token_ms / 1e3
    return float(gated(arrivals, durations, scores, args.max_num_seqs, args.aging, args.min_queue).mean())


def stream_arrivals(stream: dict, load: float, args: argparse.Namespace) -> np.ndarray:
    """Poisson arrivals at ``load`` x the e2e capacity: every slot busy, one mean response per slot."""
    from pars_fast.e2e.workload import arrival_offsets

    rate = load * args.max_num_seqs / (stream["lengths"].mean() * args.token_ms / 1e3)
    return arrival_offsets(len(stream["lengths"]), rate, stream["seed"])


def print_row(label: str, taus: list[float], ratios: list[float]) -> None:
    p10, p90 = np.percentile(ratios, [10, 90])
    print(f"| {label} | {np.mean(taus):.3f} | {np.mean(ratios):.3f}x | {p10:.2f}-{p90:.2f} |")


def needed_tau(curve: list[tuple[float, float, list[float]]], target: float) -> str:
    """The tau where the curve's mean speed-up crosses ``target``, interpolated between its rows."""
    points = sorted((tau, float(np.mean(ratios))) for _, tau, ratios in curve)
    for (tau0, r0), (tau1, r1) in zip(points, points[1:]):
        if r0 < target <= r1:
            return f"Kendall tau >= {tau0 + (tau1 - tau0) * (target - r0) / (r1 - r0):.2f} on the stream"
    if points and points[0][1] >= target:
        return f"Kendall tau >= {points[0][0]:.2f} or less"
    return "more than the oracle order gives"


# The simulator's noise levels: fewer than the ideal server's (each point is a run).
SIM_SIGMAS = (0.0, 0.5, 0.9, 1.4, 2.5)


def _sim_run(task: tuple) -> tuple:
    """One simulated run (in a forked worker): (key, FCFS-or-PARS mean latency, Kendall tau)."""
    key, policy, scores = task
    from vllm.v1.core.sched.scheduler import Scheduler

    from pars_fast.e2e.metrics import summarize
    from pars_fast.sim.engine import SimEngine
    from pars_fast.sim.ranking import ScoreTable, sim_runtime
    from pars_fast.vllm import PARSScheduler

    reqs, dep, cost, rcost, lengths = _SIM[key[0]]
    if policy == "fcfs":
        engine = SimEngine(Scheduler, dep, cost)
    elif policy == "sjf":
        engine = SimEngine(PARSScheduler, dep, cost, pars={"ranker": "oracle", "log_interval_s": 0},
                           runtime=lambda clock: sim_runtime(clock, None, lambda rid: 0, rcost))
    else:
        table = ScoreTable("noisy oracle" if policy == "noise" else policy, np.asarray(scores, dtype=np.float64), None)
        # prompt_weight 0: the curve is what the order of the scores is worth, nothing else.
        pars = {"ranker": "default", "log_interval_s": 0, "online": False, "prompt_weight": 0}
        engine = SimEngine(PARSScheduler, dep, cost, pars=pars,
                           runtime=lambda clock: sim_runtime(clock, table, lambda rid: int(rid), rcost))
    run = engine.run(reqs)
    tau = kendall_tau(np.asarray(scores), lengths) if scores is not None else float("nan")
    return key, summarize(run.timings)["latency_mean"], tau


_SIM: dict = {}


def sim_main(args: argparse.Namespace) -> int:
    """The tau -> speed-up curve on the simulator (see the module docstring)."""
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from dataclasses import replace

    logging.getLogger("vllm").setLevel(logging.ERROR)
    from vllm.v1.core.sched.scheduler import Scheduler

    from pars_fast.sim.benchmark import saturated_capacity
    from pars_fast.sim.costs import build_cost_model
    from pars_fast.sim.engine import Deployment, SimEngine, sim_model_dir
    from pars_fast.sim.ranking import ranker_cost, score_table
    from pars_fast.sim.workload import arrival_times, build_workload, load_source, parse_arrivals, served_tokenizer

    dep = Deployment.for_gpu(args.sim_model, args.sim_gpu, args.sim_tp, max_model_len=8192)
    cost = build_cost_model(args.sim_cost, model=args.sim_model, gpu=args.sim_gpu, tp=args.sim_tp)
    rcost = ranker_cost(args.sim_ranker_cost)
    tokenizer = served_tokenizer(args.sim_model)
    sim_model_dir()
    work = build_workload("sharegpt-test", args.sim_model, args.n, seed=0, arrivals="burst", max_model_len=8192,
                          tokenizer=tokenizer)
    burst = work.requests
    lengths = np.array([r.output_tokens for r in burst], dtype=np.float64)
    capacity = args.capacity or saturated_capacity(SimEngine(Scheduler, dep, cost).run(burst[: min(2000, args.n)]).timings)
    samples = load_source("sharegpt-test", tokenizer)
    real = {}
    for name in args.ranker:
        if name == "prompt-length":
            real[name] = np.array([r.prompt_len for r in burst], dtype=np.float64)
        else:
            from pars_fast.e2e.benchmark import resolve_ranker

            table = score_table(resolve_ranker(name), [s.prompt for s in samples])
            real[name] = table.scores[[r.sample for r in burst]]
    print(f"SIMULATION: {args.sim_model} on {args.sim_tp} x {args.sim_gpu} ({dep.num_blocks:,} KV blocks, max_num_seqs "
          f"{dep.max_num_seqs}); {cost.description}; ranker cost: {rcost.source}; {args.n} ShareGPT test requests; "
          f"capacity {capacity:.2f} req/s; PARSScheduler's shipped defaults, online adaptation off, "
          f"prompt_weight 0 (the scores' order alone)")
    tasks = []
    for load in args.loads.split(","):
        if load == "burst":
            reqs = burst
        else:
            t = arrival_times(args.n, parse_arrivals("poisson"), float(load) * capacity, 0)
            reqs = [replace(r, arrival_s=float(a)) for r, a in zip(burst, t)]
        _SIM[load] = (reqs, dep, cost, rcost, lengths)
        tasks += [((load, "fcfs"), "fcfs", None), ((load, "sjf"), "sjf", None)]
        for sigma in SIM_SIGMAS:
            noise = np.random.default_rng([0, 7]).standard_normal(args.n)
            tasks.append(((load, f"sigma {sigma}"), "noise", np.log(lengths) + sigma * noise))
        tasks += [((load, f"ranker `{name}`"), name, scores) for name, scores in real.items()]
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        results = {key: (lat, tau) for key, lat, tau in pool.map(_sim_run, tasks)}
    for load in args.loads.split(","):
        fcfs = results[(load, "fcfs")][0]
        print(f"\n### load {load}: FCFS/SJF {fcfs / results[(load, 'sjf')][0]:.2f}x\n")
        print("| scores | Kendall tau on the stream | FCFS/PARS mean latency |")
        print("|---|---|---|")
        curve = []
        for key, (lat, tau) in results.items():
            if key[0] != load or key[1] in ("fcfs", "sjf"):
                continue
            label = "oracle" if key[1] == "sigma 0.0" else ("oracle + noise " + key[1] if key[1].startswith("sigma") else key[1])
            print(f"| {label} | {tau:.3f} | {fcfs / lat:.3f}x |")
            if key[1].startswith("sigma"):
                curve.append((0.0, tau, [fcfs / lat]))
        print(f"\nFCFS/PARS >= {args.target}x at {load} (simulated) needs {needed_tau(curve, args.target)}.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sim", action="store_true", help="on the simulator at GPU scale (see the module docstring)")
    parser.add_argument("--sim-model", default="meta-llama/Meta-Llama-3.1-8B")
    parser.add_argument("--sim-gpu", default="h100_sxm")
    parser.add_argument("--sim-tp", type=int, default=1)
    parser.add_argument("--sim-cost", default="aiconfigurator")
    parser.add_argument("--sim-ranker-cost", default="cpu")
    parser.add_argument("--capacity", type=float, default=None, help="--sim: capacity in req/s (default: measured)")
    parser.add_argument("--jobs", type=int, default=2, help="--sim: runs at once")
    parser.add_argument("--ranker", action="append", default=[], help="default, prompt-length or a ranker folder")
    parser.add_argument("--streams", type=int, default=8, help="request streams (seeds 0..N-1)")
    parser.add_argument("--draws", type=int, default=10, help="noise draws per sigma and stream")
    parser.add_argument("--loads", default="1.5,3", help="arrival rates as multiples of the ideal capacity")
    parser.add_argument("--target", type=float, default=1.3, help="FCFS/PARS mean latency to reach")
    parser.add_argument("--data", default="sharegpt")
    parser.add_argument("--model", default=None, help="served model folder (default: the e2e tiny Llama)")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-prompt-tokens", type=int, default=1024)
    parser.add_argument("--max-response-tokens", type=int, default=512)
    parser.add_argument("--token-ms", type=float, default=7.8)
    parser.add_argument("--aging", type=float, default=0.01, help="PARSScheduler aging, score units per second")
    parser.add_argument("--min-queue", type=int, default=16, help="PARSScheduler min_queue")
    args = parser.parse_args(argv)
    if args.sim:
        return sim_main(args)

    loads = [float(x) for x in args.loads.split(",")]
    streams = draw_streams(args)
    rankers = {name: ranker_scores(name, streams) for name in args.ranker}
    print(f"{len(streams)} streams of {args.n} requests ({args.data}, responses clipped at {args.max_response_tokens}), "
          f"{args.max_num_seqs} slots, aging {args.aging}/s, min_queue {args.min_queue}; "
          f"{args.draws} noise draws per sigma and stream")
    for load in loads:
        arrivals = [stream_arrivals(stream, load, args) for stream in streams]
        fcfs, sjf = zip(*(baselines(s, a, args) for s, a in zip(streams, arrivals)))
        fcfs_over_sjf = [f / j for f, j in zip(fcfs, sjf)]
        print(f"\n### load {load:g}x: FCFS/SJF {np.mean(fcfs_over_sjf):.2f}x "
              f"(streams {min(fcfs_over_sjf):.2f}-{max(fcfs_over_sjf):.2f})\n")
        print("| scores | Kendall tau on the stream | FCFS/PARS mean latency | p10-p90 over streams and draws |")
        print("|---|---|---|---|")
        curve = []
        for sigma in SIGMAS:
            taus, ratios = [], []
            for stream, arr, base in zip(streams, arrivals, fcfs):
                for draw in range(1 if sigma == 0 else args.draws):
                    noise = np.random.default_rng([stream["seed"], draw, 7]).standard_normal(args.n)
                    scores = np.log(stream["lengths"]) + sigma * noise
                    taus.append(kendall_tau(scores, stream["lengths"]))
                    ratios.append(base / pars_latency(stream, arr, scores, args))
            curve.append((sigma, float(np.mean(taus)), ratios))
            print_row("oracle (gated)" if sigma == 0 else f"oracle + noise sigma {sigma}", taus, ratios)
        for name, per_stream in rankers.items():
            taus = [kendall_tau(scores, s["lengths"]) for s, scores in zip(streams, per_stream)]
            ratios = [f / pars_latency(s, a, scores, args) for s, a, f, scores in zip(streams, arrivals, fcfs, per_stream)]
            print_row(f"ranker `{name}`", taus, ratios)
        print(f"\nFCFS/PARS >= {args.target}x at {load:g}x on an ideal server needs {needed_tau(curve, args.target)}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
