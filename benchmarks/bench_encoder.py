"""CPU throughput of the ranker encoder: HF transformers' padded batch vs the packed torch path.

Workload: the first 320 ShareGPT test-split prompts (90/10 split, seed 42), in arrival
order, truncated to 128 MiniLM tokens, scored in batches of 32 (all-MiniLM-L6-v2,
[CLS] pooling, a random ``Linear(384, 1)`` head). Every provider goes from token-id
lists to one float32 score per prompt:

- ``hf``: transformers ``BertModel`` (its default SDPA attention) on each batch padded
  to its longest prompt, with an attention mask;
- ``torch-fp32``: ``pars_fast.encoder.TorchPackedEncoder``, packed, fp32;
- ``torch-bf16``: the same in bf16 (fast only where the CPU has native bf16; see
  ``cpu_supports_bf16``, recorded in each result's ``extra_info``);
- ``hf-1t``, ``torch-fp32-1t``: ``hf`` and ``torch-fp32`` with one intra-op thread
  (``TorchPackedEncoder(num_threads=1)``), the others use torch's default (all cores);
- ``torch-int8-1t``: the packed path with int8 dynamic-quantized GEMMs (the
  ``"torch-int8"`` backend, what ``PARSScheduler`` scores with on a CPU), one thread.

    make bench                                         # everything in benchmarks/
    pytest benchmarks/bench_encoder.py --benchmark-only --benchmark-columns=min,median,rounds
    python benchmarks/bench_encoder.py --rounds 5      # interleaved rounds, prints ratios

Before timing, each provider's scores are checked: fp32 within 1e-4 of ``hf``, bf16
Kendall tau >= 0.99 against fp32, int8 >= 0.85 (a random head; the trained default
ranker's int8 scores agree at 0.957 and rank the test split as well, docs/BENCHMARKS.md). The machine is shared and noisy, so the script mode
interleaves providers round by round and reports per-round ratios as well.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import lru_cache

import pytest
import torch

N_PROMPTS = 320
BATCH = 32
MAX_LEN = 128
PROVIDERS = ("hf", "torch-fp32", "torch-bf16", "hf-1t", "torch-fp32-1t", "torch-int8-1t")
MIN_TAU_INT8 = 0.85
FP32_ATOL = 1e-4
MIN_TAU = 0.99


@lru_cache(maxsize=1)
def workload() -> list[list[int]]:
    """Token ids of the first N_PROMPTS ShareGPT test-split prompts, in arrival order."""
    from transformers import AutoTokenizer

    from pars_fast.data import sharegpt_split
    from pars_fast.tiny_llama import minilm_dir

    _, test = sharegpt_split()
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    return tok([s.prompt for s in test[:N_PROMPTS]], truncation=True, max_length=MAX_LEN)["input_ids"]


@lru_cache(maxsize=1)
def model_and_head() -> tuple[torch.nn.Module, torch.nn.Linear]:
    from transformers import BertModel

    from pars_fast.tiny_llama import minilm_dir

    model = BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False).eval()
    torch.manual_seed(0)
    return model, torch.nn.Linear(model.config.hidden_size, 1)


def make_provider(name: str) -> Callable[[list[list[int]]], torch.Tensor]:
    """A function from one batch of token-id lists to its (n,) float32 scores."""
    from pars_fast.backends import pad_batch
    from pars_fast.encoder import TorchPackedEncoder, torch_threads

    model, head = model_and_head()
    if name in ("hf", "hf-1t"):
        pad_id = int(model.config.pad_token_id or 0)
        threads = 1 if name == "hf-1t" else None

        @torch.inference_mode()
        def hf(batch: list[list[int]]) -> torch.Tensor:
            with torch_threads(threads):
                return hf_forward(batch)

        def hf_forward(batch: list[list[int]]) -> torch.Tensor:
            ids, mask = pad_batch(batch, pad_id)
            pooled = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            return head(pooled).squeeze(1)

        return hf
    if name == "torch-fp32":
        return TorchPackedEncoder(model, head, "cls", dtype=torch.float32).score
    if name == "torch-fp32-1t":
        return TorchPackedEncoder(model, head, "cls", dtype=torch.float32, num_threads=1).score
    if name == "torch-bf16":
        return TorchPackedEncoder(model, head, "cls", dtype=torch.bfloat16).score
    if name == "torch-int8-1t":
        return TorchPackedEncoder(model, head, "cls", num_threads=1, quantize="int8").score
    raise ValueError(f"unknown provider {name!r}; choose from {PROVIDERS}")


def score_all(fn: Callable[[list[list[int]]], torch.Tensor], prompts: list[list[int]]) -> torch.Tensor:
    return torch.cat([fn(prompts[i : i + BATCH]) for i in range(0, len(prompts), BATCH)])


@lru_cache(maxsize=None)
def checked_scores(name: str) -> torch.Tensor:
    """Scores of the whole workload, after checking them against the reference."""
    prompts = workload()
    scores = score_all(make_provider(name), prompts).detach()
    if name.startswith("torch-fp32"):
        diff = (scores - checked_scores("hf")).abs().max().item()
        assert diff <= FP32_ATOL, f"{name} differs from hf by {diff:.2e}"
    if name == "torch-bf16":
        assert kendall_tau(scores, checked_scores("torch-fp32")) >= MIN_TAU
    if name == "torch-int8-1t":
        assert kendall_tau(scores, checked_scores("torch-fp32")) >= MIN_TAU_INT8
    return scores


def kendall_tau(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a.numpy(), b.numpy()).statistic)


def environment() -> dict[str, object]:
    from pars_fast.encoder import cpu_supports_bf16

    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_supports_bf16(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "prompts": N_PROMPTS,
        "batch": BATCH,
        "max_len": MAX_LEN,
    }


# ----------------------------------------------------------------------------- pytest-benchmark


@pytest.mark.parametrize("provider", PROVIDERS)
def test_encoder_throughput(benchmark, provider):
    prompts = workload()
    scores = checked_scores(provider)
    fn = make_provider(provider)
    benchmark.group = f"encoder: {N_PROMPTS} ShareGPT prompts, batch {BATCH}, max_len {MAX_LEN}"
    benchmark.extra_info.update(environment())
    benchmark.extra_info["real_tokens"] = sum(len(x) for x in prompts)
    benchmark.extra_info["padded_tokens"] = sum(
        len(prompts[i : i + BATCH]) * max(len(x) for x in prompts[i : i + BATCH]) for i in range(0, len(prompts), BATCH)
    )
    if provider != "hf":
        benchmark.extra_info["max_abs_diff_vs_hf"] = (scores - checked_scores("hf")).abs().max().item()
        benchmark.extra_info["kendall_tau_vs_hf"] = kendall_tau(scores, checked_scores("hf"))
    benchmark.pedantic(score_all, args=(fn, prompts), rounds=3, iterations=1, warmup_rounds=1)


# ----------------------------------------------------------------------------- interleaved script mode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="interleaved CPU encoder throughput (see module docstring)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [p for p in args.providers.split(",") if p]
    prompts = workload()
    fns = {name: make_provider(name) for name in names}
    for name in names:
        checked_scores(name)
    env = environment()
    print(" | ".join(f"{k}={v}" for k, v in env.items()))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        # Each round runs every provider once, in a rotated order, so load drift hits all alike.
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            score_all(fns[name], prompts)
            times[name].append(time.perf_counter() - t0)
    print(f"{'provider':<14} {'median s':>9} {'min s':>7} {'prompts/s':>10}  "
          "vs hf / vs hf-1t (median of per-round ratios)")
    for name in names:
        med = sorted(times[name])[len(times[name]) // 2]
        ratios = []
        for base in ("hf", "hf-1t"):
            if base in times:
                r = sorted(b / t for b, t in zip(times[base], times[name]))
                ratios.append(f"{r[len(r) // 2]:.2f}x ({r[0]:.2f}-{r[-1]:.2f})")
            else:
                ratios.append("-")
        print(f"{name:<14} {med:>9.3f} {min(times[name]):>7.3f} {len(prompts) / med:>10.1f}  "
              f"{ratios[0]:>18} {ratios[1]:>18}")
    for name in names:
        if name != "hf":
            print(f"{name} max |score - hf| = {(checked_scores(name) - checked_scores('hf')).abs().max():.2e}")
    if "torch-int8-1t" in names and "torch-fp32-1t" in times:
        r = sorted(b / t for b, t in zip(times["torch-fp32-1t"], times["torch-int8-1t"]))
        print(f"torch-int8-1t vs torch-fp32-1t: {r[len(r) // 2]:.2f}x ({r[0]:.2f}-{r[-1]:.2f}); Kendall tau vs fp32 = "
              f"{kendall_tau(checked_scores('torch-int8-1t'), checked_scores('torch-fp32')):.4f}")
    if "torch-bf16" in names and "torch-fp32" in names:
        print(f"torch-bf16 Kendall tau vs torch-fp32 = "
              f"{kendall_tau(checked_scores('torch-bf16'), checked_scores('torch-fp32')):.4f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
