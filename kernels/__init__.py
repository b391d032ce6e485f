"""Fused Triton kernels for the ranker's BERT encoder (installed as ``pars_fast.kernels``).

The forward pass runs on a packed, padding-free batch: every prompt's tokens are
concatenated into ``[total_tokens, hidden]`` with ``cu_seqlens`` offsets.

One file per fused op, each with its ``@triton.jit`` kernel, a validating launcher
and a pure-torch ``*_ref`` beside it:

- ``embeddings``: word + type + position gather, sum and LayerNorm;
- ``linear``: GEMM + bias [+ GELU] [+ residual + LayerNorm];
- ``attention``: variable-length bidirectional FlashAttention-style attention;
- ``pooling``: [CLS] or mean pooling + the ``Linear(hidden, 1)`` score head;
- ``encoder``: ``TritonBertEncoder``, the whole forward (the ``"triton"`` ranker backend).

Set ``TRITON_INTERPRET=1`` *before* importing this package to run the kernels on CPU
tensors through Triton's interpreter (slow; no bf16).
"""

from .attention import varlen_attention, varlen_attention_ref
from .embeddings import embed_layernorm, embed_layernorm_ref
from .encoder import TritonBertEncoder
from .linear import linear, linear_ref
from .pooling import pool_score, pool_score_ref

__all__ = [
    "TritonBertEncoder",
    "embed_layernorm",
    "embed_layernorm_ref",
    "linear",
    "linear_ref",
    "pool_score",
    "pool_score_ref",
    "varlen_attention",
    "varlen_attention_ref",
]
