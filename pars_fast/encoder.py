"""Fast packed, padding-free forward of a BERT-family encoder on the CPU (the ``"torch"`` backend).

HF transformers pads a batch to its longest prompt; on ShareGPT (prompts truncated
to 128 tokens) a batch of 32 holds about 60 real tokens per prompt but is padded to
128, so half of every GEMM is spent on padding. This module runs the same weights on
a *packed* batch instead: all prompts' tokens concatenated into ``[total_tokens,
hidden]``, with ``cu_seqlens`` offsets. Every per-token op (the QKV, output and FFN
GEMMs, GELU, LayerNorm) runs once over the packed rows; only attention needs the
sequence structure, and it runs as a few ``scaled_dot_product_attention`` calls over
length buckets (prompts sorted by length, so a bucket pads little).

Further savings, all exact in fp32:
- one fused QKV GEMM per layer instead of three;
- with [CLS] pooling, the last layer runs attention queries, the output projection
  and the FFN for the [CLS] rows only (the other rows' final states are never read);
- ``torch.inference_mode`` and in-place residual adds.

bf16 halves the GEMM time on CPUs with native bf16 matmul (AVX512-BF16 or AMX);
``dtype="auto"`` picks it only there, because emulated bf16 is slower than fp32.

``quantize="int8"`` (the ``"torch-int8"`` backend) runs the four GEMMs of each layer as
int8 dynamic-quantized linears (per-output-channel int8 weights, activations quantized
per tensor at run time, fbgemm/x86 kernels): 2.3x less CPU time per prompt than fp32 on
an AVX2 machine, at a Kendall tau cost of about 0.01 (docs/BENCHMARKS.md).

Shared with the Triton backend (``pars_fast.kernels.encoder``): :func:`pack_batch`
and :class:`EncoderWeights` (weights pulled out of a HF ``BertModel``, QKV fused).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "POOLINGS",
    "EncoderWeights",
    "LayerWeights",
    "PackedBatch",
    "TorchPackedEncoder",
    "cpu_supports_bf16",
    "head_params",
    "int8_backend",
    "pack_batch",
    "resolve_device",
    "resolve_dtype",
    "torch_threads",
]

POOLINGS = ("cls", "mean")

# HF activation names -> the `approximate` argument of F.gelu.
_GELU_KINDS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- packing


@dataclass(frozen=True)
class PackedBatch:
    """A batch of prompts concatenated without padding.

    Sequence ``i`` (in packed order) owns rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
    ``order[i]`` is the caller's index of packed sequence ``i`` (identity unless the
    batch was sorted), so ``result[order] = packed_result`` restores the caller's order.
    """

    input_ids: Tensor  # (total_tokens,) int64
    position_ids: Tensor  # (total_tokens,) int64, 0..len-1 within each sequence
    cu_seqlens: Tensor  # (batch + 1,) int32
    lengths: list[int]  # per packed sequence
    order: list[int]  # caller's index of each packed sequence

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)

    @property
    def total_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> PackedBatch:
        """Move the index tensors to ``device`` in one host-to-device copy."""
        device = torch.device(device)
        if self.input_ids.device == device:
            return self
        t = self.total_tokens
        # One transfer instead of three: the ids, positions and offsets travel together.
        flat = torch.cat([self.input_ids, self.position_ids, self.cu_seqlens.long()]).to(device, non_blocking=True)
        return PackedBatch(flat[:t], flat[t : 2 * t], flat[2 * t :].int(), self.lengths, self.order)


def pack_batch(
    batch: Sequence[Sequence[int]],
    *,
    vocab_size: int | None = None,
    max_positions: int | None = None,
    sort: bool = False,
) -> PackedBatch:
    """Pack token-id lists (already truncated, [CLS]/[SEP] included) into one flat batch.

    ``sort=True`` orders sequences longest first (stable), which lets attention
    bucket similar lengths together; ``PackedBatch.order`` maps back.
    Raises ``ValueError`` for an empty prompt, an id outside ``[0, vocab_size)`` or a
    prompt longer than ``max_positions`` (the encoder has no position embedding for it).
    """
    if isinstance(batch, (str, bytes)) or not isinstance(batch, Sequence):
        raise TypeError(f"batch must be a list of token-id lists, got {type(batch).__name__}")
    lengths = [len(seq) for seq in batch]
    for i, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"prompt {i} of the batch is empty; every prompt needs at least one token ([CLS])")
        if max_positions is not None and n > max_positions:
            raise ValueError(
                f"prompt {i} has {n} tokens but the encoder has only {max_positions} positions; "
                "truncate prompts before scoring"
            )
    order = sorted(range(len(batch)), key=lambda i: -lengths[i]) if sort else list(range(len(batch)))
    seqs = [batch[i] for i in order]
    lengths = [lengths[i] for i in order]
    try:
        input_ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"batch must contain lists of int token ids ({exc})") from None
    if input_ids.numel() and vocab_size is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size}), got min {lo} and max {hi}")
    lens = torch.tensor(lengths, dtype=torch.long)
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    torch.cumsum(lens, 0, out=cu_seqlens[1:])
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens)
    position_ids = torch.arange(input_ids.numel(), dtype=torch.long) - starts
    return PackedBatch(input_ids, position_ids, cu_seqlens, lengths, order)


# ----------------------------------------------------------------------------- weights


@dataclass
class LayerWeights:
    """One post-LN transformer layer; QKV fused into one (3*hidden, hidden) weight."""

    qkv_weight: Tensor
    qkv_bias: Tensor
    out_weight: Tensor
    out_bias: Tensor
    ln1_weight: Tensor
    ln1_bias: Tensor
    up_weight: Tensor
    up_bias: Tensor
    down_weight: Tensor
    down_bias: Tensor
    ln2_weight: Tensor
    ln2_bias: Tensor


@dataclass
class EncoderWeights:
    """A BERT encoder's weights, detached from the HF module, on one device.

    Mixed precision: the GEMM weights and biases are in ``dtype``; the embedding tables
    and LayerNorm parameters stay fp32, because the residual stream is kept in fp32
    (in bf16 it alone costs ~0.002 of Kendall tau against fp32 scores).
    """

    word_embeddings: Tensor  # (vocab, hidden)
    position_embeddings: Tensor  # (max_positions, hidden)
    token_type_embeddings: Tensor  # (type_vocab, hidden)
    emb_ln_weight: Tensor
    emb_ln_bias: Tensor
    layers: list[LayerWeights]
    num_heads: int
    eps: float
    activation: str  # "gelu" (exact, erf) or "gelu_tanh"
    dtype: torch.dtype  # of the GEMM weights
    device: torch.device

    @property
    def hidden_size(self) -> int:
        return int(self.word_embeddings.shape[1])

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return int(self.word_embeddings.shape[0])

    @property
    def max_positions(self) -> int:
        return int(self.position_embeddings.shape[0])

    @classmethod
    def from_hf(cls, encoder: nn.Module, *, dtype: torch.dtype, device: torch.device | str) -> EncoderWeights:
        """Copy the weights of a HF ``BertModel`` (absolute positions, GELU, post-LN).

        Raises ``ValueError`` for a configuration this packed forward does not reproduce.
        """
        config = getattr(encoder, "config", None)
        if config is None or not hasattr(encoder, "embeddings") or not hasattr(encoder, "encoder"):
            raise TypeError(f"expected a transformers BertModel, got {type(encoder).__name__}")
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise ValueError("only bidirectional encoders are supported (config.is_decoder must be False)")
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {position_type!r}")
        act = config.hidden_act
        if not isinstance(act, str) or act not in _GELU_KINDS:
            raise ValueError(f"unsupported hidden_act {act!r}; supported: {sorted(_GELU_KINDS)}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"hidden_size {config.hidden_size} is not a multiple of {config.num_attention_heads} heads"
            )
        device = torch.device(device)

        def t(p: Tensor) -> Tensor:  # GEMM operand
            return p.detach().to(device=device, dtype=dtype).contiguous()

        def f(p: Tensor) -> Tensor:  # embedding / LayerNorm: fp32
            return p.detach().to(device=device, dtype=torch.float32).contiguous()

        emb = encoder.embeddings
        layers = []
        for layer in encoder.encoder.layer:
            att = layer.attention
            layers.append(
                LayerWeights(
                    qkv_weight=t(torch.cat([att.self.query.weight, att.self.key.weight, att.self.value.weight])),
                    qkv_bias=t(torch.cat([att.self.query.bias, att.self.key.bias, att.self.value.bias])),
                    out_weight=t(att.output.dense.weight),
                    out_bias=t(att.output.dense.bias),
                    ln1_weight=f(att.output.LayerNorm.weight),
                    ln1_bias=f(att.output.LayerNorm.bias),
                    up_weight=t(layer.intermediate.dense.weight),
                    up_bias=t(layer.intermediate.dense.bias),
                    down_weight=t(layer.output.dense.weight),
                    down_bias=t(layer.output.dense.bias),
                    ln2_weight=f(layer.output.LayerNorm.weight),
                    ln2_bias=f(layer.output.LayerNorm.bias),
                )
            )
        return cls(
            word_embeddings=f(emb.word_embeddings.weight),
            position_embeddings=f(emb.position_embeddings.weight),
            token_type_embeddings=f(emb.token_type_embeddings.weight),
            emb_ln_weight=f(emb.LayerNorm.weight),
            emb_ln_bias=f(emb.LayerNorm.bias),
            layers=layers,
            num_heads=int(config.num_attention_heads),
            eps=float(config.layer_norm_eps),
            activation="gelu" if _GELU_KINDS[act] == "none" else "gelu_tanh",
            dtype=dtype,
            device=device,
        )


def head_params(head: nn.Module, hidden: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """The score head ``Linear(hidden, 1)`` as fp32 (weight (hidden,), bias (1,))."""
    weight = getattr(head, "weight", None)
    if weight is None or tuple(weight.shape) != (1, hidden):
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(f"head must be nn.Linear({hidden}, 1), got weight shape {shape}")
    bias = head.bias if getattr(head, "bias", None) is not None else torch.zeros(1)
    return (weight.detach().reshape(hidden).to(device, torch.float32).contiguous(),
            bias.detach().reshape(1).to(device, torch.float32).contiguous())


def cpu_supports_bf16() -> bool:
    """True when oneDNN has native bf16 matmul here (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op: absent in some builds
        return False


def resolve_device(device: torch.device | str) -> torch.device:
    """``"cuda"`` -> ``cuda:<current>``, so device comparisons with tensors' devices hold."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(dtype: torch.dtype | str | None, encoder: nn.Module, device: torch.device) -> torch.dtype:
    """``None``: the encoder's own dtype; ``"auto"``: the fastest dtype that keeps rankings (see module doc)."""
    if dtype is None:
        return next(encoder.parameters()).dtype
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"unknown dtype {dtype!r}; use None, 'auto', 'float32', 'float16' or 'bfloat16'")
    if resolved not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {resolved}")
    return resolved


# ----------------------------------------------------------------------------- attention plan


@dataclass
class _Bucket:
    """Consecutive packed sequences [first, last) attended in one padded SDPA call."""

    tok_start: int
    tok_end: int
    n_seqs: int
    max_len: int
    gather: Tensor | None  # (n_seqs * max_len,) row of each padded slot; None when all lengths are equal
    mask: Tensor | None  # (n_seqs, 1, 1, max_len) True = real key
    valid: Tensor | None  # (tokens,) padded slot of each real token, in packed order


def _plan_attention(lengths: list[int], min_fill: float, device: torch.device) -> list[_Bucket]:
    """Group consecutive (length-sorted) sequences so each group pads to at most 1/min_fill."""
    buckets: list[_Bucket] = []
    cu = [0, *itertools.accumulate(lengths)]
    i = 0
    while i < len(lengths):
        j, longest = i + 1, lengths[i]
        # Sorted longest-first, so a bucket extends while its shortest keeps the fill up.
        while j < len(lengths) and min_fill * longest <= lengths[j] <= longest:
            j += 1
        seg = lengths[i:j]
        n = j - i
        if min(seg) == longest:  # equal lengths: a plain view of the packed rows, no mask, no copy
            buckets.append(_Bucket(cu[i], cu[j], n, longest, None, None, None))
        else:
            lens = torch.tensor(seg)
            slot = torch.arange(longest)
            real = slot[None, :] < lens[:, None]  # (n, longest)
            starts = torch.tensor(cu[i:j]) - cu[i]
            # Padding slots repeat the sequence's last row: finite values, masked out as keys,
            # and their query outputs are never read.
            rows = starts[:, None] + torch.minimum(slot[None, :], lens[:, None] - 1)
            buckets.append(
                _Bucket(
                    cu[i], cu[j], n, longest,
                    gather=rows.reshape(-1).to(device),
                    mask=real[:, None, None, :].to(device),
                    valid=real.reshape(-1).nonzero().squeeze(1).to(device),
                )
            )
        i = j
    return buckets


def _attention(qkv: Tensor, buckets: list[_Bucket], num_heads: int, cls_only: bool) -> Tensor:
    """Bidirectional attention of each sequence over its own tokens.

    ``qkv`` is (total_tokens, 3*hidden); returns (total_tokens, hidden), or
    (batch, hidden) for the first token of each sequence when ``cls_only``.
    """
    hidden = qkv.shape[1] // 3
    head_dim = hidden // num_heads
    outs = []
    for b in buckets:
        rows = qkv[b.tok_start : b.tok_end]
        if b.gather is not None:
            rows = rows.index_select(0, b.gather)
        q, k, v = rows.view(b.n_seqs, b.max_len, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        if cls_only:
            q = q[:, :, :1]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask)  # (n, heads, Lq, head_dim)
        o = o.transpose(1, 2).reshape(-1, hidden)
        if b.valid is not None and not cls_only:
            o = o.index_select(0, b.valid)
        outs.append(o)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# ----------------------------------------------------------------------------- int8 GEMMs

_GEMMS = ("qkv", "out", "up", "down")


def _prepack_int8(weight: Tensor, bias: Tensor) -> object:
    """fbgemm/x86 prepacked int8 weights: symmetric, one scale per output channel."""
    import warnings

    weight, bias = weight.detach().float(), bias.detach().float()
    scale = (weight.abs().amax(dim=1).clamp_min(1e-8) / 127.0).double()
    with warnings.catch_warnings():  # torch marks quantized tensors for removal; pinned torch 2.13 has them
        warnings.simplefilter("ignore", UserWarning)
        qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
    return torch.ops.quantized.linear_prepack(qweight, bias)


def _linear_int8(x: Tensor, packed: object) -> Tensor:
    # Full 8-bit activations (reduce_range=False). 7-bit ones rule out int16 saturation in
    # AVX2 kernels without VNNI, but cost more accuracy than the rare saturation does: on
    # the ShareGPT test split the int8 scores agree with fp32 at Kendall tau 0.94 with
    # full range and 0.89 with reduced range, at the same speed.
    return torch.ops.quantized.linear_dynamic(x.float(), packed, False)


def int8_backend(encoder: nn.Module, head: nn.Module, pooling: str, device: torch.device | str) -> TorchPackedEncoder:
    """The ``"torch-int8"`` backend: :class:`TorchPackedEncoder` with int8 dynamic-quantized GEMMs."""
    return TorchPackedEncoder(encoder, head, pooling, device, quantize="int8")


# ----------------------------------------------------------------------------- the backend


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore (``None``: leave torch's setting)."""
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorchPackedEncoder:
    """The ``"torch"`` backend: packed forward of a HF ``BertModel`` plus a ``Linear(hidden, 1)`` head.

    ``pooled(batch)`` -> (n, hidden) float32 and ``score(batch)`` -> (n,) float32, where
    ``batch`` is a list of token-id lists (truncated, [CLS]/[SEP] included). Results are
    in the caller's order, on ``device``.

    ``dtype``: ``None`` keeps the encoder's dtype (fp32 matches HF within 1e-5);
    ``"auto"`` uses bf16 where the CPU multiplies bf16 natively, else fp32.
    ``min_fill``: attention buckets pad each prompt to at most ``1/min_fill`` times its length.
    ``num_threads``: intra-op threads while scoring (``None``: torch's global setting). On
    an idle 2-core CPU, 2 threads are faster (75 vs 52 prompts/s); on one crowded by other
    processes (a vLLM worker), 1 thread is (54 vs 22 prompts/s: OpenMP threads wait on a
    descheduled sibling). See docs/BENCHMARKS.md.
    Built for the CPU; it also runs on CUDA tensors (the GPU benchmark compares it there).
    The weights are copied at construction: rebuild the backend after changing the encoder.
    """

    name = "torch"

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        pooling: str = "cls",
        device: torch.device | str = "cpu",
        *,
        dtype: torch.dtype | str | None = None,
        min_fill: float = 0.5,
        num_threads: int | None = None,
        quantize: str | None = None,
    ) -> None:
        if quantize not in (None, "int8"):
            raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0.0 < min_fill <= 1.0:
            raise ValueError(f"min_fill must be in (0, 1], got {min_fill}")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.num_threads = num_threads
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, encoder, self.device)
        self.pooling = pooling
        self.min_fill = min_fill
        self.weights = EncoderWeights.from_hf(encoder, dtype=self.dtype, device=self.device)
        self.head_weight, self.head_bias = head_params(head, self.weights.hidden_size, self.device)
        w = self.weights
        self.quantize = quantize
        if quantize == "int8":
            if self.device.type != "cpu":
                raise ValueError("quantize='int8' runs on the CPU only (fbgemm/x86 kernels)")
            self.name = "torch-int8"
            self._int8 = [{g: _prepack_int8(getattr(lw, f"{g}_weight"), getattr(lw, f"{g}_bias")) for g in _GEMMS}
                          for lw in w.layers]
        # Token type 0 for every token (single-segment prompts): fold it into the position table.
        self._pos_type = w.position_embeddings + w.token_type_embeddings[0]
        self._approximate = "none" if w.activation == "gelu" else "tanh"

    @property
    def hidden_size(self) -> int:
        return self.weights.hidden_size

    def pack(self, batch: Sequence[Sequence[int]]) -> PackedBatch:
        w = self.weights
        return pack_batch(batch, vocab_size=w.vocab_size, max_positions=w.max_positions, sort=True).to(self.device)

    @torch.inference_mode()
    def forward_packed(self, packed: PackedBatch) -> Tensor:
        """Pooled (batch, hidden) float32 states in *packed* order.

        GEMMs and attention run in ``self.dtype``; embeddings, residual adds and
        LayerNorms in fp32 (the ``.to``/``.float`` casts are no-ops in fp32).
        """
        w, hidden, eps, dt = self.weights, self.weights.hidden_size, self.weights.eps, self.dtype
        x = F.embedding(packed.input_ids, w.word_embeddings)
        x += F.embedding(packed.position_ids, self._pos_type)
        x = F.layer_norm(x, (hidden,), w.emb_ln_weight, w.emb_ln_bias, eps)
        buckets = _plan_attention(packed.lengths, self.min_fill, x.device)
        cls_rows = packed.cu_seqlens[:-1].long()
        n_layers = len(w.layers)
        for i, lw in enumerate(w.layers):
            # With [CLS] pooling the last layer only needs the [CLS] rows' outputs.
            cls_only = self.pooling == "cls" and i == n_layers - 1
            if self.quantize == "int8":
                q = self._int8[i]
                qkv, out, up, down = (partial(_linear_int8, packed=q[g]) for g in _GEMMS)
            else:
                qkv = partial(F.linear, weight=lw.qkv_weight, bias=lw.qkv_bias)
                out = partial(F.linear, weight=lw.out_weight, bias=lw.out_bias)
                up = partial(F.linear, weight=lw.up_weight, bias=lw.up_bias)
                down = partial(F.linear, weight=lw.down_weight, bias=lw.down_bias)
            a = _attention(qkv(x.to(dt)), buckets, w.num_heads, cls_only)
            if cls_only:
                x = x.index_select(0, cls_rows)
            h = out(a).float()
            h += x
            x = F.layer_norm(h, (hidden,), lw.ln1_weight, lw.ln1_bias, eps)
            h = F.gelu(up(x.to(dt)), approximate=self._approximate)
            h = down(h).float()
            h += x
            x = F.layer_norm(h, (hidden,), lw.ln2_weight, lw.ln2_bias, eps)
        if self.pooling == "cls":
            return x
        seq = torch.repeat_interleave(torch.arange(packed.batch_size, device=x.device),
                                      torch.tensor(packed.lengths, device=x.device))
        sums = torch.zeros(packed.batch_size, hidden, dtype=torch.float32, device=x.device)
        sums.index_add_(0, seq, x)
        return sums / torch.tensor(packed.lengths, dtype=torch.float32, device=x.device)[:, None]

    @torch.inference_mode()
    def pooled(self, batch: Sequence[Sequence[int]]) -> Tensor:
        """(n, hidden) float32 pooled encoder states, in the caller's order."""
        packed = self.pack(batch)
        out = torch.empty(packed.batch_size, self.hidden_size, dtype=torch.float32, device=self.device)
        if packed.batch_size:
            with torch_threads(self.num_threads):
                out[torch.tensor(packed.order, device=self.device)] = self.forward_packed(packed)
        return out

    @torch.inference_mode()
    def score(self, batch: Sequence[Sequence[int]]) -> Tensor:
        """(n,) float32 scores (higher = longer expected response), in the caller's order."""
        return self.pooled(batch) @ self.head_weight + self.head_bias
