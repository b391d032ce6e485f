"""Fused BERT embeddings: word + token-type + position gather, sum and LayerNorm in one kernel.

One program per token row: the three table rows are gathered, summed in fp32 (in
HF's order: word + type, then + position), normalised and written once, instead of
three gathers, two adds and a LayerNorm each reading and writing [tokens, hidden].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import FLOAT_DTYPES, INDEX_DTYPES, check_device, check_out, check_tensor, next_pow2


@triton.jit
def _embed_layernorm_kernel(
    ids_ptr,  # token ids, (n_tokens,) int32/int64
    pos_ids_ptr,  # position ids, (n_tokens,) int32/int64
    type_ids_ptr,  # token type ids, (n_tokens,); read only if HAS_TYPE_IDS (else type 0)
    word_ptr,  # word embeddings, (vocab, hidden), row stride stride_word
    pos_ptr,  # position embeddings, (max_positions, hidden), row stride stride_pos
    type_ptr,  # token type embeddings, (type_vocab, hidden), row stride stride_type
    ln_w_ptr,  # LayerNorm weight, (hidden,)
    ln_b_ptr,  # LayerNorm bias, (hidden,)
    out_ptr,  # output, (n_tokens, hidden), row stride stride_out
    stride_word,
    stride_pos,
    stride_type,
    stride_out,
    hidden,
    eps,
    HAS_TYPE_IDS: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= hidden: one program holds a whole row
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < hidden
    tok = tl.load(ids_ptr + row).to(tl.int64)
    pos = tl.load(pos_ids_ptr + row).to(tl.int64)
    x = tl.load(word_ptr + tok * stride_word + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_TYPE_IDS:
        typ = tl.load(type_ids_ptr + row).to(tl.int64)
        x += tl.load(type_ptr + typ * stride_type + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        x += tl.load(type_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(pos_ptr + pos * stride_pos + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / hidden
    diff = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / hidden + eps)
    w = tl.load(ln_w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(ln_b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (diff * rstd * w + b).to(out_ptr.dtype.element_ty), mask=mask)


def embed_layernorm(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    *,
    token_type_ids: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(word[ids] + type[type_ids] + pos[position_ids]) -> (n_tokens, hidden).

    ``token_type_ids=None`` means type 0 for every token. Ids are not bounds-checked
    here (that would need a device sync); ``pars_fast.encoder.pack_batch`` checks them.
    The output dtype defaults to the word table's; ``out`` may be a preallocated
    contiguous (n_tokens, hidden) buffer of that dtype.
    """
    device = check_device(check_tensor("input_ids", input_ids, ndim=1, dtypes=INDEX_DTYPES, unit_last_stride=False))
    n = input_ids.shape[0]
    word = check_tensor("word_embeddings", word_embeddings, ndim=2, dtypes=FLOAT_DTYPES, device=device)
    hidden = word.shape[1]
    check_tensor("position_ids", position_ids, ndim=1, dtypes=INDEX_DTYPES, shape=(n,), device=device,
                 unit_last_stride=False)
    check_tensor("position_embeddings", position_embeddings, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, hidden),
                 device=device)
    check_tensor("token_type_embeddings", token_type_embeddings, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, hidden),
                 device=device)
    if token_type_embeddings.shape[0] < 1:
        raise ValueError("token_type_embeddings needs at least one row (type 0)")
    check_tensor("ln_weight", ln_weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(hidden,), device=device)
    check_tensor("ln_bias", ln_bias, ndim=1, dtypes=FLOAT_DTYPES, shape=(hidden,), device=device)
    if token_type_ids is not None:
        check_tensor("token_type_ids", token_type_ids, ndim=1, dtypes=INDEX_DTYPES, shape=(n,), device=device,
                     unit_last_stride=False)
    if input_ids.stride(0) != 1 or position_ids.stride(0) != 1 or (
        token_type_ids is not None and token_type_ids.stride(0) != 1
    ):
        raise ValueError("input_ids, position_ids and token_type_ids must be contiguous")
    out_dtype = out_dtype or word.dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {FLOAT_DTYPES}, got {out_dtype}")
    if out is None:
        out = torch.empty(n, hidden, dtype=out_dtype, device=device)
    else:
        check_out(out, (n, hidden), out_dtype, device)
    if n == 0:
        return out
    block_n = next_pow2(hidden)
    _embed_layernorm_kernel[(n,)](
        input_ids, position_ids, token_type_ids if token_type_ids is not None else input_ids,
        word, position_embeddings, token_type_embeddings, ln_weight, ln_bias, out,
        word.stride(0), position_embeddings.stride(0), token_type_embeddings.stride(0), out.stride(0),
        hidden, eps,
        HAS_TYPE_IDS=token_type_ids is not None,
        BLOCK_N=block_n,
        num_warps=4 if block_n <= 1024 else 8,
    )
    return out


def embed_layernorm_ref(
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    word_embeddings: torch.Tensor,
    position_embeddings: torch.Tensor,
    token_type_embeddings: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    eps: float,
    *,
    token_type_ids: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Pure-torch reference of :func:`embed_layernorm` (fp32 math when ``upcast``)."""
    dt = torch.float32 if upcast else word_embeddings.dtype
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    x = word_embeddings[input_ids.long()].to(dt) + token_type_embeddings[token_type_ids.long()].to(dt)
    x = x + position_embeddings[position_ids.long()].to(dt)
    y = torch.nn.functional.layer_norm(x, (x.shape[-1],), ln_weight.to(dt), ln_bias.to(dt), eps)
    return y.to(out_dtype or word_embeddings.dtype)
