"""``train()``: one training run, from samples to a ranker with its metadata.

Steps: the seeded ``max_train`` subset, the validation slice (a deterministic
5% of the *training* samples; the test split is never seen), tokenizing, then

* ``head`` mode: frozen encoder, cached embeddings, the score head fitted on them;
* ``full`` mode: optionally the LP-FT probe (a linear head on frozen embeddings
  first), the fine-tune, then, if the recipe asks for more than PARS's linear
  head (MLP, cheap features, kNN memory), that head fitted on the fine-tuned
  encoder's embeddings of the same training prompts.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pars_fast.data import Sample, check_rankable, fingerprint, length_stats
from pars_fast.losses import pair_mask
from pars_fast.ranker import Ranker, RankerConfig
from pars_fast.training.cache import encode_features
from pars_fast.training.config import MODE_DEFAULTS, TrainConfig, TrainResult, loss_lengths, split_validation
from pars_fast.training.full import train_full_mode
from pars_fast.training.head import fit_score_head, train_head_mode

log = logging.getLogger("pars_fast.training")


def train(
    samples: Sequence[Sample],
    config: TrainConfig | None = None,
    ranker_config: RankerConfig | None = None,
    *,
    backbone: str | Path | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    feature_cache: bool = True,
    data_name: str = "custom",
    recipe: str | None = None,
) -> TrainResult:
    """Train a ranker on ``samples`` (its validation slice is taken from them).

    Returns the ranker with the best-validation checkpoint loaded, its metadata
    filled in (data, recipe, loss, mode, config, validation metrics and curve, wall time).
    """
    cfg = (config or TrainConfig()).resolved()
    t0 = time.perf_counter()
    samples = list(samples)
    check_rankable(samples, cfg.delta, what="training data")
    if cfg.max_train is not None and len(samples) > cfg.max_train:
        keep = np.sort(np.random.default_rng(cfg.seed).permutation(len(samples))[: cfg.max_train])
        samples = [samples[i] for i in keep]
        check_rankable(samples, cfg.delta, what=f"training subset (max_train={cfg.max_train})")
    train_s, val_s = split_validation(samples, cfg.val_frac, cfg.max_val, cfg.seed)
    check_rankable(train_s, cfg.delta, what="training data (after the validation slice)")
    val_s = [s for s in val_s if not s.censored]  # checkpoints are chosen on exact labels only
    if val_s and not bool(pair_mask(torch.tensor([s.response_len for s in val_s]), cfg.delta).any()):
        val_s = []  # no pair to judge a checkpoint by: keep the last one

    torch.manual_seed(cfg.seed)
    ranker = Ranker.from_backbone(backbone, ranker_config, backend="hf", device=device, seed=cfg.seed)
    texts = [s.prompt for s in train_s]
    val_texts = [s.prompt for s in val_s]
    train_ids = ranker.tokenize(texts)
    val_ids = ranker.tokenize(val_texts)
    loss_len = torch.from_numpy(loss_lengths(train_s, cfg.delta_unit))
    token_len = torch.tensor([s.response_len for s in train_s], dtype=torch.float32)
    val_lengths = np.array([s.response_len for s in val_s], dtype=np.float64)
    log_len = torch.log1p(loss_len.abs())
    loss_kw = {
        "delta": cfg.delta,
        "margin": cfg.margin,
        "log_mean": float(log_len.mean()),
        "log_std": float(log_len.std().clamp_min(1e-6)),
    }
    common = {"progress": progress, "feature_cache": feature_cache}

    timings: dict[str, float] = {}
    if cfg.mode == "head":
        # On a saved (fine-tuned) ranker's encoder, its trained linear head is the base a kNN blend adds to.
        base = ranker.head if ranker.metadata.get("backbone_head") else None
        best, history, run_t = train_head_mode(
            ranker, cfg, train_ids, loss_len, token_len, texts, val_ids, val_texts, val_lengths, loss_kw,
            base=base, **common,
        )
        timings.update(run_t)
    else:
        if cfg.init_head == "probe":
            # LP-FT: fit a linear head on frozen features (cached, seconds), then fine-tune everything from there.
            epochs, batch, lr = MODE_DEFAULTS["head"]
            probe = copy.copy(cfg)
            probe.mode, probe.epochs, probe.batch_size, probe.lr, probe.max_steps = "head", epochs, batch, lr, None
            probe.head, probe.features, probe.knn = "linear", False, "off"
            probe_best, _, probe_t = train_head_mode(
                ranker, probe, train_ids, loss_len, token_len, texts, val_ids, val_texts, val_lengths, loss_kw,
                **common,
            )
            timings.update({f"probe_{k}": v for k, v in probe_t.items()})
            ranker.metadata["probe"] = {k: v for k, v in probe_best.items() if k != "val"}
        best, history, run_t = train_full_mode(
            ranker, cfg, train_ids, loss_len, val_ids, val_lengths, loss_kw, progress=progress, log=log
        )
        timings.update(run_t)
        if not cfg.plain_head:
            # The recipe's head on the fine-tuned encoder's embeddings (frozen now).
            t1 = time.perf_counter()
            emb = encode_features(ranker, train_ids, progress=progress, cache=feature_cache, desc="re-encoding train")
            val_emb = encode_features(ranker, val_ids, progress=progress, cache=feature_cache, desc="re-encoding val")
            base = ranker.head  # kept as the base when the recipe adds only a blended kNN memory
            _, head_best, _ = fit_score_head(
                ranker, cfg, emb, loss_len, token_len, texts,
                (val_emb, val_texts, val_lengths) if val_ids else None, loss_kw, base=base,
            )
            best["fine_tuned_head_val"] = best.pop("val", {})
            best["head"] = {k: v for k, v in head_best.items() if k != "val"}
            best["val"] = head_best.get("val", {})
            timings["head_on_fine_tuned"] = round(time.perf_counter() - t1, 1)
    ranker.encoder.eval()
    ranker.set_backend("auto")
    wall = time.perf_counter() - t0
    import transformers

    from pars_fast import __version__

    ranker.metadata.update(
        {
            "pars_fast_version": __version__,
            "recipe": recipe,
            "loss": cfg.loss,
            "mode": cfg.mode,
            "head": ranker.head_spec.to_dict(),
            "train_config": asdict(cfg),
            "ranker_config": asdict(ranker.config),
            "training_data": {
                "name": data_name,
                "n_train": len(train_s),
                "n_val": len(val_s),
                "fingerprint": fingerprint(train_s),
                "response_len": length_stats(train_s),
            },
            "best": best,
            "metrics": {"val": best.get("val", {})},
            "history": history,
            "timings_s": {**timings, "total": round(wall, 1)},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
    )
    return TrainResult(ranker, best, history, wall, len(train_s), len(val_s))


def score_samples(ranker: Ranker, prompts: list[str], feature_cache: bool = True) -> np.ndarray:
    """Scores of prompts; a head-mode ranker (untouched backbone) reuses cached embeddings."""
    if ranker.metadata.get("mode") == "head" and feature_cache:
        emb = encode_features(ranker, ranker.tokenize(prompts), progress=False, desc="encoding eval prompts")
        with torch.inference_mode():
            emb = emb.to(ranker.device)
            if ranker.score_head is None:
                return ranker.head(emb).squeeze(-1).float().cpu().numpy()
            feats = None
            if ranker.score_head.n_features:
                from pars_fast.features import cheap_features

                feats = torch.from_numpy(cheap_features(prompts))
            return ranker.score_head(emb, feats).float().cpu().numpy()
    return ranker.score(prompts)


def attach_eval_metrics(
    ranker: Ranker, sets: dict[str, Sequence[Sample]], delta: float = 0.2, feature_cache: bool = True
) -> dict[str, Any]:
    """Score each evaluation set; store the metrics (τ with its bootstrap SE) in ``ranker.metadata["metrics"]``."""
    from pars_fast.metrics import bootstrap_se, ranking_metrics

    out: dict[str, Any] = {}
    for key, samples in sets.items():
        if not samples:
            continue
        t0 = time.perf_counter()
        prompts = [s.prompt for s in samples]
        scores = score_samples(ranker, prompts, feature_cache)
        lengths = [s.response_len for s in samples]
        metrics: dict[str, Any] = ranking_metrics(scores, lengths, delta)
        metrics["kendall_tau_se"] = round(bootstrap_se(scores, lengths), 4)
        metrics["score_s"] = round(time.perf_counter() - t0, 2)
        out[key] = metrics
    ranker.metadata.setdefault("metrics", {}).update(out)
    return out


__all__ = ["attach_eval_metrics", "score_samples", "train"]
