"""Scoring new arrivals inside vLLM's engine core, with a fallback to FCFS.

The engine core only sees token ids, so a text ranker gets prompts decoded with the
served model's own tokenizer, cut to the tokens the ranker reads. ``ArrivalScorer``
scores one batch per scheduler step and turns every failure (an exception, a wrong
number of scores, NaN, a batch over the time budget) into "no score" for the requests
concerned, which the scheduler then keeps in FCFS position. Counters live in
``PARSStats``.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pars_fast.vllm.config import PARSConfig, PARSConfigError

if TYPE_CHECKING:
    from vllm.config import ModelConfig
    from vllm.v1.request import Request

logger = logging.getLogger("pars_fast.vllm")

# Served-model tokens decoded per ranker token: the two tokenizers differ (BPE vs
# WordPiece), so decode a little more than the ranker reads; the ranker truncates.
DECODE_SLACK = 1.25
# Used when neither the config nor the ranker says how many prompt tokens it reads.
DEFAULT_MAX_PROMPT_TOKENS = 128
# Scores are clamped to +-SCORE_LIMIT so a wild ranker output cannot overflow the
# integer priority (see scheduler.PRIORITY_UNITS_PER_SCORE).
SCORE_LIMIT = 1e9


class Scorer(Protocol):
    """Scores requests: higher = longer expected response. NaN = cannot score this one."""

    name: str

    def score_requests(self, requests: Sequence[Request]) -> tuple[np.ndarray, float]:
        """Scores (any array-like of len(requests)) and seconds spent decoding prompts."""
        ...


class OracleScorer:
    """Oracle SJF for benchmarks: each request's ``max_tokens`` is its true length."""

    name = "oracle"

    def score_requests(self, requests: Sequence[Request]) -> tuple[np.ndarray, float]:
        return np.fromiter((r.max_tokens for r in requests), dtype=np.float64, count=len(requests)), 0.0


class PromptLengthScorer:
    """Baseline: a longer prompt predicts a longer response (Kendall tau ~0.16 on ShareGPT)."""

    name = "prompt-length"

    def score_requests(self, requests: Sequence[Request]) -> tuple[np.ndarray, float]:
        return np.fromiter((r.num_prompt_tokens for r in requests), dtype=np.float64, count=len(requests)), 0.0


class TextRankerScorer:
    """A text ranker (``.score(list[str])``) fed with prompts decoded by the served tokenizer."""

    def __init__(
        self, ranker: Any, tokenizer: Any, max_prompt_tokens: int, name: str, threads: int | None = None
    ) -> None:
        self.ranker = ranker
        self.threads = threads  # torch intra-op threads while scoring; None: leave torch's setting
        self.tokenizer = tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.decode_tokens = math.ceil(max_prompt_tokens * DECODE_SLACK)
        self.name = name

    def decode(self, requests: Sequence[Request]) -> list[str | None]:
        """Prompt text of each request, cut to what the ranker reads; None without token ids."""
        n = self.decode_tokens
        ids = [r.prompt_token_ids[:n] for r in requests if r.prompt_token_ids is not None]
        texts = iter(_batch_decode(self.tokenizer, ids) if ids else [])
        return [next(texts) if r.prompt_token_ids is not None else None for r in requests]

    def score_requests(self, requests: Sequence[Request]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        texts = self.decode(requests)
        decode_s = time.perf_counter() - start
        known = [t for t in texts if t is not None]
        if len(known) == len(texts):
            return self._score(known), decode_s
        # Prompt-embeds requests carry no token ids: they get NaN (FCFS), the rest a score.
        scores = _as_scores(self._score(known), len(known)) if known else np.empty(0)
        out = np.full(len(texts), np.nan)
        out[[i for i, t in enumerate(texts) if t is not None]] = scores
        return out, decode_s

    def _score(self, texts: list[str]) -> Any:
        from pars_fast.encoder import torch_threads

        with torch_threads(self.threads):
            return self.ranker.score(texts)


def _batch_decode(tokenizer: Any, ids: list[list[int]]) -> list[str]:
    if hasattr(tokenizer, "batch_decode"):
        return list(tokenizer.batch_decode(ids, skip_special_tokens=True))
    return [tokenizer.decode(x, skip_special_tokens=True) for x in ids]


class ScoreError(RuntimeError):
    """The ranker's output cannot be used (wrong shape or length)."""


def _as_scores(raw: Any, n: int) -> np.ndarray:
    try:
        scores = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ScoreError(f"ranker returned {type(raw).__name__}, not numbers: {exc}") from None
    if scores.ndim == 2 and scores.shape[1] == 1:  # [n, 1] from a Linear head is fine
        scores = scores[:, 0]
    if scores.shape != (n,):
        raise ScoreError(f"ranker returned shape {scores.shape} for {n} prompts")
    return scores


# ---------------------------------------------------------------------- loading


def load_scorer(config: PARSConfig, model_config: ModelConfig | None) -> Scorer:
    """Build the scorer named by ``config.ranker``; every error here is a start-up error."""
    kind = config.ranker_kind()
    if config.ranker == "oracle":
        return OracleScorer()
    if config.ranker == "prompt-length":
        return PromptLengthScorer()
    if config.ranker == "default":
        ranker = _load_default_ranker(config.backend)
    elif kind == "folder":
        from pars_fast.ranker import Ranker

        ranker = Ranker.load(Path(config.ranker).expanduser(), backend=config.backend)
    else:
        ranker = _import_ranker(config.ranker)
    max_tokens = config.max_prompt_tokens or _ranker_max_prompt_tokens(ranker)
    tokenizer = served_tokenizer(model_config)
    return TextRankerScorer(ranker, tokenizer, max_tokens, name=config.ranker, threads=config.threads)


def _load_default_ranker(backend: str) -> Any:
    from pars_fast.paths import default_ranker_dir
    from pars_fast.ranker import Ranker, RankerLoadError

    try:
        return Ranker.load(default_ranker_dir(), backend=backend)
    except RankerLoadError:  # missing or unreadable: (re)train it, as ensure_default_ranker does
        pass
    logger.warning("PARS: no default ranker at %s yet; training it now (one-off, minutes on a CPU)", default_ranker_dir())
    from pars_fast.training import ensure_default_ranker

    ensure_default_ranker()
    return Ranker.load(default_ranker_dir(), backend=backend)


def _import_ranker(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PARSConfigError(f"PARS ranker {spec!r}: cannot import {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PARSConfigError(f"PARS ranker {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not hasattr(obj, "score") or isinstance(obj, type):
        obj = obj()  # a class or factory: build the ranker
    if not callable(getattr(obj, "score", None)):
        raise PARSConfigError(f"PARS ranker {spec!r} gives {type(obj).__name__}, which has no score(list[str]) method")
    return obj


def _ranker_max_prompt_tokens(ranker: Any) -> int:
    value = getattr(getattr(ranker, "config", None), "max_prompt_tokens", None)
    value = value or getattr(ranker, "max_prompt_tokens", None)
    return int(value) if value else DEFAULT_MAX_PROMPT_TOKENS


def served_tokenizer(model_config: ModelConfig | None) -> Any:
    """The served model's tokenizer, as vLLM itself builds it (cached per process)."""
    if model_config is None:
        raise PARSConfigError("PARS: a text ranker needs the served model's tokenizer, but no model config was given")
    from vllm.tokenizers import cached_get_tokenizer, cached_tokenizer_from_config

    try:
        tokenizer = cached_tokenizer_from_config(model_config)
        if tokenizer is None:  # skip_tokenizer_init=True: vLLM has none, but the files may be there
            tokenizer = cached_get_tokenizer(
                model_config.tokenizer,
                tokenizer_mode=model_config.tokenizer_mode,
                revision=model_config.tokenizer_revision,
                trust_remote_code=model_config.trust_remote_code,
            )
    except Exception as exc:
        raise PARSConfigError(
            f"PARS: cannot load the tokenizer of {model_config.tokenizer!r} to decode prompts for the ranker "
            f"({type(exc).__name__}: {exc}). Use ranker 'oracle' or 'prompt-length', which need no tokenizer."
        ) from exc
    return tokenizer


# ---------------------------------------------------------------------- batch scoring + fallback


@dataclass
class PARSStats:
    """Counters of one scheduler (one engine core). Seconds are wall-clock, summed."""

    requests_scored: int = 0  # got a ranker score
    requests_fallback: int = 0  # ordered FCFS instead (see fallback_reasons)
    batches: int = 0  # scoring steps that had arrivals
    failed_batches: int = 0  # batches with no usable scores (error, budget, cool-down)
    scoring_seconds: float = 0.0  # decode + score, all batches
    decode_seconds: float = 0.0  # of which decoding token ids to text
    max_batch_seconds: float = 0.0
    fallback_reasons: dict[str, int] = field(default_factory=dict)  # reason -> requests
    last_fallback_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ArrivalScorer:
    """Scores batches of new arrivals; failures become NaN (= FCFS) and are counted."""

    def __init__(self, scorer: Scorer, config: PARSConfig, clock: Callable[[], float] = time.perf_counter) -> None:
        self.scorer = scorer
        self.fallback = config.fallback
        self.clock = clock
        self.stats = PARSStats()
        self.mean_score = 0.0  # running mean of finite scores: where unscored requests queue
        self._num_scores = 0
        self._retry_at = -math.inf
        self._warned: set[str] = set()

    def score(self, requests: Sequence[Request]) -> np.ndarray:
        """Finite score per request, or NaN for the ones to keep in FCFS position."""
        n = len(requests)
        stats = self.stats
        stats.batches += 1
        start = self.clock()
        if start < self._retry_at:
            return self._fail(n, "cool-down", "ranker paused after a failure", warn=False)
        try:
            raw, decode_s = self.scorer.score_requests(requests)
            scores = _as_scores(raw, n)
        except Exception as exc:
            if self.fallback.on_error == "raise":
                raise
            self._retry_at = self.clock() + self.fallback.retry_after_s
            stats.scoring_seconds += self.clock() - start
            reason = "error" if not isinstance(exc, ScoreError) else "bad output"
            return self._fail(n, reason, f"{type(exc).__name__}: {exc}")
        elapsed = self.clock() - start
        stats.scoring_seconds += elapsed
        stats.decode_seconds += decode_s
        stats.max_batch_seconds = max(stats.max_batch_seconds, elapsed)
        budget = self.fallback.budget_s
        if budget is not None and elapsed > budget:
            if self.fallback.on_error == "raise":
                raise TimeoutError(f"PARS: scoring {n} prompts took {elapsed:.3f} s, over the {budget} s budget")
            self._retry_at = self.clock() + self.fallback.retry_after_s
            return self._fail(n, "over budget", f"{n} prompts took {elapsed:.3f} s > budget_s={budget}")
        finite = np.isfinite(scores)
        num_bad = n - int(finite.sum())
        if num_bad:
            if self.fallback.on_error == "raise":
                raise ScoreError(f"PARS: ranker returned {num_bad} non-finite score(s) for {n} prompts")
            self._fail(num_bad, "non-finite", f"{num_bad} of {n} scores were NaN/inf", failed_batch=False)
            scores = np.where(finite, scores, np.nan)  # +-inf too: no order can be read from it
        scores = np.clip(scores, -SCORE_LIMIT, SCORE_LIMIT)  # NaN stays NaN
        good = scores[finite]
        if good.size:
            self._num_scores += good.size
            self.mean_score += (float(good.sum()) - good.size * self.mean_score) / self._num_scores
            stats.requests_scored += int(good.size)
        return scores

    def _fail(self, n: int, reason: str, detail: str, warn: bool = True, failed_batch: bool = True) -> np.ndarray:
        stats = self.stats
        stats.requests_fallback += n
        stats.failed_batches += int(failed_batch)
        stats.fallback_reasons[reason] = stats.fallback_reasons.get(reason, 0) + n
        stats.last_fallback_reason = f"{reason}: {detail}"
        if warn and reason not in self._warned:  # once per kind, the counters keep the rest
            self._warned.add(reason)
            retry = f"; retrying the ranker after {self.fallback.retry_after_s:g} s" if failed_batch else ""
            logger.warning("PARS: falling back to FCFS order for %d request(s) (%s: %s)%s", n, reason, detail, retry)
        else:
            logger.debug("PARS: FCFS fallback for %d request(s) (%s: %s)", n, reason, detail)
        return np.full(n, np.nan)
