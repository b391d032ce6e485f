"""``pars-fast demo``: a small, honest end-to-end run on a fresh install.

1. Makes sure the default ranker exists (``ensure_default_ranker()`` trains it on
   the ShareGPT train split on first use: a few minutes on 2 CPU cores).
2. Replays held-out ShareGPT prompts on a real vLLM engine (the tiny CPU Llama) under
   FCFS, PARS and oracle SJF, every policy on the same requests, all arriving at once
   (a burst: the engine is overloaded from the first second).
3. Prints the latency table and the ratios, and writes the plots.
4. A short **simulated** GPU section (``pars-fast sim``, under a minute): the same
   policies for Llama-3.1-8B on one H100, vLLM's own scheduler on a virtual clock,
   labelled as simulation with its step-cost model (``--no-sim`` skips it).

It is ``pars-fast bench e2e`` with smaller defaults, so every option of that
command works here too (e.g. ``--loads 3`` for Poisson arrivals at 3x the capacity,
measured first from an extra FCFS burst).
"""

from __future__ import annotations

import argparse
import sys
import time

from pars_fast.bench import add_e2e_arguments, config_from_args

# Sized to finish in under 10 minutes on 2 CPU cores, ranker training included.
DEMO_N = 100
DEMO_MAX_RESPONSE_TOKENS = 512
DEMO_REPEATS = 2
# The simulated section: a burst deep enough to queue behind vLLM's 1,024 sequences on an
# H100, the linear step-cost preset (no table build), both cores: under a minute.
SIM_N = 2000


def verdict(result: dict) -> list[str]:
    """One plain line per load: did PARS beat FCFS on mean latency here, and by how much.

    With repeats (``--repeats``), the ratio is the median of the back-to-back pairs, and
    pairs that disagree on the winner are called what they are: noise.
    """
    runs = result["runs"]
    if "pars" not in runs or "fcfs" not in runs:
        return []
    lines = []
    for load in result["loads"]:
        fcfs = runs["fcfs"]["levels"][load]["summary"]["latency_mean"]
        pars = runs["pars"]["levels"][load]["summary"]["latency_mean"]
        ratio = result.get("comparisons", {}).get(load, {}).get("FCFS/PARS mean latency") or fcfs / pars
        span = (result.get("comparison_ranges") or {}).get(load, {}).get("FCFS/PARS mean latency")
        pairs = "" if span is None else f"; pairs {span[0]:.2f}-{span[1]:.2f}x"
        seconds = f"({pars:.2f} s vs {fcfs:.2f} s{pairs})"
        if span is not None and span[0] < 1.0 <= span[1]:
            lines.append(
                f"Verdict ({load}): no clear winner: FCFS/PARS {ratio:.2f}x, but the repeats disagree {seconds}; "
                "this machine's run-to-run noise is larger than the difference."
            )
        elif ratio >= 1.0:
            lines.append(f"Verdict ({load}): PARS beat FCFS on mean latency, {ratio:.2f}x {seconds}.")
        else:
            lines.append(f"Verdict ({load}): PARS was SLOWER than FCFS on mean latency, {ratio:.2f}x {seconds}.")
    return lines


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_e2e_arguments(parser, n=DEMO_N, loads="burst", out="pars-fast-demo")
    parser.add_argument("--no-sim", action="store_true", help="skip the simulated GPU section")
    # Two runs per policy: one can be off by 20% on a small shared machine, and the
    # verdict should say so when the two disagree.
    parser.set_defaults(max_response_tokens=DEMO_MAX_RESPONSE_TOKENS, repeats=DEMO_REPEATS)


def run(args: argparse.Namespace) -> int:
    from pars_fast.e2e.benchmark import BenchError, RunError, resolve_ranker, run_benchmark
    from pars_fast.e2e.report import markdown_table, ratio_table, write_report
    from pars_fast.e2e.workload import WorkloadError, load_name

    t0 = time.monotonic()
    config = config_from_args(args)
    loads = ", ".join(load_name(f) for f in config.loads)
    print(
        f"pars-fast demo: {config.n} held-out ShareGPT requests (responses clipped at {config.max_response_tokens} "
        f"tokens), load {loads}, policies {', '.join(config.policies)}, on a real vLLM engine "
        f"({config.model or 'tiny random-weight Llama on the CPU'}, max_num_seqs={config.max_num_seqs}).",
        flush=True,
    )
    try:
        config.check()
        if any(p in ("pars", "pars-frozen", "pars-priority") for p in config.policies):
            print("[1/2] ranker", flush=True)
            t = time.monotonic()
            config.ranker = resolve_ranker(config.ranker)  # trains the default ranker on first use
            print(f"      ready in {time.monotonic() - t:.0f} s: {config.ranker}", flush=True)
        print("[2/2] engines (one per policy, same requests)", flush=True)
        result = run_benchmark(config, log=lambda msg: print("      " + msg, flush=True))
    except (BenchError, RunError, WorkloadError, ValueError, FileNotFoundError) as exc:
        print(f"pars-fast demo: error: {exc}", file=sys.stderr)
        return 1
    files = write_report(result, config.out_dir, prefix="demo")
    print()
    print(markdown_table(result))
    print()
    print(ratio_table(result))
    print()
    for line in verdict(result):
        print(line)
    print()
    print(
        "How to read it: latency is arrival -> last token; 'norm.' is latency per output token, which shows "
        "short requests stuck behind long ones; SJF knows the true lengths (the best order), PARS only sees the prompt."
    )
    print(f"Plots: {files['cdf']} and {files['bars']}; all timings: {files['json']}")
    if not args.no_sim:
        simulated_section(config)
    print(f"Total time: {(time.monotonic() - t0) / 60:.1f} min")
    return 0


def simulated_section(config) -> None:
    """The same policies on a simulated GPU server (pars-fast sim), clearly labelled."""
    from pathlib import Path

    from pars_fast.sim.benchmark import SimConfig, parse_rates, run_sim
    from pars_fast.sim.report import SIMULATION_NOTE

    policies = [p for p in config.policies if p in ("fcfs", "pars", "sjf", "prompt-length")]
    print()
    print(f"[sim] SIMULATION: Llama-3.1-8B on one H100, a burst of {SIM_N:,} ShareGPT test requests, "
          f"policies {', '.join(policies)} (`pars-fast sim` for more)", flush=True)
    try:
        result = run_sim(
            SimConfig(out_dir=str(Path(config.out_dir) / "sim"), n=SIM_N, rates=parse_rates("burst"), policies=policies,
                      ranker=config.ranker, cost="linear", jobs=2, progress=False),
            log=lambda msg: print("      " + msg, flush=True),
        )
    except Exception as exc:  # the real-engine result above stands on its own
        print(f"      simulation skipped: {type(exc).__name__}: {exc}")
        return
    burst = result["runs"]
    print()
    print(SIMULATION_NOTE)
    for policy in policies:
        s = burst[policy]["levels"]["burst"]["summary"]
        print(f"      {policy:>14}: mean latency {s['latency_mean']:.2f} s, P99 {s['latency_p99']:.2f} s, "
              f"TTFT {s['ttft_mean']:.2f} s (simulated)")
    ratios = result["comparisons"]["burst"]
    for label in ("FCFS/PARS mean latency", "FCFS/SJF mean latency"):
        if label in ratios:
            print(f"      {label}: {ratios[label]:.2f}x (simulated)")
    print(f"      Full report: {Path(config.out_dir) / 'sim' / 'results.md'}")
