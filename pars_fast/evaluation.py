"""Evaluating and using a ranker from the command line.

* ``pars-fast eval [--ranker DIR | --baseline prompt-length] --data FILE.jsonl|sharegpt-test|humaneval [--json]``:
  Kendall τ, δ-filtered pairwise accuracy, Spearman ρ and n on held-out data.
* ``pars-fast score [--ranker DIR]``: scores prompts read from stdin, one per line
  (or one JSON string / ``{"prompt": ...}`` object per line with ``--jsonl``),
  and prints one score per line (higher = longer expected response).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pars_fast.data import Sample
from pars_fast.metrics import ranking_metrics

BASELINES = ("prompt-length",)


def prompt_length_scores(prompts: Sequence[str], tokenizer: Any = None) -> np.ndarray:
    """The prompt-length heuristic: score = untruncated prompt length in tokens."""
    from pars_fast.data import _resolve_tokenizer, count_tokens

    return np.asarray(count_tokens(list(prompts), _resolve_tokenizer(tokenizer)), dtype=np.float32)


def evaluate_scores(scores: np.ndarray, samples: Sequence[Sample], delta: float = 0.2) -> dict[str, Any]:
    """Ranking metrics of ``scores`` against the samples' true response lengths."""
    return ranking_metrics(scores, [s.response_len for s in samples], delta)


def evaluate_ranker(ranker: Any, samples: Sequence[Sample], delta: float = 0.2) -> dict[str, Any]:
    """Score ``samples`` with ``ranker`` and return the metrics plus scoring time."""
    t0 = time.perf_counter()
    scores = ranker.score([s.prompt for s in samples])
    elapsed = time.perf_counter() - t0
    metrics = evaluate_scores(scores, samples, delta)
    metrics["score_s"] = round(elapsed, 3)
    metrics["prompts_per_s"] = round(len(samples) / elapsed, 1) if elapsed > 0 else math.inf
    return metrics


# --------------------------------------------------------------------------- pars-fast eval


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranker", default=None, help="ranker folder (default: the default ranker)")
    parser.add_argument("--baseline", choices=BASELINES, default=None, help="evaluate a heuristic instead of a ranker")
    parser.add_argument(
        "--data", default="sharegpt-test", help="sharegpt-test (default), sharegpt-train, humaneval, or FILE.jsonl"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer counting response lengths (default: the ranker's MiniLM tokenizer)"
    )
    parser.add_argument("--delta", type=float, default=0.2, help="pair filter for pairwise accuracy")
    parser.add_argument("--backend", default="auto", help="encoder backend (auto, hf, ...)")
    parser.add_argument("--device", default=None)
    parser.add_argument(
        "--online", action="store_true",
        help="stream the prompts through the online learner (as PARSScheduler learns from finished requests): "
        "each is scored, then its true length is revealed; reports tau over the second half of the stream",
    )
    parser.add_argument("--seed", type=int, default=0, help="--online: the stream's order")
    parser.add_argument("--json", action="store_true", help="print metrics as JSON")


def run(args: argparse.Namespace) -> int:
    if args.online:
        return _run_online(args)
    from pars_fast.data import DatasetError, check_rankable, load_dataset
    from pars_fast.ranker import Ranker, RankerLoadError

    try:
        samples = load_dataset(args.data, tokenizer=args.tokenizer)
        check_rankable(samples, args.delta, what=f"evaluation data {args.data!r}")
        if args.baseline == "prompt-length":
            tokenizer = args.tokenizer
            if tokenizer is None and args.ranker is not None:
                tokenizer = Ranker.load(args.ranker, backend="hf", device="cpu").tokenizer
            t0 = time.perf_counter()
            scores = prompt_length_scores([s.prompt for s in samples], tokenizer)
            metrics = evaluate_scores(scores, samples, args.delta)
            metrics["score_s"] = round(time.perf_counter() - t0, 3)
            name = "prompt-length"
        else:
            ranker = Ranker.load(args.ranker, backend=args.backend, device=args.device)
            metrics = evaluate_ranker(ranker, samples, args.delta)
            metrics["backend"] = ranker.backend_name
            name = str(args.ranker or "default")
    except (DatasetError, RankerLoadError, FileNotFoundError, ValueError) as exc:
        print(f"pars-fast eval: error: {exc}", file=sys.stderr)
        return 2
    metrics = {"ranker": name, "data": args.data, **metrics}
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(
            f"{name} on {args.data}: kendall_tau={metrics['kendall_tau']:.4f} "
            f"pairwise_accuracy={metrics['pairwise_accuracy']:.4f} (delta={args.delta}, {metrics['n_pairs']} pairs) "
            f"spearman={metrics['spearman']:.4f} n={metrics['n']}"
        )
    return 0


def _run_online(args: argparse.Namespace) -> int:
    from pars_fast.data import DatasetError, load_dataset
    from pars_fast.online import stream_eval
    from pars_fast.ranker import Ranker, RankerLoadError

    if args.baseline is not None:
        print("pars-fast eval: error: --online streams a ranker, not a baseline", file=sys.stderr)
        return 2
    try:
        samples = load_dataset(args.data, tokenizer=args.tokenizer)
        ranker = Ranker.load(args.ranker, backend=args.backend, device=args.device)
        result = stream_eval(ranker, samples, seed=args.seed)
    except (DatasetError, RankerLoadError, FileNotFoundError, ValueError) as exc:
        print(f"pars-fast eval: error: {exc}", file=sys.stderr)
        return 2
    result = {"ranker": str(args.ranker or "default"), "data": args.data, **result}
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    else:
        half, learner = result["second_half"], result["learner"]
        print(
            f"{result['ranker']} on {args.data}, streamed (seed {args.seed}, n={result['n']}); Kendall tau over the "
            f"second half: frozen {half['frozen']:.4f}, online {half['online']:.4f}, blend {half['blend']:.4f}, "
            f"prompt length {half['prompt_length']:.4f}; final online weight {learner['weight']:.2f}"
        )
    return 0


# --------------------------------------------------------------------------- pars-fast score


def score_configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ranker", default=None, help="ranker folder (default: the default ranker)")
    parser.add_argument("--jsonl", action="store_true", help='each input line is a JSON string or {"prompt": ...}')
    parser.add_argument("--json", action="store_true", help="print one JSON object per line: {\"score\": ..., \"index\": ...}")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=256, help="prompts scored per call")


def _read_prompts(lines: Sequence[str], jsonl: bool) -> list[str]:
    prompts: list[str] = []
    for lineno, line in enumerate(lines, 1):
        line = line.rstrip("\n").rstrip("\r")
        if not jsonl:
            prompts.append(line)
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"stdin line {lineno}: not valid JSON ({exc.msg})") from exc
        if isinstance(obj, dict):
            obj = obj.get("prompt")
        if not isinstance(obj, str):
            raise ValueError(f'stdin line {lineno}: expected a JSON string or {{"prompt": str}}')
        prompts.append(obj)
    return prompts


def score_run(args: argparse.Namespace) -> int:
    from pars_fast.ranker import Ranker, RankerLoadError

    try:
        ranker = Ranker.load(args.ranker, backend=args.backend, device=args.device)
        prompts = _read_prompts(sys.stdin.readlines(), args.jsonl)
    except (RankerLoadError, ValueError) as exc:
        print(f"pars-fast score: error: {exc}", file=sys.stderr)
        return 2
    step = max(1, args.batch_size)
    for start in range(0, len(prompts), step):
        scores = ranker.score(prompts[start : start + step])
        for k, value in enumerate(scores):
            if args.json:
                print(json.dumps({"index": start + k, "score": float(value)}))
            else:
                print(f"{float(value):.6f}")
    return 0


__all__ = [
    "BASELINES",
    "configure_parser",
    "evaluate_ranker",
    "evaluate_scores",
    "prompt_length_scores",
    "run",
    "score_configure_parser",
    "score_run",
]
