"""Variable-length bidirectional attention on a packed batch (FlashAttention-style).

Each program owns one (sequence, head, query block). It streams that sequence's own
keys and values in blocks with an online softmax (running max and sum, rescaled per
block), so no [seq, seq] score matrix, no padding and no mask tensor ever exist: a
sequence's boundaries come from ``cu_seqlens``. Query blocks past a sequence's end
run zero key iterations and store nothing, which is the only cost of mixing lengths.
q, k and v may be strided views into one fused QKV buffer (no split copies).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, check_device, check_out, check_tensor, dot_precision, next_pow2


@triton.jit
def _varlen_attention_kernel(
    q_ptr,  # queries, (total_tokens, heads, head_dim), strides (stride_qt, stride_qh, 1)
    k_ptr,  # keys, (total_tokens, heads, head_dim), strides (stride_kt, stride_kh, 1)
    v_ptr,  # values, (total_tokens, heads, head_dim), strides (stride_vt, stride_vh, 1)
    o_ptr,  # output, (total_tokens, heads, head_dim), strides (stride_ot, stride_oh, 1)
    cu_seqlens_ptr,  # sequence offsets, (batch + 1,) int32
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    sm_scale,
    head_dim,
    PRECISION: tl.constexpr,  # tl.dot input precision for fp32 inputs ("ieee" = exact fp32)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner iteration
    BLOCK_D: tl.constexpr,  # >= head_dim
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    pid_m = tl.program_id(2)
    start = tl.load(cu_seqlens_ptr + seq).to(tl.int64)
    seqlen = (tl.load(cu_seqlens_ptr + seq + 1) - tl.load(cu_seqlens_ptr + seq)).to(tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seqlen
    mask_d = offs_d < head_dim

    q_ptrs = q_ptr + (start + offs_m[:, None]) * stride_qt + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    # A query block past this sequence's end does nothing: zero key iterations, masked store.
    kv_len = tl.where(pid_m * BLOCK_M < seqlen, seqlen, 0)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 is the native instruction
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(0, kv_len, BLOCK_N):
        cur = n0 + offs_n
        mask_n = cur < seqlen
        k_ptrs = k_ptr + (start + cur[None, :]) * stride_kt + head * stride_kh + offs_d[:, None]
        k = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_D, BLOCK_N)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every block holds >= 1 real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_ptrs = v_ptr + (start + cur[:, None]) * stride_vt + head * stride_vh + offs_d[None, :]
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    acc = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # l_i == 0 only in idle blocks, never stored
    o_ptrs = o_ptr + (start + offs_m[:, None]) * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    sm_scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax(q k^T * scale) v within each packed sequence; returns (total_tokens, heads, head_dim).

    ``q``/``k``/``v``: (total_tokens, heads, head_dim), unit stride in head_dim (views of a
    fused QKV buffer are fine). ``cu_seqlens``: (batch + 1,) int32 offsets, from 0 to
    total_tokens, non-decreasing; ``max_seqlen`` its largest difference (passed in so
    the launch needs no device sync; the offsets themselves are not re-checked here).
    ``out`` may be a preallocated contiguous buffer of q's shape and dtype.
    """
    device = check_device(check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES))
    shape = tuple(q.shape)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), shape=shape, device=device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), shape=shape, device=device)
    check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,), device=device)
    if cu_seqlens.shape[0] < 1:
        raise ValueError("cu_seqlens needs at least one entry (0)")
    if not cu_seqlens.is_contiguous():
        raise ValueError("cu_seqlens must be contiguous")
    if not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    total, heads, head_dim = shape
    batch = cu_seqlens.shape[0] - 1
    if max_seqlen > total:
        raise ValueError(f"max_seqlen {max_seqlen} exceeds total_tokens {total}")
    if out is None:
        out = torch.empty(total, heads, head_dim, dtype=q.dtype, device=device)
    else:
        check_out(out, shape, q.dtype, device, q, k, v)
    if batch == 0 or max_seqlen == 0 or total == 0:
        return out
    scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)
    # 16 is tl.dot's smallest tile; beyond 64 a block only adds idle rows for short prompts.
    block = min(64, max(16, next_pow2(max_seqlen)))
    grid = (batch, heads, triton.cdiv(max_seqlen, block))
    if grid[2] > 65535:
        raise ValueError(f"max_seqlen {max_seqlen} is too long for one launch (grid dim 2 > 65535)")
    _varlen_attention_kernel[grid](
        q, k, v, out, cu_seqlens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        scale, head_dim,
        PRECISION=dot_precision(q.dtype),
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=max(16, next_pow2(head_dim)),
        num_warps=4,
        num_stages=2,
    )
    return out


def varlen_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    *,
    sm_scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Pure-torch reference of :func:`varlen_attention`: one SDPA per sequence (fp32 when ``upcast``)."""
    dt = torch.float32 if upcast else q.dtype
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:
            continue
        qs, ks, vs = (t[s:e].to(dt).transpose(0, 1) for t in (q, k, v))  # (heads, len, head_dim)
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, scale=sm_scale)
        out[s:e] = o.transpose(0, 1).to(q.dtype)
    return out
