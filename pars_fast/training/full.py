"""``full`` mode: fine-tune the encoder and its linear head together (PARS's recipe).

AdamW (no weight decay on biases and LayerNorm weights), a linear schedule with
warm-up (``transformers.get_linear_schedule_with_warmup``), gradient clipping,
and the checkpoint with the best validation pairwise accuracy. Validation runs
``evals_per_epoch`` times an epoch; every evaluation (step, train loss, val
accuracy, val τ, elapsed seconds) goes into the history: the validation curve.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import numpy as np
import torch

from pars_fast.losses import compute_loss
from pars_fast.metrics import kendall_tau, ranking_metrics
from pars_fast.ranker import Ranker
from pars_fast.training.config import TrainConfig, step_batches
from pars_fast.training.head import val_metric


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def train_full_mode(
    ranker: Ranker,
    cfg: TrainConfig,
    train_ids: list[list[int]],
    loss_len: torch.Tensor,
    val_ids: list[list[int]],
    val_lengths: np.ndarray,
    loss_kw: dict[str, float],
    *,
    progress: bool,
    log: Any = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    t0 = time.perf_counter()
    encoder, head = ranker.encoder, ranker.head
    decay, no_decay = [], []
    for name, p in encoder.named_parameters():
        # The usual BERT recipe: no weight decay on biases and LayerNorm weights.
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decay, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": cfg.lr, "weight_decay": 0.0},
            {"params": list(head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
        ]
    )
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(step_batches(len(train_ids), cfg.batch_size, np.random.default_rng(0)))
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(total * cfg.warmup_frac), total)
    eval_every = max(1, math.ceil(min(steps_per_epoch, total) / max(1, cfg.evals_per_epoch)))
    params = [p for g in opt.param_groups for p in g["params"]]
    metric = val_metric(cfg.delta)

    def evaluate(entry: dict[str, Any]) -> None:
        encoder.eval()
        head.eval()
        with torch.inference_mode():
            scores = head(ranker.backend.pooled(val_ids)).squeeze(-1).float().cpu().numpy()
        encoder.train()
        head.train()
        entry["val_pairwise_accuracy"] = metric(scores, val_lengths)
        entry["val_kendall_tau"] = kendall_tau(scores, val_lengths)
        entry["elapsed_s"] = round(time.perf_counter() - t0, 1)

    best: dict[str, Any] = {"val_pairwise_accuracy": -math.inf}
    best_state: dict[str, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, Any]] = []
    step = 0
    ema: float | None = None
    if cfg.init_head == "probe" and val_ids:
        # The probed start is a candidate too: fine-tuning must beat it to be kept.
        best = {"epoch": 0, "step": 0, "train_loss": math.nan}
        evaluate(best)
        best_state = {"encoder": _snapshot(encoder), "head": _snapshot(head)}
        history.append(dict(best))
    encoder.train()
    head.train()
    with tqdm(total=total, desc=f"full/{cfg.loss}", unit="step", disable=not progress, file=sys.stderr) as bar:
        for epoch in range(cfg.epochs):
            for idx in step_batches(len(train_ids), cfg.batch_size, rng):
                if step >= total:
                    break
                t_idx = torch.as_tensor(idx)
                pooled = ranker.backend.pooled([train_ids[i] for i in idx])
                scores = head(pooled).squeeze(-1)
                loss, used = compute_loss(cfg.loss, scores, loss_len[t_idx], generator=gen, **loss_kw)
                opt.zero_grad(set_to_none=True)
                if used:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
                sched.step()
                step += 1
                ema = float(loss.detach()) if ema is None else 0.95 * ema + 0.05 * float(loss.detach())
                bar.update(1)
                bar.set_postfix(loss=f"{ema:.4f}", best=f"{best['val_pairwise_accuracy']:.4f}")
                if step % eval_every == 0 or step == total:
                    entry: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": ema}
                    if val_ids:
                        evaluate(entry)
                    history.append(entry)
                    if not val_ids or entry["val_pairwise_accuracy"] > best["val_pairwise_accuracy"]:
                        best = dict(entry)
                        best_state = {"encoder": _snapshot(encoder), "head": _snapshot(head)}
                    if log is not None:
                        log.info("step %d: %s", step, entry)
                    if progress:  # the validation curve, visible in the log while the run goes on
                        bar.write(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}))
            if step >= total:
                break
    if best_state is not None:
        encoder.load_state_dict(best_state["encoder"])
        head.load_state_dict(best_state["head"])
    encoder.eval()
    head.eval()
    if val_ids:
        with torch.inference_mode():
            scores = head(ranker.backend.pooled(val_ids)).squeeze(-1).float().cpu().numpy()
        best["val"] = ranking_metrics(scores, val_lengths, cfg.delta)
    return best, history, {"train": round(time.perf_counter() - t0, 1)}


__all__ = ["train_full_mode"]
