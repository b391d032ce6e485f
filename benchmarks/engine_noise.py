"""How much does a vLLM engine's speed vary on its own, and does service order change it?

One engine (the tiny CPU Llama, 8 slots), one stream of real ShareGPT test requests
replayed as a burst (``max_tokens`` = the true length, ``ignore_eos``), submitted in
several orders: arrival (FCFS), true length (SJF), prompt length, and longest first.
Orders take turns, rotating each round, so a slow minute hits all of them. For each
run it prints the wall-clock tokens/s::

    python benchmarks/engine_noise.py --rounds 3

Same engine and same order twice is the noise floor that any end-to-end ratio from one
run per policy sits on (``pars-fast bench e2e --repeats`` exists for that reason).
(CPU time is no help here: the engine's processes poll, so together they use both
cores whatever the work, 2 CPU seconds per wall second.)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

ORDERS = ("fcfs", "sjf", "prompt-length", "longest-first")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-response-tokens", type=int, default=512)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pars_fast.e2e.benchmark import resolve_model
    from pars_fast.e2e.workload import build_workload, load_samples

    model = resolve_model(None)
    tokenizer = AutoTokenizer.from_pretrained(model)
    jobs = build_workload(load_samples("sharegpt", tokenizer), tokenizer, args.n, seed=0,
                          max_response_tokens=args.max_response_tokens).jobs
    by = {
        "fcfs": lambda i: i,
        "sjf": lambda i: jobs[i].max_tokens,
        "prompt-length": lambda i: jobs[i].prompt_len,
        "longest-first": lambda i: -jobs[i].max_tokens,
    }
    orders = {name: sorted(range(len(jobs)), key=by[name]) for name in ORDERS}
    llm = LLM(model=model, dtype="auto", max_model_len=2048, max_num_seqs=8, enforce_eager=True,
              enable_prefix_caching=False, seed=0)
    tokens = sum(j.max_tokens for j in jobs)
    llm.generate([TokensPrompt(prompt_token_ids=jobs[0].prompt_token_ids)],
                 SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up

    tps: dict[str, list[float]] = {name: [] for name in ORDERS}
    print(f"{len(jobs)} requests, {tokens} tokens; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    for r in range(args.rounds):
        for name in ORDERS[r % len(ORDERS):] + ORDERS[: r % len(ORDERS)]:
            idx = orders[name]
            prompts = [TokensPrompt(prompt_token_ids=jobs[i].prompt_token_ids) for i in idx]
            params = [SamplingParams(max_tokens=jobs[i].max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
                      for i in idx]
            t0 = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            tps[name].append(tokens / wall)
            print(f"round {r} {name:>13}: {wall:5.1f} s, {tokens / wall:6.0f} tok/s (load {os.getloadavg()[0]:.1f})",
                  flush=True)

    print("\n| order | tok/s per round | median / FCFS | same order max/min |")
    print("|---|---|---|---|")
    base = float(np.median(tps["fcfs"]))
    for name in ORDERS:
        print(f"| {name} | {' '.join(f'{x:.0f}' for x in tps[name])} | {np.median(tps[name]) / base:.2f}× | "
              f"{max(tps[name]) / min(tps[name]):.2f} |")


if __name__ == "__main__":
    main()
