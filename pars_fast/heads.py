"""Score heads on top of the encoder's pooled embedding.

A ranker's score is computed from the pooled embedding ``e [n, hidden]`` that the
backend returns, in up to three parts::

    score = net([ (e - mu_e) / sd_e , (f - mu_f) / sd_f , (m - mu_m) / sd_m ])  +  knn_weight * (knn(e) - mu_v) / sd_v
            \\____ base: "linear" or "mlp" over the embedding, cheap prompt features f and kNN inputs m (optional) ____/

* ``net``: ``Linear(d, 1)`` (``kind="linear"``, PARS's head) or
  ``Linear(d, units) -> GELU -> Linear(units, 1)`` (``kind="mlp"``).
* ``f``: :func:`pars_fast.features.cheap_features` of the prompt text, when
  ``features=True`` (fusion with prompt length and lexical cues).
* ``knn``: a retrieval memory (:class:`KnnMemory`) of the training prompts'
  L2-normalised embeddings and their log response lengths: the
  softmax-weighted mean log length of the ``k`` most cosine-similar training
  prompts. Either blended in after the net is trained (weight tuned on the
  validation slice), or, with ``knn_inputs``, fed to the net as inputs
  (:data:`KNN_INPUTS`: the neighbour mean at several ``k`` and how similar the
  neighbours are); the net then learns how far to trust the memory, from
  leave-one-out lookups of the training prompts.

The standardization statistics are buffers, so a head is self-contained and is
saved as one safetensors file (plus ``memory.safetensors`` for the kNN part).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

HEAD_KINDS = ("linear", "mlp")


@dataclass
class KnnSpec:
    """The kNN memory's lookup: ``k`` neighbours, softmax over cosine similarity / ``temperature``."""

    k: int = 50
    temperature: float = 0.05
    weight: float = 1.0  # blend weight of the standardized kNN score (tuned on validation)

    def validate(self) -> KnnSpec:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"knn k must be an int >= 1, got {self.k!r}")
        if not self.temperature > 0:
            raise ValueError(f"knn temperature must be > 0, got {self.temperature!r}")
        return self


@dataclass
class HeadSpec:
    """What a head computes (stored in ``ranker.json`` under ``"head"``)."""

    kind: str = "linear"
    units: int = 256  # mlp only: hidden units
    features: bool = False  # fuse cheap prompt features
    knn: KnnSpec | None = None
    feature_names: list[str] = field(default_factory=list)  # set when features=True
    knn_inputs: bool = False  # feed KNN_INPUTS of the memory to the net (needs knn)

    def validate(self) -> HeadSpec:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.kind == "mlp" and (not isinstance(self.units, int) or self.units < 1):
            raise ValueError(f"mlp units must be an int >= 1, got {self.units!r}")
        if self.knn is not None:
            self.knn.validate()
        if self.knn_inputs and self.knn is None:
            raise ValueError("knn_inputs needs a kNN memory (knn)")
        return self

    @property
    def is_plain_linear(self) -> bool:
        """A bare ``Linear(hidden, 1)`` on the pooled embedding: what every backend can score itself."""
        return self.kind == "linear" and not self.features and self.knn is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadSpec:
        d = dict(d)
        known = {"kind", "units", "features", "knn", "feature_names", "knn_inputs"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown head keys: {sorted(unknown)}")
        knn = d.pop("knn", None)
        return cls(**d, knn=KnnSpec(**knn) if knn else None).validate()


# The kNN inputs of a knn_inputs head: the neighbour mean log length at several
# (k, temperature), the top-1 and mean top-10 cosine similarity (is there a
# near-duplicate?), and the top-1 neighbour's own log length.
KNN_INPUT_LOOKUPS = ((10, 0.05), (50, 0.05), (200, 0.1), (500, 0.1))
KNN_INPUTS = (*(f"knn_k{k}" for k, _ in KNN_INPUT_LOOKUPS), "top1_sim", "top10_mean_sim", "top1_value")


class KnnMemory(torch.nn.Module):
    """Retrieval over training prompts: ``keys [m, hidden]`` (unit rows, fp16) and ``values [m]`` (log1p length).

    ``lookup`` is one matmul against the memory plus a top-k: about 4 MFLOP per
    prompt for 10k rows of 384 dims, well under a millisecond on a CPU.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spec: KnnSpec) -> None:
        super().__init__()
        if keys.ndim != 2 or values.shape != (keys.shape[0],):
            raise ValueError(f"memory keys [m, d] and values [m] expected, got {tuple(keys.shape)}, {tuple(values.shape)}")
        self.spec = spec.validate()
        self.register_buffer("keys", torch.nn.functional.normalize(keys.float(), dim=1).half())
        self.register_buffer("values", values.float())

    @property
    def rows(self) -> int:
        return int(self.keys.shape[0])

    def _float_keys(self) -> torch.Tensor:
        # Stored fp16 (half the folder size); looked up in fp32, converted once, not per call.
        cached = getattr(self, "_keys32", None)
        if cached is None or cached.device != self.keys.device or cached.shape != self.keys.shape:
            cached = self.keys.float()
            self._keys32 = cached
        return cached

    def lookup(self, emb: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax-weighted mean value of the ``k`` nearest rows of each embedding.

        ``exclude[i]`` (optional) is a memory row that query ``i`` may not use:
        leave-one-out scores for the memory's own training prompts.
        """
        q = torch.nn.functional.normalize(emb.float(), dim=1)
        sims = q @ self._float_keys().T
        if exclude is not None:
            sims[torch.arange(len(q)), exclude] = -math.inf
        k = min(self.spec.k, self.rows - (1 if exclude is not None else 0))
        top, idx = sims.topk(max(1, k), dim=1)
        w = torch.softmax(top / self.spec.temperature, dim=1)
        return (w * self.values[idx]).sum(1)

    def inputs(self, emb: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """The :data:`KNN_INPUTS` columns ``[n, 7]`` of each embedding (one matmul, one top-k)."""
        q = torch.nn.functional.normalize(emb.float(), dim=1)
        sims = q @ self._float_keys().T
        if exclude is not None:
            sims[torch.arange(len(q)), exclude] = -math.inf
        avail = self.rows - (1 if exclude is not None else 0)
        top, idx = sims.topk(max(1, min(max(k for k, _ in KNN_INPUT_LOOKUPS), avail)), dim=1)
        vals = self.values[idx]
        cols = []
        for k, temp in KNN_INPUT_LOOKUPS:
            w = torch.softmax(top[:, :k] / temp, dim=1)
            cols.append((w * vals[:, :k]).sum(1))
        cols += [top[:, 0], top[:, :10].mean(1), vals[:, 0]]
        return torch.stack(cols, 1)


class ScoreHead(torch.nn.Module):
    """The score head of a ranker (see the module doc): base net, optional features, optional kNN blend."""

    def __init__(self, hidden: int, spec: HeadSpec | None = None, memory: KnnMemory | None = None) -> None:
        super().__init__()
        self.spec = (spec or HeadSpec()).validate()
        self.hidden = hidden
        self.n_features = len(self.spec.feature_names) if self.spec.features else 0
        if self.spec.features and not self.n_features:
            raise ValueError("a head with features=True needs feature_names")
        self.n_knn = len(KNN_INPUTS) if self.spec.knn_inputs else 0
        d = hidden + self.n_features + self.n_knn
        self.register_buffer("e_mean", torch.zeros(hidden))
        self.register_buffer("e_std", torch.ones(hidden))
        self.register_buffer("f_mean", torch.zeros(self.n_features))
        self.register_buffer("f_std", torch.ones(self.n_features))
        self.register_buffer("m_mean", torch.zeros(self.n_knn))
        self.register_buffer("m_std", torch.ones(self.n_knn))
        self.register_buffer("v_mean", torch.zeros(()))
        self.register_buffer("v_std", torch.ones(()))
        if self.spec.kind == "linear":
            self.net: torch.nn.Module = torch.nn.Linear(d, 1)
        else:
            self.net = torch.nn.Sequential(
                torch.nn.Linear(d, self.spec.units), torch.nn.GELU(), torch.nn.Linear(self.spec.units, 1)
            )
        if (self.spec.knn is None) != (memory is None):
            raise ValueError("a kNN head needs a memory, and a memory needs a head spec with knn")
        self.memory = memory

    # ------------------------------------------------------------------ parts

    def inputs(
        self, emb: torch.Tensor, feats: torch.Tensor | None = None, exclude: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The net's input ``[n, d]``; ``exclude``: leave-one-out memory rows for the kNN inputs."""
        x = (emb.float() - self.e_mean) / self.e_std
        if self.n_features:
            if feats is None:
                raise ValueError("this head fuses cheap prompt features: pass feats")
            x = torch.cat([x, (feats.float().to(x.device) - self.f_mean) / self.f_std], dim=1)
        if self.n_knn:
            if self.memory is None:
                raise ValueError("this head reads kNN inputs but has no memory")
            x = torch.cat([x, (self.memory.inputs(emb, exclude) - self.m_mean) / self.m_std], dim=1)
        return x

    def base(self, emb: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(self.inputs(emb, feats)).squeeze(-1)

    def knn_z(self, emb: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        assert self.memory is not None
        return (self.memory.lookup(emb, exclude) - self.v_mean) / self.v_std

    def forward(self, emb: torch.Tensor, feats: torch.Tensor | None = None) -> torch.Tensor:
        score = self.base(emb, feats)
        if self.memory is not None and self.spec.knn.weight != 0:
            score = score + self.spec.knn.weight * self.knn_z(emb)
        return score

    # ------------------------------------------------------------------ (de)serialisation

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``(head tensors, memory tensors or None)`` for safetensors files."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("memory.")}
        state = {k: v.float() for k, v in state.items()}
        mem = None
        if self.memory is not None:
            mem = {"keys": self.memory.keys.detach().cpu().contiguous(), "values": self.memory.values.detach().cpu().contiguous()}
        return state, mem

    @classmethod
    def from_tensors(
        cls, hidden: int, spec: HeadSpec, state: dict[str, torch.Tensor], memory: dict[str, torch.Tensor] | None
    ) -> ScoreHead:
        mem = None
        if spec.knn is not None:
            if memory is None:
                raise ValueError("the head uses a kNN memory, but memory.safetensors is missing")
            mem = KnnMemory(memory["keys"], memory["values"], spec.knn)
        head = cls(hidden, spec, mem)
        want = {k: tuple(v.shape) for k, v in head.state_dict().items() if not k.startswith("memory.")}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if want != got:
            raise ValueError(f"head tensors do not match its spec: expected {want}, got {got}")
        head.load_state_dict({**head.state_dict(), **state})
        return head

    def as_linear(self) -> torch.nn.Linear:
        """The equivalent plain ``Linear(hidden, 1)`` on raw embeddings (plain-linear heads only)."""
        if not self.spec.is_plain_linear:
            raise ValueError("only a linear head without features or kNN folds into one Linear")
        lin = torch.nn.Linear(self.hidden, 1)
        with torch.no_grad():
            w = self.net.weight / self.e_std
            lin.weight.copy_(w)
            lin.bias.copy_(self.net.bias - (w * self.e_mean).sum())
        return lin

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> ScoreHead:
        head = cls(int(linear.in_features))
        head.net.load_state_dict(linear.state_dict())
        return head


# --------------------------------------------------------------------------- fitting heads on fixed embeddings


@dataclass
class HeadFit:
    head: ScoreHead
    best: dict[str, Any]
    history: list[dict[str, Any]]


def set_standardization(
    head: ScoreHead, emb: torch.Tensor, feats: torch.Tensor | None, exclude: torch.Tensor | None = None
) -> None:
    with torch.no_grad():
        head.e_mean.copy_(emb.mean(0))
        head.e_std.copy_(emb.std(0).clamp_min(1e-6))
        if head.n_features and feats is not None:
            head.f_mean.copy_(feats.mean(0))
            head.f_std.copy_(feats.std(0).clamp_min(1e-6))
        if head.n_knn:
            assert head.memory is not None
            m = head.memory.inputs(emb, exclude)
            head.m_mean.copy_(m.mean(0))
            head.m_std.copy_(m.std(0).clamp_min(1e-6))
        if head.memory is not None:
            head.v_mean.copy_(head.memory.values.mean())
            head.v_std.copy_(head.memory.values.std().clamp_min(1e-6))


def fit_head(
    spec: HeadSpec,
    emb: torch.Tensor,
    lengths: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, int]],
    *,
    feats: torch.Tensor | None = None,
    val: tuple[torch.Tensor, torch.Tensor | None, np.ndarray] | None = None,
    val_metric: Callable[[np.ndarray, np.ndarray], float],
    epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    warmup_frac: float = 0.1,
    grad_clip: float = 1.0,
    dropout: float = 0.0,
    max_steps: int | None = None,
    seed: int = 42,
    memory: KnnMemory | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> HeadFit:
    """Train the base net of a head (no kNN part) on fixed embeddings; keep the best validation epoch.

    ``loss_fn(scores, lengths, generator) -> (loss, n_used)``. ``val`` is
    ``(embeddings, features or None, lengths)``. ``dropout`` applies to the inputs
    while training only (it regularises the 384-dim MLP on ~10k prompts).
    A ``knn_inputs`` head needs ``memory``, built over ``emb`` in the same row
    order: each training prompt reads the memory without its own row.
    A head with a blended kNN part (``knn`` without ``knn_inputs``) comes back
    without it; :func:`attach_knn` adds it.
    """
    from transformers import get_linear_schedule_with_warmup

    base_spec = copy.deepcopy(spec)
    exclude = None
    if spec.knn_inputs:
        if memory is None or memory.rows != len(emb):
            raise ValueError("a knn_inputs head needs the memory of its training embeddings")
        base_spec.knn.weight = 0.0  # the net reads the memory; nothing is blended on top
        exclude = torch.arange(len(emb))
    else:
        base_spec.knn = None
        memory = None
    torch.manual_seed(seed)
    head = ScoreHead(emb.shape[1], base_spec, memory)
    set_standardization(head, emb, feats, exclude)
    with torch.no_grad():
        x = head.inputs(emb, feats, exclude).detach()
        xv = head.inputs(val[0], val[1]).detach() if val is not None else None
    opt = torch.optim.AdamW(head.net.parameters(), lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    n = len(x)
    steps_per_epoch = sum(1 for i in range(0, n, batch_size) if min(batch_size, n - i) >= 2)
    total = steps_per_epoch * epochs if max_steps is None else min(steps_per_epoch * epochs, max_steps)
    sched = get_linear_schedule_with_warmup(opt, math.ceil(total * warmup_frac), total)
    drop = torch.nn.Dropout(dropout)
    best: dict[str, Any] = {"val_metric": -math.inf}
    best_state = copy.deepcopy(head.net.state_dict())
    history: list[dict[str, Any]] = []
    step = 0
    for epoch in range(epochs):
        head.net.train()
        perm = rng.permutation(n)
        run, cnt = 0.0, 0
        for i in range(0, n, batch_size):
            idx = torch.as_tensor(perm[i : i + batch_size])
            if len(idx) < 2 or step >= total:
                continue
            scores = head.net(drop(x[idx])).squeeze(-1)
            loss, used = loss_fn(scores, lengths[idx], gen)
            opt.zero_grad(set_to_none=True)
            if used:
                loss.backward()
                torch.nn.utils.clip_grad_norm_(head.net.parameters(), grad_clip)
                opt.step()
            sched.step()
            step += 1
            run += float(loss.detach())
            cnt += 1
            if progress is not None:
                progress(step, total)
        head.net.eval()
        entry: dict[str, Any] = {"epoch": epoch + 1, "step": step, "train_loss": run / max(1, cnt)}
        if xv is not None:
            with torch.no_grad():
                entry["val_metric"] = val_metric(head.net(xv).squeeze(-1).numpy(), val[2])
        history.append(entry)
        if xv is None or entry["val_metric"] > best["val_metric"]:
            best = dict(entry)
            best_state = copy.deepcopy(head.net.state_dict())
        if step >= total:
            break
    head.net.load_state_dict(best_state)
    return HeadFit(head.eval(), best, history)


def attach_knn(
    head: ScoreHead,
    spec: KnnSpec,
    mem_emb: torch.Tensor,
    mem_lengths: torch.Tensor,
    *,
    val: tuple[torch.Tensor, torch.Tensor | None, np.ndarray] | None,
    val_metric: Callable[[np.ndarray, np.ndarray], float],
    weights: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0),
    lookups: tuple[tuple[int, float], ...] = tuple((k, t) for k in (10, 20, 50, 100, 200) for t in (0.02, 0.05, 0.1)),
    tune: bool = True,
) -> tuple[ScoreHead, dict[str, Any]]:
    """A copy of ``head`` that blends in a kNN memory over ``mem_emb``.

    With a validation set (and ``tune``), the lookup (``k``, temperature) is
    picked from ``lookups`` by the kNN score's own validation metric, then the
    blend weight (in units of the base score's own spread, so weight 1 means
    "as much kNN as base") from ``weights``. Returns the new head and the grids.
    """
    values = torch.log1p(mem_lengths.float())
    lookup_grid: dict[str, float] = {}
    if val is not None and tune and lookups:
        probe = KnnMemory(mem_emb, values, spec)
        with torch.no_grad():
            for k, temp in lookups:
                probe.spec = KnnSpec(k=k, temperature=temp, weight=spec.weight)
                lookup_grid[f"{k},{temp}"] = val_metric(probe.lookup(val[0]).numpy(), val[2])
        best_k, best_t = max(lookups, key=lambda kt: lookup_grid[f"{kt[0]},{kt[1]}"])
        spec = KnnSpec(k=best_k, temperature=best_t, weight=spec.weight)
    memory = KnnMemory(mem_emb, values, spec)
    new_spec = copy.deepcopy(head.spec)
    new_spec.knn = copy.deepcopy(spec)
    out = ScoreHead(head.hidden, new_spec, memory)
    state = {k: v for k, v in head.state_dict().items() if not k.startswith("memory.")}
    out.load_state_dict({**out.state_dict(), **state})
    with torch.no_grad():
        out.v_mean.copy_(values.mean())
        out.v_std.copy_(values.std().clamp_min(1e-6))
    grid: dict[str, float] = {}
    if val is not None and tune:
        with torch.no_grad():
            base = out.base(val[0], val[1])
            knn = out.knn_z(val[0])
            spread = float(base.std().clamp_min(1e-6))
            for w in weights:
                grid[str(w)] = val_metric((base + w * spread * knn).numpy(), val[2])
        best_w = max(weights, key=lambda w: grid[str(w)])
        out.spec.knn.weight = best_w * spread
        spec_weight = best_w
    else:
        with torch.no_grad():
            spread = 1.0 if val is None else float(out.base(val[0], val[1]).std().clamp_min(1e-6))
        out.spec.knn.weight = spec.weight * spread
        spec_weight = spec.weight
    info = {"k": spec.k, "temperature": spec.temperature, "weight_relative": spec_weight, "weight": out.spec.knn.weight,
            "grid": grid, "lookup_grid": lookup_grid}
    return out.eval(), info


__all__ = [
    "HEAD_KINDS",
    "KNN_INPUTS",
    "HeadFit",
    "HeadSpec",
    "KnnMemory",
    "KnnSpec",
    "ScoreHead",
    "attach_knn",
    "fit_head",
]
