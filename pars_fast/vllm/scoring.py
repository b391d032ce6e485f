"""What a score is made of: scorers, and the guard that turns their failures into FCFS.

The scheduler never hands vLLM ``Request`` objects to a scorer. It hands it
:class:`ScoreJob` s: plain, picklable records (request id, the prompt's first token
ids, prompt length, ``max_tokens``), so the same scorer runs inline in ``schedule()``,
in a thread, or in a separate process (:mod:`pars_fast.vllm.worker`).

* :class:`OracleScorer` (``max_tokens`` is the true length: oracle SJF for benchmarks)
  and :class:`PromptLengthScorer` (baseline) cost microseconds.
* :class:`TextRankerScorer` decodes the token ids with the *served* model's tokenizer
  (the engine core has no prompt text), cut to what the ranker reads, and scores the
  texts with a ranker (``.score(list[str])``).
* :class:`GuardedScorer` runs any of them and turns every failure (an exception, a
  wrong number of scores, NaN/inf, a batch over its time limit) into NaN, which the
  scheduler reads as "keep this request's FCFS key". Its counters are
  :class:`ScoringStats`.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pars_fast.vllm.config import FallbackConfig, PARSConfig, PARSConfigError

if TYPE_CHECKING:
    from vllm.config import ModelConfig

logger = logging.getLogger("pars_fast.vllm")

# Served-model tokens decoded per ranker token: the two tokenizers differ (BPE vs
# WordPiece), so decode a little more than the ranker reads; the ranker truncates.
DECODE_SLACK = 1.25
# Used when neither the config nor the ranker says how many prompt tokens it reads.
DEFAULT_MAX_PROMPT_TOKENS = 128
# Scores are clamped to +-SCORE_LIMIT so a wild ranker output cannot overflow the
# integer priority (see scheduler.PRIORITY_UNITS_PER_SCORE).
SCORE_LIMIT = 1e9


@dataclass(frozen=True)
class ScoreJob:
    """One request to score, as plain data (picklable; no vLLM objects)."""

    request_id: str
    # The prompt's first token ids, cut to what the ranker reads (None: a prompt-embeds request).
    prompt_token_ids: list[int] | None
    num_prompt_tokens: int
    max_tokens: int | None = None


class Scorer(Protocol):
    """Scores jobs: higher = longer expected response. NaN = cannot score this one."""

    name: str
    # True when scoring costs microseconds (no model): the scheduler scores such
    # requests inline, before every step, instead of through a worker.
    cheap: bool

    def score_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[Any, float]:
        """Scores (array-like of len(jobs)) and the seconds spent decoding prompts."""
        ...


class OracleScorer:
    """Oracle SJF for benchmarks: each request's ``max_tokens`` is its true length."""

    name = "oracle"
    cheap = True

    def score_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[np.ndarray, float]:
        return np.array([math.nan if j.max_tokens is None else j.max_tokens for j in jobs], dtype=np.float64), 0.0


class PromptLengthScorer:
    """Baseline: a longer prompt predicts a longer response (Kendall tau ~0.1 on ShareGPT)."""

    name = "prompt-length"
    cheap = True

    def score_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[np.ndarray, float]:
        return np.fromiter((j.num_prompt_tokens for j in jobs), dtype=np.float64, count=len(jobs)), 0.0


class TextRankerScorer:
    """A text ranker (``.score(list[str])``) fed with prompts decoded by the served tokenizer."""

    cheap = False

    def __init__(self, ranker: Any, tokenizer: Any, name: str, threads: int | None = None) -> None:
        self.ranker = ranker
        self.tokenizer = tokenizer
        self.threads = threads  # torch intra-op threads while scoring; None: leave torch's setting
        self.name = name

    def decode(self, jobs: Sequence[ScoreJob]) -> list[str | None]:
        """Prompt text of each job; None for jobs without token ids."""
        ids = [j.prompt_token_ids for j in jobs if j.prompt_token_ids is not None]
        texts = iter(_batch_decode(self.tokenizer, ids) if ids else [])
        return [next(texts) if j.prompt_token_ids is not None else None for j in jobs]

    def score_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        texts = self.decode(jobs)
        decode_s = time.perf_counter() - start
        known = [t for t in texts if t is not None]
        if len(known) == len(texts):
            return self._score(known), decode_s
        # Prompt-embeds requests carry no token ids: they get NaN (FCFS), the rest a score.
        scores = as_scores(self._score(known), len(known)) if known else np.empty(0)
        out = np.full(len(texts), np.nan)
        out[[i for i, t in enumerate(texts) if t is not None]] = scores
        return out, decode_s

    def warm_up(self) -> None:
        """Score a few prompts of different lengths, so one-off costs (Triton autotuning,
        allocator growth) are paid at start-up, not in the first batches that matter.
        Only pars_fast rankers: a user's ranker object is scored by traffic alone."""
        from pars_fast.ranker import Ranker

        if not isinstance(self.ranker, Ranker):
            return
        words = "the quick brown fox jumps over the lazy dog ".split()
        prompts = [" ".join(words * k) for k in (1, 4, 16, 64)]
        self._score(prompts)

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


def as_scores(raw: Any, n: int) -> np.ndarray:
    """``raw`` as a float64 vector of length ``n``, or :class:`ScoreError`."""
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


def max_prompt_tokens(config: PARSConfig, ranker: Any = None) -> int:
    """Prompt tokens the ranker reads: the config's, else the ranker's own, else 128."""
    if config.max_prompt_tokens:
        return config.max_prompt_tokens
    value = getattr(getattr(ranker, "config", None), "max_prompt_tokens", None)
    value = value or getattr(ranker, "max_prompt_tokens", None)
    return int(value) if value else DEFAULT_MAX_PROMPT_TOKENS


def prompt_tokens_read(config: PARSConfig) -> int:
    """Prompt tokens the configured ranker reads, found without loading it (for the engine core)."""
    if config.max_prompt_tokens:
        return config.max_prompt_tokens
    folder: Path | None = None
    if config.ranker == "default":
        folder = default_ranker_path()
    elif config.ranker_kind() == "folder":
        folder = Path(config.ranker).expanduser()
    if folder is not None:
        try:
            return int(json.loads((folder / "ranker.json").read_text())["config"]["max_prompt_tokens"])
        except (OSError, ValueError, KeyError, TypeError):
            return DEFAULT_MAX_PROMPT_TOKENS  # the worker's Ranker.load will say what is wrong
    if config.ranker_kind() == "import":  # a class or object: read its attribute, build nothing
        module_name, _, attr = config.ranker.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            return DEFAULT_MAX_PROMPT_TOKENS
        return max_prompt_tokens(config, obj)
    return DEFAULT_MAX_PROMPT_TOKENS


def decode_tokens(max_prompt: int) -> int:
    """Served-model tokens to send for a ranker that reads ``max_prompt`` tokens."""
    return math.ceil(max_prompt * DECODE_SLACK)


def cheap_scorer(config: PARSConfig) -> Scorer | None:
    """The built-in model-free scorers; None for a text ranker."""
    if config.ranker == "oracle":
        return OracleScorer()
    if config.ranker == "prompt-length":
        return PromptLengthScorer()
    return None


def build_scorer(config: PARSConfig, tokenizer: Any) -> Scorer:
    """The scorer named by ``config.ranker``, loaded where it will run (every error is a start-up error)."""
    cheap = cheap_scorer(config)
    if cheap is not None:
        return cheap
    ranker = load_ranker(config)
    return TextRankerScorer(ranker, tokenizer, name=config.ranker, threads=config.threads)


def load_ranker(config: PARSConfig) -> Any:
    """The text ranker of ``config``: a ranker folder, the default ranker, or ``pkg.module:attr``."""
    kind = config.ranker_kind()
    if config.ranker == "default" or kind == "folder":
        from pars_fast.ranker import Ranker, RankerLoadError

        path = default_ranker_path() if config.ranker == "default" else Path(config.ranker).expanduser()
        try:
            return Ranker.load(path, backend=config.backend, device=None if config.device == "auto" else config.device)
        except RankerLoadError as exc:
            raise PARSConfigError(f"PARS: {exc}") from exc
    return _import_ranker(config.ranker)


def default_ranker_path() -> Path:
    """The default ranker's folder; raises a clear error if it has not been trained.

    It is never trained inside the engine: that would hold the engine's start-up for
    minutes (against vLLM's ready timeout) and print nothing useful.
    """
    from pars_fast.paths import default_ranker_dir

    path = default_ranker_dir()
    if not (path / "ranker.json").is_file():
        raise PARSConfigError(
            f"PARS: no default ranker at {path}. Train it first with `pars-fast train` (a few minutes on "
            "2 CPU cores), or start the server with `pars-fast serve`, which trains it before the engine starts."
        )
    return path


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


# ---------------------------------------------------------------------- guarded batch scoring


@dataclass
class ScoringStats:
    """Counters of one scorer. Seconds are wall-clock, summed."""

    requests_scored: int = 0  # got a usable score
    requests_fallback: int = 0  # kept their FCFS key instead (see fallback_reasons)
    batches: int = 0  # batches handed to the scorer
    failed_batches: int = 0  # batches with no usable scores (error, time limit, cool-down)
    scoring_seconds: float = 0.0  # decode + score, all batches
    decode_seconds: float = 0.0  # of which decoding token ids to text
    max_batch_seconds: float = 0.0
    fallback_reasons: dict[str, int] = field(default_factory=dict)  # reason -> requests
    last_fallback_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GuardedScorer:
    """Scores batches; failures become NaN (= FCFS) and are counted, never raised
    (unless ``fallback.on_error == "raise"``).

    ``time_limit_s``: a batch that takes longer is discarded (its requests go FCFS) and
    the scorer rests for ``fallback.retry_after_s``: a ranker that slow is doing harm.
    """

    def __init__(
        self,
        scorer: Scorer,
        fallback: FallbackConfig,
        time_limit_s: float | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.scorer = scorer
        self.fallback = fallback
        self.time_limit_s = time_limit_s
        self.clock = clock
        self.stats = ScoringStats()
        self._retry_at = -math.inf
        self._warned: set[str] = set()
        self.seconds_per_job = 0.0  # running estimate, to size inline chunks under a budget

    def resting(self) -> bool:
        return self.clock() < self._retry_at

    def score(self, jobs: Sequence[ScoreJob]) -> np.ndarray:
        """Finite score per job, or NaN for the ones to keep in FCFS position."""
        n = len(jobs)
        if n == 0:
            return np.empty(0)
        stats = self.stats
        stats.batches += 1
        start = self.clock()
        if start < self._retry_at:
            return self._fail(n, "cool-down", "ranker paused after a failure", warn=False)
        try:
            raw, decode_s = self.scorer.score_jobs(jobs)
            scores = as_scores(raw, n)
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
        per_job = elapsed / n
        self.seconds_per_job = per_job if self.seconds_per_job == 0 else 0.8 * self.seconds_per_job + 0.2 * per_job
        limit = self.time_limit_s
        if limit is not None and elapsed > limit:
            if self.fallback.on_error == "raise":
                raise TimeoutError(f"PARS: scoring {n} prompts took {elapsed:.3f} s, over the {limit} s limit")
            self._retry_at = self.clock() + self.fallback.retry_after_s
            return self._fail(n, "over time limit", f"{n} prompts took {elapsed:.3f} s > {limit} s")
        finite = np.isfinite(scores)
        num_bad = n - int(finite.sum())
        if num_bad:
            if self.fallback.on_error == "raise":
                raise ScoreError(f"PARS: ranker returned {num_bad} non-finite score(s) for {n} prompts")
            self._fail(num_bad, "non-finite", f"{num_bad} of {n} scores were NaN/inf", failed_batch=False)
            scores = np.where(finite, scores, np.nan)  # +-inf too: no order can be read from it
        stats.requests_scored += n - num_bad
        return np.clip(scores, -SCORE_LIMIT, SCORE_LIMIT)  # NaN stays NaN

    def _fail(self, n: int, reason: str, detail: str, warn: bool = True, failed_batch: bool = True) -> np.ndarray:
        record_fallback(self.stats, n, reason, detail, failed_batch)
        if warn and reason not in self._warned:  # once per kind, the counters keep the rest
            self._warned.add(reason)
            retry = f"; retrying the ranker after {self.fallback.retry_after_s:g} s" if failed_batch else ""
            logger.warning("PARS: falling back to FCFS order for %d request(s) (%s: %s)%s", n, reason, detail, retry)
        else:
            logger.debug("PARS: FCFS fallback for %d request(s) (%s: %s)", n, reason, detail)
        return np.full(n, np.nan)


def record_fallback(stats: ScoringStats, n: int, reason: str, detail: str, failed_batch: bool = False) -> None:
    stats.requests_fallback += n
    stats.failed_batches += int(failed_batch)
    stats.fallback_reasons[reason] = stats.fallback_reasons.get(reason, 0) + n
    stats.last_fallback_reason = f"{reason}: {detail}"
