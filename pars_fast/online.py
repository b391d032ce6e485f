"""Online adaptation: learn the served model's own output lengths from finished requests.

A ranker trained offline learns ChatGPT's response lengths on ShareGPT; the engine it
schedules for knows the true output length of every request it finishes, from the
very model and workload being served. :class:`OnlineLearner` turns those labels into
a second predictor and blends it with the ranker by measured merit:

* **Memory.** A bounded ring of the last ``memory`` finished requests: the ranker's
  pooled embedding (L2-normalised), the prompt length and the log output length.
* **Online predictor.** ``y_hat = ridge([1, log(1 + prompt tokens), knn])``, where
  ``knn`` is the softmax-weighted mean log length of the ``k`` most cosine-similar
  remembered requests. The ridge has three weights, refit in closed form after every
  label from exponentially forgotten sufficient statistics, so it adapts in a few
  dozen requests and never needs a background refit.
* **Prequential blend.** Each finished request is first *judged* against the scores
  it got when it was scored (base ranker, online predictor, and the blend that was
  used), and only then learned from. Over a window of recent requests, the running
  pairwise accuracy (on the pairs whose order is known) of each predictor, and of
  their blends ``(1 - w) z_b + w z_o`` for ``w`` in 0, 0.1, ..., 1, is measured; the
  online weight moves halfway to the most accurate ``w`` (0 until
  ``min_observations`` requests were judged; ties go to the base ranker). ``z`` are
  scores standardized by running means and deviations. The blend is expressed in
  the base ranker's own units (``mu_b + sd_b * ((1 - w) z_b + w z_o)``), so with
  ``w = 0`` the score is exactly the ranker's, and aging keeps its meaning.
* **Censoring.** A request stopped by its ``max_tokens`` produced "at least L"
  tokens. Such a label only enters the ridge when the prediction is below it, and a
  pair is judged only when its order is known: the shorter one finished on its own
  and the longer one is at least ``delta`` longer. (Replays of recorded lengths, like
  the end-to-end benchmark, cap every request at its true length:
  ``trust_length_caps=True`` treats a cap as an exact label there.)

**Cost.** With the ranker inline, :meth:`OnlineLearner.observe` runs on the engine
thread, once per finished request. It reads the whole memory once (``memory x dim``
multiply-adds, on the calling thread: no BLAS threads) plus a few fixed-size NumPy calls.
Every 8th call (every call until ``min_observations``) also re-chooses the weight: one
``[window, window]`` known-pair mask, then, for all 14 predictors together, a sort and
``14 * window**2 / 64`` word operations on bitsets. At memory 2048, dim 384, window 256,
on one core of this project's 2-core VM (benchmarks/bench_online.py, fastest of 400):
0.11 ms per observe, 0.43 ms for one that re-chooses the weight.

Everything here is NumPy and deterministic; nothing survives :meth:`reset` or a
restart (persistence is what traces are for, see :mod:`pars_fast.traces`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

__all__ = ["OnlineConfig", "OnlineLearner", "known_pair_accuracies", "known_pair_accuracy", "stream_eval"]

# Online weights tried when the blend is re-chosen.
_WEIGHT_GRID = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class OnlineConfig:
    """Settings of the online learner (``additional_config["pars"]["online"]``)."""

    enabled: bool = True
    # Finished requests remembered (kNN memory and ridge horizon).
    memory: int = 2048
    # Neighbours read per prediction, and the softmax temperature over cosine similarity.
    k: int = 32
    temperature: float = 0.05
    # Judged requests before the online predictor's scores count at all.
    min_observations: int = 32
    # Recent judged requests over which running pairwise accuracies are measured.
    window: int = 256
    # Pairs whose lengths differ by less than this (relative) are not judged: near-ties
    # say nothing about order (PARS's delta).
    delta: float = 0.2
    # Ridge penalty of the online predictor (on standardized inputs).
    ridge: float = 1.0
    # A request stopped by max_tokens is an exact label (True: replays of recorded
    # lengths) or "at least L" (False, the default: real serving).
    trust_length_caps: bool = False
    # Learn from requests that finished without ever being scored (admitted at once, at
    # light load): the worker embeds them when it has nothing to score.
    learn_unscored: bool = True
    # At most this fraction of the worker's time goes to embedding unscored requests.
    cpu_fraction: float = 0.5

    @classmethod
    def parse(cls, value: Any, source: str) -> OnlineConfig:
        """``True``/``False``, or an object of the fields above."""
        if isinstance(value, OnlineConfig):
            return value
        if isinstance(value, bool):
            return cls(enabled=value)
        if not isinstance(value, dict):
            raise ValueError(f"{source}: expected true, false or an object like {{\"memory\": 2048}}, got {value!r}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        out = cls(**value)
        for name in ("memory", "k", "min_observations", "window"):
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{source}.{name}: expected a positive integer, got {v!r}")
        for name in ("temperature", "ridge"):
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{source}.{name}: expected a number > 0, got {v!r}")
        if not 0 <= out.delta < 1 or not 0 < out.cpu_fraction <= 1:
            raise ValueError(f"{source}: delta must be in [0, 1) and cpu_fraction in (0, 1]")
        for name in ("enabled", "trust_length_caps", "learn_unscored"):
            if not isinstance(getattr(out, name), bool):
                raise ValueError(f"{source}.{name}: expected true or false, got {getattr(out, name)!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def known_pair_accuracy(pred: np.ndarray, length: np.ndarray, exact: np.ndarray, delta: float) -> tuple[float, int]:
    """Pairwise accuracy of ``pred`` over the pairs whose order is known, and their number.

    Pair (i, j) is known to have ``length[i] > length[j]`` when j's length is exact
    (it finished on its own) and ``(length[i] - length[j]) / length[i] >= delta``;
    i's may be a lower bound. A tie in ``pred`` counts half. NaN when no pair is known.
    This is the pair-matrix reference; :func:`known_pair_accuracies` scores many
    predictors at once, with the same results.
    """
    li, lj = length[:, None], length[None, :]
    known = exact[None, :] & (li > lj) & ((li - lj) >= delta * li)
    n = int(known.sum())
    if n == 0:
        return math.nan, 0
    diff = pred[:, None] - pred[None, :]
    right = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
    return float(right[known].sum() / n), n


def _known_pairs(length: np.ndarray, exact: np.ndarray, delta: float) -> np.ndarray:
    """``known[i, j]``: i is known to be longer than j (see :func:`known_pair_accuracy`)."""
    margin = delta * length
    known = np.subtract.outer(length, length) >= margin[:, None]
    if not (margin > 0).all():  # a positive margin already implies length[i] > length[j]
        known &= length[:, None] > length[None, :]
    known &= exact[None, :]
    return known


def known_pair_accuracies(preds: np.ndarray, length: np.ndarray, exact: np.ndarray, delta: float) -> tuple[np.ndarray, int]:
    """:func:`known_pair_accuracy` of each row of ``preds`` ([p, m]), and the number of known pairs.

    The known-pair mask is built once, as one 64-bit bitset per item; each predictor then
    costs a sort and O(m * m / 64) word operations instead of an [m, m] float matrix. The
    results are the same as the reference's, bit for bit: both count right pairs and ties,
    and such counts are exact in float64.
    """
    preds = np.atleast_2d(np.asarray(preds, dtype=np.float64))
    p, m = preds.shape
    known = _known_pairs(length, exact, delta)
    n = int(np.count_nonzero(known))
    if n == 0:
        return np.full(p, math.nan), 0
    if not np.isfinite(preds).all():  # NaN breaks sorting's order, inf - inf is NaN: use the reference
        return np.array([known_pair_accuracy(row, length, exact, delta)[0] for row in preds]), n
    words = -(-m // 64)
    padded = np.zeros((m, words * 64), dtype=bool)
    padded[:, :m] = known
    known_bits = np.packbits(padded, axis=1, bitorder="little").view("<u8")  # [m, words]: row i = {j known shorter}
    rows = np.arange(p)[:, None]
    order = np.argsort(preds, axis=1)
    # below[k, r]: the bitset of the r items that predictor k scores lowest (row 0: none).
    below = np.zeros((p, m + 1, words), dtype=np.uint64)
    below[rows, np.arange(1, m + 1)[None, :], order >> 6] = np.left_shift(np.uint64(1), (order & 63).astype(np.uint64))
    np.bitwise_or.accumulate(below, axis=1, out=below)
    below = below.reshape(p * (m + 1), words)
    # Per item, how many items score strictly lower: its position in sorted order, or, for
    # tied scores, the position where its tie group starts.
    ranked = np.take_along_axis(preds, order, axis=1)
    pos = np.broadcast_to(np.arange(m), (p, m))
    new_group = np.ones((p, m), dtype=bool)
    np.not_equal(ranked[:, 1:], ranked[:, :-1], out=new_group[:, 1:])
    tied = not new_group.all()
    lower = np.empty((p, m), dtype=np.intp)
    lower[rows, order] = np.maximum.accumulate(np.where(new_group, pos, 0), axis=1) if tied else pos
    right = _count_known(below, rows * (m + 1) + lower, known_bits)
    if not tied:
        return right / n, n
    # ... and how many score lower or the same (where its tie group ends).
    group_end = np.ones((p, m), dtype=bool)
    group_end[:, :-1] = new_group[:, 1:]
    lower_or_tie = np.empty((p, m), dtype=np.intp)
    lower_or_tie[rows, order] = np.minimum.accumulate(np.where(group_end, pos + 1, m)[:, ::-1], axis=1)[:, ::-1]
    right_or_tie = _count_known(below, rows * (m + 1) + lower_or_tie, known_bits)
    return (right + 0.5 * (right_or_tie - right)) / n, n


def _count_known(below: np.ndarray, index: np.ndarray, known_bits: np.ndarray) -> np.ndarray:
    """Per predictor k: sum over items i of |below[index[k, i]] & known_bits[i]|."""
    sets = below[index.ravel()].reshape(*index.shape, -1)
    sets &= known_bits
    return _popcount(sets).sum(axis=(1, 2), dtype=np.int64)


_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (NumPy < 2.0 has no bitwise_count: a byte table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(words)
    return _BYTE_POPCOUNT[np.ascontiguousarray(words).view(np.uint8)].reshape(*words.shape, 8).sum(axis=-1)


def _similarities(q: np.ndarray, memory: np.ndarray) -> np.ndarray:
    """``q @ memory.T`` ([n, d] x [size, d] -> [n, size]) as one dot product per pair, on the
    calling thread. A matrix product would go to BLAS, whose threads, on a machine whose
    cores are busy (vLLM's CPU backend, a loaded host), turned a 100 us product on the
    engine thread into milliseconds, and at times seconds (benchmarks/bench_online.py)."""
    if hasattr(np, "vecdot"):
        return np.vecdot(q[:, None, :], memory[None, :, :])
    return np.einsum("nd,sd->ns", q, memory)


class _Welford:
    """Running mean and standard deviation."""

    def __init__(self) -> None:
        self.n, self.mean, self._m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        for x in np.asarray(values, dtype=np.float64).ravel():
            self.n += 1
            d = x - self.mean
            self.mean += d / self.n
            self._m2 += d * (x - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self._m2 / (self.n - 1)) if self.n > 1 else 1.0


class OnlineLearner:
    """Learns output lengths from finished requests and blends them with a base ranker's scores.

    ``dim``: embedding size (None: no kNN part, prompt length only). Use it as
    ``final, online = learner.score(base, emb, prompt_tokens)`` when requests arrive,
    then ``learner.observe(...)`` with what was returned once each finishes.
    """

    def __init__(self, config: OnlineConfig | None = None, dim: int | None = None) -> None:
        self.config = config or OnlineConfig()
        self.dim = dim
        self.reset()

    def reset(self) -> None:
        """Forget everything learned (the counters of resets survive)."""
        c = self.config
        self.resets = getattr(self, "resets", -1) + 1
        self._emb = np.zeros((c.memory, self.dim), dtype=np.float32) if self.dim else None
        self._y = np.zeros(c.memory, dtype=np.float64)
        self._size = 0
        self._next = 0
        # Ridge sufficient statistics over x = [1, log prompt tokens, knn], forgotten
        # geometrically over about `memory` labels.
        self._xtx = np.zeros((3, 3))
        self._xty = np.zeros(3)
        self._coef = np.zeros(3)
        self._labels = _Welford()
        self._base = _Welford()
        self._online = _Welford()  # of the online predictions made
        # The last `window` judged requests, a ring of rows (base, online, final, output
        # tokens, exact): the accuracies are sums over pairs, so row order does not matter.
        self._judged = np.zeros((c.window, 5))
        self._num_judged = 0
        self.weight = 0.0
        self._weight_updates = 0
        self.accuracy: dict[str, float] = {"base": math.nan, "online": math.nan, "blend": math.nan}
        self.known_pairs = 0
        self.observed = 0
        self.censored = 0

    # -------------------------------------------------------------- predict

    def _knn(self, emb: np.ndarray) -> np.ndarray:
        """Softmax-weighted mean log length of each row's k most similar remembered requests."""
        if self._emb is None or self._size == 0:
            return np.full(len(emb), self._labels.mean if self._labels.n else 0.0)
        q = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        sims = _similarities(q.astype(np.float32, copy=False), self._emb[: self._size])  # [n, size]
        k = min(self.config.k, self._size)
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < self._size else np.broadcast_to(np.arange(self._size), (len(q), self._size))
        s = np.take_along_axis(sims, top, axis=1) / self.config.temperature
        w = np.exp(s - s.max(axis=1, keepdims=True))
        return (w * self._y[top]).sum(axis=1) / w.sum(axis=1)

    def _features(self, emb: np.ndarray | None, prompt_tokens: np.ndarray) -> np.ndarray:
        n = len(prompt_tokens)
        knn = self._knn(emb) if emb is not None else np.full(n, self._labels.mean if self._labels.n else 0.0)
        return np.stack([np.ones(n), np.log1p(np.asarray(prompt_tokens, dtype=np.float64)), knn], axis=1)

    def predict(self, emb: np.ndarray | None, prompt_tokens: np.ndarray) -> np.ndarray:
        """The online predictor's log output length for each request."""
        x = self._features(emb, prompt_tokens)
        if self._labels.n < 2:
            return np.full(len(x), self._labels.mean)
        return x @ self._coef

    def score(self, base: np.ndarray, emb: np.ndarray | None, prompt_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(final scores, online predictions)`` for requests whose base ranker scores are ``base``."""
        base = np.asarray(base, dtype=np.float64)
        finite = np.isfinite(base)
        self._base.add(base[finite])
        online = self.predict(emb, prompt_tokens)
        self._online.add(online)
        if self.weight <= 0.0:
            return base.copy(), online
        return self._blend(base, online, self.weight), online

    def _blend(self, base: np.ndarray, online: np.ndarray, w: float | np.ndarray) -> np.ndarray:
        sd_b, sd_o = max(self._base.std, 1e-9), max(self._online.std, 1e-9)
        z_b = (base - self._base.mean) / sd_b
        z_o = (online - self._online.mean) / sd_o
        return self._base.mean + sd_b * ((1.0 - w) * z_b + w * z_o)

    # -------------------------------------------------------------- learn

    def observe(
        self,
        base: float,
        online: float,
        final: float,
        emb: np.ndarray | None,
        prompt_tokens: int,
        output_tokens: int,
        length_capped: bool,
    ) -> None:
        """Judge one finished request against the scores it got, then learn from it."""
        c = self.config
        exact = not length_capped or c.trust_length_caps
        y = math.log1p(max(0, int(output_tokens)))
        self.observed += 1
        self.censored += int(not exact)
        if all(math.isfinite(v) for v in (base, online, final)):
            self._judged[self._num_judged % c.window] = (base, online, final, float(output_tokens), exact)
            self._num_judged += 1
            if self.observed % 8 == 0 or min(self._num_judged, c.window) <= c.min_observations:
                self._update_weight()
        # Learn: ridge (a censored label only pushes a prediction up to its bound) ...
        x = self._features(None if emb is None else np.asarray(emb, dtype=np.float32)[None, :], np.array([prompt_tokens]))[0]
        forget = 1.0 - 1.0 / c.memory
        if exact or x @ self._coef < y:
            self._xtx = forget * self._xtx + np.outer(x, x)
            self._xty = forget * self._xty + x * y
            self._labels.add(np.array([y]))
            self._refit()
        # ... and memory.
        if self._emb is not None and emb is not None:
            e = np.asarray(emb, dtype=np.float32)
            self._emb[self._next] = e / max(float(np.linalg.norm(e)), 1e-12)
            self._y[self._next] = y
            self._next = (self._next + 1) % c.memory
            self._size = min(self._size + 1, c.memory)

    def _refit(self) -> None:
        # Standardize the two non-constant inputs (their scales differ), penalize them only.
        n = self._xtx[0, 0]
        if n < 2:
            return
        mean = self._xtx[0] / n
        cov = self._xtx / n - np.outer(mean, mean)
        sd = np.sqrt(np.maximum(np.diag(cov)[1:], 1e-12))
        cxy = self._xty / n - mean * (self._xty[0] / n)
        a = cov[1:, 1:] / np.outer(sd, sd) + (self.config.ridge / n) * np.eye(2)
        beta = np.linalg.solve(a, cxy[1:] / sd) / sd
        self._coef = np.array([self._xty[0] / n - mean[1:] @ beta, *beta])

    def _update_weight(self) -> None:
        c = self.config
        if min(self._num_judged, c.window) < c.min_observations:
            self.weight = 0.0
            return
        arr = self._judged[: min(self._num_judged, c.window)]
        length, exact = arr[:, 3], arr[:, 4] != 0
        # Rows: the base ranker, the online predictor and the blend each request got, then
        # the blends at each weight of the grid; all judged in one pass.
        grid = np.array(_WEIGHT_GRID)[:, None]
        preds = np.concatenate([arr[:, :3].T, self._blend(arr[:, 0], arr[:, 1], grid)])
        acc, self.known_pairs = known_pair_accuracies(preds, length, exact, c.delta)
        self.accuracy = {"base": float(acc[0]), "online": float(acc[1]), "blend": float(acc[2])}
        if self.known_pairs == 0:
            return
        best_w, best_acc = 0.0, -1.0
        for w, a in zip(_WEIGHT_GRID, acc[3:]):  # ascending: a tie keeps the smaller online weight
            if a > best_acc + 1e-9:
                best_w, best_acc = w, float(a)
        self.weight = best_w if self._weight_updates == 0 else 0.5 * (self.weight + best_w)
        self._weight_updates += 1

    # -------------------------------------------------------------- report

    def stats(self) -> dict[str, Any]:
        return {
            "observed": self.observed,
            "censored": self.censored,
            "memory": self._size,
            "weight": round(self.weight, 4),
            "accuracy_base": _r(self.accuracy["base"]),
            "accuracy_online": _r(self.accuracy["online"]),
            "accuracy_blend": _r(self.accuracy["blend"]),
            "judged_pairs": self.known_pairs,
            "resets": self.resets,
        }


def _r(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def stream_eval(ranker: Any, samples: Any, config: OnlineConfig | None = None, seed: int = 0) -> dict[str, Any]:
    """Prequential streaming evaluation of online adaptation on top of ``ranker``.

    Prompts arrive once each, in a seeded random order; each is scored (base ranker,
    online predictor, blend), then its true length is revealed and learned from.
    Returns Kendall tau of the frozen ranker, of prompt length, of the online
    predictor and of the blend, over the whole stream and over its second half (when
    the learner has seen half the data), plus the learner's final stats.
    """
    from pars_fast.metrics import kendall_tau

    config = config or OnlineConfig()
    order = np.random.default_rng(seed).permutation(len(samples))
    stream = [samples[i] for i in order]
    prompts = [s.prompt for s in stream]
    lengths = np.array([s.response_len for s in stream], dtype=np.float64)
    # The engine knows each prompt's token count; here, the ranker's tokenizer counts it.
    prompt_tokens = np.array([len(ids) for ids in ranker.tokenizer(prompts, add_special_tokens=False)["input_ids"]])
    base_all, emb_all = ranker.score_and_embed(prompts)  # the frozen ranker's view: fixed, so one pass
    learner = OnlineLearner(config, dim=emb_all.shape[1])
    base, online, final = (np.empty(len(stream)) for _ in range(3))
    for i in range(len(stream)):
        f, o = learner.score(base_all[i : i + 1], emb_all[i : i + 1], prompt_tokens[i : i + 1])
        base[i], online[i], final[i] = base_all[i], o[0], f[0]
        learner.observe(base[i], online[i], final[i], emb_all[i], int(prompt_tokens[i]), int(lengths[i]), False)
    half = len(stream) // 2

    def taus(sl: slice) -> dict[str, float]:
        return {
            "frozen": kendall_tau(base[sl], lengths[sl]),
            "prompt_length": kendall_tau(prompt_tokens[sl].astype(np.float64), lengths[sl]),
            "online": kendall_tau(online[sl], lengths[sl]),
            "blend": kendall_tau(final[sl], lengths[sl]),
        }

    return {"n": len(stream), "seed": seed, "all": taus(slice(None)), "second_half": taus(slice(half, None)),
            "learner": learner.stats(), "config": config.to_dict()}
