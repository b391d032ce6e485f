"""Head training on fixed encoder embeddings: ``head`` mode, the LP-FT probe, and the heads fitted after a fine-tune.

The encoder is frozen here. Embeddings of every training prompt are computed
once (cached on disk for the untouched backbone), then the score head
(:mod:`pars_fast.heads`: linear or MLP, optionally fused with cheap prompt
features, optionally blended with a kNN memory) is fitted in seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from pars_fast.features import FEATURE_NAMES, cheap_features
from pars_fast.heads import HeadSpec, KnnMemory, KnnSpec, ScoreHead, attach_knn, fit_head
from pars_fast.losses import compute_loss
from pars_fast.metrics import pairwise_accuracy, ranking_metrics
from pars_fast.ranker import Ranker
from pars_fast.training.cache import encode_features
from pars_fast.training.config import TrainConfig


def val_metric(delta: float) -> Callable[[np.ndarray, np.ndarray], float]:
    """Validation pairwise accuracy (the checkpoint-selection metric); -1 when there is no pair."""

    def metric(scores: np.ndarray, lengths: np.ndarray) -> float:
        acc = pairwise_accuracy(scores, lengths, delta)
        return -1.0 if math.isnan(acc) else acc

    return metric


def loss_fn(cfg: TrainConfig, loss_kw: dict[str, float]) -> Callable[..., tuple[torch.Tensor, int]]:
    return lambda scores, lengths, gen: compute_loss(cfg.loss, scores, lengths, generator=gen, **loss_kw)


def head_spec(cfg: TrainConfig) -> HeadSpec:
    return HeadSpec(
        kind=cfg.head,
        units=cfg.head_units,
        features=cfg.features,
        feature_names=list(FEATURE_NAMES) if cfg.features else [],
        knn=KnnSpec(k=cfg.knn_k, temperature=cfg.knn_temperature) if cfg.knn != "off" else None,
        knn_inputs=cfg.knn == "inputs",
    )


def fit_score_head(
    ranker: Ranker,
    cfg: TrainConfig,
    emb: torch.Tensor,
    loss_len: torch.Tensor,
    token_len: torch.Tensor,
    texts: Sequence[str],
    val: tuple[torch.Tensor, Sequence[str], np.ndarray] | None,
    loss_kw: dict[str, float],
    *,
    base: torch.nn.Linear | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    max_steps: int | None = None,
) -> tuple[ScoreHead, dict[str, Any], list[dict[str, Any]]]:
    """Fit ``cfg``'s head on fixed embeddings and install it in ``ranker``.

    ``base``: keep this trained linear head as the base instead of fitting one
    (a fine-tuned ranker's own head, when only a kNN memory is added).
    ``loss_len`` orders the pairs (tokens or chars); ``token_len`` fills the kNN memory.
    """
    spec = head_spec(cfg)
    feats = torch.from_numpy(cheap_features(list(texts))) if cfg.features else None
    val_t = None
    if val is not None:
        val_feats = torch.from_numpy(cheap_features(list(val[1]))) if cfg.features else None
        val_t = (val[0], val_feats, val[2])
    metric = val_metric(cfg.delta)
    memory = None
    if cfg.knn == "inputs":
        memory = KnnMemory(emb, torch.log1p(token_len.float()), spec.knn)
    if base is not None and cfg.head == "linear" and not cfg.features and cfg.knn != "inputs":
        head: ScoreHead = ScoreHead.from_linear(base)
        best: dict[str, Any] = {}
        history: list[dict[str, Any]] = []
    else:
        fit = fit_head(
            spec, emb, loss_len, loss_fn(cfg, loss_kw), feats=feats, val=val_t, val_metric=metric,
            epochs=epochs or 30, batch_size=batch_size or 128, lr=lr or 1e-3, weight_decay=cfg.weight_decay,
            warmup_frac=cfg.warmup_frac, grad_clip=cfg.grad_clip,
            dropout=cfg.head_dropout if cfg.head == "mlp" else 0.0, seed=cfg.seed, max_steps=max_steps,
            memory=memory,
        )
        head, best, history = fit.head, fit.best, fit.history
        best = {("val_pairwise_accuracy" if k == "val_metric" else k): v for k, v in best.items()}
        history = [{("val_pairwise_accuracy" if k == "val_metric" else k): v for k, v in h.items()} for h in history]
    if cfg.knn == "blend":
        head, info = attach_knn(
            head, KnnSpec(k=cfg.knn_k, temperature=cfg.knn_temperature), emb, token_len,
            val=val_t, val_metric=metric,
        )
        best["knn"] = info
    ranker.set_head(head)
    if val_t is not None:
        with torch.no_grad():
            scores = head.to(emb.device)(val_t[0], val_t[1]).cpu().numpy()
        best["val"] = ranking_metrics(scores, val_t[2], cfg.delta)
    return head, best, history


def train_head_mode(
    ranker: Ranker,
    cfg: TrainConfig,
    train_ids: list[list[int]],
    loss_len: torch.Tensor,
    token_len: torch.Tensor,
    texts: Sequence[str],
    val_ids: list[list[int]],
    val_texts: Sequence[str],
    val_lengths: np.ndarray,
    loss_kw: dict[str, float],
    *,
    progress: bool,
    feature_cache: bool,
    base: torch.nn.Linear | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """``head`` mode: embeddings of the frozen encoder (cached), then :func:`fit_score_head`."""
    t0 = time.perf_counter()
    feats = encode_features(ranker, train_ids, progress=progress, cache=feature_cache, desc="encoding train prompts")
    val_feats = (
        encode_features(ranker, val_ids, progress=progress, cache=feature_cache, desc="encoding val prompts")
        if val_ids
        else None
    )
    t_feat = time.perf_counter() - t0
    t1 = time.perf_counter()
    val = (val_feats, val_texts, val_lengths) if val_feats is not None else None
    _, best, history = fit_score_head(
        ranker, cfg, feats, loss_len, token_len, texts, val, loss_kw,
        epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, max_steps=cfg.max_steps, base=base,
    )
    return best, history, {"features": round(t_feat, 1), "train": round(time.perf_counter() - t1, 1)}


__all__ = ["fit_score_head", "head_spec", "loss_fn", "train_head_mode", "val_metric"]
