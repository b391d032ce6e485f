"""Training rankers: ``pars-fast train`` and the default ranker.

One job per module:

* :mod:`~pars_fast.training.config`: ``TrainConfig``, ``TrainResult``, the validation slice;
* :mod:`~pars_fast.training.cache`: frozen-encoder features, computed once and cached on disk;
* :mod:`~pars_fast.training.head`: score heads fitted on fixed embeddings (``head`` mode, LP-FT probe);
* :mod:`~pars_fast.training.full`: the full fine-tune (``full`` mode, PARS's recipe);
* :mod:`~pars_fast.training.trainer`: ``train()``, one run from samples to a ranker;
* :mod:`~pars_fast.training.recipes`: named recipes (``--recipe fast|default|paper|best``);
* :mod:`~pars_fast.training.default`: ``ensure_default_ranker()``, trained on first use;
* :mod:`~pars_fast.training.cli`: ``pars-fast train``.

Recipe (PARS): AdamW, weight decay 0.01, linear schedule with 10% warmup,
gradient clipping at 1.0, fixed seed, and the checkpoint with the best
validation pairwise accuracy is kept. Validation is a deterministic slice of the
*training* samples; the test split is never looked at while training.
"""

from pars_fast.training.cache import FeatureCache, encode_features
from pars_fast.training.cli import configure_parser, run
from pars_fast.training.config import MODES, TrainConfig, TrainResult, split_validation
from pars_fast.training.default import DEFAULT_RANKER_MAX_TRAIN, DEFAULT_RECIPE, ensure_default_ranker
from pars_fast.training.recipes import RECIPES
from pars_fast.training.trainer import attach_eval_metrics, train

__all__ = [
    "DEFAULT_RANKER_MAX_TRAIN",
    "DEFAULT_RECIPE",
    "MODES",
    "RECIPES",
    "FeatureCache",
    "TrainConfig",
    "TrainResult",
    "attach_eval_metrics",
    "configure_parser",
    "encode_features",
    "ensure_default_ranker",
    "run",
    "split_validation",
    "train",
]
