"""Named training recipes: ``pars-fast train --recipe NAME``.

A recipe is a set of :class:`TrainConfig` and :class:`RankerConfig` values;
flags given on the command line override it. Measured results of each are in
docs/RANKING.md.

* ``fast``: PARS loss, frozen MiniLM, linear head, 6,000 training prompts
  (the default ranker before issue 10; about 2 minutes on 2 idle cores).
* ``default``: what ``ensure_default_ranker()`` trains on first use: frozen
  MiniLM, a linear head on [embedding, cheap prompt features, kNN-memory
  lookups]; the best recipe that trains in about 3 minutes on 2 idle cores.
* ``paper``: PARS's recipe: full fine-tune, 3 epochs, batch 32, lr 2e-5,
  δ = 0.2, margin 1, from a probed linear head (LP-FT). 15-25 min on 2 idle
  cores, about a minute on a GPU.
* ``best``: ``paper``, then a kNN memory of the training prompts' fine-tuned
  embeddings blended into the fine-tuned head's score (lookup and blend
  weight picked on the validation slice).
* ``knn-on``: that last step alone, on a ranker fine-tuned before
  (``--backbone DIR``): ``paper`` then ``knn-on`` is ``best`` in two commands.
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "fast": {"mode": "head", "head": "linear", "max_train": 6_000},
    "default": {"mode": "head", "head": "linear", "features": True, "knn": "inputs"},
    "paper": {
        "mode": "full",
        "epochs": 3,
        "batch_size": 32,
        "lr": 2e-5,
        "delta": 0.2,
        "margin": 1.0,
        "init_head": "probe",
    },
    "best": {
        "mode": "full",
        "epochs": 3,
        "batch_size": 32,
        "lr": 2e-5,
        "delta": 0.2,
        "margin": 1.0,
        "init_head": "probe",
        "head": "linear",
        "knn": "blend",
    },
    # The kNN part of "best" alone, on a ranker fine-tuned before:
    #   pars-fast train --recipe knn-on --backbone FINE_TUNED_RANKER_DIR --out DIR
    "knn-on": {"mode": "head", "knn": "blend"},
}

# Keys that belong to RankerConfig rather than TrainConfig.
RANKER_KEYS = ("max_prompt_tokens", "pooling", "truncation", "head_tokens")


def recipe(name: str) -> dict[str, Any]:
    """The settings of recipe ``name`` (a copy)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name])


__all__ = ["RANKER_KEYS", "RECIPES", "recipe"]
