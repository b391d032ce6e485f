"""Ranking in simulated time: real scores, modelled cost.

The scheduler under simulation is the real ``PARSScheduler``; only what it would ask of
a ranker on the simulated server is replaced, through its runtime seams
(:class:`~pars_fast.vllm.runtime.SchedulerRuntime`):

* **Scores are real.** :func:`score_table` runs the actual ranker on the actual prompt
  texts once per (ranker, prompts) and caches base scores and pooled embeddings on
  disk (the online learner needs the embeddings). :class:`CachedRankerScorer` hands
  them out by request id, exactly where ``TextRankerScorer`` would compute them.
* **Their cost is modelled** (:class:`RankerCost`: a fixed cost per batch plus a cost
  per prompt). Inline, scoring advances the engine's virtual clock, so it lengthens the
  step as it would. In a worker, :class:`VirtualWorkerLink` stands in for the worker
  process: the real ``ScoringWorker`` parent side sends it jobs, and it answers each
  batch ``RankerCost`` seconds after the batch could start (one batch at a time, in
  order), so scores reach the scheduler as late as they would.

Where the costs come from (``RANKER_COSTS``): ``cpu`` was measured on this project's
2-core machine (the default ranker, int8, one thread, decode + features + encoder +
head); a GPU server's CPU cores are faster, so it is conservative there. ``gpu`` is an
estimate until a GPU run measures the Triton path (see the entry's ``source``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pars_fast.clock import Clock, VirtualClock
from pars_fast.vllm.scoring import GuardedScorer, OnlineScorer, ScoreJob

logger = logging.getLogger("pars_fast.sim")

__all__ = [
    "RANKER_COSTS",
    "CachedRankerScorer",
    "RankerCost",
    "ScoreTable",
    "VirtualWorkerLink",
    "ranker_cost",
    "score_table",
    "sim_runtime",
]


@dataclass(frozen=True)
class RankerCost:
    """Seconds a ranker takes to score a batch: ``per_batch_s + per_prompt_s * n``."""

    per_batch_s: float
    per_prompt_s: float
    source: str

    def batch_s(self, n: int) -> float:
        return self.per_batch_s + self.per_prompt_s * n if n > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Measured with `python benchmarks/ranker_cost.py` (see its docstring for the run); the
# GPU entry is an estimate until a device measures it.
RANKER_COSTS: dict[str, RankerCost] = {
    "cpu": RankerCost(
        per_batch_s=0.0088,
        per_prompt_s=0.0076,
        source="measured: the default ranker in the scheduler's worker path (Llama-3 token ids decoded, then "
        "torch-int8 MiniLM, 1 thread), ShareGPT test prompts, CPU time on this project's 2-core VM "
        "(python benchmarks/ranker_cost.py: 8.5-9.1 ms a batch + 7.6-7.7 ms a prompt in two runs)",
    ),
    "gpu": RankerCost(
        per_batch_s=0.0015,
        per_prompt_s=0.0002,
        source="estimate, not measured: MiniLM (22.7M params) on an H100 is launch-bound, ~1.5 ms a batch; "
        "per prompt ~0.2 ms of CPU-side decode and cheap features",
    ),
    "free": RankerCost(0.0, 0.0, source="no cost: what the order alone is worth"),
}


def ranker_cost(name: str) -> RankerCost:
    try:
        return RANKER_COSTS[name]
    except KeyError:
        raise ValueError(f"unknown ranker cost {name!r}; choose from {sorted(RANKER_COSTS)}") from None


# ---------------------------------------------------------------------- scores


@dataclass
class ScoreTable:
    """A ranker's base score (and pooled embedding) for each prompt of a workload's source."""

    ranker: str
    scores: np.ndarray  # [n_prompts] float64
    embeddings: np.ndarray | None  # [n_prompts, dim] float32


def score_table(ranker_dir: str | Path, prompts: Sequence[str], cache_dir: Path | None = None) -> ScoreTable:
    """Scores and embeddings of ``prompts`` by the ranker in ``ranker_dir``, cached on disk
    under ``cache_dir`` (default: ``$PARS_FAST_HOME/sim/scores``), keyed by the ranker's
    files and the prompts."""
    from pars_fast.paths import home

    ranker_dir = Path(ranker_dir)
    key = hashlib.sha256()
    for f in sorted(ranker_dir.rglob("*")):
        if f.is_file():
            key.update(f.name.encode())
            key.update(f.read_bytes())
    for p in prompts:
        key.update(p.encode())
        key.update(b"\0")
    cache_dir = cache_dir or home() / "sim" / "scores"
    path = cache_dir / f"{key.hexdigest()[:24]}.npz"
    if path.is_file():
        data = np.load(path)
        emb = data["embeddings"] if data["embeddings"].size else None
        return ScoreTable(str(ranker_dir), data["scores"], emb)
    from pars_fast.ranker import Ranker

    ranker = Ranker.load(ranker_dir)
    scores, emb = ranker.score_and_embed(list(prompts))
    scores = np.asarray(scores, dtype=np.float64)
    emb = None if emb is None else np.asarray(emb, dtype=np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, scores=scores, embeddings=emb if emb is not None else np.empty(0, dtype=np.float32))
    tmp.replace(path)
    return ScoreTable(str(ranker_dir), scores, emb)


class CachedRankerScorer:
    """``TextRankerScorer``'s place in the simulator: the cached scores of each request's
    prompt, looked up by request id (``sample_of``: request id -> prompt row of ``table``).

    ``clock``: advanced by ``cost`` for every batch (the inline scorer spends the engine's
    time; a worker model passes its own timeline)."""

    cheap = False

    def __init__(self, table: ScoreTable, sample_of: Callable[[str], int], cost: RankerCost, clock: Clock) -> None:
        self.table = table
        self.sample_of = sample_of
        self.cost = cost
        self.clock = clock
        self.name = f"cached:{Path(table.ranker).name}"

    def score_jobs(self, jobs: Sequence[ScoreJob]) -> tuple[np.ndarray, float]:
        scores, _, decode_s = self.score_and_embed(jobs, embed=False)
        return scores, decode_s

    def score_and_embed(self, jobs: Sequence[ScoreJob], embed: bool = True) -> tuple[np.ndarray, np.ndarray | None, float]:
        rows = np.fromiter((self.sample_of(j.request_id) for j in jobs), dtype=np.int64, count=len(jobs))
        if isinstance(self.clock, VirtualClock):
            self.clock.advance(self.cost.batch_s(len(jobs)))
        emb = self.table.embeddings[rows] if embed and self.table.embeddings is not None else None
        return self.table.scores[rows].copy(), emb, 0.0

    def warm_up(self) -> None:
        """Nothing to warm: the scores are computed."""


def _scorer(config: Any, table: ScoreTable, sample_of: Callable[[str], int], cost: RankerCost, clock: Clock) -> Any:
    inner = CachedRankerScorer(table, sample_of, cost, clock)
    return OnlineScorer(inner, config.online) if config.online.enabled else inner


# ---------------------------------------------------------------------- the worker, modelled


@dataclass
class _Job:
    job: ScoreJob
    sent_at: float


class VirtualWorkerLink:
    """A scoring worker process on simulated time (the ``Link`` of ``ScoringWorker``).

    Jobs are scored one batch at a time, ``score_batch_max`` at most, each batch taking
    ``RankerCost`` seconds from when it could start: when the worker finished its last
    batch and its first job had been sent. The answer is readable once the engine's
    clock reaches the batch's end. Cancelled jobs not yet started are skipped (and
    answered as skipped), as the real worker does. Finished requests (``observe``)
    teach the online learner when they are sent; requests that finished unscored are
    embedded when the worker has nothing to score, within ``online.cpu_fraction`` of its
    time, each batch at the same modelled cost.
    """

    def __init__(self, worker: Any, table: ScoreTable, sample_of: Callable[[str], int], cost: RankerCost, clock: VirtualClock) -> None:
        self.config = worker.config
        self.engine_clock = clock
        self.timeline = VirtualClock(clock.now())  # the worker's own time
        self.cost = cost
        self.scorer = _scorer(self.config, table, sample_of, cost, self.timeline)
        self.online = self.scorer if isinstance(self.scorer, OnlineScorer) else None
        self.guard = GuardedScorer(self.scorer, self.config.fallback, clock=self.timeline)
        self._pending: deque[_Job] = deque()
        self._cancelled: set[str] = set()
        self._outbox: deque[tuple[float, Any]] = deque()
        self._held: deque[Any] = deque()
        self._learn_after = 0.0
        self._outbox.append((clock.now(), ("ready", {"pid": None, "warmup_s": 0.0, "scorer": self.scorer.name, "simulated": True})))

    def _stats(self) -> dict[str, Any]:
        out = self.guard.stats.to_dict()
        if self.online is not None:
            out["online"] = self.online.stats()
        return out

    # -- Link

    def send(self, msg: Any) -> None:
        kind, payload = msg
        now = self.engine_clock.now()
        self._run_until(now)
        if kind == "score":
            self._pending.extend(_Job(job, now) for job in payload)
        elif kind == "cancel":
            self._cancelled.update(payload)
        elif kind == "observe" and self.online is not None:
            self.online.observe(payload)
        elif kind == "reset" and self.online is not None:
            self.online.reset()
            self._outbox.append((now, ("stats", self._stats())))
        elif kind == "sync":
            self._run_until(float("inf"))
            while self.online is not None and self.online.pending:
                self.online.learn_pending(self.config.score_batch_max)
            self._outbox.append((max(now, self.timeline.now()), ("synced", payload, self._stats())))
        elif kind == "stop":
            self._outbox.append((now, ("stopped", self._stats())))

    def recv(self, timeout: float) -> Any | None:
        if self._held:
            return self._held.popleft()
        now = self.engine_clock.now()
        self._run_until(now)
        if self._outbox and self._outbox[0][0] <= now:
            return self._outbox.popleft()[1]
        if timeout > 0:  # a blocking wait (tests, shutdown): waiting is time passing
            self._run_until(now + timeout)
            if self._outbox:
                self.engine_clock.advance_to(max(now, min(self._outbox[0][0], now + timeout)))
            else:
                self.engine_clock.advance(timeout)
            if self._outbox and self._outbox[0][0] <= self.engine_clock.now():
                return self._outbox.popleft()[1]
        return None

    def push_back(self, msgs: list[Any]) -> None:
        self._held.extendleft(reversed(msgs))

    def is_alive(self) -> bool:
        return True

    def kill(self, grace_s: float = 0.0) -> None:
        self._pending.clear()

    # -- the worker's timeline

    def _run_until(self, now: float) -> None:
        """Run every batch that starts by ``now``."""
        batch_max = self.config.score_batch_max
        while True:
            if self._pending:
                start = max(self.timeline.now(), self._pending[0].sent_at)
                if start > now:
                    return
                self.timeline.advance_to(start)
                batch: list[ScoreJob] = []
                skipped = 0
                while self._pending and len(batch) < batch_max and self._pending[0].sent_at <= start:
                    job = self._pending.popleft().job
                    if job.request_id in self._cancelled:
                        self._cancelled.discard(job.request_id)
                        self.guard.stats.requests_skipped += 1
                        skipped += 1
                    else:
                        batch.append(job)
                if not self._pending:
                    self._cancelled.clear()
                scores = self.guard.score(batch).tolist() if batch else []  # advances the timeline by the cost
                self._outbox.append(
                    (self.timeline.now(), ("scores", [j.request_id for j in batch], scores, self._stats(), skipped))
                )
            elif self.online is not None and self.online.pending:
                start = max(self.timeline.now(), self._learn_after)
                if start > now:
                    return
                self.timeline.advance_to(start)
                n = self.online.learn_pending(batch_max)
                spent = self.cost.batch_s(n)
                self.timeline.advance(spent)
                self._learn_after = self.timeline.now() + spent * (1.0 / self.config.online.cpu_fraction - 1.0)
            else:
                return


def sim_runtime(
    clock: VirtualClock,
    table: ScoreTable | None,
    sample_of: Callable[[str], int],
    cost: RankerCost,
) -> Any:
    """The runtime that puts ``PARSScheduler`` on simulated time: ``clock``, cached scores
    from ``table`` (None: a model-free ranker, which needs none), ranking cost ``cost``,
    and a GPU server's spare CPUs (``worker: "auto"`` picks a worker process)."""
    from pars_fast.vllm.runtime import SchedulerRuntime

    if table is None:
        return SchedulerRuntime(clock=clock, spare_cpus=True)
    return SchedulerRuntime(
        clock=clock,
        build_scorer=lambda config, _tokenizer: _scorer(config, table, sample_of, cost, clock),
        open_link=lambda worker: VirtualWorkerLink(worker, table, sample_of, cost, clock),
        spare_cpus=True,
    )


def load_cost_file(path: str | Path) -> RankerCost:
    data = json.loads(Path(path).read_text())
    return RankerCost(float(data["per_batch_s"]), float(data["per_prompt_s"]), str(data.get("source", path)))
