"""Fit the shipped ``linear`` step-cost presets to aiconfigurator's vLLM kernel tables.

    .venv/bin/python benchmarks/fit_linear_presets.py            # refit, write pars_fast/sim/presets/
    .venv/bin/python benchmarks/fit_linear_presets.py --dry-run  # print the fits only

For each (model, GPU, TP) in ``PRESETS`` it prices a grid of realistic engine steps with the
``aiconfigurator`` cost model (forward pass + its default per-step overhead), then fits
``beta0 + beta1*prefill tokens + beta2*decode tokens + beta3*KV tokens read`` by least
squares on the *relative* error (steps run from ~5 ms to ~300 ms; an absolute fit would
ignore the small decode steps that dominate a simulation). The fit is bounded so the
preset can never price a step under the HBM floor: ``beta0 >= weight bytes per GPU / BW``,
``beta3 >= KV bytes per token per GPU / BW``, ``beta1, beta2 >= 0``. The errors per batch
class go into the preset's ``"fit"`` entry.

The grid (``step_grid``): decode-only batches of 1-1024 requests at contexts 128-8192;
prefill-only steps (one chunk of 16-8192 tokens with 0-8192 cached, or 2-64 prompts at once);
and mixed steps (8-512 decoding requests plus a chunk that fills the token budget, or a
smaller one), every batch within vLLM's default token budget for the GPU and its KV capacity.
Needs the ``sim`` extra (aiconfigurator-core). Takes ~20 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import lsq_linear

from pars_fast.sim import costs
from pars_fast.sim.costs import LinearCost, StepBatch

PRESETS = (
    ("meta-llama/Meta-Llama-3.1-8B", "h100_sxm", 1),
    ("meta-llama/Meta-Llama-3.1-70B", "h100_sxm", 4),
)
OUT = Path(__file__).resolve().parents[1] / "pars_fast" / "sim" / "presets"


def step_grid(model: str, gpu: str, tp: int) -> list[tuple[str, StepBatch]]:
    """(class, batch) pairs: realistic steps for vLLM's defaults on this deployment."""
    budget = costs.vllm_serving_defaults(gpu)["max_num_batched_tokens"]
    kv_tokens = costs.kv_capacity_blocks(model=model, gpu=gpu, tp=tp) * 16
    out: list[tuple[str, StepBatch]] = []
    for d in (1, 2, 4, 8, 16, 32, 64, 96, 128, 192, 256, 384, 512, 768, 1024):
        for c in (128, 256, 512, 1024, 2048, 4096, 8192):
            if d * c <= kv_tokens:
                out.append(("decode", StepBatch((), (c,) * d)))
    for n in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192):
        for k in (0, 512, 2048, 8192):
            if n <= budget:
                out.append(("prefill", StepBatch(((n, k),), ())))
    for b in (2, 4, 8, 16, 32, 64):
        for n in (16, 64, 128, 256, 512, 1024):
            if b * n <= budget:
                out.append(("prefill", StepBatch(((n, 0),) * b, ())))
    for d in (8, 32, 64, 128, 256, 512):
        for c in (256, 1024, 4096):
            if d * c > kv_tokens:
                continue
            for n in (64, 512, 2048, budget - d):
                for k in (0, 2048):
                    out.append(("mixed", StepBatch(((n, k),), (c,) * d)))
    return out


def features(batch: StepBatch) -> list[float]:
    """The linear model's regressors: 1, prefill tokens, decode tokens, KV tokens read."""
    return [1.0, batch.prefill_tokens, batch.decode_tokens, batch.kv_read_tokens]


def error_summary(rel: np.ndarray) -> dict[str, float]:
    """Median, 90th percentile and largest absolute relative error, in percent."""
    a = np.abs(rel) * 100
    return {"median_pct": round(float(np.median(a)), 2), "p90_pct": round(float(np.quantile(a, 0.9)), 2),
            "max_pct": round(float(a.max()), 2)}


def fit(model: str, gpu: str, tp: int) -> LinearCost:
    """The bounded relative least-squares fit for one deployment (module docstring)."""
    ref = costs.build_cost_model("aiconfigurator", model=model, gpu=gpu, tp=tp)
    grid = step_grid(model, gpu, tp)
    x = np.array([features(b) for _, b in grid])
    y = np.array([ref.step_s(b) for _, b in grid])
    spec, g = costs.model_spec(model), costs.gpu_spec(gpu)
    lower = [spec.weight_bytes_per_gpu(tp) / g.hbm_bytes_per_s, 0.0, 0.0,
             spec.kv_bytes_per_token(tp) / g.hbm_bytes_per_s]
    sol = lsq_linear(x / y[:, None], np.ones(len(y)), bounds=(lower, np.inf))
    beta = sol.x
    rel = x @ beta / y - 1
    classes = np.array([c for c, _ in grid])
    fit_info = {"batches": len(grid), "relative_error": {"all": error_summary(rel)}}
    for c in ("decode", "prefill", "mixed"):
        fit_info["relative_error"][c] = error_summary(rel[classes == c])
    fit_info["at_lower_bound"] = [name for name, b, lo in zip(
        ("beta0_s", "prefill_s_per_token", "decode_s_per_token", "context_s_per_token"), beta, lower)
        if b <= lo * (1 + 1e-9)]
    meta = {
        "model": spec.name, "gpu": g.name, "tp": tp, "overhead_s": ref.overhead_s,
        "fitted_to": ref.description, "fit": fit_info,
        "created_by": "benchmarks/fit_linear_presets.py",
    }
    median = fit_info["relative_error"]["all"]["median_pct"]
    source = f"fitted to {ref.name} ({len(grid)} steps, median error {median}%)"
    return LinearCost(*(float(b) for b in beta), source=source, metadata=meta)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the fits, write nothing")
    args = parser.parse_args(argv)
    for model, gpu, tp in PRESETS:
        cost = fit(model, gpu, tp)
        print(cost.name)
        print("  " + cost.description)
        print("  " + json.dumps(cost.metadata["fit"]))
        if not args.dry_run:
            path = OUT / costs._preset_filename(model, gpu, tp)
            cost.to_file(path)
            print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
