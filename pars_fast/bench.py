"""``pars-fast bench``: benchmarks. ``pars-fast bench e2e`` runs FCFS vs PARS vs oracle SJF.

Example (the CPU run in docs/BENCHMARKS.md)::

    pars-fast bench e2e --n 200 --loads burst,0.8,1.5,3 --out e2e-results

Each policy gets its own vLLM engine (the tiny CPU Llama unless ``--model``) and the
same request stream; Poisson loads are multiples of the capacity measured from the
FCFS burst. On a CPU the engines start together and take turns load by load
(``--schedule``). Writes ``results.json`` (every request's timings and the
summaries), ``results.md`` (the table), two plots and the engines' logs to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pars_fast.e2e.benchmark import DEFAULT_POLICIES, POLICIES


def _loads(text: str) -> list[float | None]:
    from pars_fast.e2e.workload import WorkloadError, parse_load

    try:
        return [parse_load(part) for part in text.split(",") if part.strip()]
    except WorkloadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no policies given; choose from {', '.join(POLICIES)}")
    return names  # checked against the built-in policies and --variant names by BenchConfig.check


def _variant(text: str) -> tuple[str, dict[str, Any]]:
    name, sep, value = text.partition("=")
    try:
        overrides = json.loads(value) if sep else None
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--variant {name}: not JSON ({exc})") from None
    if not name or not isinstance(overrides, dict):
        raise argparse.ArgumentTypeError(f"expected NAME=JSON-object (PARS settings over the pars policy's), got {text!r}")
    return name, overrides


def _engine_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (an AsyncEngineArgs field), got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value  # a bare string


def add_e2e_arguments(parser: argparse.ArgumentParser, *, n: int, loads: str, out: str) -> None:
    """The end-to-end options (shared with ``pars-fast demo``, which changes the defaults)."""
    g = parser.add_argument_group("workload")
    g.add_argument("--data", default="sharegpt", help="'sharegpt' (its held-out test split) or a .jsonl of {prompt, response_len}")
    g.add_argument("-n", "--n", type=int, default=n, help=f"requests in the stream (default {n})")
    g.add_argument("--loads", type=_loads, default=_loads(loads),
                   help=f"comma-separated: 'burst' and/or multiples of the measured capacity (default {loads})")
    g.add_argument("--capacity", type=float, default=None, help="capacity in req/s; default: measured from the FCFS burst")
    g.add_argument("--seed", type=int, default=0, help="fixes the sampled requests and the arrival times")
    g.add_argument("--repeats", type=int, default=1,
                   help="serve every load this many times per policy, in rotation; each ratio is then the median of "
                   "the back-to-back pairs, with its range (default 1; this noisy 2-core machine needs 3+)")
    g.add_argument("--record-steps", action="store_true",
                   help="the FCFS engine records every step (logs/fcfs.steps.jsonl) to calibrate the simulator: "
                   "pars-fast sim calibrate --from-log OUT/logs/fcfs.steps.jsonl --out COST.json")
    g.add_argument("--max-prompt-tokens", type=int, default=1024, help="skip samples with longer prompts (default 1024)")
    g.add_argument("--max-response-tokens", type=int, default=None, help="clip responses to this many tokens (default: no clip)")
    g = parser.add_argument_group("policies")
    g.add_argument("--policies", type=_policies, default=list(DEFAULT_POLICIES), help=f"comma-separated, from: {', '.join(POLICIES)}")
    g.add_argument("--variant", type=_variant, action="append", default=[], metavar="NAME=JSON",
                   help="a policy NAME: pars with these PARS settings on top, e.g. pars-thread='{\"worker\": \"thread\"}'; repeatable")
    g.add_argument("--ranker", default="default", help="ranker folder for pars (default: the default ranker, trained on first use)")
    g.add_argument("--aging", type=float, default=None, help="PARSScheduler aging (score units per second waited); default: the scheduler's")
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="model folder or name (default: the tiny random-weight Llama, for CPUs)")
    g.add_argument("--max-num-seqs", type=int, default=8, help="concurrent sequences per engine step (default 8)")
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--kv-cache-gib", type=int, default=1, help="CPU KV cache (VLLM_CPU_KVCACHE_SPACE) unless already set")
    g.add_argument("--engine-arg", type=_engine_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra AsyncEngineArgs field (VALUE parsed as JSON), repeatable")
    g = parser.add_argument_group("output")
    g.add_argument("--out", default=out, help=f"output folder (default {out})")
    g.add_argument("--schedule", choices=("auto", "interleaved", "sequential"), default="auto",
                   help="interleaved: all engines up, policies take turns per load (fair on a busy machine); "
                   "sequential: one engine at a time (a big model on one GPU); auto: sequential with CUDA")
    g.add_argument("--timeout", type=float, default=None, help="seconds allowed per engine start and per load level")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--verbose", action="store_true", help="show vLLM's logs instead of writing them to OUT/logs")


def config_from_args(args: argparse.Namespace) -> Any:
    from pars_fast.e2e.benchmark import BenchConfig

    return BenchConfig(
        out_dir=args.out,
        model=args.model,
        data=args.data,
        n=args.n,
        loads=args.loads,
        policies=args.policies,
        variants=dict(args.variant),
        ranker=args.ranker,
        aging=args.aging,
        capacity_rps=args.capacity,
        seed=args.seed,
        repeats=args.repeats,
        max_num_seqs=args.max_num_seqs,
        max_model_len=args.max_model_len,
        max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype,
        kv_cache_gib=args.kv_cache_gib,
        engine_args=dict(args.engine_arg),
        progress=not args.no_progress,
        verbose=args.verbose,
        timeout_s=args.timeout,
        schedule=args.schedule,
        record_steps=args.record_steps,
    )


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    e2e = sub.add_parser(
        "e2e",
        help="FCFS vs PARS vs oracle SJF on a real vLLM engine",
        description="FCFS vs PARS vs oracle SJF on a real vLLM engine, same request stream for every policy.",
    )
    add_e2e_arguments(e2e, n=200, loads="burst,0.8,1.5,3", out="pars-fast-e2e")


def run(args: argparse.Namespace) -> int:
    if args.bench != "e2e":  # argparse only lets e2e through; kept for clarity
        print(f"pars-fast bench: unknown benchmark {args.bench!r}", file=sys.stderr)
        return 2
    return run_e2e(args)


def run_e2e(args: argparse.Namespace) -> int:
    from pars_fast.e2e.benchmark import BenchError, RunError, run_benchmark
    from pars_fast.e2e.report import markdown_table, ratio_table, write_report
    from pars_fast.e2e.workload import WorkloadError

    try:
        config = config_from_args(args)
        config.check()
        result = run_benchmark(config)
    except (BenchError, RunError, WorkloadError, ValueError, FileNotFoundError) as exc:
        print(f"pars-fast bench e2e: error: {exc}", file=sys.stderr)
        return 1
    files = write_report(result, args.out)
    print()
    print(markdown_table(result))
    print()
    print(ratio_table(result))
    print()
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0
