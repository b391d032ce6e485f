"""What a score is made of: scorers, and the guard that turns their failures into FCFS.

The scheduler never hands vLLM ``Request`` objects to a scorer. It hands it
:class:`ScoreJob` s: plain, picklable records (request id, the prompt's first token
ids, prompt length, ``max_tokens``), so the same scorer runs inline in ``schedule()``,
in a thread, or in a separate process (:mod:`pars_fast.vllm.worker`).

* :class:`OracleScorer` (``max_tokens`` is the true length: oracle SJF for benchmarks)
  and :class:`PromptLengthScorer` (baseline) cost microseconds.
* :class:`TextRankerScorer` decodes the token ids with the *served* model's tokenizer
  (the engine core has no prompt text) and scores the texts with a ranker
  (``.score(list[str])``). It decodes the whole prompt (up to ``PROMPT_DECODE_CAP``
  tokens), not just what the encoder reads: a ranker's cheap features (length, lines,
  requested counts) read the whole text. Decoding runs in the worker, off the step.
* :class:`OnlineScorer` wraps a text ranker with an :class:`~pars_fast.online.OnlineLearner`:
  it blends the ranker's scores with what finished requests taught it.
* :class:`GuardedScorer` runs any of them and turns every failure (an exception, a
  wrong number of scores, NaN/inf, a batch over its time limit) into NaN, which the
  scheduler reads as "keep this request's FCFS key". Its counters are
  :class:`ScoringStats`.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pars_fast.clock import REAL_CLOCK, Clock
from pars_fast.online import OnlineConfig, OnlineLearner
from pars_fast.vllm.config import FallbackConfig, PARSConfig, PARSConfigError

if TYPE_CHECKING:
    from vllm.config import ModelConfig

logger = logging.getLogger("pars_fast.vllm")

# Prompt tokens sent to a text ranker (and decoded): enough for its cheap features to
# see the whole of nearly every prompt (ShareGPT's p99 is about 3,000 tokens), bounded
# so that a huge prompt costs the worker milliseconds, not seconds.
PROMPT_DECODE_CAP = 8192
# Finished-request records an OnlineScorer keeps while waiting for their labels.
MAX_PENDING_RECORDS = 16384
# Scores are clamped to +-SCORE_LIMIT so a wild ranker output cannot overflow the
# integer priority (see pars_fast.aging.PRIORITY_UNITS_PER_SCORE).
SCORE_LIMIT = 1e9


@dataclass(frozen=True)
class ScoreJob:
    """One request to score, as plain data (picklable; no vLLM objects)."""

    request_id: str
    # The prompt's token ids, up to PROMPT_DECODE_CAP (None: a prompt-embeds request). The
    # scheduler passes the request's own list when it fits (no copy): read it, never change it.
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

    def __init__(self, ranker: Any, tokenizer: Any, name: str, threads: int | None = None, clock: Clock = REAL_CLOCK) -> None:
        self.ranker = ranker
        self.tokenizer = tokenizer
        self.threads = threads  # torch intra-op threads while scoring; None: leave torch's setting
        self.name = name
        self.clock = clock

    def decode(self, jobs: Sequence[ScoreJob]) -> list[str | None]:
        """Prompt text of each job; None for jobs without token ids."""
        ids = [j.prompt_token_ids for j in jobs if j.prompt_token_ids is not None]
        texts = iter(_batch_decode(self.tokenizer, ids) if ids else [])
        return [next(texts) if j.prompt_token_ids is not None else None for j in jobs]

    def score_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[np.ndarray, float]:
        scores, _, decode_s = self.score_and_embed(jobs, embed=False)
        return scores, decode_s

    def score_and_embed(self, jobs: Sequence[ScoreJob], embed: bool = True) -> tuple[np.ndarray, np.ndarray | None, float]:
        """Scores, the ranker's embeddings (None if it has none, or ``embed=False``), decode seconds."""
        start = self.clock.now()
        texts = self.decode(jobs)
        decode_s = self.clock.now() - start
        known = [t for t in texts if t is not None]
        use_embed = embed and callable(getattr(self.ranker, "score_and_embed", None))
        with _threads(self.threads):
            if not known:
                raw, emb = np.empty(0), None
            elif use_embed:
                raw, emb = self.ranker.score_and_embed(known)
            else:
                raw, emb = self.ranker.score(known), None
        scores = as_scores(raw, len(known))
        if len(known) == len(texts):
            return scores, emb, decode_s
        # Prompt-embeds requests carry no token ids: they get NaN (FCFS), the rest a score.
        rows = [i for i, t in enumerate(texts) if t is not None]
        out = np.full(len(texts), np.nan)
        out[rows] = scores
        full_emb = None
        if emb is not None:
            full_emb = np.zeros((len(texts), emb.shape[1]), dtype=np.float32)
            full_emb[rows] = emb
        return out, full_emb, decode_s

    def warm_up(self) -> None:
        """Score a few prompts of different lengths, so one-off costs (Triton autotuning,
        allocator growth) are paid at start-up, not in the first batches that matter.
        Only pars_fast rankers: a user's ranker object is scored by traffic alone."""
        from pars_fast.ranker import Ranker

        if not isinstance(self.ranker, Ranker):
            return
        words = "the quick brown fox jumps over the lazy dog ".split()
        prompts = [" ".join(words * k) for k in (1, 4, 16, 64)]
        with _threads(self.threads):
            self.ranker.score_and_embed(prompts)


@dataclass(frozen=True)
class Observation:
    """A finished request, as the online learner sees it."""

    request_id: str
    output_tokens: int
    length_capped: bool  # stopped by max_tokens: "at least output_tokens"
    aborted: bool = False  # not a label: only forget the request
    job: ScoreJob | None = None  # set for requests that were never scored (to embed them)


def backend_check_of(scorer: Any) -> dict[str, Any] | None:
    """The Triton self-check's verdict of the ranker behind a scorer (``Ranker.backend_check``:
    which backend serves, and the measured difference), or None when no check ran."""
    for _ in range(4):  # OnlineScorer -> TextRankerScorer -> Ranker
        check = getattr(scorer, "backend_check", None)
        if isinstance(check, dict):
            return check
        scorer = getattr(scorer, "inner", None) or getattr(scorer, "ranker", None)
        if scorer is None:
            return None
    return None


class OnlineScorer:
    """A text ranker whose scores an :class:`~pars_fast.online.OnlineLearner` blends with
    what finished requests taught it. Runs where the ranker runs (the worker).

    ``score_jobs`` keeps, per scored request, what the learner needs when its label
    comes (``observe``). Requests that finished unscored are embedded later, when the
    worker has nothing to score (``learn_pending``), within ``online.cpu_fraction``.
    """

    cheap = False

    def __init__(self, inner: TextRankerScorer, config: OnlineConfig) -> None:
        self.inner = inner
        self.name = inner.name
        self.config = config
        self.learner: OnlineLearner | None = None  # built on the first batch (its embedding size)
        self._records: dict[str, tuple[float, float, float, np.ndarray | None, int]] = {}
        self._unscored: list[Observation] = []
        self._resets = 0

    def warm_up(self) -> None:
        self.inner.warm_up()

    def _learner(self, emb: np.ndarray | None) -> OnlineLearner:
        if self.learner is None:
            self.learner = OnlineLearner(self.config, dim=None if emb is None else int(emb.shape[1]))
        return self.learner

    def score_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[np.ndarray, float]:
        base, emb, decode_s = self.inner.score_and_embed(jobs)
        learner = self._learner(emb)
        tokens = np.array([j.num_prompt_tokens for j in jobs])
        final, online = learner.score(base, emb, tokens)
        for i, job in enumerate(jobs):
            self._records[job.request_id] = (base[i], online[i], final[i], None if emb is None else emb[i], job.num_prompt_tokens)
        while len(self._records) > MAX_PENDING_RECORDS:  # labels that never came (lost requests)
            del self._records[next(iter(self._records))]
        return final, decode_s

    def observe(self, observations: Sequence[Observation]) -> None:
        """Learn from finished requests (prequentially: each is judged against the scores it got)."""
        for obs in observations:
            record = self._records.pop(obs.request_id, None)
            if obs.aborted:
                continue
            if record is not None:
                base, online, final, emb, prompt_tokens = record
                self._learner(emb).observe(base, online, final, emb, prompt_tokens, obs.output_tokens, obs.length_capped)
            elif obs.job is not None and self.config.learn_unscored and obs.job.prompt_token_ids is not None:
                self._unscored.append(obs)
        if len(self._unscored) > MAX_PENDING_RECORDS:
            del self._unscored[: len(self._unscored) - MAX_PENDING_RECORDS]  # keep the newest

    @property
    def pending(self) -> int:
        """Finished-but-unscored requests waiting to be learned from."""
        return len(self._unscored)

    def learn_pending(self, max_jobs: int) -> int:
        """Embed and learn from up to ``max_jobs`` requests that finished unscored."""
        batch, self._unscored = self._unscored[:max_jobs], self._unscored[max_jobs:]
        if not batch:
            return 0
        jobs = [obs.job for obs in batch if obs.job is not None]
        base, emb, _ = self.inner.score_and_embed(jobs)
        learner = self._learner(emb)
        tokens = np.array([j.num_prompt_tokens for j in jobs])
        final, online = learner.score(base, emb, tokens)  # what it would have got: judged, then learned
        for i, obs in enumerate(batch):
            learner.observe(base[i], online[i], final[i], None if emb is None else emb[i], tokens[i], obs.output_tokens, obs.length_capped)
        return len(batch)

    def reset(self) -> None:
        """Forget what traffic taught (records of requests in flight are kept)."""
        if self.learner is not None:
            self.learner.reset()
        self._unscored.clear()
        self._resets += 1

    def stats(self) -> dict[str, Any]:
        learner = self.learner.stats() if self.learner is not None else OnlineLearner(self.config).stats()
        return {**learner, "resets": self._resets, "pending_unscored": len(self._unscored)}


def _threads(n: int | None) -> Any:
    from pars_fast.encoder import torch_threads

    return torch_threads(n)


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


def cheap_scorer(config: PARSConfig) -> Scorer | None:
    """The built-in model-free scorers; None for a text ranker."""
    if config.ranker == "oracle":
        return OracleScorer()
    if config.ranker == "prompt-length":
        return PromptLengthScorer()
    return None


def build_scorer(config: PARSConfig, tokenizer: Any, online: bool = False) -> Scorer:
    """The scorer named by ``config.ranker``, loaded where it will run (every error is a start-up error).

    ``online``: wrap a text ranker in an :class:`OnlineScorer` (when ``config.online`` is on).
    """
    cheap = cheap_scorer(config)
    if cheap is not None:
        return cheap
    scorer = TextRankerScorer(load_ranker(config), tokenizer, name=config.ranker, threads=config.threads)
    return OnlineScorer(scorer, config.online) if online and config.online.enabled else scorer


def load_ranker(config: PARSConfig) -> Any:
    """The text ranker of ``config``: a ranker folder, the default ranker, or ``pkg.module:attr``."""
    kind = config.ranker_kind()
    if config.ranker == "default" or kind == "folder":
        from pars_fast.ranker import Ranker, RankerLoadError

        path = default_ranker_path() if config.ranker == "default" else Path(config.ranker).expanduser()
        device = None if config.device == "auto" else config.device
        try:
            ranker = Ranker.load(path, backend=_serving_backend(config.backend, device), device=device)
        except RankerLoadError as exc:
            raise PARSConfigError(f"PARS: {exc}") from exc
        if config.max_prompt_tokens:  # read more or fewer prompt tokens than the ranker was trained on
            ranker.config.max_prompt_tokens = config.max_prompt_tokens
            ranker.config.validate()
        return ranker
    return _import_ranker(config.ranker)


def _serving_backend(backend: str, device: str | None) -> str:
    """The backend a ranker scores with in the scheduler: "auto" on a CPU means the int8
    packed path, which costs 2.3x less CPU per prompt at the same ranking quality (the
    default ranker: test tau 0.408 int8 vs 0.407 fp32; docs/BENCHMARKS.md)."""
    if backend != "auto":
        return backend
    import torch

    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    return "torch-int8" if on_cpu else "auto"


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

# Recent events an event log keeps (see EventLog): enough for a once-a-second reader.
EVENT_LOG_RECENT = 256


def event_log() -> dict[str, Any]:
    """``{"count": events so far, "recent": the last EVENT_LOG_RECENT values, oldest first}``:
    per-event values a reader (pars_fast.vllm.prometheus) turns into a histogram."""
    return {"count": 0, "recent": []}


def log_event(log: dict[str, Any], value: float) -> None:
    log["count"] += 1
    recent = log["recent"]
    recent.append(value)
    if len(recent) > EVENT_LOG_RECENT:
        del recent[: len(recent) - EVENT_LOG_RECENT]


@dataclass
class ScoringStats:
    """Counters of one scorer. Seconds are on the scheduler's clock, summed."""

    requests_scored: int = 0  # got a usable score
    requests_fallback: int = 0  # kept their FCFS key instead (see fallback_reasons)
    requests_skipped: int = 0  # finished or aborted before the worker got to them
    batches: int = 0  # batches handed to the scorer
    failed_batches: int = 0  # batches with no usable scores (error, time limit, cool-down)
    scoring_seconds: float = 0.0  # decode + score, all batches
    decode_seconds: float = 0.0  # of which decoding token ids to text
    max_batch_seconds: float = 0.0
    fallback_reasons: dict[str, int] = field(default_factory=dict)  # reason -> requests
    last_fallback_reason: str | None = None
    scoring_batch_seconds: dict[str, Any] = field(default_factory=event_log)  # each batch that ran the ranker

    def record_batch(self, seconds: float) -> None:
        self.max_batch_seconds = max(self.max_batch_seconds, seconds)
        log_event(self.scoring_batch_seconds, seconds)

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
        clock: Clock = REAL_CLOCK,
    ) -> None:
        self.scorer = scorer
        self.fallback = fallback
        self.time_limit_s = time_limit_s
        self.clock = clock
        self.stats = ScoringStats()
        self._retry_at = -math.inf
        self._warned: set[str] = set()
        self.seconds_per_job = 0.0  # running estimate (EWMA), to size inline chunks under a budget

    def resting(self) -> bool:
        return self.clock.now() < self._retry_at

    def score(self, jobs: Sequence[ScoreJob], remeasure: bool = False) -> np.ndarray:
        """Finite score per job, or NaN for the ones to keep in FCFS position.

        ``remeasure``: this batch's cost per job replaces the running estimate instead of
        blending into it (a probe after a lock-out: the old estimate is what is in doubt).
        """
        n = len(jobs)
        if n == 0:
            return np.empty(0)
        stats = self.stats
        stats.batches += 1
        start = self.clock.now()
        if start < self._retry_at:
            return self._fail(n, "cool-down", "ranker paused after a failure", warn=False)
        try:
            raw, decode_s = self.scorer.score_jobs(jobs)
            scores = as_scores(raw, n)
        except Exception as exc:
            if self.fallback.on_error == "raise":
                raise
            self._retry_at = self.clock.now() + self.fallback.retry_after_s
            stats.scoring_seconds += self.clock.now() - start
            stats.record_batch(self.clock.now() - start)
            reason = "error" if not isinstance(exc, ScoreError) else "bad output"
            return self._fail(n, reason, f"{type(exc).__name__}: {exc}")
        elapsed = self.clock.now() - start
        stats.scoring_seconds += elapsed
        stats.decode_seconds += decode_s
        stats.record_batch(elapsed)
        per_job = elapsed / n
        if remeasure or self.seconds_per_job == 0:
            self.seconds_per_job = per_job
        else:
            self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * per_job
        limit = self.time_limit_s
        if limit is not None and elapsed > limit:
            if self.fallback.on_error == "raise":
                raise TimeoutError(f"PARS: scoring {n} prompts took {elapsed:.3f} s, over the {limit} s limit")
            self._retry_at = self.clock.now() + self.fallback.retry_after_s
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
