"""Ranker: tokenizing/truncation, batched scoring, bad input, save/load, load errors, backends."""

import json
import random

import numpy as np
import pytest
import torch

from pars_fast.backends import (
    HFBackend,
    length_buckets,
    make_backend,
    pool,
    register_backend,
    registered_backends,
    resolve_backend_name,
)
from pars_fast.ranker import Ranker, RankerConfig, RankerLoadError, RankerNotFoundError


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PARS_FAST_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def ranker():
    r = Ranker.from_backbone(device="cpu", backend="hf", seed=1)
    # A non-trivial head so scores differ visibly between prompts.
    with torch.no_grad():
        r.head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    return r


def _reference_ids(r: Ranker, text: str) -> list[int]:
    body = r.tokenizer(text, add_special_tokens=False)["input_ids"]
    head_n, tail_n = r._split_budget()
    if len(body) > head_n + tail_n:
        body = body[:head_n] + (body[len(body) - tail_n :] if tail_n else [])
    return [r.tokenizer.cls_token_id, *body, r.tokenizer.sep_token_id]


def _words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    vocab = ["alpha", "beta,", "gamma.", "delta", "schedule", "中文", "naïve", "x" * 30, "\n", "résumé"]
    return " ".join(rng.choice(vocab) for _ in range(n))


@pytest.mark.parametrize(
    "config",
    [
        RankerConfig(),
        RankerConfig(truncation="head_tail"),
        RankerConfig(max_prompt_tokens=37, truncation="head_tail", head_tokens=5),
    ],
    ids=["head128", "head_tail128", "head_tail37"],
)
def test_tokenize_matches_naive_truncation(ranker, config):
    r = Ranker(ranker.encoder, ranker.head, ranker.tokenizer, config, backend="hf", device="cpu")
    # Short, exactly-at-budget, long, and very long texts (the last take the cut-at-whitespace path).
    texts = ["", "hi", _words(40, 1), _words(130, 2), _words(3000, 3), _words(40000, 4), "a" * 20000]
    got = r.tokenize(texts)
    for text, ids in zip(texts, got):
        assert ids == _reference_ids(r, text)
        assert len(ids) <= config.max_prompt_tokens


def test_head_tail_keeps_the_end(ranker):
    r = Ranker(ranker.encoder, ranker.head, ranker.tokenizer, RankerConfig(max_prompt_tokens=10, truncation="head_tail"),
               backend="hf", device="cpu")
    ids = r.tokenize(["one two three four five six seven eight nine ten eleven twelve"])[0]
    words = r.tokenizer.convert_ids_to_tokens(ids)
    assert words == ["[CLS]", "one", "two", "three", "four", "nine", "ten", "eleven", "twelve", "[SEP]"]


def test_score_shape_dtype_and_order_independence(ranker):
    prompts = [_words(n, n) for n in (1, 5, 60, 200, 7, 33, 129, 2)]
    scores = ranker.score(prompts)
    assert scores.shape == (len(prompts),) and scores.dtype == np.float32
    assert np.all(np.isfinite(scores))
    # Length-sorted bucketing must hand each score back to its own prompt.
    perm = [3, 0, 7, 5, 1, 6, 2, 4]
    assert np.allclose(ranker.score([prompts[i] for i in perm]), scores[perm], atol=1e-5)
    singles = np.array([ranker.score([p])[0] for p in prompts])
    assert np.allclose(singles, scores, atol=1e-5)
    assert len(set(np.round(scores, 4))) > 1


def test_pooling_matches_unpadded_forward(ranker):
    ids = ranker.tokenize(["a short prompt", _words(50, 9)])
    for pooling in ("cls", "mean"):
        backend = make_backend("hf", ranker.encoder, ranker.head, pooling, "cpu")
        with torch.inference_mode():
            batched = backend.pooled(ids)
            for row, x in zip(batched, ids):
                hidden = ranker.encoder(input_ids=torch.tensor([x])).last_hidden_state[0]
                want = hidden[0] if pooling == "cls" else hidden.mean(0)
                assert torch.allclose(row, want, atol=1e-5)


@pytest.mark.parametrize(
    "prompt",
    ["", "   \n\t ", "x \ud800 y \udfff", "\x00\x01\x7f", "🚀" * 50, "\u202eRTL\u200b", "é" * 300, "word " * 200_000],
    ids=["empty", "whitespace", "lone-surrogates", "control", "emoji", "rtl-zwsp", "accents", "1MB"],
)
def test_bad_input_gets_a_finite_score(ranker, prompt):
    scores = ranker.score([prompt, "a normal prompt"])
    assert scores.shape == (2,) and np.all(np.isfinite(scores))


def test_bad_input_types(ranker):
    assert ranker.score([]).shape == (0,)
    with pytest.raises(TypeError, match="not a single string"):
        ranker.score("just one prompt")
    with pytest.raises(TypeError, match="prompt 1 is NoneType"):
        ranker.score(["ok", None])
    with pytest.raises(ValueError, match="empty token-id list"):
        ranker.score_token_ids([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ranker.score_token_ids([[101, 10**6, 102]])
    with pytest.raises(ValueError, match="exceed"):
        ranker.score_token_ids([[101] * 600])


def test_score_token_ids_equals_score(ranker):
    prompts = ["why is the sky blue", _words(300, 5)]
    assert np.array_equal(ranker.score_token_ids(ranker.tokenize(prompts)), ranker.score(prompts))


def test_save_load_round_trip_identical_scores(ranker, tmp_path):
    ranker.metadata["note"] = "round-trip"
    out = ranker.save(tmp_path / "r")
    for name in ("ranker.json", "head.safetensors", "metadata.json", "encoder/config.json", "tokenizer"):
        assert (out / name).exists(), name
    loaded = Ranker.load(out, backend="hf", device="cpu")
    prompts = ["hello", _words(500, 6), "", "🚀"]
    assert np.array_equal(loaded.score(prompts), ranker.score(prompts))
    assert loaded.config == ranker.config
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["note"] == "round-trip" and "pars_fast_version" in meta
    # Saving over an existing folder replaces it.
    ranker.save(out)
    assert Ranker.load(out, backend="hf", device="cpu").config == ranker.config


def test_load_missing_default_says_how_to_create_it():
    with pytest.raises(RankerNotFoundError) as info:
        Ranker.load()
    msg = str(info.value)
    assert "rankers/default" in msg and "pars-fast train" in msg and "ensure_default_ranker" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_load_missing_and_corrupt_folders(ranker, tmp_path):
    with pytest.raises(RankerNotFoundError, match="nowhere"):
        Ranker.load(tmp_path / "nowhere")
    out = ranker.save(tmp_path / "r")

    (out / "head.safetensors").rename(out / "head.bak")
    with pytest.raises(RankerNotFoundError, match="missing head.safetensors"):
        Ranker.load(out)
    (out / "head.bak").rename(out / "head.safetensors")

    good = (out / "ranker.json").read_text()
    (out / "ranker.json").write_text("{not json")
    with pytest.raises(RankerLoadError, match=f"corrupt ranker at {out}"):
        Ranker.load(out)
    (out / "ranker.json").write_text(json.dumps({**json.loads(good), "config": {"pooling": "max"}}))
    with pytest.raises(RankerLoadError, match="pooling"):
        Ranker.load(out)
    (out / "ranker.json").write_text(good)

    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 384), "bias": torch.zeros(2)}, str(out / "head.safetensors"))
    with pytest.raises(RankerLoadError, match=r"weight \[1, 384\]"):
        Ranker.load(out)
    (out / "head.safetensors").write_bytes(b"garbage")
    with pytest.raises(RankerLoadError, match="corrupt"):
        Ranker.load(out)


def test_config_validation(ranker):
    with pytest.raises(ValueError, match="pooling"):
        RankerConfig(pooling="max").validate()
    with pytest.raises(ValueError, match="truncation"):
        RankerConfig(truncation="tail").validate()
    with pytest.raises(ValueError, match="exceeds"):
        Ranker(ranker.encoder, ranker.head, ranker.tokenizer, RankerConfig(max_prompt_tokens=1024), backend="hf")
    with pytest.raises(ValueError, match="Linear"):
        Ranker(ranker.encoder, torch.nn.Linear(384, 2), ranker.tokenizer, backend="hf")


def test_backend_registry(ranker):
    assert "hf" in registered_backends()
    assert resolve_backend_name("hf", "cpu") == "hf"
    assert resolve_backend_name("auto", "cpu") in registered_backends()
    with pytest.raises(ValueError, match="unknown ranker backend 'nope'"):
        make_backend("nope", ranker.encoder, ranker.head, "mean", "cpu")
    with pytest.raises(ValueError, match="pooling"):
        make_backend("hf", ranker.encoder, ranker.head, "max", "cpu")

    class Doubled(HFBackend):
        name = "doubled-test"

        def score(self, batch):
            return 2 * super().score(batch)

    register_backend("doubled-test", Doubled)
    ids = ranker.tokenize(["x", "y z"])
    base = ranker.score_token_ids(ids)
    other = Ranker(ranker.encoder, ranker.head, ranker.tokenizer, ranker.config, backend="doubled-test", device="cpu")
    assert other.backend_name == "doubled-test"
    assert np.allclose(other.score_token_ids(ids), 2 * base, atol=1e-6)
    with pytest.raises(ValueError, match="reserved"):
        register_backend("auto", Doubled)


def test_length_buckets_cover_each_index_once_within_limits():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 128) for _ in range(rng.randint(0, 300))]
        buckets = length_buckets(lengths, max_batch_size=16, max_batch_tokens=1024)
        flat = sorted(i for b in buckets for i in b)
        assert flat == list(range(len(lengths)))
        for b in buckets:
            width = max(lengths[i] for i in b)
            assert len(b) <= 16 and (len(b) * width <= 1024 or len(b) == 1)
            assert all(lengths[i] >= 0.5 * width for i in b)


def test_pool_masks_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert pool(hidden, mask, "mean").tolist() == [[2.0, 3.0]]
    assert pool(hidden, mask, "cls").tolist() == [[1.0, 2.0]]
