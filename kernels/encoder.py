"""``TritonBertEncoder``: the whole packed BERT forward through the fused kernels (the ``"triton"`` backend).

Per batch: pack the token-id lists (no padding) -> one host-to-device copy of
ids/positions/offsets -> ``embed_layernorm`` -> per layer five launches
(QKV GEMM+bias; varlen attention reading q/k/v straight out of the QKV buffer;
output GEMM+bias+residual+LayerNorm; up GEMM+bias+GELU; down GEMM+bias+residual+
LayerNorm) -> ``pool_score`` -> one float per prompt. In fp16/bf16 the GEMMs and
attention run in half precision while the residual stream and LayerNorms stay fp32. With [CLS] pooling the last
layer keeps only the [CLS] rows after attention, so its output projection and FFN
run on ``batch`` rows instead of ``total_tokens``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pars_fast.encoder import (
    POOLINGS,
    EncoderWeights,
    PackedBatch,
    head_params,
    pack_batch,
    resolve_device,
    resolve_dtype,
)

from ._utils import interpreting
from .attention import varlen_attention
from .embeddings import embed_layernorm
from .linear import linear
from .pooling import pool_score

__all__ = ["TritonBertEncoder"]


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() and not interpreting() else "cpu")


class TritonBertEncoder:
    """Packed forward of a HF ``BertModel`` plus a ``Linear(hidden, 1)`` head on Triton kernels.

    ``pooled(batch)`` -> (n, hidden) float32 and ``score(batch)`` -> (n,) float32, where
    ``batch`` is a list of token-id lists (truncated, [CLS]/[SEP] included); results are
    in the caller's order, on ``device``. ``dtype``: ``None`` keeps the encoder's dtype,
    ``"auto"`` picks bf16 (or fp16) on a GPU; fp32 GEMMs run in full fp32, not TF32.
    Runs on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1`` (fp32/fp16 only:
    the interpreter has no bf16 arithmetic). The weights are copied at construction:
    rebuild the backend after changing the encoder.
    """

    name = "triton"

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        pooling: str = "cls",
        device: torch.device | str | None = None,
        *,
        dtype: torch.dtype | str | None = None,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.device = resolve_device(_default_device() if device is None else device)
        if self.device.type != "cuda" and not interpreting():
            raise ValueError(
                f"the Triton backend needs a CUDA device, got {self.device}; use the 'torch' backend on a CPU "
                "(or set TRITON_INTERPRET=1 before importing pars_fast.kernels to run the kernels interpreted)"
            )
        self.dtype = resolve_dtype(dtype, encoder, self.device)
        if self.dtype == torch.bfloat16 and interpreting():
            raise ValueError(
                "the Triton interpreter has no bf16 arithmetic; use float32 or float16 under TRITON_INTERPRET=1"
            )
        self.pooling = pooling
        self.weights = EncoderWeights.from_hf(encoder, dtype=self.dtype, device=self.device)
        self.head_weight, self.head_bias = head_params(head, self.weights.hidden_size, self.device)

    @property
    def hidden_size(self) -> int:
        return self.weights.hidden_size

    def pack(self, batch: Sequence[Sequence[int]]) -> PackedBatch:
        w = self.weights
        return pack_batch(batch, vocab_size=w.vocab_size, max_positions=w.max_positions).to(self.device)

    @torch.inference_mode()
    def forward_packed(self, packed: PackedBatch) -> tuple[Tensor, Tensor]:
        """fp32 ``pooled`` (batch, hidden) and ``scores`` (batch,), in packed order."""
        w, dt = self.weights, self.dtype
        hidden, heads, head_dim = w.hidden_size, w.num_heads, w.head_dim
        cu, max_seqlen = packed.cu_seqlens, packed.max_seqlen
        # Mixed precision as in the torch path: the residual stream and every LayerNorm
        # output stay fp32; GEMMs read them cast to the weights' dtype, tile by tile.
        x = embed_layernorm(packed.input_ids, packed.position_ids, w.word_embeddings, w.position_embeddings,
                            w.token_type_embeddings, w.emb_ln_weight, w.emb_ln_bias, w.eps, out_dtype=torch.float32)
        last = len(w.layers) - 1
        for i, lw in enumerate(w.layers):
            qkv = linear(x, lw.qkv_weight, lw.qkv_bias, out_dtype=dt).view(-1, 3, heads, head_dim)
            a = varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_seqlen).view(-1, hidden)
            if i == last and self.pooling == "cls":
                # Only the [CLS] rows' final states are read: one row per sequence from here on.
                rows = cu[:-1].long()
                a, x = a.index_select(0, rows), x.index_select(0, rows)
                cu = torch.arange(packed.batch_size + 1, dtype=torch.int32, device=x.device)
            x = linear(a, lw.out_weight, lw.out_bias, residual=x, ln_weight=lw.ln1_weight, ln_bias=lw.ln1_bias,
                       eps=w.eps, out_dtype=torch.float32)
            h = linear(x, lw.up_weight, lw.up_bias, activation=w.activation, out_dtype=dt)
            x = linear(h, lw.down_weight, lw.down_bias, residual=x, ln_weight=lw.ln2_weight, ln_bias=lw.ln2_bias,
                       eps=w.eps, out_dtype=torch.float32)
        return pool_score(x, cu, self.head_weight, self.head_bias, self.pooling)

    def pooled(self, batch: Sequence[Sequence[int]]) -> Tensor:
        """(n, hidden) float32 pooled encoder states, in the caller's order."""
        return self._run(batch)[0]

    def score(self, batch: Sequence[Sequence[int]]) -> Tensor:
        """(n,) float32 scores (higher = longer expected response), in the caller's order."""
        return self._run(batch)[1]

    def _run(self, batch: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        packed = self.pack(batch)
        if packed.batch_size == 0:
            return (torch.empty(0, self.hidden_size, device=self.device), torch.empty(0, device=self.device))
        return self.forward_packed(packed)  # pack_batch(sort=False): packed order is the caller's order
