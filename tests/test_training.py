"""Training (head and full mode), the feature cache, and the train/eval/score CLI."""

import io
import json
import math
import sys

import numpy as np
import pytest
import torch

from pars_fast.cli import main
from pars_fast.data import DatasetError, Sample, load_sharegpt, save_jsonl, train_test_split
from pars_fast.metrics import kendall_tau, pairwise_accuracy, ranking_metrics
from pars_fast.ranker import Ranker
from pars_fast.training import FeatureCache, TrainConfig, encode_features, split_validation, train


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """One $PARS_FAST_HOME per module, so the feature cache is shared by its tests."""
    path = tmp_path_factory.mktemp("pars_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PARS_FAST_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def samples(home):
    # 800 real ShareGPT first turns: 600 to train on, 200 held out.
    return train_test_split(load_sharegpt(limit=800), test_frac=0.25, seed=0)


@pytest.fixture(scope="module")
def head_result(samples):
    train_s, _ = samples
    return train(train_s, TrainConfig(loss="pairwise", mode="head"), progress=False)


def test_head_mode_beats_random_on_held_out(head_result, samples):
    _, test_s = samples
    scores = head_result.ranker.score([s.prompt for s in test_s])
    lengths = [s.response_len for s in test_s]
    tau = kendall_tau(scores, lengths)
    acc = pairwise_accuracy(scores, lengths)
    # Random ranking gives tau ~ 0 +- 0.05 and accuracy ~ 0.5 on 200 prompts.
    assert tau > 0.15, tau
    assert acc > 0.6, acc


def test_head_mode_folds_standardization_into_a_plain_linear(head_result, samples):
    r = head_result.ranker
    assert isinstance(r.head, torch.nn.Linear) and r.head.weight.shape == (1, 384)
    meta = r.metadata
    assert meta["loss"] == "pairwise" and meta["mode"] == "head"
    assert meta["training_data"]["n_train"] + meta["training_data"]["n_val"] == head_result.n_train + head_result.n_val
    # The recorded validation metrics come from the saved (folded) head on raw features.
    train_s, _ = samples
    _, val_s = split_validation(train_s)
    val_scores = r.score([s.prompt for s in val_s])
    want = ranking_metrics(val_scores, [s.response_len for s in val_s])
    assert head_result.best["val"]["kendall_tau"] == pytest.approx(want["kendall_tau"], abs=1e-3)
    assert 0 < head_result.best["epoch"] <= 30
    assert head_result.best["val_pairwise_accuracy"] == max(h["val_pairwise_accuracy"] for h in head_result.history)


@pytest.mark.parametrize("loss", ["pointwise", "listmle"])
def test_baseline_losses_train_in_head_mode(samples, loss):
    # Features are cached by the first head run, so these are seconds.
    train_s, test_s = samples
    result = train(train_s, TrainConfig(loss=loss, mode="head"), progress=False)
    scores = result.ranker.score([s.prompt for s in test_s])
    assert kendall_tau(scores, [s.response_len for s in test_s]) > 0.1


def test_feature_cache_rows_are_reused(head_result, samples, home):
    r = head_result.ranker
    train_s, _ = samples
    ids = r.tokenize([s.prompt for s in train_s[:50]])
    fresh = encode_features(r, ids, progress=False, cache=False)
    cached = encode_features(r, ids, progress=False, cache=True)
    assert torch.allclose(fresh, cached, atol=1e-5)
    files = sorted(p.name for p in (home / "features").glob("*.pt"))
    assert [f.rsplit("-", 1)[1] for f in files] == ["cls.pt", "mean.pt"]
    cache = FeatureCache(files[0].rsplit("-", 1)[0], "mean", 384)
    assert len(cache.index) >= len({tuple(x) for x in ids})


@pytest.mark.parametrize("init_head", ["random", "probe"])
def test_full_mode_updates_encoder_and_keeps_best(samples, init_head):
    train_s, _ = samples
    base = Ranker.from_backbone(device="cpu", backend="hf")
    # No warm-up: get_linear_schedule_with_warmup's first warm-up step has lr 0, and every step here must move.
    cfg = TrainConfig(loss="pairwise", mode="full", batch_size=8, max_steps=2, init_head=init_head, warmup_frac=0.0)
    result = train(train_s[:60], cfg, progress=False)
    if init_head == "probe":
        # The probed start is evaluated at step 0 and kept only if no later step beats it.
        assert result.history[0]["step"] == 0 and "probe" in result.ranker.metadata
        assert result.best["val_pairwise_accuracy"] == max(h["val_pairwise_accuracy"] for h in result.history)
    r = result.ranker
    before = base.encoder.state_dict()["encoder.layer.0.attention.self.query.weight"]
    after = r.encoder.state_dict()["encoder.layer.0.attention.self.query.weight"]
    # Kept the untouched (probed) start only if it validated best; otherwise the encoder moved.
    assert torch.equal(before, after) == (result.best["step"] == 0)
    assert r.metadata["mode"] == "full" and r.metadata["train_config"]["lr"] == 2e-5
    assert [h["step"] for h in result.history][-1] == 2
    assert np.all(np.isfinite(r.score(["a prompt", ""])))
    assert not r.encoder.training


def test_head_mode_mlp_features_knn_round_trip(samples, tmp_path):
    # The default recipe's head on the module's cached features: seconds.
    train_s, test_s = samples
    cfg = TrainConfig(mode="head", head="mlp", head_units=64, features=True, knn="blend", knn_k=10, epochs=6)
    result = train(train_s, cfg, progress=False)
    r = result.ranker
    assert r.head_spec.kind == "mlp" and r.head_spec.features and r.head_spec.knn is not None
    assert r.score_head.memory.rows == result.n_train
    assert "knn" in result.best and result.best["knn"]["grid"]
    prompts = [s.prompt for s in test_s]
    from pars_fast.training.trainer import score_samples

    scores = score_samples(r, prompts)  # cached frozen embeddings: no encoder pass
    assert kendall_tau(scores, [s.response_len for s in test_s]) > 0.15
    loaded = Ranker.load(r.save(tmp_path / "r"), backend="hf", device="cpu")
    assert np.allclose(loaded.score(prompts[:8]), scores[:8], atol=1e-4)  # the real scoring path agrees
    assert loaded.metadata["head"]["kind"] == "mlp"


def test_head_on_a_saved_rankers_encoder_keeps_its_head_as_the_knn_base(head_result, samples, tmp_path):
    # The two-stage "best" route: a fine-tuned ranker folder as the backbone, a kNN blend on top.
    train_s, _ = samples
    folder = head_result.ranker.save(tmp_path / "base")
    result = train(train_s, TrainConfig(mode="head", knn="blend", knn_k=10), backbone=folder, progress=False)
    r = result.ranker
    assert r.metadata["backbone"] == str(folder) and r.head_spec.knn is not None
    assert torch.allclose(r.score_head.net.weight, head_result.ranker.head.weight)
    assert r.config == head_result.ranker.config


def test_delta_in_characters_orders_pairs_by_response_characters(samples):
    train_s, _ = samples
    assert all(s.response_chars is not None and s.response_chars >= s.response_len for s in train_s[:50])
    result = train(train_s, TrainConfig(mode="head", delta_unit="chars", epochs=3), progress=False)
    assert result.ranker.metadata["train_config"]["delta_unit"] == "chars"
    with pytest.raises(ValueError, match="response characters"):
        train([Sample(f"p{i}", 10 + 40 * (i % 2)) for i in range(30)], TrainConfig(delta_unit="chars"), progress=False)


def test_recipes_and_flags_merge():
    import argparse

    from pars_fast.training.cli import configs_from_args, configure_parser
    from pars_fast.training.recipes import RECIPES

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    cfg, rcfg = configs_from_args(parser.parse_args(["--recipe", "paper", "--epochs", "1", "--truncation", "head_tail"]))
    assert (cfg.mode, cfg.epochs, cfg.batch_size, cfg.lr, cfg.init_head) == ("full", 1, 32, 2e-5, "probe")
    assert rcfg.truncation == "head_tail" and rcfg.max_prompt_tokens == 128
    cfg, rcfg = configs_from_args(parser.parse_args(["--out", "somewhere"]))
    assert cfg == TrainConfig() and rcfg is None  # the backbone's own ranker config, or the defaults
    # No --out writes the default ranker, so it trains the default recipe, not the bare defaults.
    from pars_fast.training.default import DEFAULT_RECIPE

    bare, _ = configs_from_args(parser.parse_args([]))
    named, _ = configs_from_args(parser.parse_args(["--recipe", DEFAULT_RECIPE]))
    assert bare == named != TrainConfig()
    cfg, _ = configs_from_args(parser.parse_args(["--recipe", "default", "--knn", "off"]))
    assert cfg.mode == "head" and cfg.features and cfg.knn == "off"
    assert set(RECIPES) >= {"fast", "default", "paper", "best"}
    for name in RECIPES:
        configs_from_args(parser.parse_args(["--recipe", name]))[0].resolved()


def test_unusable_training_data_is_a_clear_error():
    with pytest.raises(DatasetError, match="empty"):
        train([], TrainConfig())
    with pytest.raises(DatasetError, match="one distinct response length"):
        train([Sample(f"p{i}", 10) for i in range(30)], TrainConfig())
    with pytest.raises(DatasetError, match="no valid pair"):
        train([Sample(f"p{i}", 100 + i % 3) for i in range(30)], TrainConfig())
    with pytest.raises(ValueError, match="loss must be one of"):
        train([Sample("a", 1), Sample("b", 9)], TrainConfig(loss="hinge"))


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def data_file(samples, home):
    train_s, test_s = samples
    return save_jsonl(train_s[:300] + test_s[:100], home / "small.jsonl")


def _run_cli(argv, capsys, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_train_without_out_writes_default_ranker_then_eval_and_score(data_file, home, capsys, monkeypatch):
    rc, out, err = _run_cli(
        ["train", "--data", str(data_file), "--mode", "head", "--epochs", "5", "--no-progress", "--json"], capsys
    )
    assert rc == 0, err
    summary = json.loads(out)
    default = home / "rankers" / "default"
    assert summary["out"] == str(default) and (default / "ranker.json").is_file()
    assert summary["test"]["n"] == 40 and -1 <= summary["test"]["kendall_tau"] <= 1

    from pars_fast.training import ensure_default_ranker

    assert ensure_default_ranker(progress=False) == default  # exists: no training

    rc, out, err = _run_cli(["eval", "--data", str(data_file), "--json"], capsys)
    assert rc == 0, err
    metrics = json.loads(out)
    assert {"kendall_tau", "pairwise_accuracy", "spearman", "n"} <= set(metrics)
    assert metrics["n"] == 400 and not math.isnan(metrics["kendall_tau"])

    rc, out, err = _run_cli(["eval", "--baseline", "prompt-length", "--data", str(data_file), "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["ranker"] == "prompt-length"

    prompts = ["write a long essay about the history of Rome", "", "hi \ud800", "yes or no?"]
    rc, out, err = _run_cli(["score", "--ranker", str(default)], capsys, "\n".join(prompts) + "\n", monkeypatch)
    assert rc == 0, err
    got = [float(x) for x in out.split()]
    want = Ranker.load(default, backend="hf", device="cpu").score(prompts)
    assert np.allclose(got, want, atol=1e-5)

    jsonl = "\n".join(json.dumps(x) for x in ["line one\nwith a newline", {"prompt": "two"}]) + "\n"
    rc, out, err = _run_cli(["score", "--jsonl", "--json"], capsys, jsonl, monkeypatch)
    assert rc == 0, err
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch, data_file):
    rc, _, err = _run_cli(["eval", "--ranker", str(tmp_path / "none"), "--data", str(data_file)], capsys)
    assert rc == 2 and "no usable ranker" in err and str(tmp_path / "none") in err

    flat = save_jsonl([Sample(f"p{i}", 7) for i in range(50)], tmp_path / "flat.jsonl")
    rc, _, err = _run_cli(["train", "--data", str(flat), "--out", str(tmp_path / "r"), "--no-progress"], capsys)
    assert rc == 2 and "one distinct response length" in err

    rc, _, err = _run_cli(["score", "--jsonl"], capsys, "{broken\n", monkeypatch)
    assert rc == 2 and "line 1" in err


@pytest.mark.slow
def test_ensure_default_ranker_trains_when_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("PARS_FAST_HOME", str(tmp_path))
    from pars_fast.training import ensure_default_ranker

    path = ensure_default_ranker(progress=False)
    r = Ranker.load(path)
    assert r.metadata["mode"] == "head" and r.metadata["training_data"]["name"] == "sharegpt-train"
    assert r.metadata["metrics"]["test"]["kendall_tau"] > 0.2
