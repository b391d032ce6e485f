"""Score heads (MLP, cheap features, kNN memory), the cheap features, and the version-2 ranker folder."""

import json
import math

import numpy as np
import pytest
import torch

from pars_fast.features import FEATURE_NAMES, cheap_features
from pars_fast.heads import HeadSpec, KnnMemory, KnnSpec, ScoreHead, attach_knn, fit_head
from pars_fast.losses import pairwise_margin_loss
from pars_fast.metrics import pairwise_accuracy
from pars_fast.ranker import Ranker


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    monkeypatch.setenv("PARS_FAST_HOME", str(tmp_path / "home"))


def _pairwise(scores, lengths, gen):
    return pairwise_margin_loss(scores, lengths, delta=0.2, margin=1.0)


def _acc(scores, lengths):
    return pairwise_accuracy(scores, lengths, 0.2)


# --------------------------------------------------------------------------- cheap features


def test_cheap_features_known_values():
    text = "Write a 500-word essay about Rome?\n```python\nprint(1)\n```"
    f = dict(zip(FEATURE_NAMES, cheap_features([text, ""])[0]))
    assert f["log_chars"] == pytest.approx(math.log1p(len(text)))
    assert f["log_lines"] == pytest.approx(math.log1p(3))
    assert f["first_word_long_verb"] == 1.0 and f["first_word_short_verb"] == 0.0
    assert f["log_requested_count"] == pytest.approx(math.log1p(500))
    assert f["requests_words"] == 1.0
    assert f["has_code_fence"] == 1.0
    assert f["ends_with_question"] == 0.0  # it ends with the fence
    assert cheap_features(["What is 2+2?"])[0, FEATURE_NAMES.index("ends_with_question")] == 1.0
    assert np.all(cheap_features([""]) == 0.0)
    with pytest.raises(TypeError, match="list of strings"):
        cheap_features("one prompt")


# --------------------------------------------------------------------------- kNN memory


def test_knn_lookup_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(300, 16)).astype(np.float32)
    values = rng.uniform(1, 7, 300).astype(np.float32)
    queries = rng.normal(size=(9, 16)).astype(np.float32)
    spec = KnnSpec(k=7, temperature=0.1)
    mem = KnnMemory(torch.from_numpy(keys), torch.from_numpy(values), spec)
    got = mem.lookup(torch.from_numpy(queries)).numpy()
    # Reference: fp16-stored unit keys, float64 cosine, explicit top-k and softmax.
    unit = (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float16).astype(np.float64)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    for row, want_row in zip(q @ unit.T, got):
        top = np.argsort(-row)[:7]
        w = np.exp((row[top] - row[top].max()) / 0.1)
        assert want_row == pytest.approx(float((w * values[top]).sum() / w.sum()), rel=1e-4)


def test_knn_leave_one_out_never_uses_the_query_row():
    keys = torch.eye(4) + 0.01
    values = torch.tensor([100.0, 1.0, 1.0, 1.0])
    mem = KnnMemory(keys, values, KnnSpec(k=1, temperature=0.01))
    assert mem.lookup(keys[:1]).item() == pytest.approx(100.0)  # its own row
    assert mem.lookup(keys[:1], exclude=torch.tensor([0])).item() == pytest.approx(1.0)
    top1_value = -1  # KNN_INPUTS: the nearest row's own value is the last column
    assert mem.inputs(keys[:1])[0, top1_value].item() == pytest.approx(100.0)
    assert mem.inputs(keys[:1], exclude=torch.tensor([0]))[0, top1_value].item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- fitting


def _planted(n, dim=24, seed=0):
    """Embeddings whose first direction carries log length, plus prompts whose length carries it too."""
    g = torch.Generator().manual_seed(seed)
    log_len = torch.rand(n, generator=g) * 5 + 1
    emb = torch.randn(n, dim, generator=g) * 3
    emb[:, 0] = log_len + 0.05 * torch.randn(n, generator=g)
    return emb, torch.exp(log_len).round()


def test_fit_head_linear_and_mlp_learn_a_planted_signal():
    emb, lengths = _planted(500)
    val_emb, val_len = _planted(200, seed=1)
    for spec in (HeadSpec("linear"), HeadSpec("mlp", units=32)):
        fit = fit_head(spec, emb, lengths, _pairwise, val=(val_emb, None, val_len.numpy()), val_metric=_acc,
                       epochs=8, batch_size=64, lr=1e-2)
        with torch.no_grad():
            acc = _acc(fit.head(val_emb).numpy(), val_len.numpy())
        assert acc > 0.9, (spec.kind, acc)
        assert fit.best["val_metric"] == max(h["val_metric"] for h in fit.history)


def test_features_head_uses_the_prompt_text():
    # The embedding is noise; only the prompt length tells response lengths apart.
    g = torch.Generator().manual_seed(0)
    n = 400
    words = torch.randint(1, 300, (n,), generator=g)
    prompts = ["word " * int(w) for w in words]
    lengths = words.float() * 3
    emb = torch.randn(n, 8, generator=g)
    feats = torch.from_numpy(cheap_features(prompts))
    spec = HeadSpec("linear", features=True, feature_names=list(FEATURE_NAMES))
    fit = fit_head(spec, emb[:300], lengths[:300], _pairwise, feats=feats[:300], val=None, val_metric=_acc,
                   epochs=10, batch_size=64, lr=1e-2)
    with torch.no_grad():
        acc = _acc(fit.head(emb[300:], feats[300:]).numpy(), lengths[300:].numpy())
    assert acc > 0.85  # the embedding alone is noise: ~0.5
    with pytest.raises(ValueError, match="feats"):
        fit.head(emb[:2])


def test_attach_knn_picks_a_weight_on_validation():
    # Lengths are a function of the cluster an embedding falls in, which a linear head cannot read.
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 16, generator=g) * 4
    cluster_len = torch.tensor([10.0, 400.0, 30.0, 900.0, 60.0, 200.0])
    ids = torch.randint(0, 6, (900,), generator=g)
    emb = centers[ids] + torch.randn(900, 16, generator=g) * 0.5
    lengths = cluster_len[ids]
    base = ScoreHead(16)  # an untrained base: zero signal
    with torch.no_grad():
        base.net.weight.zero_()
    head, info = attach_knn(base, KnnSpec(k=10, temperature=0.05), emb[:600], lengths[:600],
                            val=(emb[600:750], None, lengths[600:750].numpy()), val_metric=_acc)
    assert info["weight_relative"] > 0 and head.memory.rows == 600
    # The lookup (k, temperature) was picked on validation from the grid, and the head uses it.
    assert info["lookup_grid"] and (head.spec.knn.k, head.spec.knn.temperature) == (info["k"], info["temperature"])
    assert info["lookup_grid"][f"{info['k']},{info['temperature']}"] == max(info["lookup_grid"].values())
    with torch.no_grad():
        acc = _acc(head(emb[750:]).numpy(), lengths[750:].numpy())
    assert acc > 0.95


def test_knn_inputs_head_reads_the_memory_leave_one_out():
    # Cluster-valued lengths again; the net learns to trust the neighbour mean (an input here).
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(6, 16, generator=g) * 4
    cluster_len = torch.tensor([10.0, 400.0, 30.0, 900.0, 60.0, 200.0])
    ids = torch.randint(0, 6, (900,), generator=g)
    emb = centers[ids] + torch.randn(900, 16, generator=g) * 0.5
    lengths = cluster_len[ids]
    spec = HeadSpec("linear", knn=KnnSpec(k=10, temperature=0.05), knn_inputs=True)
    memory = KnnMemory(emb[:600], torch.log1p(lengths[:600]), spec.knn)
    fit = fit_head(spec, emb[:600], lengths[:600], _pairwise, val=(emb[600:750], None, lengths[600:750].numpy()),
                   val_metric=_acc, epochs=6, batch_size=64, lr=1e-2, memory=memory)
    head = fit.head
    assert head.spec.knn.weight == 0.0 and head.n_knn == 7 and head.memory.rows == 600
    with torch.no_grad():
        acc = _acc(head(emb[750:]).numpy(), lengths[750:].numpy())
    assert acc > 0.95
    with pytest.raises(ValueError, match="memory of its training embeddings"):
        fit_head(spec, emb[:100], lengths[:100], _pairwise, val=None, val_metric=_acc, memory=memory)


# --------------------------------------------------------------------------- ranker folders


@pytest.fixture(scope="module")
def base_ranker():
    return Ranker.from_backbone(device="cpu", backend="hf", seed=1)


def _fancy_head(r: Ranker) -> ScoreHead:
    g = torch.Generator().manual_seed(0)
    spec = HeadSpec("mlp", units=16, features=True, feature_names=list(FEATURE_NAMES), knn=KnnSpec(k=3, temperature=0.1, weight=0.7))
    mem = KnnMemory(torch.randn(20, r.hidden_size, generator=g), torch.rand(20, generator=g) * 6, spec.knn)
    head = ScoreHead(r.hidden_size, spec, mem)
    with torch.no_grad():
        for p in head.net.parameters():
            p.normal_(0, 0.3, generator=g)
        head.f_std.fill_(2.0)
    return head.eval()


PROMPTS = ["hi", "Write a 2,000-word essay on Rome.", "", "def f(x):\n    return x", "🚀" * 40]


def test_fancy_head_round_trip_and_score_and_embed(base_ranker, tmp_path):
    r = Ranker(base_ranker.encoder, _fancy_head(base_ranker), base_ranker.tokenizer, backend="hf", device="cpu")
    assert r.score_head is not None and not r.head_spec.is_plain_linear
    scores = r.score(PROMPTS)
    assert scores.dtype == np.float32 and scores.shape == (5,) and len(set(scores.round(5))) == 5
    s2, emb = r.score_and_embed(PROMPTS)
    assert np.array_equal(s2, scores)
    assert emb.dtype == np.float32 and emb.shape == (5, r.hidden_size)
    assert np.allclose(emb, r.pooled(PROMPTS), atol=1e-6)
    # The score is the head on exactly those embeddings.
    feats = torch.from_numpy(cheap_features(PROMPTS))
    with torch.no_grad():
        want = r.score_head(torch.from_numpy(emb), feats).numpy()
    assert np.allclose(scores, want, atol=1e-5)
    # Token ids only: features come from the decoded prompt; still finite, same shape.
    assert np.all(np.isfinite(r.score_token_ids(r.tokenize(PROMPTS))))

    out = r.save(tmp_path / "fancy")
    info = json.loads((out / "ranker.json").read_text())
    assert info["format_version"] == 2 and info["head"]["kind"] == "mlp" and info["head"]["knn"]["k"] == 3
    assert (out / "memory.safetensors").is_file()
    loaded = Ranker.load(out, backend="hf", device="cpu")
    assert loaded.head_spec == r.head_spec
    assert np.array_equal(loaded.score(PROMPTS), scores)
    (out / "memory.safetensors").unlink()
    with pytest.raises(Exception, match="memory.safetensors is missing"):
        Ranker.load(out, backend="hf", device="cpu")


def test_plain_linear_head_saves_as_version_1_layout_and_v1_folders_load(base_ranker, tmp_path):
    lin = torch.nn.Linear(base_ranker.hidden_size, 1)
    with torch.no_grad():
        lin.weight.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    r = Ranker(base_ranker.encoder, lin, base_ranker.tokenizer, backend="hf", device="cpu")
    s, emb = r.score_and_embed(PROMPTS)
    assert np.allclose(s, r.score(PROMPTS), atol=1e-5)
    out = r.save(tmp_path / "lin")
    from safetensors.torch import load_file

    assert set(load_file(str(out / "head.safetensors"))) == {"weight", "bias"}
    assert not (out / "memory.safetensors").exists()
    # A version-1 folder: no "head" key, format_version 1.
    info = json.loads((out / "ranker.json").read_text())
    info.pop("head")
    info["format_version"] = 1
    (out / "ranker.json").write_text(json.dumps(info))
    v1 = Ranker.load(out, backend="hf", device="cpu")
    assert v1.head_spec.is_plain_linear and np.array_equal(v1.score(PROMPTS), r.score(PROMPTS))


def test_standardized_linear_head_folds_into_a_plain_linear(base_ranker):
    head = ScoreHead(base_ranker.hidden_size)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head.e_mean.normal_(0, 1, generator=g)
        head.e_std.uniform_(0.5, 2, generator=g)
        head.net.weight.normal_(0, 1, generator=g)
    emb = torch.randn(7, base_ranker.hidden_size, generator=g)
    with torch.no_grad():
        assert torch.allclose(head(emb), head.as_linear()(emb).squeeze(-1), atol=1e-4)
    r = Ranker(base_ranker.encoder, head, base_ranker.tokenizer, backend="hf", device="cpu")
    assert r.score_head is None and isinstance(r.head, torch.nn.Linear)
