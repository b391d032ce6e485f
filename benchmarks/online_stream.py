"""Online adaptation, measured as a stream: does learning from finished requests help?

Prompts arrive once each, in a seeded random order; each is scored (the frozen
ranker, the online predictor and their blend, as ``PARSScheduler`` blends them), then
its true length is revealed and learned from (``pars_fast.online.stream_eval``).
Kendall tau over the second half of the stream is what the learner achieves once it
has seen half the data; the frozen ranker and the prompt length are scored on the
same prompts for comparison::

    python benchmarks/online_stream.py                    # the default ranker; HumanEval + ShareGPT test
    python benchmarks/online_stream.py --ranker DIR --data humaneval,sharegpt-test,sharegpt-later --seeds 5

HumanEval is out of domain for a ShareGPT-trained ranker (code); the ShareGPT test
split is in domain, where the blend must not hurt.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranker", default=None, help="ranker folder (default: the default ranker)")
    parser.add_argument("--data", default="humaneval,sharegpt-test", help="comma-separated dataset specs (pars_fast.data)")
    parser.add_argument("--seeds", type=int, default=5, help="stream orders (seeds 0..N-1)")
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--json", default=None, help="write every run's result here")
    args = parser.parse_args(argv)

    from pars_fast.data import load_dataset
    from pars_fast.online import stream_eval
    from pars_fast.ranker import Ranker

    ranker = Ranker.load(args.ranker, backend=args.backend, device="cpu")
    runs = {}
    print("| data | n | seeds | frozen τ | prompt length τ | online τ | blend τ | blend − frozen | final online weight |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in [d.strip() for d in args.data.split(",") if d.strip()]:
        samples = load_dataset(spec)
        results = [stream_eval(ranker, samples, seed=seed) for seed in range(args.seeds)]
        runs[spec] = results
        half = {k: np.array([r["second_half"][k] for r in results]) for k in ("frozen", "prompt_length", "online", "blend")}
        weight = np.array([r["learner"]["weight"] for r in results])

        def cell(a: np.ndarray) -> str:
            return f"{a.mean():.3f} ± {a.std(ddof=1) / np.sqrt(len(a)):.3f}" if len(a) > 1 else f"{a.mean():.3f}"

        print(f"| {spec} (second half) | {len(samples)} | {args.seeds} | {cell(half['frozen'])} | {cell(half['prompt_length'])} | "
              f"{cell(half['online'])} | {cell(half['blend'])} | {cell(half['blend'] - half['frozen'])} | {cell(weight)} |")
        whole = {k: np.array([r["all"][k] for r in results]) for k in ("frozen", "blend")}
        print(f"| {spec} (whole stream) | {len(samples)} | {args.seeds} | {cell(whole['frozen'])} | | | {cell(whole['blend'])} | "
              f"{cell(whole['blend'] - whole['frozen'])} | |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ranker": args.ranker or "default", "runs": runs}, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
