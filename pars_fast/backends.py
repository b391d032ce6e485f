"""Encoder backends: how a ranker turns token-id batches into pooled features and scores.

A backend wraps the ranker's encoder (a transformers BERT-family model) and its
``Linear(hidden, 1)`` head. It is built by::

    make_backend(name, encoder, head, pooling, device)

and exposes

* ``pooled(batch: list[list[int]]) -> Tensor[n, hidden]`` (float32), and
* ``score(batch: list[list[int]]) -> Tensor[n]`` (float32, higher = longer response).

Each inner list is one prompt's full model input (``[CLS] ... [SEP]``, already
truncated), as produced by ``Ranker.tokenize``. Outputs are in input order.

Backends register by name. ``"hf"`` (here) runs the HF model on length-sorted
buckets, so padding is bounded by the length spread inside a bucket. Faster
backends (packed torch on CPU, fused Triton kernels on GPU) are registered in
``_REGISTRY`` as lazily imported ``"module:factory"`` strings, so importing this
module never imports Triton. ``"auto"`` picks ``triton`` on CUDA and ``torch``
on CPU when they are registered and importable, else ``hf``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from importlib import import_module
from typing import Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")


@runtime_checkable
class EncoderBackend(Protocol):
    name: str

    def pooled(self, batch: list[list[int]]) -> torch.Tensor: ...

    def score(self, batch: list[list[int]]) -> torch.Tensor: ...


# factory(encoder, head, pooling, device) -> EncoderBackend
BackendFactory = Callable[[torch.nn.Module, torch.nn.Linear, str, torch.device], EncoderBackend]

# name -> factory, or "module:attribute" imported on first use (keeps Triton out of imports).
_REGISTRY: dict[str, BackendFactory | str] = {
    "hf": "pars_fast.backends:HFBackend",
    "torch": "pars_fast.encoder:TorchPackedEncoder",  # packed CPU path
    "torch-int8": "pars_fast.encoder:int8_backend",  # packed CPU path, int8 dynamic-quantized GEMMs
    "triton": "pars_fast.kernels.encoder:TritonBertEncoder",  # fused kernels (CUDA, or TRITON_INTERPRET=1)
}

# "auto" preference per device type, best first; "hf" is the always-present fallback.
_AUTO_ORDER = {"cuda": ("triton", "torch", "hf"), "cpu": ("torch", "hf")}


def register_backend(name: str, factory: BackendFactory | str) -> None:
    """Register (or replace) a backend factory under ``name``."""
    if name == "auto":
        raise ValueError("'auto' is reserved for backend selection")
    _REGISTRY[name] = factory


def registered_backends() -> list[str]:
    return sorted(_REGISTRY)


def _factory(name: str) -> BackendFactory:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown ranker backend {name!r}; registered: {', '.join(registered_backends())} (or 'auto')")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(import_module(module), attr)
        _REGISTRY[name] = entry
    return entry


def _importable(name: str) -> bool:
    try:
        _factory(name)
        return True
    except Exception as exc:  # a missing optional dependency (e.g. Triton) just disables the backend
        log.debug("ranker backend %r unavailable: %s", name, exc)
        return False


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """The concrete backend ``name`` stands for on ``device`` (resolves ``"auto"``)."""
    if name != "auto":
        _factory(name)  # raises a clear error for unknown names
        return name
    order = _AUTO_ORDER.get(torch.device(device).type, ("hf",))
    for candidate in order:
        if candidate in _REGISTRY and _importable(candidate):
            return candidate
    return "hf"


def make_backend(
    name: str,
    encoder: torch.nn.Module,
    head: torch.nn.Linear,
    pooling: str,
    device: torch.device | str,
) -> EncoderBackend:
    """Build backend ``name`` (or ``"auto"``) around ``encoder`` and ``head`` on ``device``."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    device = torch.device(device)
    resolved = resolve_backend_name(name, device)
    return _factory(resolved)(encoder, head, pooling, device)


# --------------------------------------------------------------------------- shared helpers


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``hidden [b, t, h]`` over valid tokens (``mask [b, t]``, 1 = token): [CLS] or masked mean.

    The mean includes [CLS] and [SEP], as sentence-transformers does for MiniLM.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def length_buckets(
    lengths: Sequence[int], max_batch_size: int, max_batch_tokens: int, min_fill: float = 0.5
) -> list[list[int]]:
    """Group indices into buckets of similar length (longest first).

    Each bucket holds at most ``max_batch_size`` rows and at most
    ``max_batch_tokens`` padded tokens (rows x longest row), and no row shorter
    than ``min_fill`` x the bucket's longest row, so every row is at least half
    real tokens (default) and memory stays bounded.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    buckets: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i in order:
        if current and (
            len(current) >= max_batch_size
            or (len(current) + 1) * width > max_batch_tokens
            or lengths[i] < min_fill * width
        ):
            buckets.append(current)
            current = []
        if not current:
            width = max(1, lengths[i])  # the first row of a bucket is its longest
        current.append(i)
    if current:
        buckets.append(current)
    return buckets


def pad_batch(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token-id lists to the longest: ``(input_ids, attention_mask)``, both int64 on the CPU."""
    width = max((len(ids) for ids in batch), default=0)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def check_batch(batch: Sequence[Sequence[int]], vocab_size: int, max_len: int) -> None:
    """Raise ``ValueError`` on token-id batches the encoder cannot take."""
    for i, ids in enumerate(batch):
        if len(ids) == 0:
            raise ValueError(f"prompt {i}: empty token-id list (expected at least [CLS] [SEP])")
        if len(ids) > max_len:
            raise ValueError(f"prompt {i}: {len(ids)} tokens exceed the encoder's {max_len} positions")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"prompt {i}: token id {lo if lo < 0 else hi} outside the vocabulary [0, {vocab_size})")


# --------------------------------------------------------------------------- "hf" backend


class HFBackend:
    """Reference backend: the transformers model's own forward on length-sorted buckets.

    Works with grad enabled too (full fine-tuning uses it); callers choose
    ``torch.inference_mode()`` and ``encoder.eval()`` for scoring.
    """

    name = "hf"

    def __init__(
        self,
        encoder: torch.nn.Module,
        head: torch.nn.Linear,
        pooling: str,
        device: torch.device | str,
        max_batch_size: int = 64,
        max_batch_tokens: int = 8192,
    ) -> None:
        self.encoder = encoder
        self.head = head
        self.pooling = pooling
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.pad_id = int(getattr(encoder.config, "pad_token_id", None) or 0)

    def pooled(self, batch: list[list[int]]) -> torch.Tensor:
        return self.pooled_all(batch, (self.pooling,))[self.pooling]

    def pooled_all(self, batch: list[list[int]], poolings: Sequence[str] = POOLINGS) -> dict[str, torch.Tensor]:
        """Several poolings of one forward pass (training caches both [CLS] and mean features)."""
        hidden_size = int(self.encoder.config.hidden_size)
        if len(batch) == 0:
            return {p: torch.empty(0, hidden_size, dtype=torch.float32, device=self.device) for p in poolings}
        lengths = [len(ids) for ids in batch]
        parts: dict[str, list[torch.Tensor]] = {p: [] for p in poolings}
        order: list[int] = []
        for bucket in length_buckets(lengths, self.max_batch_size, self.max_batch_tokens):
            ids, mask = pad_batch([batch[i] for i in bucket], self.pad_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            for p in poolings:
                parts[p].append(pool(hidden, mask, p).float())
            order.extend(bucket)
        # Undo the length sort: row k of the concatenation belongs to prompt order[k].
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.as_tensor(order)] = torch.arange(len(order))
        inverse = inverse.to(self.device)
        return {p: torch.cat(chunks)[inverse] for p, chunks in parts.items()}

    def score(self, batch: list[list[int]]) -> torch.Tensor:
        return self.head(self.pooled(batch)).squeeze(-1).float()


__all__ = [
    "POOLINGS",
    "EncoderBackend",
    "HFBackend",
    "check_batch",
    "length_buckets",
    "make_backend",
    "pad_batch",
    "pool",
    "register_backend",
    "registered_backends",
    "resolve_backend_name",
]
