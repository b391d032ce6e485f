"""The Triton backend's self-check (pars_fast.backend_check): real interpreted kernels pass,
a broken kernel makes the ranker serve with the torch path and say why in one log line.

The kernels run through ``TRITON_INTERPRET=1`` (tests/conftest.py), or on CUDA with
``TRITON_INTERPRET=0``, on a tiny random BERT
(2 layers, hidden 48, 3 heads of 16: a non-power-of-two width) with MiniLM's tokenizer,
and on a 6-prompt probe: the interpreter is slow, and the check's logic does not depend
on the model's size.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch

from pars_fast.backend_check import (
    MAX_FLIP_FRACTION,
    PROBE_PROMPTS,
    check_backend,
    compare_scores,
    flip_stats,
    needs_check,
)
from pars_fast.backends import register_backend
from pars_fast.heads import HeadSpec, KnnMemory, KnnSpec, ScoreHead
from pars_fast.ranker import Ranker, RankerConfig

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
TRITON_DEVICE = "cpu" if INTERPRETING else ("cuda" if torch.cuda.is_available() else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="Triton kernels need CUDA or TRITON_INTERPRET=1")

# Short prompts, distinct scores: 15 pairs, so a single flip (0.067) already fails the check.
SMALL_PROBE = ["", "hi", "What is the capital of Australia?", "Write a 2,000-word essay on Rome.",
               "def f(x):\n    return x * 2  # why?", "请解释量子计算。"]
LOGGER = "pars_fast.backend_check"


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def tiny_bert(tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                     intermediate_size=96, max_position_embeddings=128)
    return BertModel(cfg, add_pooling_layer=False).eval()


def _head(hidden: int = 48, seed: int = 1) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, 1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.normal_(0, 1.0, generator=gen)
        head.bias.normal_(0, 1.0, generator=gen)
    return head


def _ranker(tiny_bert, tokenizer, backend, device="cpu", **kw):
    return Ranker(tiny_bert, kw.pop("head", None) or _head(), tokenizer, RankerConfig(max_prompt_tokens=16),
                  backend=backend, device=device, **kw)


def _records(caplog, level):
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


# ----------------------------------------------------------------------------- the criterion


def test_flip_stats_counts_pairs_the_reference_orders():
    ref = np.array([0.0, 1.0, 2.0, 3.0])
    assert flip_stats(ref, ref) == (0, 6)
    assert flip_stats(ref[::-1], ref) == (6, 6)
    assert flip_stats(np.array([0.0, 2.0, 1.0, 3.0]), ref) == (1, 6)
    assert flip_stats(np.array([0.0, 1.0, 1.0, 3.0]), ref) == (1, 6)  # a tie the reference does not have
    assert flip_stats(ref, np.array([0.0, 0.0, 2.0, 3.0])) == (0, 5)  # reference ties order nothing
    assert flip_stats(np.array([0.0, np.nan, 2.0, 3.0]), ref) == (3, 6)  # NaN: every pair it touches


def test_compare_scores_judges_order_first_and_bounds_gross_errors():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=32)  # 496 pairs, as many as the shipped probe
    ok = compare_scores(ref + rng.normal(scale=1e-6, size=32), ref)
    assert ok["passed"] and ok["flipped_pairs"] == 0 and 0 < ok["max_abs_diff"] < 1e-5
    # A large absolute error that keeps the order passes: order is what a scheduler reads.
    shifted = compare_scores(ref + 0.05 * (ref.max() - ref.min()), ref)
    assert shifted["passed"] and shifted["flip_fraction"] == 0
    # Two swapped neighbours (2 of 496 pairs, 0.004) are within MAX_FLIP_FRACTION; a shuffle is not.
    order = np.argsort(ref)
    near = ref.copy()
    for a, b in (order[3:5], order[20:22]):
        near[a], near[b] = near[b], near[a]
    assert compare_scores(near, ref)["flipped_pairs"] == 2 and compare_scores(near, ref)["passed"]
    a, b = order[10:12]
    near[a], near[b] = near[b], near[a]  # a third: 3 / 496 = 0.006, just over the line
    assert compare_scores(near, ref)["flipped_pairs"] == 3 and not compare_scores(near, ref)["passed"]
    shuffled = compare_scores(rng.permutation(ref), ref)
    assert not shuffled["passed"] and shuffled["flip_fraction"] > MAX_FLIP_FRACTION
    assert "order differs" in shuffled["reason"]
    # Gross failures with the order intact: a wrong scale, NaN/inf, a wrong count.
    scaled = compare_scores(10 * ref, ref)
    assert not scaled["passed"] and scaled["flip_fraction"] == 0 and "exceeds" in scaled["reason"]
    bad = ref.copy()
    bad[[0, 5]] = [np.nan, np.inf]
    nonfinite = compare_scores(bad, ref)
    assert not nonfinite["passed"] and "2 of 32 scores are not finite" in nonfinite["reason"]
    assert nonfinite["max_abs_diff"] is None
    assert not compare_scores(ref[:5], ref)["passed"]


def test_only_triton_on_cuda_is_checked_by_itself():
    assert needs_check("triton", "cuda") and needs_check("triton", "cuda:1")
    assert not needs_check("triton", "cpu")  # the interpreter: forced checks only
    assert not needs_check("torch", "cuda") and not needs_check("hf", "cuda")


def test_shipped_probe_spans_lengths_and_orders_every_pair(tiny_bert, tokenizer):
    """The shipped probe, read as a MiniLM ranker reads it (128 tokens) and scored by the torch
    path: every length from the bare [CLS] [SEP] to the cap, and no tied scores (every pair counts)."""
    r = Ranker(tiny_bert, _head(), tokenizer, RankerConfig(max_prompt_tokens=128), backend="torch", device="cpu")
    lengths = [len(ids) for ids in r.tokenize(PROBE_PROMPTS)]
    assert min(lengths) == 2 and max(lengths) == 128 and len(set(lengths)) >= 20
    assert len(set(PROBE_PROMPTS)) == len(PROBE_PROMPTS) == 32
    scores = r.score(list(PROBE_PROMPTS))
    assert np.isfinite(scores).all() and flip_stats(scores, scores) == (0, 32 * 31 // 2)


# ----------------------------------------------------------------------------- real interpreted kernels


@needs_triton
@pytest.mark.interpreter
@pytest.mark.usefixtures("one_blas_thread")
def test_real_interpreted_kernels_pass_the_check(tiny_bert, tokenizer, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    r = _ranker(tiny_bert, tokenizer, "triton", TRITON_DEVICE)
    if TRITON_DEVICE == "cpu":
        assert r.backend_check is None  # on a CPU nothing is checked unless asked
    else:  # on CUDA the ranker checked itself on the shipped probe
        assert r.backend_check["passed"] and r.backend_check["probe_size"] == len(PROBE_PROMPTS)
    caplog.clear()
    rec = check_backend(r, probe=SMALL_PROBE)
    assert r.backend_check is rec and r.backend_name == "triton" and rec["backend"] == "triton"
    assert rec["passed"] is True and rec["reason"] == "scores agree"
    assert rec["probe_size"] == 6 and rec["pairs"] == 15 and rec["flipped_pairs"] == 0
    # fp32 kernels vs fp32 torch: only the summation order differs.
    assert 0.0 <= rec["max_abs_diff"] < 1e-4
    assert len(_records(caplog, logging.INFO)) == 1 and not _records(caplog, logging.WARNING)


def _roll_scores(monkeypatch):
    """An off-by-one in the pooling kernel's row offsets: every prompt gets its neighbour's score."""
    import pars_fast.kernels.encoder as kenc

    real = kenc.pool_score

    def rolled(*args, **kwargs):
        pooled, scores = real(*args, **kwargs)
        return pooled.roll(1, 0), scores.roll(1, 0)

    monkeypatch.setattr(kenc, "pool_score", rolled)
    return "order differs"


def _raise_in_linear(monkeypatch):
    import pars_fast.kernels.encoder as kenc

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")

    monkeypatch.setattr(kenc, "linear", broken)
    return "triton raised RuntimeError: CUDA error: an illegal memory access"


@needs_triton
@pytest.mark.interpreter
@pytest.mark.usefixtures("one_blas_thread")
@pytest.mark.parametrize("breakage", [_roll_scores, _raise_in_linear], ids=["wrong-scores", "raises"])
def test_broken_kernel_serves_with_torch_and_says_why(tiny_bert, tokenizer, monkeypatch, caplog, breakage):
    caplog.set_level(logging.INFO, logger=LOGGER)
    import pars_fast.backend_check as bc

    monkeypatch.setattr(bc, "PROBE_PROMPTS", tuple(SMALL_PROBE))  # what the constructor's check reads
    why = breakage(monkeypatch)
    r = _ranker(tiny_bert, tokenizer, "triton", TRITON_DEVICE, check=True)  # as Ranker.load does on CUDA
    rec = r.backend_check
    assert r.backend_name == "torch" and rec["backend"] == "torch" and rec["checked"] == "triton"
    assert rec["passed"] is False and why in rec["reason"] and rec["probe_size"] == 6
    warnings = _records(caplog, logging.WARNING)
    assert len(warnings) == 1 and not _records(caplog, logging.INFO)
    line = warnings[0].getMessage()
    assert "\n" not in line and "serving with 'torch'" in line and why in line
    # It serves the torch path's scores, and a new head keeps it there.
    reference = _ranker(tiny_bert, tokenizer, "torch", TRITON_DEVICE)
    assert np.array_equal(r.score(SMALL_PROBE), reference.score(SMALL_PROBE))
    r.set_head(_head(seed=2))
    assert r.backend_name == "torch" and r.backend_check is rec


# ----------------------------------------------------------------------------- other heads, other failures


def test_check_compares_full_head_scores(tiny_bert, tokenizer):
    """A kNN head scores in torch on the backend's pooled output: the check compares what it serves."""
    rng = torch.Generator().manual_seed(5)
    spec = HeadSpec("linear", knn=KnnSpec(k=4, temperature=0.05, weight=1.0))
    memory = KnnMemory(torch.randn(40, 48, generator=rng), torch.rand(40, generator=rng) * 6, spec.knn)
    head = ScoreHead(48, spec, memory)
    with torch.no_grad():
        head.net.weight.normal_(0, 1.0, generator=rng)
    r = _ranker(tiny_bert, tokenizer, "hf", head=head)
    rec = check_backend(r, probe=SMALL_PROBE)  # "hf" under test, against the torch path
    assert rec["passed"] and rec["checked"] == "hf" and r.backend_name == "hf"
    assert rec["max_abs_diff"] < 1e-3 and rec["flipped_pairs"] == 0


def test_a_failing_reference_leaves_the_backend_unverified(tiny_bert, tokenizer, caplog):
    def no_reference(*args, **kwargs):
        raise RuntimeError("reference unavailable")

    register_backend("broken-reference-test", no_reference)
    r = _ranker(tiny_bert, tokenizer, "hf")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        rec = check_backend(r, probe=SMALL_PROBE, reference="broken-reference-test")
    assert rec["passed"] is None and r.backend_name == "hf" and rec["backend"] == "hf"
    assert "not verified" in rec["reason"] and "reference unavailable" in rec["reason"]
    assert len(_records(caplog, logging.WARNING)) == 1


# ---------------------------------------------------------------------- the verdict in the scheduler's stats


class VerdictRanker:
    """A text ranker that carries a self-check verdict, as a Ranker on CUDA does."""

    backend_check = {"checked": "triton", "backend": "torch", "passed": False, "reason": "a test's verdict",
                     "max_abs_diff": 0.5, "flipped_pairs": 3, "pairs": 10}

    def score(self, prompts):
        return np.array([len(p) for p in prompts], dtype=np.float32)


@pytest.mark.parametrize("mode", ["inline", "thread", "process"])
def test_the_verdict_appears_in_the_scheduler_stats(tiny_llama_dir, mode):
    """Wherever the ranker runs, pars_stats() (and so the stats file and /metrics) says
    which backend serves and what the self-check measured."""
    from pars_fast.sim.harness import make_scheduler, make_vllm_config
    from pars_fast.vllm import PARSScheduler

    pars = {"ranker": f"{__name__}:VerdictRanker", "worker": mode, "online": False}
    sched = make_scheduler(PARSScheduler, make_vllm_config(tiny_llama_dir, pars=pars))
    try:
        stats = sched.pars_stats()
        assert stats["worker"]["mode"] == mode
        assert stats["worker"]["backend_check"] == VerdictRanker.backend_check
    finally:
        sched.shutdown()
