"""Hyper-parameters of a training run, its result, and the validation slice."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pars_fast.data import Sample
from pars_fast.heads import HEAD_KINDS
from pars_fast.losses import LOSSES
from pars_fast.ranker import Ranker

MODES = ("head", "full")
DELTA_UNITS = ("tokens", "chars")
KNN_MODES = ("off", "blend", "inputs")
# Defaults per mode: (epochs, batch size, lr). Head mode is cheap per epoch, so it
# runs many; PARS's lr 2e-5 is for the encoder in full mode.
MODE_DEFAULTS = {"head": (30, 128, 1e-3), "full": (1, 32, 2e-5)}
FULL_HEAD_LR = 1e-3


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
    delta_unit: str = "tokens"  # "chars": PARS's official code filters (and orders) pairs by response characters
    margin: float = 1.0
    val_frac: float = 0.05
    max_val: int = 1000
    max_train: int | None = None  # train on the first N (after the seeded shuffle) only
    max_steps: int | None = None
    evals_per_epoch: int = 4  # full mode; head mode evaluates every epoch
    init_head: str = "random"  # full mode: "random", or "probe" = train the head on frozen features first (LP-FT)
    # The score head shipped (pars_fast.heads): fitted on the final encoder's embeddings.
    head: str = "linear"  # "linear" or "mlp"
    head_units: int = 256
    head_dropout: float = 0.1  # mlp: input dropout while fitting
    features: bool = False  # fuse cheap prompt features (pars_fast.features)
    # kNN memory of the training prompts: "off", "blend" (added to the score, weight tuned on
    # validation) or "inputs" (its lookups are inputs of the head, leave-one-out while fitting).
    knn: str = "off"
    knn_k: int = 200  # blend: neighbours and softmax temperature (best on validation, docs/RANKING.md)
    knn_temperature: float = 0.1
    seed: int = 42

    def resolved(self) -> TrainConfig:
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.head not in HEAD_KINDS:
            raise ValueError(f"head must be one of {HEAD_KINDS}, got {self.head!r}")
        if self.knn not in KNN_MODES:
            raise ValueError(f"knn must be one of {KNN_MODES}, got {self.knn!r}")
        if self.delta_unit not in DELTA_UNITS:
            raise ValueError(f"delta_unit must be one of {DELTA_UNITS}, got {self.delta_unit!r}")
        epochs, batch, lr = MODE_DEFAULTS[self.mode]
        out = copy.copy(self)
        out.epochs = epochs if self.epochs is None else self.epochs
        out.batch_size = batch if self.batch_size is None else self.batch_size
        out.lr = lr if self.lr is None else self.lr
        if self.init_head not in ("random", "probe"):
            raise ValueError(f"init_head must be 'random' or 'probe', got {self.init_head!r}")
        # A probed head is already trained: it moves at the encoder's lr; a random one needs a larger lr.
        full_head_lr = out.lr if self.init_head == "probe" else FULL_HEAD_LR
        out.head_lr = (full_head_lr if self.mode == "full" else out.lr) if self.head_lr is None else self.head_lr
        if out.epochs < 1 or out.batch_size < 2 or out.lr <= 0 or out.head_lr <= 0:
            raise ValueError(f"need epochs >= 1, batch_size >= 2, lr > 0; got {out}")
        if not 0 <= out.warmup_frac < 1 or not 0 < out.val_frac < 1:
            raise ValueError("warmup_frac must be in [0, 1) and val_frac in (0, 1)")
        return out

    @property
    def plain_head(self) -> bool:
        return self.head == "linear" and not self.features and self.knn == "off"


@dataclass
class TrainResult:
    ranker: Ranker
    best: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    n_train: int = 0
    n_val: int = 0


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


def step_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of shuffled index batches; a last batch smaller than 2 is dropped (no pair, no list)."""
    perm = rng.permutation(n)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size) if min(batch_size, n - i) >= 2]


def loss_lengths(samples: Sequence[Sample], unit: str) -> np.ndarray:
    """The lengths the loss orders and δ-filters by: response tokens, or characters (PARS's code).

    A censored sample's length is negated: "at least L" (``pars_fast.losses``).
    """
    sign = np.array([-1.0 if s.censored else 1.0 for s in samples], dtype=np.float32)
    if unit == "tokens":
        return sign * np.array([s.response_len for s in samples], dtype=np.float32)
    missing = sum(s.response_chars is None for s in samples)
    if missing:
        raise ValueError(f"delta_unit='chars' needs response characters; {missing} samples lack them")
    return sign * np.array([s.response_chars for s in samples], dtype=np.float32)


__all__ = [
    "DELTA_UNITS",
    "KNN_MODES",
    "MODES",
    "MODE_DEFAULTS",
    "TrainConfig",
    "TrainResult",
    "loss_lengths",
    "split_validation",
    "step_batches",
]
