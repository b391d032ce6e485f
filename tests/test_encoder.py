"""The packed encoder backends ("torch" CPU path, "triton" kernels) against HF transformers.

Real MiniLM weights, real ShareGPT prompts, a random ``Linear(384, 1)`` head. The
reference is ``BertModel``'s own padded forward with an attention mask. The Triton
backend runs on CUDA when ``TRITON_INTERPRET=0`` and CUDA is present, else through the
interpreter on a few short prompts (a larger run is behind ``-m slow``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pars_fast.encoder import TorchPackedEncoder, cpu_supports_bf16, pack_batch

ROOT = Path(__file__).resolve().parents[1]
SCORE_ATOL = 1e-4  # fp32 packed vs padded forward: only summation order differs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TRITON_DEVICE = "cpu" if _interpreting() else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")


pytestmark = pytest.mark.usefixtures("one_blas_thread")


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def model(minilm_dir):
    from transformers import BertModel

    return BertModel.from_pretrained(minilm_dir, add_pooling_layer=False).eval()


@pytest.fixture(scope="module")
def head():
    torch.manual_seed(1234)
    return torch.nn.Linear(384, 1)


@pytest.fixture(scope="module")
def prompts():
    """Real first-turn ShareGPT prompts, streamed from the start of the file."""
    from pars_fast.data import iter_sharegpt_pairs

    out = []
    for prompt, _ in iter_sharegpt_pairs():
        out.append(prompt)
        if len(out) == 64:
            return out
    raise AssertionError("ShareGPT yielded fewer than 64 prompts")


def _ids(tokenizer, texts, max_len):
    return tokenizer(list(texts), truncation=True, max_length=max_len)["input_ids"]


@torch.inference_mode()
def hf_scores(model, head, batch, pooling, device="cpu"):
    """HF BertModel's padded forward with an attention mask: the reference."""
    width = max(len(x) for x in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    model = model.to(device)
    h = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
    if pooling == "cls":
        pooled = h[:, 0]
    else:
        m = mask.to(device)[..., None].float()
        pooled = (h * m).sum(1) / m.sum(1)
    return (pooled @ head.weight[0].to(device).float() + head.bias.to(device).float()).cpu()


def _edge_cases(tokenizer):
    # [CLS] alone (one token) and [CLS] [SEP] (an empty prompt's encoding).
    return [[tokenizer.cls_token_id], [tokenizer.cls_token_id, tokenizer.sep_token_id]]


# ----------------------------------------------------------------------------- packing


def test_pack_batch_offsets_positions_and_order():
    batch = [[5, 6, 7], [8], [9, 10, 11, 12, 13], [14, 15]]
    p = pack_batch(batch)
    assert p.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    assert p.cu_seqlens.tolist() == [0, 3, 4, 9, 11] and p.cu_seqlens.dtype == torch.int32
    assert p.position_ids.tolist() == [0, 1, 2, 0, 0, 1, 2, 3, 4, 0, 1]
    assert (p.batch_size, p.max_seqlen, p.total_tokens) == (4, 5, 11)
    s = pack_batch(batch, sort=True)
    assert s.lengths == [5, 3, 2, 1] and s.order == [2, 0, 3, 1]
    assert s.input_ids.tolist() == [9, 10, 11, 12, 13, 5, 6, 7, 14, 15, 8]


def test_pack_batch_empty():
    p = pack_batch([])
    assert p.batch_size == 0 and p.total_tokens == 0 and p.cu_seqlens.tolist() == [0]


@pytest.mark.parametrize(
    "batch, kwargs, error, match",
    [
        ([[1, 2], []], {}, ValueError, "prompt 1 of the batch is empty"),
        ([[1, 2, 3]], {"max_positions": 2}, ValueError, "prompt 0 has 3 tokens but the encoder has only 2"),
        ([[1, 99]], {"vocab_size": 50}, ValueError, r"token ids must lie in \[0, 50\)"),
        ([[1, -1]], {"vocab_size": 50}, ValueError, "min -1"),
        ([[1, "a"]], {}, TypeError, "lists of int token ids"),
        ("not a batch", {}, TypeError, "list of token-id lists"),
    ],
)
def test_pack_batch_rejects_bad_input(batch, kwargs, error, match):
    with pytest.raises(error, match=match):
        pack_batch(batch, **kwargs)


# ----------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_torch_backend_matches_hf(model, head, tokenizer, prompts, pooling):
    batch = _ids(tokenizer, prompts[:24], 128) + _edge_cases(tokenizer)
    backend = TorchPackedEncoder(model, head, pooling)
    got, want = backend.score(batch), hf_scores(model, head, batch, pooling)
    assert got.dtype == torch.float32 and got.shape == (len(batch),)
    assert (got - want).abs().max().item() <= SCORE_ATOL
    pooled = backend.pooled(batch)
    assert pooled.shape == (len(batch), 384) and pooled.dtype == torch.float32
    torch.testing.assert_close(pooled @ head.weight[0].detach() + head.bias.detach(), got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_torch_backend_bucketing_does_not_change_scores(model, head, tokenizer, prompts, pooling):
    # min_fill ~0: one padded bucket for all lengths; 1.0: only equal-length (unpadded) buckets.
    # The default bucketing is checked against HF above; the others must agree with it.
    batch = _ids(tokenizer, prompts[:16], 128) + _edge_cases(tokenizer)
    want = TorchPackedEncoder(model, head, pooling).score(batch)
    for min_fill in (1e-6, 1.0):
        got = TorchPackedEncoder(model, head, pooling, min_fill=min_fill).score(batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_torch_backend_keeps_caller_order(model, head, tokenizer, prompts):
    batch = _ids(tokenizer, prompts[:8], 128)
    backend = TorchPackedEncoder(model, head, "mean")
    together = backend.score(batch)
    torch.testing.assert_close(backend.score(batch[::-1]), together.flip(0), atol=1e-5, rtol=0)
    alone = torch.cat([backend.score([x]) for x in batch])
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=0)


def test_torch_backend_thread_setting_is_scoped(model, head, tokenizer, prompts):
    batch = _ids(tokenizer, prompts[:4], 128)
    before = torch.get_num_threads()
    want = TorchPackedEncoder(model, head, "cls").score(batch)
    got = TorchPackedEncoder(model, head, "cls", num_threads=1).score(batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        TorchPackedEncoder(model, head, "cls", num_threads=0)


def test_torch_backend_empty_batch(model, head):
    backend = TorchPackedEncoder(model, head, "cls")
    assert backend.score([]).shape == (0,) and backend.pooled([]).shape == (0, 384)


def test_torch_backend_bf16_keeps_the_ranking(model, head, tokenizer, prompts):
    from scipy.stats import kendalltau

    batch = _ids(tokenizer, prompts[:64], 128)  # 2016 pairs: tau >= 0.99 allows ~10 swapped pairs
    fp32 = TorchPackedEncoder(model, head, "cls", dtype=torch.float32).score(batch)
    bf16 = TorchPackedEncoder(model, head, "cls", dtype="bfloat16").score(batch)
    assert bf16.dtype == torch.float32
    tau = kendalltau(fp32.numpy(), bf16.numpy()).statistic
    assert tau >= 0.99, f"bf16 Kendall tau vs fp32 = {tau:.4f}"


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_torch_int8_backend_keeps_the_ranking(model, head, tokenizer, prompts, pooling):
    """int8 GEMMs perturb the scores a little (the encoder's pooled states stay close) and
    keep the order: Kendall tau >= 0.85 against fp32 over 64 real prompts (2016 pairs) with
    this random head (0.94 with the trained default ranker on the ShareGPT test split)."""
    from scipy.stats import kendalltau

    from pars_fast.backends import make_backend

    batch = _ids(tokenizer, prompts[:64], 128)
    fp32 = TorchPackedEncoder(model, head, pooling)
    int8 = make_backend("torch-int8", model, head, pooling, "cpu")
    assert int8.name == "torch-int8" and int8.quantize == "int8"
    want, got = fp32.pooled(batch), int8.pooled(batch)
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=1)
    assert cosine.min().item() > 0.95, cosine.min()  # measured: >= 0.97
    assert not torch.equal(got, want)  # the quantized path really ran
    tau = kendalltau(fp32.score(batch).numpy(), int8.score(batch).numpy()).statistic
    assert tau >= 0.85, f"int8 Kendall tau vs fp32 = {tau:.4f}"
    # Caller order and batch independence hold as in fp32.
    torch.testing.assert_close(int8.score(batch[:8][::-1]), int8.score(batch[:8]).flip(0), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="quantize must be"):
        TorchPackedEncoder(model, head, pooling, quantize="int4")


def test_auto_dtype_follows_cpu_bf16_support(model, head):
    backend = TorchPackedEncoder(model, head, "cls", dtype="auto")
    assert backend.dtype == (torch.bfloat16 if cpu_supports_bf16() else torch.float32)
    assert TorchPackedEncoder(model, head, "cls").dtype == torch.float32  # None: the encoder's own dtype


def test_backends_reject_bad_configuration(model, head):
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="pooling must be one of"):
        TorchPackedEncoder(model, head, "max")
    with pytest.raises(ValueError, match=r"head must be nn.Linear\(384, 1\)"):
        TorchPackedEncoder(model, torch.nn.Linear(384, 2), "cls")
    with pytest.raises(ValueError, match="unknown dtype"):
        TorchPackedEncoder(model, head, "cls", dtype="int8")
    with pytest.raises(ValueError, match="min_fill"):
        TorchPackedEncoder(model, head, "cls", min_fill=0.0)
    tiny = dict(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    with pytest.raises(ValueError, match="unsupported hidden_act 'relu'"):
        TorchPackedEncoder(BertModel(BertConfig(**tiny, hidden_act="relu")), torch.nn.Linear(32, 1), "cls")
    with pytest.raises(TypeError, match="expected a transformers BertModel"):
        TorchPackedEncoder(torch.nn.Linear(3, 3), head, "cls")
    backend = TorchPackedEncoder(model, head, "cls")
    with pytest.raises(ValueError, match="token ids must lie in"):
        backend.score([[101, 30522]])
    with pytest.raises(ValueError, match="only 512 positions"):
        backend.score([[101] * 513])


def test_gelu_tanh_models_match_hf():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, hidden_act="gelu_new", max_position_embeddings=40)
    model, head = BertModel(config, add_pooling_layer=False).eval(), torch.nn.Linear(48, 1)
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    batch = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (1, 7, 33, 40, 5)]
    for pooling in ("cls", "mean"):
        got = TorchPackedEncoder(model, head, pooling).score(batch)
        assert (got - hf_scores(model, head, batch, pooling)).abs().max().item() <= SCORE_ATOL


# ----------------------------------------------------------------------------- triton backend


def _triton(model, head, pooling, **kw):
    from pars_fast.kernels import TritonBertEncoder

    return TritonBertEncoder(model, head, pooling, TRITON_DEVICE, **kw)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_triton_backend_matches_hf_quick(model, head, tokenizer, prompts, pooling):
    # Real prompts cut to 16 tokens plus the one- and two-token edge cases: the interpreter
    # runs every kernel of all six layers in seconds (its cost grows with sequences x heads).
    batch = _ids(tokenizer, prompts[:3 if pooling == "cls" else 1], 16) + _edge_cases(tokenizer)
    backend = _triton(model, head, pooling, dtype=torch.float32)
    got = backend.score(batch).cpu()
    assert got.dtype == torch.float32 and got.shape == (len(batch),)
    assert (got - hf_scores(model, head, batch, pooling)).abs().max().item() <= SCORE_ATOL
    assert backend.pooled([]).shape == (0, 384)


@needs_triton
@pytest.mark.interpreter
@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_triton_backend_matches_hf_full(model, head, tokenizer, prompts, pooling):
    batch = _ids(tokenizer, prompts[:16], 128) + _edge_cases(tokenizer)
    want = hf_scores(model, head, batch, pooling)
    got = _triton(model, head, pooling, dtype=torch.float32).score(batch).cpu()
    assert (got - want).abs().max().item() <= SCORE_ATOL
    half = _triton(model, head, pooling, dtype=torch.float16).score(batch).cpu()
    assert (half - want).abs().max().item() <= 2e-2  # fp16 residual stream: ~1e-3 relative per layer


def test_triton_backend_needs_cuda_or_interpreter(model, head, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        _triton_cls()(model, head, "cls", "cpu")


def test_triton_backend_refuses_bf16_in_the_interpreter(model, head, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="no bf16 arithmetic"):
        _triton_cls()(model, head, "cls", "cpu", dtype=torch.bfloat16)


def _triton_cls():
    from pars_fast.kernels import TritonBertEncoder

    return TritonBertEncoder


# ----------------------------------------------------------------------------- registry and GPU script


def test_backends_are_registered(model, head):
    from pars_fast.backends import make_backend, registered_backends

    assert {"torch", "triton"} <= set(registered_backends())
    backend = make_backend("torch", model, head, "cls", "cpu")
    assert isinstance(backend, TorchPackedEncoder) and backend.name == "torch"
    assert make_backend("auto", model, head, "cls", "cpu").name == "torch"


def test_gpu_benchmark_fails_cleanly_without_cuda():
    # Hide every GPU: the script must import and exit 2 with a clear message, not a traceback.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_encoder.py"), "--batches", "1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA GPU is available" in proc.stderr and "Traceback" not in proc.stderr
