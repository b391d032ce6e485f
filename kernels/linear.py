"""Linear layer with a fused epilogue: ``y = LN(act(x @ W^T + b) + residual)``.

The epilogue runs on the fp32 accumulator while the tile is still in registers:
- bias, then optional GELU (exact erf, or the tanh approximation);
- optional residual add and LayerNorm. LayerNorm needs whole rows, so with it one
  program owns all N columns (BLOCK_N >= N; BERT's hidden 384 fits one 512-wide
  block), which is what lets a BERT output projection, its residual add and its
  LayerNorm run as one kernel with one write of [tokens, hidden].
``W`` keeps ``nn.Linear``'s (N, K) layout, so no transposed copy is made. ``x`` may be
fp32 while ``W`` is fp16/bf16 (tiles are cast on load), and the output dtype is free:
that is how the encoder keeps its residual stream and LayerNorms in fp32 while its
GEMMs run in half precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    FLOAT_DTYPES,
    check_device,
    check_out,
    check_tensor,
    dot_precision,
    interpreting,
    next_pow2,
    single_config,
)

ACTIVATIONS = ("none", "gelu", "gelu_tanh")

# GPU search space (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); _prune drops tiles
# that overflow shared memory for the dtype, and for the LayerNorm variant keeps only
# BLOCK_N == next_pow2(N) with a register-sized accumulator.
_GEMM_TILES = [(128, 128, 32, 4, 8), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4), (64, 64, 32, 4, 4),
               (128, 128, 64, 3, 8), (64, 64, 64, 3, 4), (32, 64, 64, 4, 4), (32, 128, 32, 4, 4)]
_LN_TILES = [(bm, bn, bk, stages, warps) for bn in (16, 32, 64, 128, 256, 512, 1024, 2048)
             for bm, bk, stages, warps in ((16, 64, 3, 4), (32, 32, 3, 4), (32, 64, 3, 8), (64, 32, 3, 8),
                                           (16, 32, 2, 8), (32, 32, 2, 8), (16, 16, 1, 8))]
# One config (per BLOCK_N) under pytest on a GPU: reproducible, and small enough to
# exercise masked tails and several K iterations on the tests' small shapes.
_TEST_GEMM_TILES = [(32, 64, 32, 2, 4)]
_TEST_LN_TILES = [(32 if bn <= 512 else 16, bn, 32 if bn <= 512 else 16, 1, 4 if bn <= 256 else 8)
                  for bn in (16, 32, 64, 128, 256, 512, 1024, 2048)]
# The interpreter's cost is per program and per loop iteration, not per element: wide tiles.
_INTERPRETER_GEMM_TILES = [(64, 256, 128, 1, 4)]
_INTERPRETER_LN_TILES = [(64, bn, 128, 1, 4) for bn in (16, 32, 64, 128, 256, 512, 1024, 2048)]
_SMEM_BUDGET = 200 * 1024  # bytes; H100 allows 227 KB per block, A100 163 KB (a bigger tile fails to compile)
_MAX_LN_ACC = 32 * 1024  # fp32 accumulator elements per program before registers spill


def _configs(tiles: list[tuple[int, int, int, int, int]]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in tiles]


def _smem_bytes(c: triton.Config, elsize: int) -> int:
    k = c.kwargs
    return max(c.num_stages, 1) * (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elsize


def _m_bucket(m: int) -> int:
    """The smallest power of 4 >= m (capped): few distinct tuning keys, each a similar GEMM shape."""
    return min(4 ** (((m - 1).bit_length() + 1) // 2), 1 << 16)


def _prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    args = {**named_args, **kwargs}
    elsize = args["x_ptr"].element_size()
    if args.get("HAS_LAYERNORM"):
        # Correctness, not speed: the LayerNorm epilogue needs the whole row in one block.
        want = max(16, next_pow2(args["N"]))
        configs = [c for c in configs if c.kwargs["BLOCK_N"] == want]
        kept = [c for c in configs if c.kwargs["BLOCK_M"] * want <= _MAX_LN_ACC]
    else:
        kept = configs
    kept = [c for c in kept if _smem_bytes(c, elsize) <= _SMEM_BUDGET]
    # Never prune to nothing: fall back to the smallest tile.
    return kept or [min(configs, key=lambda c: _smem_bytes(c, elsize))]


@triton.jit
def _linear_kernel(
    x_ptr,  # input, (M, K), row stride stride_xm, unit column stride; cast to W's dtype for the dot
    w_ptr,  # weight, (N, K) as in nn.Linear, row stride stride_wn, unit column stride
    b_ptr,  # bias, (N,); read only if HAS_BIAS
    res_ptr,  # residual, (M, N), row stride stride_rm; read only if HAS_RESIDUAL
    ln_w_ptr,  # LayerNorm weight, (N,); read only if HAS_LAYERNORM
    ln_b_ptr,  # LayerNorm bias, (N,); read only if HAS_LAYERNORM
    y_ptr,  # output, (M, N), row stride stride_ym
    M,
    N,
    K,
    m_bucket,  # autotuning key only: M rounded to a power of 4, so a batch-1 tuning is not reused at batch 1024
    stride_xm,
    stride_wn,
    stride_rm,
    stride_ym,
    eps,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none", "gelu" (erf) or "gelu_tanh"
    HAS_RESIDUAL: tl.constexpr,
    HAS_LAYERNORM: tl.constexpr,  # requires BLOCK_N >= N (one program per row block)
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 inputs ("ieee" = exact fp32)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    # W is (N, K); load a (BLOCK_K, BLOCK_N) tile of W^T directly.
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        # x may be fp32 (the residual stream) with fp16/bf16 weights: cast the tile on load.
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0).to(w_ptr.dtype.element_ty)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
        inner = tl.minimum(tl.maximum(inner, -20.0), 20.0)  # tanh is +-1 in fp32 there; avoids exp overflow
        acc = acc * tl.sigmoid(2.0 * inner)  # 0.5 * (1 + tanh(z)) == sigmoid(2z)
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :]
        acc += tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_LAYERNORM:
        acc = tl.where(mask_n[None, :], acc, 0.0)
        mean = tl.sum(acc, axis=1) / N
        diff = tl.where(mask_n[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
        ln_w = tl.load(ln_w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        ln_b = tl.load(ln_b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        acc = diff * rstd[:, None] * ln_w[None, :] + ln_b[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _tiles(interpreter: list, test: list, gpu: list) -> list[triton.Config]:
    return _configs(interpreter if interpreting() else test if single_config() else gpu)


_linear_gemm = triton.autotune(
    configs=_tiles(_INTERPRETER_GEMM_TILES, _TEST_GEMM_TILES, _GEMM_TILES),
    key=["m_bucket", "N", "K", "HAS_RESIDUAL", "ACTIVATION"],
    prune_configs_by={"early_config_prune": _prune},
)(_linear_kernel)
_linear_ln = triton.autotune(
    configs=_tiles(_INTERPRETER_LN_TILES, _TEST_LN_TILES, _LN_TILES),
    key=["m_bucket", "N", "K"],
    prune_configs_by={"early_config_prune": _prune},
)(_linear_kernel)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-12,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``LN(act(x @ weight.T + bias) + residual)`` with every part after the GEMM optional.

    ``x``: (M, K); ``weight``: (N, K); ``bias``: (N,); ``residual``: (M, N);
    ``ln_weight``/``ln_bias``: (N,), both or neither. ``x`` has ``weight``'s dtype, or is
    fp32 and is rounded to ``weight``'s dtype for the product. Output (M, N) in
    ``out_dtype`` (default ``x``'s dtype), computed with an fp32 accumulator (full fp32,
    not TF32, for fp32 weights);
    ``out`` may be a preallocated contiguous (M, N) buffer that aliases no input.
    """
    device = check_device(check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES))
    m, k = x.shape
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, k), device=device)
    if x.dtype != weight.dtype and x.dtype != torch.float32:
        raise TypeError(f"x must have weight's dtype ({weight.dtype}) or float32, got {x.dtype}")
    out_dtype = out_dtype or x.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    n = weight.shape[0]
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(n,), device=device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=FLOAT_DTYPES, shape=(m, n), device=device)
    if (ln_weight is None) != (ln_bias is None):
        raise ValueError("pass both ln_weight and ln_bias, or neither")
    has_ln = ln_weight is not None
    if has_ln:
        check_tensor("ln_weight", ln_weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(n,), device=device)
        check_tensor("ln_bias", ln_bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(n,), device=device)
        if n > 2048:
            raise ValueError(f"the fused LayerNorm holds a whole row in one block; N={n} > 2048 is not supported")
    if n == 0 or k == 0:
        raise ValueError(f"empty GEMM: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if out is None:
        y = torch.empty(m, n, dtype=out_dtype, device=device)
    else:
        y = check_out(out, (m, n), out_dtype, device, x, weight, bias, residual)
    if m == 0:
        return y
    kernel = _linear_ln if has_ln else _linear_gemm

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"])

    kernel[grid](
        x, weight, bias if bias is not None else x, residual if residual is not None else x,
        ln_weight if has_ln else x, ln_bias if has_ln else x, y,
        m, n, k, _m_bucket(m),
        x.stride(0), weight.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0),
        eps,
        HAS_BIAS=bias is not None,
        ACTIVATION=activation,
        HAS_RESIDUAL=residual is not None,
        HAS_LAYERNORM=has_ln,
        PRECISION=dot_precision(weight.dtype),
    )
    return y


def linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    ln_weight: torch.Tensor | None = None,
    ln_bias: torch.Tensor | None = None,
    eps: float = 1e-12,
    out_dtype: torch.dtype | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Pure-torch reference of :func:`linear` (fp32 math when ``upcast``)."""
    dt = torch.float32 if upcast else weight.dtype
    out_dtype = out_dtype or x.dtype
    x = x.to(weight.dtype)  # the rounding the kernel applies to an fp32 x with half weights

    def f(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(dt)

    y = torch.nn.functional.linear(x.to(dt), weight.to(dt), f(bias))
    if activation != "none":
        y = torch.nn.functional.gelu(y, approximate="none" if activation == "gelu" else "tanh")
    if residual is not None:
        y = y + residual.to(dt)
    if ln_weight is not None:
        y = torch.nn.functional.layer_norm(y, (y.shape[-1],), f(ln_weight), f(ln_bias), eps)
    return y.to(out_dtype)
