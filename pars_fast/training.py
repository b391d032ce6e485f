"""Training a ranker: PARS pairwise loss or a baseline loss, in ``full`` or ``head`` mode.

* ``full``: fine-tune encoder and head together (AdamW, encoder lr 2e-5; the
  freshly initialised head gets its own larger lr, else it barely moves in a
  short budget).
* ``head``: the encoder stays frozen. Pooled features of every training prompt
  are computed once (and cached on disk under ``$PARS_FAST_HOME/features``, keyed
  by the encoder weights and the exact token ids), then only ``Linear(hidden, 1)``
  is trained, on standardized features; the standardization is folded back into
  the head, so the saved head is a plain ``Linear`` on raw pooled features.

Recipe (PARS): AdamW, weight decay 0.01, linear schedule with 10% warmup,
gradient clipping at 1.0, fixed seed, and the checkpoint with the best
validation pairwise accuracy is kept. Validation is a deterministic slice of the
*training* samples; the test split is never looked at while training.

CLI: ``pars-fast train`` (see ``configure_parser``). Without ``--out`` it writes
the default ranker (``$PARS_FAST_HOME/rankers/default``).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pars_fast.data import Sample, check_rankable, fingerprint, length_stats
from pars_fast.losses import LOSSES, compute_loss
from pars_fast.metrics import pairwise_accuracy, ranking_metrics
from pars_fast.paths import default_ranker_dir, home
from pars_fast.ranker import Ranker, RankerConfig, RankerLoadError

log = logging.getLogger(__name__)

MODES = ("head", "full")
# Defaults per mode: (epochs, batch size, lr). Head mode is cheap per epoch, so it
# runs many; PARS's lr 2e-5 is for the encoder in full mode.
_MODE_DEFAULTS = {"head": (30, 128, 1e-3), "full": (1, 32, 2e-5)}
_FULL_HEAD_LR = 1e-3

# The default ranker (ensure_default_ranker): head mode on a 6,000-prompt subset of the
# ShareGPT train split (9,977 prompts), so that first use, and with it `pars-fast demo`,
# stays within its 10-minute budget on 2 idle cores: encoding runs at ~3.8k tokens/s,
# 145 s for all 9,977 prompts, ~85 s for 6,000. The cost in tau is in docs/RANKING.md.
DEFAULT_RANKER_MAX_TRAIN = 6_000


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (``None`` = the mode's default)."""

    loss: str = "pairwise"
    mode: str = "head"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    head_lr: float | None = None  # full mode only: lr of the (new) linear head
    weight_decay: float = 0.01
    warmup_frac: float = 0.1
    grad_clip: float = 1.0
    delta: float = 0.2
    margin: float = 1.0
    val_frac: float = 0.05
    max_val: int = 1000
    max_train: int | None = None  # train on the first N (after the seeded shuffle) only
    max_steps: int | None = None
    evals_per_epoch: int = 4  # full mode; head mode evaluates every epoch
    init_head: str = "random"  # full mode: "random", or "probe" = train the head on frozen features first (LP-FT)
    seed: int = 42

    def resolved(self) -> TrainConfig:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        epochs, batch, lr = _MODE_DEFAULTS[self.mode]
        out = copy.copy(self)
        out.epochs = epochs if self.epochs is None else self.epochs
        out.batch_size = batch if self.batch_size is None else self.batch_size
        out.lr = lr if self.lr is None else self.lr
        if self.init_head not in ("random", "probe"):
            raise ValueError(f"init_head must be 'random' or 'probe', got {self.init_head!r}")
        # A probed head is already trained: it moves at the encoder's lr; a random one needs a larger lr.
        full_head_lr = out.lr if self.init_head == "probe" else _FULL_HEAD_LR
        out.head_lr = (full_head_lr if self.mode == "full" else out.lr) if self.head_lr is None else self.head_lr
        if out.epochs < 1 or out.batch_size < 2 or out.lr <= 0 or out.head_lr <= 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 2, lr > 0; got {out}")
        if not 0 <= out.warmup_frac < 1 or not 0 < out.val_frac < 1:
            raise ValueError("warmup_frac must be in [0, 1) and val_frac in (0, 1)")
        return out


@dataclass
class TrainResult:
    ranker: Ranker
    best: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    n_train: int = 0
    n_val: int = 0


# --------------------------------------------------------------------------- helpers


def split_validation(
    samples: Sequence[Sample], val_frac: float = 0.05, max_val: int = 1000, seed: int = 42
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic ``(train, validation)`` slice of the training samples.

    Fewer than 20 samples: no validation (the last checkpoint is kept).
    """
    n = len(samples)
    if n < 20:
        return list(samples), []
    n_val = min(max_val, max(2, round(n * val_frac)))
    perm = np.random.default_rng(seed + 1).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    return [s for i, s in enumerate(samples) if i not in val_idx], [s for i, s in enumerate(samples) if i in val_idx]


def _linear_schedule(optimizer: torch.optim.Optimizer, total: int, warmup_frac: float) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, math.ceil(total * warmup_frac)) if warmup_frac > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _row_keys(ids: Sequence[Sequence[int]]) -> list[str]:
    return [hashlib.blake2b(np.asarray(row, dtype=np.int32).tobytes(), digest_size=12).hexdigest() for row in ids]


class FeatureCache:
    """Frozen pooled features per (encoder weights, pooling), one row per distinct token-id list.

    Stored as ``$PARS_FAST_HOME/features/<weights>-<pooling>.pt`` = ``{"keys": [...], "feats": Tensor}``,
    so any subset (train, validation, test, a ``max_train`` slice) reuses rows computed before.
    """

    def __init__(self, weights: str, pooling: str, hidden: int) -> None:
        self.weights, self.pooling = weights, pooling
        self.path = home() / "features" / f"{weights}-{pooling}.pt"
        self.hidden = hidden
        self.index: dict[str, int] = {}
        self.feats = torch.empty(0, hidden)
        if self.path.is_file():
            try:
                blob = torch.load(self.path, map_location="cpu", weights_only=True)
                keys, feats = list(blob["keys"]), blob["feats"]
                if feats.shape == (len(keys), hidden):
                    self.index = {k: i for i, k in enumerate(keys)}
                    self.feats = feats
            except Exception as exc:  # a corrupt cache is rebuilt
                log.warning("ignoring unreadable feature cache %s: %s", self.path, exc)

    def get(self, keys: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Rows for ``keys`` (zeros where missing) and the positions of the missing ones."""
        out = torch.zeros(len(keys), self.hidden)
        missing = []
        for pos, key in enumerate(keys):
            row = self.index.get(key)
            if row is None:
                missing.append(pos)
            else:
                out[pos] = self.feats[row]
        return out, missing

    def add(self, keys: Sequence[str], feats: torch.Tensor) -> None:
        rows: list[int] = []
        for i, k in enumerate(keys):
            if k not in self.index:  # also skips repeats inside `keys` (duplicate prompts)
                self.index[k] = len(self.feats) + len(rows)
                rows.append(i)
        if rows:
            self.feats = torch.cat([self.feats, feats[torch.as_tensor(rows)]])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        torch.save({"keys": list(self.index), "feats": self.feats}, tmp)
        tmp.replace(self.path)  # atomic: concurrent readers see the old or the new file


def encode_features(
    ranker: Ranker,
    ids: Sequence[Sequence[int]],
    *,
    progress: bool = True,
    cache: bool = True,
    chunk: int = 256,
    desc: str = "features",
) -> torch.Tensor:
    """Pooled encoder features ``[n, hidden]`` (float32, CPU) of token-id lists.

    With ``cache``, rows are kept in a :class:`FeatureCache` keyed by the encoder
    weights, so frozen features are computed once across runs, losses and
    subsets. Both [CLS] and mean pooling come out of one forward pass and both
    are cached, so comparing poolings costs no second pass.
    """
    from pars_fast.backends import POOLINGS, HFBackend

    backend = ranker.backend
    poolings = POOLINGS if isinstance(backend, HFBackend) else (ranker.config.pooling,)
    keys = _row_keys(ids)
    caches: dict[str, FeatureCache] = {}
    if cache:
        weights = _weights_digest(ranker.encoder)
        caches = {p: FeatureCache(weights, p, ranker.hidden_size) for p in poolings}
        out, todo = caches[ranker.config.pooling].get(keys)
    else:
        out, todo = torch.zeros(len(ids), ranker.hidden_size), list(range(len(ids)))
    if not todo:
        return out
    from tqdm.auto import tqdm

    ranker.encoder.eval()
    # Sort by length so each chunk (and each bucket inside it) has little padding.
    todo.sort(key=lambda i: len(ids[i]))
    computed = {p: torch.empty(len(todo), ranker.hidden_size) for p in poolings}
    total_tokens = sum(len(ids[i]) for i in todo)
    with tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(todo), chunk):
            idx = todo[start : start + chunk]
            batch = [list(ids[i]) for i in idx]
            with torch.inference_mode():
                if isinstance(backend, HFBackend):
                    pooled = backend.pooled_all(batch, poolings)
                else:
                    pooled = {poolings[0]: backend.pooled(batch)}
            for p in poolings:
                computed[p][start : start + len(idx)] = pooled[p].float().cpu()
            bar.update(sum(len(ids[i]) for i in idx))
    out[torch.as_tensor(todo)] = computed[ranker.config.pooling]
    todo_keys = [keys[i] for i in todo]
    for p, c in caches.items():
        # Re-read before writing, so rows another process added meanwhile are kept.
        fresh = FeatureCache(c.weights, p, ranker.hidden_size)
        fresh.add(todo_keys, computed[p])
        fresh.save()
    return out


def _val_metric(scores: np.ndarray, lengths: np.ndarray, delta: float) -> float:
    acc = pairwise_accuracy(scores, lengths, delta)
    return -1.0 if math.isnan(acc) else acc


# --------------------------------------------------------------------------- training


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
) -> TrainResult:
    """Train a ranker on ``samples`` (its validation slice is taken from them).

    Returns the ranker with the best-validation checkpoint loaded, its metadata
    filled in (data, loss, mode, config, validation metrics, wall time).
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
    if val_s and len({s.response_len for s in val_s}) < 2:
        val_s = []

    torch.manual_seed(cfg.seed)
    ranker = Ranker.from_backbone(backbone, ranker_config, backend="hf", device=device, seed=cfg.seed)
    train_ids = ranker.tokenize([s.prompt for s in train_s])
    val_ids = ranker.tokenize([s.prompt for s in val_s])
    lengths = torch.tensor([s.response_len for s in train_s], dtype=torch.float32)
    val_lengths = np.array([s.response_len for s in val_s], dtype=np.float64)
    log_len = torch.log1p(lengths)
    loss_kw = {
        "delta": cfg.delta,
        "margin": cfg.margin,
        "log_mean": float(log_len.mean()),
        "log_std": float(log_len.std().clamp_min(1e-6)),
    }

    timings: dict[str, float] = {}
    if cfg.mode == "full" and cfg.init_head == "probe":
        # LP-FT: fit the head on frozen features (cached, seconds), then fine-tune everything from there.
        epochs, batch, lr = _MODE_DEFAULTS["head"]
        probe_cfg = copy.copy(cfg)
        probe_cfg.mode, probe_cfg.epochs, probe_cfg.batch_size, probe_cfg.lr = "head", epochs, batch, lr
        probe_cfg.max_steps = None
        probe_best, _, probe_t = _train_head(
            ranker, probe_cfg, train_ids, lengths, val_ids, val_lengths, loss_kw,
            progress=progress, feature_cache=feature_cache,
        )
        timings.update({f"probe_{k}": v for k, v in probe_t.items()})
        ranker.metadata["probe"] = {k: v for k, v in probe_best.items() if k != "val"}
    runner = _train_head if cfg.mode == "head" else _train_full
    best, history, run_t = runner(
        ranker, cfg, train_ids, lengths, val_ids, val_lengths, loss_kw, progress=progress, feature_cache=feature_cache
    )
    timings.update(run_t)
    ranker.encoder.eval()
    ranker.head.eval()
    ranker.set_backend("auto")
    wall = time.perf_counter() - t0
    import transformers

    from pars_fast import __version__

    ranker.metadata.update(
        {
            "pars_fast_version": __version__,
            "loss": cfg.loss,
            "mode": cfg.mode,
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
            "timings_s": {**timings, "total": round(wall, 1)},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
    )
    return TrainResult(ranker, best, history, wall, len(train_s), len(val_s))


def _step_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(n)
    # Drop a last batch smaller than 2: it has no pair and no list to rank.
    return [perm[i : i + batch_size] for i in range(0, n, batch_size) if min(batch_size, n - i) >= 2]


def _train_head(
    ranker: Ranker,
    cfg: TrainConfig,
    train_ids: list[list[int]],
    lengths: torch.Tensor,
    val_ids: list[list[int]],
    val_lengths: np.ndarray,
    loss_kw: dict[str, float],
    *,
    progress: bool,
    feature_cache: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    feats = encode_features(ranker, train_ids, progress=progress, cache=feature_cache, desc="encoding train prompts")
    val_feats = (
        encode_features(ranker, val_ids, progress=progress, cache=feature_cache, desc="encoding val prompts")
        if val_ids
        else None
    )
    t_feat = time.perf_counter() - t0
    t1 = time.perf_counter()
    # Standardize features: the frozen pooled outputs have very different scales per dim.
    mu = feats.mean(0)
    sd = feats.std(0).clamp_min(1e-6)
    x = (feats - mu) / sd
    xv = (val_feats - mu) / sd if val_feats is not None else None

    torch.manual_seed(cfg.seed)
    head = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = len(_step_batches(len(x), cfg.batch_size, np.random.default_rng(0)))
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = _linear_schedule(opt, total, cfg.warmup_frac)

    best: dict[str, Any] = {"val_pairwise_accuracy": -math.inf}
    best_state = copy.deepcopy(head.state_dict())
    history: list[dict[str, Any]] = []
    step = 0
    with tqdm(total=total, desc=f"head/{cfg.loss}", unit="step", disable=not progress, file=sys.stderr) as bar:
        for epoch in range(cfg.epochs):
            run_loss, run_n = 0.0, 0
            for idx in _step_batches(len(x), cfg.batch_size, rng):
                if step >= total:
                    break
                t_idx = torch.as_tensor(idx)
                scores = head(x[t_idx]).squeeze(-1)
                loss, used = compute_loss(cfg.loss, scores, lengths[t_idx], generator=gen, **loss_kw)
                opt.zero_grad(set_to_none=True)
                if used:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
                    opt.step()
                sched.step()
                step += 1
                run_loss += float(loss.detach())
                run_n += 1
                bar.update(1)
            entry: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": run_loss / max(1, run_n)}
            if xv is not None:
                with torch.no_grad():
                    val_scores = head(xv).squeeze(-1).numpy()
                entry["val_pairwise_accuracy"] = _val_metric(val_scores, val_lengths, cfg.delta)
            history.append(entry)
            metric = entry.get("val_pairwise_accuracy", 0.0)
            if xv is None or metric > best["val_pairwise_accuracy"]:
                best = dict(entry)
                best_state = copy.deepcopy(head.state_dict())
            bar.set_postfix(
                loss=f"{entry['train_loss']:.4f}",
                val_acc=f"{metric:.4f}",
                best=f"{best.get('val_pairwise_accuracy', 0):.4f}",
            )
            if step >= total:
                break

    head.load_state_dict(best_state)
    # Fold the standardization in: w·(f - mu)/sd + b = (w/sd)·f + (b - (w/sd)·mu).
    with torch.no_grad():
        w = head.weight / sd
        ranker.head.weight.copy_(w)
        ranker.head.bias.copy_(head.bias - (w * mu).sum())
    if val_feats is not None:
        with torch.no_grad():
            val_scores = ranker.head(val_feats.to(ranker.device)).squeeze(-1).cpu().numpy()
        best["val"] = ranking_metrics(val_scores, val_lengths, cfg.delta)
    return best, history, {"features": round(t_feat, 1), "train": round(time.perf_counter() - t1, 1)}


def _train_full(
    ranker: Ranker,
    cfg: TrainConfig,
    train_ids: list[list[int]],
    lengths: torch.Tensor,
    val_ids: list[list[int]],
    val_lengths: np.ndarray,
    loss_kw: dict[str, float],
    *,
    progress: bool,
    feature_cache: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    from tqdm.auto import tqdm

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
    steps_per_epoch = len(_step_batches(len(train_ids), cfg.batch_size, np.random.default_rng(0)))
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    sched = _linear_schedule(opt, total, cfg.warmup_frac)
    eval_every = max(1, math.ceil(min(steps_per_epoch, total) / max(1, cfg.evals_per_epoch)))
    params = [p for g in opt.param_groups for p in g["params"]]

    def evaluate() -> float:
        encoder.eval()
        head.eval()
        scores = ranker.score_token_ids(val_ids)
        encoder.train()
        head.train()
        return _val_metric(scores, val_lengths, cfg.delta)

    best: dict[str, Any] = {"val_pairwise_accuracy": -math.inf}
    best_state: dict[str, dict[str, torch.Tensor]] | None = None
    history: list[dict[str, Any]] = []
    step = 0
    ema: float | None = None
    if cfg.init_head == "probe" and val_ids:
        # The probed start is a candidate too: fine-tuning must beat it to be kept.
        best = {"epoch": 0, "step": 0, "train_loss": math.nan, "val_pairwise_accuracy": evaluate()}
        best_state = {
            "encoder": {k: v.detach().clone() for k, v in encoder.state_dict().items()},
            "head": {k: v.detach().clone() for k, v in head.state_dict().items()},
        }
        history.append(dict(best))
    encoder.train()
    head.train()
    with tqdm(total=total, desc=f"full/{cfg.loss}", unit="step", disable=not progress, file=sys.stderr) as bar:
        for epoch in range(cfg.epochs):
            for idx in _step_batches(len(train_ids), cfg.batch_size, rng):
                if step >= total:
                    break
                t_idx = torch.as_tensor(idx)
                pooled = ranker.backend.pooled([train_ids[i] for i in idx])
                scores = head(pooled).squeeze(-1)
                loss, used = compute_loss(cfg.loss, scores, lengths[t_idx], generator=gen, **loss_kw)
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
                        entry["val_pairwise_accuracy"] = evaluate()
                    history.append(entry)
                    if not val_ids or entry["val_pairwise_accuracy"] > best["val_pairwise_accuracy"]:
                        best = dict(entry)
                        best_state = {
                            "encoder": {k: v.detach().clone() for k, v in encoder.state_dict().items()},
                            "head": {k: v.detach().clone() for k, v in head.state_dict().items()},
                        }
                    log.info("step %d: %s", step, entry)
            if step >= total:
                break
    if best_state is not None:
        encoder.load_state_dict(best_state["encoder"])
        head.load_state_dict(best_state["head"])
    encoder.eval()
    head.eval()
    if val_ids:
        best["val"] = ranking_metrics(ranker.score_token_ids(val_ids), val_lengths, cfg.delta)
    return best, history, {"train": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------- default ranker


def ensure_default_ranker(progress: bool = True) -> Path:
    """Path of the default ranker, training it first if it is missing or unreadable.

    Trains in ``head`` mode (PARS pairwise loss) on a bounded subset
    (``DEFAULT_RANKER_MAX_TRAIN`` prompts) of the ShareGPT *train* split, so the
    ShareGPT test split stays unseen for benchmarks. A few minutes on 2 cores.
    """
    path = default_ranker_dir()
    try:
        Ranker.load(path, backend="hf", device="cpu")
        return path
    except RankerLoadError:
        pass
    if progress:
        print(f"pars-fast: no default ranker at {path}; training one (head mode, a few minutes)...", file=sys.stderr)
    from pars_fast.data import sharegpt_split

    train_samples, test_samples = sharegpt_split()
    result = train(
        train_samples,
        TrainConfig(loss="pairwise", mode="head", max_train=DEFAULT_RANKER_MAX_TRAIN),
        progress=progress,
        data_name="sharegpt-train",
    )
    _attach_test_metrics(result.ranker, test_samples, "sharegpt-test")
    result.ranker.save(path)
    return path


def _attach_test_metrics(
    ranker: Ranker, test: Sequence[Sample], name: str, delta: float = 0.2, feature_cache: bool = True
) -> dict[str, Any]:
    """Score the test split, store the metrics in ``ranker.metadata["metrics"]["test"]``."""
    if not test:
        return {}
    t0 = time.perf_counter()
    prompts = [s.prompt for s in test]
    if ranker.metadata.get("mode") == "head" and feature_cache:
        # A head-mode encoder is the untouched backbone: reuse its cached test features.
        feats = encode_features(ranker, ranker.tokenize(prompts), progress=False, desc="encoding test prompts")
        with torch.inference_mode():
            scores = ranker.head(feats.to(ranker.device)).squeeze(-1).float().cpu().numpy()
    else:
        scores = ranker.score(prompts)
    metrics = ranking_metrics(scores, [s.response_len for s in test], delta)
    metrics["data"] = name
    metrics["score_s"] = round(time.perf_counter() - t0, 2)
    ranker.metadata.setdefault("metrics", {})["test"] = metrics
    return metrics


# --------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    r = RankerConfig()
    parser.add_argument(
        "--data",
        default="sharegpt",
        help="sharegpt (first turns; trains on its 90%% split), sharegpt-all (all turns), humaneval, "
        "or FILE.jsonl (split 90/10 here)",
    )
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer counting response lengths (serving model's folder; default: the ranker's)"
    )
    parser.add_argument("--out", default=None, help="output folder (default: $PARS_FAST_HOME/rankers/default)")
    parser.add_argument("--loss", choices=LOSSES, default=d.loss)
    parser.add_argument(
        "--mode", choices=MODES, default=d.mode,
        help="full: fine-tune the encoder; head: frozen encoder, train the linear head on cached features",
    )
    parser.add_argument("--backbone", default=None, help="local HF BERT-family folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--pooling", choices=("cls", "mean"), default=r.pooling)
    parser.add_argument("--max-prompt-tokens", type=int, default=r.max_prompt_tokens)
    parser.add_argument("--truncation", choices=("head", "head_tail"), default=r.truncation)
    parser.add_argument("--head-tokens", type=int, default=None, help="head_tail: tokens kept from the start (default: half)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 30 (head), 1 (full)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 (head), 32 (full)")
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (head), 2e-5 (full, encoder)")
    parser.add_argument("--head-lr", type=float, default=None, help=f"full mode: lr of the new head (default {_FULL_HEAD_LR})")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--delta", type=float, default=d.delta, help="pair filter: keep |La-Lb|/max(La,Lb) >= delta")
    parser.add_argument("--margin", type=float, default=d.margin)
    parser.add_argument(
        "--init-head", choices=("random", "probe"), default=d.init_head,
        help="full mode: start from a random head, or from one fitted on frozen features first (LP-FT)",
    )
    parser.add_argument("--max-train", type=int, default=None, help="train on a seeded subset of N samples")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--val-frac", type=float, default=d.val_frac)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-feature-cache", action="store_true", help="head mode: recompute frozen features")
    parser.add_argument("--json", action="store_true", help="print the result (metrics, timings) as JSON")


def run(args: argparse.Namespace) -> int:
    from pars_fast.data import DatasetError, load_dataset, sharegpt_split, train_test_split

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    tokenizer = args.tokenizer
    try:
        if args.data in ("sharegpt", "sharegpt-all"):
            train_samples, test_samples = sharegpt_split(all_turns=args.data == "sharegpt-all", tokenizer=tokenizer)
            data_name, test_name = f"{args.data}-train", f"{args.data}-test"
        else:
            all_samples = load_dataset(args.data, tokenizer=tokenizer)
            check_rankable(all_samples, args.delta, what=args.data)
            train_samples, test_samples = train_test_split(all_samples)
            data_name, test_name = f"{args.data} (90% split)", f"{args.data} (10% split)"
        cfg = TrainConfig(
            loss=args.loss,
            mode=args.mode,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            head_lr=args.head_lr,
            weight_decay=args.weight_decay,
            delta=args.delta,
            margin=args.margin,
            max_train=args.max_train,
            max_steps=args.max_steps,
            init_head=args.init_head,
            val_frac=args.val_frac,
            seed=args.seed,
        )
        rcfg = RankerConfig(
            max_prompt_tokens=args.max_prompt_tokens,
            pooling=args.pooling,
            truncation=args.truncation,
            head_tokens=args.head_tokens,
        )
        result = train(
            train_samples,
            cfg,
            rcfg,
            backbone=args.backbone,
            device=args.device,
            progress=not args.no_progress,
            feature_cache=not args.no_feature_cache,
            data_name=data_name,
        )
    except (DatasetError, ValueError, FileNotFoundError, RankerLoadError) as exc:
        print(f"pars-fast train: error: {exc}", file=sys.stderr)
        return 2
    test_metrics = _attach_test_metrics(result.ranker, test_samples, test_name, args.delta, not args.no_feature_cache)
    out = Path(args.out) if args.out else default_ranker_dir()
    result.ranker.save(out)
    summary = {
        "out": str(out),
        "loss": args.loss,
        "mode": args.mode,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "best": {k: v for k, v in result.best.items() if k != "val"},
        "val": result.best.get("val", {}),
        "test": test_metrics,
        "timings_s": result.ranker.metadata.get("timings_s", {}),
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=float))
    else:
        v, t = summary["val"], test_metrics
        print(f"saved {args.mode}/{args.loss} ranker to {out} ({summary['timings_s'].get('total', 0):.0f} s)")
        if v:
            print(
                f"  validation: kendall_tau={v['kendall_tau']:.4f} "
                f"pairwise_accuracy={v['pairwise_accuracy']:.4f} (n={v['n']})"
            )
        if t:
            print(
                f"  test [{test_name}]: kendall_tau={t['kendall_tau']:.4f} "
                f"pairwise_accuracy={t['pairwise_accuracy']:.4f} spearman={t['spearman']:.4f} (n={t['n']})"
            )
    return 0


__all__ = [
    "DEFAULT_RANKER_MAX_TRAIN",
    "TrainConfig",
    "TrainResult",
    "configure_parser",
    "encode_features",
    "ensure_default_ranker",
    "run",
    "split_validation",
    "train",
]
