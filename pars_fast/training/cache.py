"""Frozen-encoder features, computed once and cached on disk.

``encode_features`` pools the encoder output of token-id lists; with the cache,
rows live in ``$PARS_FAST_HOME/features/<weights>-<pooling>.pt`` keyed by the
encoder weights and the exact token ids, so every head run, loss, subset and
evaluation set reuses rows computed before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch

from pars_fast.paths import home
from pars_fast.ranker import Ranker

log = logging.getLogger(__name__)


def weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def row_keys(ids: Sequence[Sequence[int]]) -> list[str]:
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
    keys = row_keys(ids)
    caches: dict[str, FeatureCache] = {}
    if cache:
        weights = weights_digest(ranker.encoder)
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


__all__ = ["FeatureCache", "encode_features", "row_keys", "weights_digest"]
