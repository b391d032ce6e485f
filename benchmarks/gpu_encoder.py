"""GPU benchmark of the ranker encoder: Triton kernels vs the packed torch path vs HF transformers.

For batches of 1 to 1024 ShareGPT test-split prompts (arrival order, truncated to
128 tokens), every provider goes from token-id lists to one score per prompt:

- ``hf``: transformers ``BertModel`` (SDPA attention, eager PyTorch) on the batch
  padded to its longest prompt, [CLS] pooling, ``Linear(hidden, 1)`` head;
- ``torch``: ``pars_fast.encoder.TorchPackedEncoder`` (packed, no padding) on the GPU;
- ``triton``: ``pars_fast.kernels.TritonBertEncoder`` (packed, fused kernels).

Timing is ``triton.testing.do_bench`` (median, p20, p80 in ms). Each row also shows
the compute floor: FLOPs per token x real tokens / the measured dense matmul peak.
Before timing, every provider's scores are checked against ``hf``.

    python benchmarks/gpu_encoder.py                      # bf16, batches 1..1024
    python benchmarks/gpu_encoder.py --dtype fp16 --batches 1,256 --json out.json

Needs a CUDA GPU (exits with status 2 and a message otherwise) and TRITON_INTERPRET unset.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PROVIDERS = ("hf", "torch", "triton")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32,128,256,512,1024", help="comma-separated batch sizes")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--pooling", default="cls", choices=("cls", "mean"))
    p.add_argument("--max-len", type=int, default=128, help="truncation length in tokens, [CLS]/[SEP] included")
    p.add_argument("--hf-attn", default="sdpa", choices=("sdpa", "eager"), help="HF attention implementation")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up time, ms")
    p.add_argument("--rep", type=int, default=200, help="do_bench measuring time, ms")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def cuda_problem() -> str | None:
    """Why this script cannot run here, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: unset it (or set it to 0) to time compiled kernels on the GPU"
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (
            "no CUDA GPU is available (torch.cuda.is_available() is False, torch "
            f"{torch.__version__}); this benchmark times Triton kernels on a GPU. "
            "On a CPU use benchmarks/bench_encoder.py."
        )
    return None


def load_prompts(n: int, max_len: int) -> list[list[int]]:
    """The first ``n`` ShareGPT test-split prompts as token-id lists (repeated if the split is shorter)."""
    from transformers import AutoTokenizer

    from pars_fast.data import sharegpt_split
    from pars_fast.tiny_llama import minilm_dir

    _, test = sharegpt_split()
    tok = AutoTokenizer.from_pretrained(minilm_dir())
    ids = tok([s.prompt for s in test[:n]], truncation=True, max_length=max_len)["input_ids"]
    return [ids[i % len(ids)] for i in range(n)]


def encoder_flops(lengths: Sequence[int], layers: int, hidden: int, intermediate: int) -> float:
    """FLOPs of a packed forward: the dense GEMMs per real token plus each sequence's attention."""
    dense = 2 * (4 * hidden * hidden + 2 * hidden * intermediate)  # QKV + output projection + FFN
    attention = sum(4 * n * n * hidden for n in lengths)  # QK^T and PV over each sequence's own keys
    return float(layers * (dense * sum(lengths) + attention))


def matmul_peak_flops(dtype: object) -> float:
    """Measured dense matmul throughput (FLOP/s) of this GPU in ``dtype`` (cuBLAS, 8192^3)."""
    import torch
    from triton.testing import do_bench

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def make_providers(names: Sequence[str], dtype: object, pooling: str, hf_attn: str) -> dict[str, Callable]:
    import torch
    from transformers import BertModel

    from pars_fast.backends import pad_batch
    from pars_fast.encoder import TorchPackedEncoder
    from pars_fast.kernels import TritonBertEncoder
    from pars_fast.tiny_llama import minilm_dir

    model = BertModel.from_pretrained(minilm_dir(), add_pooling_layer=False, attn_implementation=hf_attn)
    model = model.to("cuda", dtype).eval()
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 1).to("cuda")  # fp32 head: scores compared in fp32
    pad_id = int(model.config.pad_token_id or 0)

    @torch.inference_mode()
    def hf(batch: list[list[int]]) -> torch.Tensor:
        ids, mask = pad_batch(batch, pad_id)
        ids, mask = ids.to("cuda", non_blocking=True), mask.to("cuda", non_blocking=True)
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        if pooling == "cls":
            pooled = h[:, 0]
        else:
            m = mask[..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1)
        return head(pooled.float()).squeeze(1)

    made: dict[str, Callable] = {}
    for name in names:
        if name == "hf":
            made[name] = hf
        elif name == "torch":
            made[name] = TorchPackedEncoder(model, head, pooling, "cuda", dtype=dtype).score
        elif name == "triton":
            made[name] = TritonBertEncoder(model, head, pooling, "cuda", dtype=dtype).score
        else:
            raise SystemExit(f"unknown provider {name!r}; choose from {PROVIDERS}")
    return made


def run(args: argparse.Namespace) -> list[dict]:
    import torch
    import triton
    from triton.testing import do_bench

    from pars_fast.tiny_llama import minilm_dir
    from transformers import AutoConfig

    dtype = getattr(torch, DTYPES[args.dtype])
    batches = [int(b) for b in args.batches.split(",")]
    names = sorted((p for p in args.providers.split(",") if p), key=lambda n: n != "hf")  # hf first: the baseline
    config = AutoConfig.from_pretrained(minilm_dir())
    prompts = load_prompts(max(batches), args.max_len)
    providers = make_providers(names, dtype, args.pooling, args.hf_attn)
    peak = matmul_peak_flops(dtype)
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{args.dtype} | pooling {args.pooling} | HF attention {args.hf_attn} | "
          f"matmul peak {peak / 1e12:.0f} TFLOP/s")
    header = (f"{'batch':>5} {'tokens':>7} {'provider':>8} {'median ms':>10} {'p20-p80 ms':>15} {'prompts/s':>10} "
              f"{'tokens/s':>11} {'vs hf':>6} {'floor ms':>9} {'% floor':>7} {'max|dscore|':>11}")
    print(header)
    rows = []
    for b in batches:
        batch = prompts[:b]
        lengths = [len(x) for x in batch]
        tokens = sum(lengths)
        floor_ms = encoder_flops(lengths, config.num_hidden_layers, config.hidden_size,
                                 config.intermediate_size) / peak * 1e3
        reference = providers["hf"](batch) if "hf" in providers else None
        base_ms = None
        for name, fn in providers.items():
            err = float((fn(batch) - reference).abs().max()) if reference is not None else float("nan")
            med, p20, p80 = do_bench(lambda fn=fn: fn(batch), warmup=args.warmup, rep=args.rep,
                                     quantiles=[0.5, 0.2, 0.8])
            base_ms = med if name == "hf" else base_ms
            row = {"batch": b, "tokens": tokens, "padded_tokens": b * max(lengths), "provider": name,
                   "median_ms": med, "p20_ms": p20, "p80_ms": p80, "prompts_per_s": b / med * 1e3,
                   "tokens_per_s": tokens / med * 1e3, "speedup_vs_hf": (base_ms / med) if base_ms else None,
                   "floor_ms": floor_ms, "max_abs_score_diff_vs_hf": err}
            rows.append(row)
            vs = f"{row['speedup_vs_hf']:.2f}x" if row["speedup_vs_hf"] else "-"
            spread = f"{p20:.3f}-{p80:.3f}"
            print(f"{b:>5} {tokens:>7} {name:>8} {med:>10.3f} {spread:>15} {row['prompts_per_s']:>10.0f} "
                  f"{row['tokens_per_s']:>11.0f} {vs:>6} {floor_ms:>9.4f} {100 * floor_ms / med:>6.1f}% {err:>11.2e}")
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "python": platform.python_version(), "dtype": args.dtype, "pooling": args.pooling,
                "hf_attn": args.hf_attn, "matmul_peak_flops": peak, "max_len": args.max_len}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(f"gpu_encoder.py: {problem}", file=sys.stderr)
        return 2
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
