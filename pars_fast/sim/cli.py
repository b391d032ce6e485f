"""``pars-fast sim``: simulate serving on a GPU with vLLM's own scheduler on a virtual clock.

Example (Llama-3.1-8B on one H100, the ShareGPT test split)::

    pars-fast sim --model meta-llama/Meta-Llama-3.1-8B --gpu h100_sxm --tp 1 \\
        --data sharegpt-test --n 10000 --rates 0.5,0.8,1,1.2,1.5,2 \\
        --policies fcfs,pars,sjf,prompt-length --ranker default --out sim-results

``pars-fast sim calibrate`` fits the ``linear`` step-cost model to a real engine's steps
(``pars_fast.sim.calibrate``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pars_fast.sim.benchmark import DEFAULT_POLICIES, POLICIES, ROUTERS, SimConfigError


def _rates(text: str) -> list[Any]:
    from pars_fast.sim.benchmark import parse_rates

    try:
        return parse_rates(text)
    except SimConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, value = text.partition("=")
    try:
        overrides = json.loads(value) if sep else None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--variant {name}: not JSON ({exc})") from None
    if not name or not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"expected NAME=JSON-object (PARS settings over the pars policy's), got {text!r}")
    return name, overrides


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Simulate serving on a GPU: vLLM's own V1 scheduler (and PARSScheduler) on a virtual clock, each step "
        "priced by GPU step costs. `pars-fast sim calibrate --help`: fit the linear step cost to a real engine."
    )
    g = parser.add_argument_group("deployment")
    g.add_argument("--model", default="meta-llama/Meta-Llama-3.1-8B", help="served model (see --list)")
    g.add_argument("--gpu", default="h100_sxm", help="GPU (see --list)")
    g.add_argument("--tp", type=_positive(int), default=1, help="tensor-parallel size")
    g.add_argument("--replicas", type=_positive(int), default=1, help="engines behind a router")
    g.add_argument("--router", choices=ROUTERS, default="round-robin")
    g.add_argument("--max-num-seqs", type=_positive(int), default=None, help="default: vLLM's on that GPU")
    g.add_argument("--max-num-batched-tokens", type=_positive(int), default=None, help="default: vLLM's on that GPU")
    g.add_argument("--max-model-len", type=_positive(int), default=8192)
    g.add_argument("--num-blocks", type=_positive(int), default=None, help="KV blocks per rank (default: from GPU memory)")
    g.add_argument("--gpu-memory-utilization", type=_positive(float), default=0.9)
    g.add_argument("--async-scheduling", choices=("on", "off"), default=None, help="default: vLLM's (on, on GPUs)")
    g.add_argument("--cost", default="aiconfigurator",
                   help="step cost: 'aiconfigurator' (measured kernel tables; the sim extra), 'linear' (the shipped "
                        "preset), or a linear coefficients JSON (pars-fast sim calibrate)")
    g.add_argument("--overhead-ms", type=float, default=None, help="per-step overhead on top of the forward pass")
    g = parser.add_argument_group("workload")
    g.add_argument("--data", default="sharegpt-test", help="sharegpt-test, sharegpt-val (where settings are chosen), sharegpt-later, humaneval or FILE.jsonl (as pars-fast eval)")
    g.add_argument("-n", "--n", type=_positive(int), default=10_000, help="requests per load (resampled past the data's size)")
    g.add_argument("--rates", type=_rates, default=_rates("0.5,0.8,1,1.2,1.5,2"),
                   help="loads: multiples of the measured capacity (1.5), req/s (20rps) or 'burst'")
    g.add_argument("--arrivals", default="poisson", help="poisson, gamma:CV (bursty; CV=1 is Poisson) or trace")
    g.add_argument("--burst-n", type=_positive(int), default=None, help="requests in the burst load (default: --n)")
    g.add_argument("--capacity-n", type=_positive(int), default=2000, help="burst size of the capacity measurement")
    g.add_argument("--capacity", type=_positive(float), default=None, help="capacity in req/s (default: measured)")
    g.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("policies")
    g.add_argument("--policies", default=",".join(DEFAULT_POLICIES), help=f"comma-separated: {', '.join(POLICIES)}")
    g.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME=JSON",
                   help="a pars variant with PARS settings overridden, e.g. 'aged={\"aging\": 0.05}'")
    g.add_argument("--pars", type=_json_object, default={}, help="PARS settings laid over every PARS policy's (JSON)")
    g.add_argument("--ranker", default="default", help="'default' (trained on first use) or a ranker folder")
    g.add_argument("--ranker-cost", default="cpu", help="the ranker's modelled cost: cpu, gpu, free, or a JSON file")
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=None, help="write results.json, results.md and plots here")
    g.add_argument("--jobs", type=_positive(int), default=min(2, os.cpu_count() or 1), help="runs at once (processes)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    g.add_argument("--list", action="store_true", help="list the models and GPUs the cost models know, and exit")


def run(args: argparse.Namespace) -> int:
    import logging

    from pars_fast.sim.benchmark import SimConfig, run_sim
    from pars_fast.sim.costs import CostModelError, available_gpus, available_models

    if args.list:
        print("models: " + ", ".join(available_models()))
        print("gpus:   " + ", ".join(available_gpus()))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # runs fork after tokenizing
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("vllm").setLevel(logging.ERROR)
    config = SimConfig(
        out_dir=args.out,
        model=args.model,
        gpu=args.gpu,
        tp=args.tp,
        data=args.data,
        n=args.n,
        rates=args.rates,
        policies=[p.strip() for p in args.policies.split(",") if p.strip()],
        variants=dict(args.variant),
        ranker=args.ranker,
        ranker_cost=args.ranker_cost,
        cost=args.cost,
        overhead_s=None if args.overhead_ms is None else args.overhead_ms / 1e3,
        arrivals=args.arrivals,
        burst_n=args.burst_n,
        capacity_n=args.capacity_n,
        capacity_rps=args.capacity,
        seed=args.seed,
        replicas=args.replicas,
        router=args.router,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_blocks=args.num_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        async_scheduling=None if args.async_scheduling is None else args.async_scheduling == "on",
        pars=args.pars,
        jobs=args.jobs,
        progress=not args.no_progress,
    )
    from pars_fast.sim.engine import SimError
    from pars_fast.sim.workload import WorkloadError

    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else (lambda msg: print(msg, flush=True))
    try:
        result = run_sim(config, log=log)
    except (SimConfigError, CostModelError, WorkloadError, SimError, FileNotFoundError) as exc:
        print(f"pars-fast sim: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"comparisons": result["comparisons"], "targets": result["targets"]}, indent=1))
    else:
        from pars_fast.sim.report import markdown_report

        print(markdown_report(result))
    if args.out:
        log(f"results in {args.out}/ (results.json, results.md, sim_*.png)")
    return 0
