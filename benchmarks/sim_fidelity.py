"""How close is the simulator to the real engine? Replay a ``pars-fast bench e2e`` run in it.

Reads the ``results.json`` of a ``pars-fast bench e2e --repeats K`` run on this machine's
CPU engine, rebuilds its exact request stream (same seed, same prompts and lengths, the
arrival times the run recorded), builds the same vLLM scheduler configuration the
engines ran with, and simulates every policy of the run with a step-cost model fitted
to that engine (``pars-fast sim calibrate``)::

    python benchmarks/sim_fidelity.py RUN/results.json --cost docs/sim/cpu-calibration.json

Prints, per load and policy, the simulated mean latency beside the engine's median over
its repeats and their range, and the ratios FCFS/SJF and FCFS/PARS both ways. The
project's bar (docs/BENCHMARKS.md, "Simulated GPU serving"): mean latency within 15%
(or within the engine's own repeat range where that is wider), ratios within 10%.

PARS runs as the CPU engine ran it: the ranker inline (no spare core), at the scoring
cost measured on this machine (``--ranker-cost``), on the prompts as the scheduler sees
them (token ids decoded by the served tokenizer).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np


def engine_settings(meta: dict, model: str) -> dict:
    """The scheduler settings the run's engines had (vLLM's own defaults resolved)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext

    cfg = meta["config"]
    args = AsyncEngineArgs(model=model, max_model_len=cfg["max_model_len"], max_num_seqs=cfg["max_num_seqs"],
                           max_num_batched_tokens=cfg.get("max_num_batched_tokens"), dtype=cfg.get("dtype", "auto"),
                           enforce_eager=True)
    vc = args.create_engine_config(usage_context=UsageContext.ENGINE_CONTEXT)
    sc = vc.scheduler_config
    return {"max_num_seqs": sc.max_num_seqs, "max_num_batched_tokens": sc.max_num_batched_tokens,
            "max_model_len": cfg["max_model_len"], "block_size": vc.cache_config.block_size or 16,
            "async_scheduling": bool(sc.async_scheduling), "enable_prefix_caching": bool(vc.cache_config.enable_prefix_caching)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="results.json of a pars-fast bench e2e run (with --repeats)")
    parser.add_argument("--cost", required=True, help="linear step costs fitted to that engine (pars-fast sim calibrate)")
    parser.add_argument("--ranker-cost", default="cpu", help="the ranker's cost inline (pars_fast.sim.ranking.RANKER_COSTS)")
    parser.add_argument("--json", type=Path, default=None, help="also write the comparison here")
    parser.add_argument("--prompt-weight", type=float, default=None,
                        help="simulate PARS with this prompt_weight instead of the run's (what another key would have done)")
    args = parser.parse_args(argv)
    logging.getLogger("vllm").setLevel(logging.ERROR)

    from transformers import AutoTokenizer
    from vllm.v1.core.sched.scheduler import Scheduler

    from pars_fast.e2e.benchmark import BenchConfig, prepare_workload, resolve_model, resolve_ranker
    from pars_fast.e2e.metrics import summarize
    from pars_fast.sim.costs import LinearCost
    from pars_fast.sim.engine import Deployment, SimEngine
    from pars_fast.sim.ranking import ranker_cost, score_table, sim_runtime
    from pars_fast.sim.workload import SimRequest
    from pars_fast.vllm import PARSScheduler

    result = json.loads(args.results.read_text())
    meta = result["meta"]
    config = BenchConfig(**{k: v for k, v in meta["config"].items() if k in BenchConfig.__dataclass_fields__})
    model = meta["model"] if Path(meta["model"]).is_dir() else resolve_model(config.model)
    workload = prepare_workload(config, model)
    jobs = workload.jobs
    settings = engine_settings(meta, model)
    cost = LinearCost.from_file(args.cost)
    dep = Deployment(model="tiny-llama (CPU engine)", gpu="cpu", tp=1, num_blocks=1_000_000, **settings)

    tokenizer = AutoTokenizer.from_pretrained(model)
    # The scheduler sees token ids and decodes them with the served model's tokenizer.
    texts = [tokenizer.decode(j.prompt_token_ids, skip_special_tokens=True) for j in jobs]
    ranker_dir = meta["ranker"] if meta.get("ranker") and Path(meta["ranker"]).is_dir() else resolve_ranker(config.ranker)
    table = score_table(ranker_dir, texts)
    rcost = ranker_cost(args.ranker_cost)
    aging = meta.get("aging")
    # Runs recorded before prompt_weight existed keyed by the score alone.
    prompt_weight = meta.get("prompt_weight", 0.0) if args.prompt_weight is None else args.prompt_weight

    def engine_for(policy: str, reqs: list[SimRequest]) -> SimEngine:
        def sample_of(rid: str) -> int:
            return reqs[int(rid)].sample

        def pars(ranker: str, tbl, extra: dict) -> SimEngine:
            settings = {"ranker": ranker, "log_interval_s": 0, "worker": "inline", **extra}
            if prompt_weight is not None:
                settings["prompt_weight"] = prompt_weight
            if aging is not None:
                settings["aging"] = aging
            return SimEngine(PARSScheduler, dep, cost, pars=settings,
                             runtime=lambda clock: sim_runtime(clock, tbl, sample_of, rcost))

        if policy == "fcfs":
            return SimEngine(Scheduler, dep, cost)
        if policy == "pars":
            return pars(ranker_dir, table, {"online": {"trust_length_caps": True}})
        if policy == "pars-frozen":
            return pars(ranker_dir, table, {"online": False})
        if policy == "sjf":
            return pars("oracle", None, {})
        if policy == "prompt-length":
            return pars("prompt-length", None, {})
        raise SystemExit(f"sim_fidelity: policy {policy!r} is not simulated")

    rows = []
    print(f"{len(jobs)} requests; engine: max_num_seqs {dep.max_num_seqs}, max_num_batched_tokens "
          f"{dep.max_num_batched_tokens}; step cost: {cost.description}")
    print("| load | policy | engine mean (s), median [range] | simulated | sim / engine |")
    print("|---|---|---|---|---|")
    sim_means: dict[tuple[str, str], float] = {}
    for load in result["loads"]:
        fcfs_level = result["runs"]["fcfs"]["levels"][load]
        arrivals = {r["idx"]: r["arrival"] for r in fcfs_level["requests"]}
        reqs = [SimRequest(j.idx, j.idx, texts[j.idx], tuple(j.prompt_token_ids), j.max_tokens, arrivals[j.idx], None)
                for j in jobs]
        for policy in result["policies"]:
            level = result["runs"][policy]["levels"][load]
            means = [r["summary"]["latency_mean"] for r in level.get("repeats") or [level]]
            run = engine_for(policy, reqs).run(reqs)
            sim = summarize(run.timings)["latency_mean"]
            sim_means[(load, policy)] = sim
            med = float(np.median(means))
            within = min(means) <= sim <= max(means) or abs(sim / med - 1) <= 0.15
            rows.append({"load": load, "policy": policy, "engine_median": med, "engine_range": [min(means), max(means)],
                         "sim": sim, "ok": within})
            print(f"| {load} | {policy} | {med:.2f} [{min(means):.2f}–{max(means):.2f}] | {sim:.2f} | "
                  f"{sim / med:.2f}{'' if within else ' ✗'} |")
    ratios = []
    print("\n| load | ratio | engine (median of pairs) | simulated | sim / engine |")
    print("|---|---|---|---|---|")
    for load in result["loads"]:
        for label, a, b in (("FCFS/SJF mean latency", "fcfs", "sjf"), ("FCFS/PARS mean latency", "fcfs", "pars")):
            engine = result.get("comparisons", {}).get(load, {}).get(label)
            if engine is None or (load, a) not in sim_means or (load, b) not in sim_means:
                continue
            sim = sim_means[(load, a)] / sim_means[(load, b)]
            ratios.append({"load": load, "ratio": label, "engine": engine, "sim": sim, "ok": abs(sim / engine - 1) <= 0.10})
            print(f"| {load} | {label} | {engine:.2f}× | {sim:.2f}× | {sim / engine:.2f}{'' if ratios[-1]['ok'] else ' ✗'} |")
    if args.json:
        args.json.write_text(json.dumps({"results": str(args.results), "cost": args.cost, "latency": rows, "ratios": ratios},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
