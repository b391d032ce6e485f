"""Pooling and score head in one kernel: [CLS] row or mean over each packed sequence, then ``w . pooled + b``.

One program per sequence writes its fp32 pooled vector and its score, so the ranker's
whole output (one float per prompt) comes from a single launch after the last layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check_device, check_out, check_tensor, next_pow2

POOLINGS = ("cls", "mean")


@triton.jit
def _pool_score_kernel(
    x_ptr,  # hidden states, (total_tokens, hidden), row stride stride_x
    cu_seqlens_ptr,  # sequence offsets, (batch + 1,) int32
    w_ptr,  # score head weight, (hidden,)
    b_ptr,  # score head bias, (1,)
    pooled_ptr,  # output pooled states, (batch, hidden) fp32, row stride stride_p
    score_ptr,  # output scores, (batch,) fp32
    stride_x,
    stride_p,
    hidden,
    MEAN: tl.constexpr,  # mean over the sequence's rows; else its first ([CLS]) row
    BLOCK_T: tl.constexpr,  # rows summed per iteration (MEAN only)
    BLOCK_N: tl.constexpr,  # >= hidden
):
    seq = tl.program_id(0)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_seqlens_ptr + seq + 1) - tl.load(cu_seqlens_ptr + seq)).to(tl.int32)
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < hidden
    if MEAN:
        rows = tl.arange(0, BLOCK_T)
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for t0 in range(0, seqlen, BLOCK_T):
            ptrs = x_ptr + (start + t0 + rows[:, None]) * stride_x + cols[None, :]
            acc += tl.load(ptrs, mask=((t0 + rows) < seqlen)[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        pooled = tl.sum(acc, axis=0) / tl.maximum(seqlen, 1).to(tl.float32)
    else:
        pooled = tl.load(x_ptr + start * stride_x + cols, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(pooled_ptr + seq.to(tl.int64) * stride_p + cols, pooled, mask=mask_n)
    w = tl.load(w_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)
    score = tl.sum(pooled * w, axis=0) + tl.load(b_ptr).to(tl.float32)
    tl.store(score_ptr + seq, score)


def pool_score(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    pooling: str = "cls",
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool each packed sequence of ``x`` (total_tokens, hidden) and score it.

    ``cu_seqlens``: (batch + 1,) int32, every sequence non-empty (not re-checked: that
    needs a device sync). ``head_weight``: (hidden,) or (1, hidden) as in
    ``nn.Linear(hidden, 1)``; ``head_bias``: (1,). Returns fp32 ``pooled`` (batch, hidden)
    and ``scores`` (batch,); ``out`` may hold preallocated (pooled, scores) buffers.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    device = check_device(check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES))
    hidden = x.shape[1]
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.shape[0] < 1 or not cu_seqlens.is_contiguous():
        raise ValueError("cu_seqlens must be a contiguous (batch + 1,) tensor starting with 0")
    if head_weight.ndim == 2 and head_weight.shape[0] == 1:
        head_weight = head_weight[0]
    check_tensor("head_weight", head_weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(hidden,), device=device)
    check_tensor("head_bias", head_bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(1,), device=device)
    batch = cu_seqlens.shape[0] - 1
    if out is None:
        pooled = torch.empty(batch, hidden, dtype=torch.float32, device=device)
        scores = torch.empty(batch, dtype=torch.float32, device=device)
    else:
        pooled = check_out(out[0], (batch, hidden), torch.float32, device, x)
        scores = check_out(out[1], (batch,), torch.float32, device, x)
    if batch == 0:
        return pooled, scores
    block_n = next_pow2(hidden)
    _pool_score_kernel[(batch,)](
        x, cu_seqlens, head_weight, head_bias, pooled, scores,
        x.stride(0), pooled.stride(0), hidden,
        MEAN=pooling == "mean",
        BLOCK_T=max(1, min(16, 8192 // block_n)),  # keeps the fp32 accumulator tile <= 8K elements
        BLOCK_N=block_n,
        num_warps=4,
    )
    return pooled, scores


def pool_score_ref(
    x: torch.Tensor,
    cu_seqlens: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    pooling: str = "cls",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of :func:`pool_score` (fp32)."""
    bounds = cu_seqlens.tolist()
    rows = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        rows.append(x[s].float() if pooling == "cls" else x[s:e].float().mean(0))
    pooled = torch.stack(rows) if rows else x.new_empty(0, x.shape[1], dtype=torch.float32)
    scores = pooled @ head_weight.reshape(-1).float() + head_bias.float()
    return pooled, scores
