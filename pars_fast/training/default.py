"""The default ranker: trained on first use by ``ensure_default_ranker()``.

``Ranker.load()`` with no path, ``pars-fast demo``, the end-to-end benchmark and
the scheduler's ``"ranker": "default"`` use it. It is the ``default`` recipe
(:mod:`pars_fast.training.recipes`) on the ShareGPT first-turn *train* split, so
the test split, the later turns and HumanEval stay unseen for evaluation.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pars_fast.paths import default_ranker_dir
from pars_fast.ranker import Ranker, RankerConfig, RankerLoadError
from pars_fast.training.config import TrainConfig
from pars_fast.training.recipes import RANKER_KEYS, recipe
from pars_fast.training.trainer import attach_eval_metrics, train

DEFAULT_RECIPE = "default"
# Training prompts the default recipe uses (None: all 9,977 of the train split).
# The frozen-feature pass is most of first use (~153 s of ~3 min on 2 idle cores,
# docs/RANKING.md); 6,000 prompts would save ~60 s and cost 0.03 test tau.
DEFAULT_RANKER_MAX_TRAIN: int | None = None


def default_configs() -> tuple[TrainConfig, RankerConfig]:
    settings = recipe(DEFAULT_RECIPE)
    ranker_kw = {k: settings.pop(k) for k in RANKER_KEYS if k in settings}
    settings.setdefault("max_train", DEFAULT_RANKER_MAX_TRAIN)
    return TrainConfig(**settings), RankerConfig(**ranker_kw)


def ensure_default_ranker(progress: bool = True) -> Path:
    """Path of the default ranker, training it first if it is missing or unreadable."""
    path = default_ranker_dir()
    try:
        Ranker.load(path, backend="hf", device="cpu")
        return path
    except RankerLoadError:
        pass
    if progress:
        print(f"pars-fast: no default ranker at {path}; training one (a few minutes on a CPU)...", file=sys.stderr)
    from pars_fast.data import sharegpt_split

    train_samples, test_samples = sharegpt_split()
    cfg, rcfg = default_configs()
    result = train(train_samples, cfg, rcfg, progress=progress, data_name="sharegpt-train", recipe=DEFAULT_RECIPE)
    attach_eval_metrics(result.ranker, {"test": test_samples})
    result.ranker.save(path)
    return path


__all__ = ["DEFAULT_RANKER_MAX_TRAIN", "DEFAULT_RECIPE", "default_configs", "ensure_default_ranker"]
