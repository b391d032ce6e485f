"""Each fused Triton kernel against its pure-torch reference, and the launchers' input checks.

Runs on a CUDA device when ``TRITON_INTERPRET=0`` and CUDA is present, otherwise on
CPU tensors through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1
by default). Shapes are small and awkward (a single token, primes 7/127/129, many
very different lengths in one pack), inputs are fresh random draws (never zeros)
and output buffers are poisoned with NaN, so a missed write shows.
"""

from __future__ import annotations

import os

import pytest
import torch

from pars_fast.kernels import (
    embed_layernorm,
    embed_layernorm_ref,
    linear,
    linear_ref,
    pool_score,
    pool_score_ref,
    varlen_attention,
    varlen_attention_ref,
)
from pars_fast.kernels._utils import interpreting

pytestmark = [pytest.mark.interpreter, pytest.mark.usefixtures("one_blas_thread")]

if not interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)




DEVICE = torch.device("cpu" if interpreting() else "cuda")
# The interpreter has no bf16 arithmetic.
DTYPES = [torch.float32, torch.float16] + ([] if interpreting() else [torch.bfloat16])
# Tolerance by dtype, against an fp32 reference on the same (rounded) inputs:
# fp32: only the summation order differs (K up to 1536 terms, LayerNorm over 384);
# fp16/bf16: the output is rounded once to 11 / 8 mantissa bits (eps 1e-3 / 8e-3) on O(1)
# values, plus the rounding of intermediates the kernel keeps in that dtype (P in P@V).
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Packs of sequence lengths: batch 1, a single token, primes, and many very different lengths.
PACKS = {
    "one-token": [1],
    "prime7": [7],
    "prime127": [127],
    "prime129": [129],
    "mixed": [1, 129, 7, 2, 127, 33, 1, 64, 5, 100],
}


def _gen() -> torch.Generator:
    # A fresh seed per run (never a fixed draw); pytest shows the printed seed if the test fails.
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, gen: torch.Generator) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(device=DEVICE, dtype=dtype)


def _nan(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _cu(lengths: list[int]) -> torch.Tensor:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return cu.to(DEVICE)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert not torch.isnan(got).any(), "NaN in the output: a row or column was never written"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- embeddings + LayerNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("n_tokens", [1, 7, 127, 129])
@pytest.mark.parametrize("hidden", [40, 384])
@pytest.mark.parametrize("with_types", [False, True])
def test_embed_layernorm_matches_reference(dtype, n_tokens, hidden, with_types):
    g = _gen()
    vocab, max_pos = 97, 131
    ids = torch.randint(0, vocab, (n_tokens,), generator=g).to(DEVICE, torch.int32)
    pos = torch.randint(0, max_pos, (n_tokens,), generator=g).to(DEVICE)
    types = torch.randint(0, 2, (n_tokens,), generator=g).to(DEVICE) if with_types else None
    tables = [_randn(vocab, hidden, dtype=dtype, gen=g), _randn(max_pos, hidden, dtype=dtype, gen=g),
              _randn(2, hidden, dtype=dtype, gen=g)]
    ln = [_randn(hidden, dtype=dtype, gen=g), _randn(hidden, dtype=dtype, gen=g)]
    out = _nan(n_tokens, hidden, dtype=dtype)
    got = embed_layernorm(ids, pos, *tables, *ln, 1e-12, token_type_ids=types, out=out)
    assert got.data_ptr() == out.data_ptr()
    _close(got, embed_layernorm_ref(ids, pos, *tables, *ln, 1e-12, token_type_ids=types), dtype)


def test_embed_layernorm_defaults_to_token_type_zero():
    g = _gen()
    ids, pos = torch.tensor([3, 1, 4], device=DEVICE), torch.tensor([0, 1, 2], device=DEVICE)
    word, posemb, types = _randn(5, 24, gen=g), _randn(3, 24, gen=g), _randn(2, 24, gen=g)
    w, b = _randn(24, gen=g), _randn(24, gen=g)
    zeros = torch.zeros(3, dtype=torch.long, device=DEVICE)
    got = embed_layernorm(ids, pos, word, posemb, types, w, b, 1e-5)
    _close(got, embed_layernorm(ids, pos, word, posemb, types, w, b, 1e-5, token_type_ids=zeros), torch.float32)
    assert not torch.allclose(got, embed_layernorm(ids, pos, word, posemb, types, w, b, 1e-5,
                                                   token_type_ids=zeros + 1))


# ----------------------------------------------------------------------------- linear + epilogue

EPILOGUES = {
    "bias": {},
    "no-bias": {"bias": None},
    "gelu": {"activation": "gelu"},
    "gelu-tanh": {"activation": "gelu_tanh"},
    "residual": {"residual": True},
    "residual-ln": {"residual": True, "ln": True},
}


# (M, K, N): small awkward shapes run every epilogue; MiniLM's four GEMMs (QKV, FFN up,
# attention output, FFN down) run the epilogue BERT uses (keeps the interpreter quick).
LINEAR_CASES = [((m, k, n), epi) for m, k, n in ((1, 40, 48), (7, 130, 200)) for epi in EPILOGUES] + [
    ((129, 384, 1152), "bias"),
    ((127, 384, 1536), "gelu"),
    ((129, 384, 384), "residual-ln"),
    ((127, 1536, 384), "residual-ln"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("shape, epilogue", LINEAR_CASES, ids=[f"{'x'.join(map(str, s))}-{e}" for s, e in LINEAR_CASES])
def test_linear_matches_reference(dtype, shape, epilogue):
    m, k, n = shape
    g = _gen()
    spec = dict(EPILOGUES[epilogue])
    x = _randn(m, k, dtype=dtype, gen=g)
    w = _randn(n, k, dtype=dtype, scale=k**-0.5, gen=g)  # O(1) outputs, as in a trained layer
    kwargs = {"bias": spec.pop("bias", _randn(n, dtype=dtype, gen=g)), "activation": spec.pop("activation", "none")}
    if spec.get("residual"):
        kwargs["residual"] = _randn(m, n, dtype=dtype, gen=g)
    if spec.get("ln"):
        kwargs["ln_weight"], kwargs["ln_bias"] = _randn(n, dtype=dtype, gen=g), _randn(n, dtype=dtype, gen=g)
    out = _nan(m, n, dtype=dtype)
    got = linear(x, w, out=out, **kwargs)
    assert got.data_ptr() == out.data_ptr()
    _close(got, linear_ref(x, w, **kwargs), dtype)


@pytest.mark.parametrize("w_dtype", [d for d in DTYPES if d != torch.float32], ids=_dtype_id)
@pytest.mark.parametrize("out_dtype", [torch.float32, None], ids=["out-fp32", "out-w-dtype"])
def test_linear_fp32_input_with_half_weights(w_dtype, out_dtype):
    # The encoder's residual stream is fp32 while its weights are half: x is cast per tile.
    g = _gen()
    x, w, b = _randn(33, 200, gen=g), _randn(72, 200, dtype=w_dtype, scale=200**-0.5, gen=g), _randn(72, gen=g)
    r, lw, lb = _randn(33, 72, gen=g), _randn(72, gen=g), _randn(72, gen=g)
    out_dtype = out_dtype or w_dtype
    kwargs = {"residual": r, "ln_weight": lw, "ln_bias": lb, "out_dtype": out_dtype}
    got = linear(x, w, b, **kwargs)
    assert got.dtype == out_dtype
    _close(got, linear_ref(x, w, b, **kwargs), w_dtype)


def test_linear_accepts_row_strided_input():
    g = _gen()
    big = _randn(9, 100, gen=g)
    x = big[:, 10:74]  # row stride 100, unit column stride: a view, no copy needed
    w, b = _randn(48, 64, scale=0.125, gen=g), _randn(48, gen=g)
    _close(linear(x, w, b), linear_ref(x.contiguous(), w, b), torch.float32)


def test_linear_fp32_is_not_tf32():
    # Values that TF32 (10-bit mantissa) would round: fp32 must stay exact to ~1e-6.
    g = _gen()
    x = (1.0 + _randn(16, 64, scale=1e-3, gen=g))
    w = (1.0 + _randn(32, 64, scale=1e-3, gen=g))
    got, want = linear(x, w), (x.double() @ w.double().T).float()
    assert (got - want).abs().max().item() < 1e-4  # TF32 would be off by ~64 * 2^-11 = 3e-2


# ----------------------------------------------------------------------------- varlen attention


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("pack", list(PACKS))
@pytest.mark.parametrize("head_dim", [16, 24])
def test_varlen_attention_matches_reference(dtype, pack, head_dim):
    lengths = PACKS[pack]
    g = _gen()
    total, heads = sum(lengths), 3
    # q/k/v as strided views of one fused QKV buffer, exactly as the encoder passes them.
    qkv = _randn(total, 3, heads, head_dim, dtype=dtype, gen=g)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    cu = _cu(lengths)
    out = _nan(total, heads, head_dim, dtype=dtype)
    got = varlen_attention(q, k, v, cu, max(lengths), out=out)
    _close(got, varlen_attention_ref(q, k, v, cu), dtype)


def test_varlen_attention_keeps_sequences_apart():
    # Changing one sequence's keys/values must not touch another sequence's output.
    g = _gen()
    lengths, heads, d = [5, 70, 3], 2, 16
    q, k, v = (_randn(sum(lengths), heads, d, gen=g) for _ in range(3))
    cu = _cu(lengths)
    base = varlen_attention(q, k, v, cu, 70)
    k2, v2 = k.clone(), v.clone()
    k2[5:75] += 3.0
    v2[5:75] -= 2.0
    moved = varlen_attention(q, k2, v2, cu, 70)
    torch.testing.assert_close(moved[:5], base[:5], rtol=0, atol=0)
    torch.testing.assert_close(moved[75:], base[75:], rtol=0, atol=0)
    assert not torch.allclose(moved[5:75], base[5:75])


def test_varlen_attention_custom_scale():
    g = _gen()
    q, k, v = (_randn(20, 2, 16, gen=g) for _ in range(3))
    cu = _cu([20])
    _close(varlen_attention(q, k, v, cu, 20, sm_scale=0.3),
           varlen_attention_ref(q, k, v, cu, sm_scale=0.3), torch.float32)


# ----------------------------------------------------------------------------- pooling + score head


@pytest.mark.parametrize("dtype", DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("pack", list(PACKS))
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_pool_score_matches_reference(dtype, pack, pooling):
    lengths = PACKS[pack]
    g = _gen()
    hidden = 40
    x = _randn(sum(lengths), hidden, dtype=dtype, gen=g)
    cu = _cu(lengths)
    w, b = _randn(1, hidden, gen=g), _randn(1, gen=g)  # nn.Linear(hidden, 1) layout
    out = (_nan(len(lengths), hidden, dtype=torch.float32), _nan(len(lengths), dtype=torch.float32))
    pooled, scores = pool_score(x, cu, w, b, pooling, out=out)
    want_pooled, want_scores = pool_score_ref(x, cu, w, b, pooling)
    # Pooling reads x as stored and sums in fp32: fp32 tolerance in every dtype.
    _close(pooled, want_pooled, torch.float32)
    _close(scores, want_scores, torch.float32)


def test_pool_score_empty_batch():
    pooled, scores = pool_score(torch.ones(0, 8, device=DEVICE), _cu([]), torch.ones(8, device=DEVICE),
                                torch.ones(1, device=DEVICE))
    assert pooled.shape == (0, 8) and scores.shape == (0,)


# ----------------------------------------------------------------------------- launcher errors


def _t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(DEVICE, dtype) if dtype.is_floating_point else torch.ones(*shape, dtype=dtype,
                                                                                               device=DEVICE)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: linear(_t(4, 8), _t(6, 9)), ValueError, r"weight must have shape \(\*, 8\)"),
        (lambda: linear(_t(4, 8, dtype=torch.float16), _t(6, 8)), TypeError, "x must have weight's dtype"),
        (lambda: linear(_t(4, 8), _t(6, 8, dtype=torch.int8)), TypeError, "weight must have dtype"),
        (lambda: linear(_t(4, 8, dtype=torch.int32), _t(6, 8)), TypeError, "x must have dtype"),
        (lambda: linear(_t(4, 8)[:, ::2], _t(6, 4)), ValueError, "unit stride"),
        (lambda: linear(_t(8), _t(6, 8)), ValueError, "x must be 2-D"),
        (lambda: linear(_t(4, 8), _t(6, 8), _t(5)), ValueError, "bias must have shape"),
        (lambda: linear(_t(4, 8), _t(6, 8), activation="relu"), ValueError, "activation must be one of"),
        (lambda: linear(_t(4, 8), _t(6, 8), residual=_t(4, 5)), ValueError, "residual must have shape"),
        (lambda: linear(_t(4, 8), _t(6, 8), ln_weight=_t(6)), ValueError, "both ln_weight and ln_bias"),
        (lambda: linear(_t(4, 8), _t(6, 8), out=_t(4, 7)), ValueError, "out must have shape"),
        (lambda: linear(_t(4, 8), _t(6, 8), "bias"), TypeError, "bias must be a torch.Tensor"),
        (lambda: varlen_attention(_t(5, 2, 16), _t(5, 2, 16), _t(5, 3, 16), _cu([5]), 5), ValueError,
         "v must have shape"),
        (lambda: varlen_attention(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), _cu([5]).long(), 5), TypeError,
         "cu_seqlens must have dtype"),
        (lambda: varlen_attention(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), _cu([5]), 6), ValueError,
         "exceeds total_tokens"),
        (lambda: varlen_attention(_t(5, 2, 16), _t(5, 2, 16), _t(5, 2, 16), _cu([5]), -1), ValueError,
         "non-negative int"),
        (lambda: varlen_attention(_t(5, 2, 32)[..., ::2], _t(5, 2, 16), _t(5, 2, 16), _cu([5]), 5), ValueError,
         "unit stride"),
        (lambda: embed_layernorm(_t(3, dtype=torch.float32), _t(3, dtype=torch.int64), _t(9, 8), _t(4, 8), _t(2, 8),
                                 _t(8), _t(8), 1e-5), TypeError, "input_ids must have dtype"),
        (lambda: embed_layernorm(_t(3, dtype=torch.int64), _t(4, dtype=torch.int64), _t(9, 8), _t(4, 8), _t(2, 8),
                                 _t(8), _t(8), 1e-5), ValueError, "position_ids must have shape"),
        (lambda: embed_layernorm(_t(3, dtype=torch.int64), _t(3, dtype=torch.int64), _t(9, 8), _t(4, 6), _t(2, 8),
                                 _t(8), _t(8), 1e-5), ValueError, "position_embeddings must have shape"),
        (lambda: embed_layernorm(_t(3, dtype=torch.int64), _t(3, dtype=torch.int64), _t(9, 8), _t(4, 8), _t(2, 8),
                                 _t(7), _t(8), 1e-5), ValueError, "ln_weight must have shape"),
        (lambda: pool_score(_t(5, 8), _cu([5]), _t(8), _t(1), "max"), ValueError, "pooling must be one of"),
        (lambda: pool_score(_t(5, 8), _cu([5]), _t(7), _t(1)), ValueError, "head_weight must have shape"),
        (lambda: pool_score(_t(5, 8), _cu([5]), _t(8), _t(2)), ValueError, "head_bias must have shape"),
    ],
)
def test_launchers_reject_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_linear_rejects_out_aliasing_an_input():
    x = _t(4, 8)
    with pytest.raises(ValueError, match="must not share memory"):
        linear(x, _t(8, 8), residual=x, out=x)


def test_launchers_need_cuda_unless_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # read at launch time, so this checks the compiled path's guard
    with pytest.raises(ValueError, match="need CUDA tensors"):
        linear(torch.randn(4, 8), torch.randn(6, 8))
    with pytest.raises(ValueError, match="need CUDA tensors"):
        pool_score(torch.randn(5, 8), torch.tensor([0, 5], dtype=torch.int32), torch.randn(8), torch.randn(1))
