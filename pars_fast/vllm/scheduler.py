"""``PARSScheduler``: vLLM's V1 scheduler with a prompt-scored waiting queue.

How it plugs in (vLLM 0.32; the scheduler interface is not public, so it is pinned):

* ``__init__`` replaces ``self.waiting`` and ``self.kv_holding_waiting`` with
  ``ScoredRequestQueue`` right after ``Scheduler.__init__``, and starts the scoring
  worker (:mod:`pars_fast.vllm.worker`), which loads and warms up the ranker.
* ``add_request`` gives a new request an FCFS key and notes it as unscored. It is in
  the queue from the start, so vLLM's counts and aborts see it like any request.
* ``schedule`` applies the scores that have come back (re-keying each request in
  O(log n)), runs vLLM's step unchanged, then hands the worker the unscored requests
  that are still waiting. It never waits on the ranker.
* ``_free_request`` (every finish and abort goes through it) forgets the request and
  cancels its scoring job if one is in flight.

**Score only when order matters.** A request that vLLM admits at once, because nothing
is queued ahead of it, needs no score: order cannot change when it runs. So the ranker
only sees requests that are still waiting after a step (plus, in that case, running
requests without a score, whose score orders preemption). At light load it does
nothing at all. The model-free rankers (oracle, prompt-length) cost microseconds and
score every arrival inline, before the step.

The key is ``Request.priority``, an int: ``round((score + aging * (arrival_time - t0))
* PRIORITY_UNITS_PER_SCORE)``. Aging is folded into the int (not left to the queue),
so the same number drives vLLM's preemption: ``self.policy`` is set to PRIORITY,
whose victim is the running request with the largest ``(priority, arrival_time)``,
i.e. the longest predicted response net of aging. A request without a score keeps
the running mean score as its own: it holds its arrival-order place among the scored.

vLLM runs ``AsyncScheduler`` when async scheduling is on; ``PARSScheduler(...)`` then
builds a ``PARSAsyncScheduler`` (same PARS logic on top of ``AsyncScheduler``), so one
class name serves both modes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from pars_fast.queue import ScoredRequestQueue
from pars_fast.vllm.compat import check_vllm_version
from pars_fast.vllm.config import PARSConfig
from pars_fast.traces import TraceRow, TraceWriter
from pars_fast.vllm.scoring import (
    PROMPT_DECODE_CAP,
    GuardedScorer,
    Observation,
    OnlineScorer,
    ScoreJob,
    ScoringStats,
    build_scorer,
    cheap_scorer,
    default_ranker_path,
    record_fallback,
    served_tokenizer,
)
from pars_fast.vllm.worker import ScoringWorker

logger = logging.getLogger("pars_fast.vllm")

# Integer priority units per score unit. Fine enough that distinct float32 scores stay
# distinct; small enough that |score| <= 1e9 plus years of aging fit in int64 and in a
# double's 53-bit mantissa.
PRIORITY_UNITS_PER_SCORE = 1_000_000
# Inline scoring under a time budget sizes each chunk to fill at most this fraction of
# what is left of the budget, at the measured cost per prompt (a first chunk is 1 prompt).
INLINE_BUDGET_MARGIN = 0.5
# An inline chunk sized to fit fallback.budget_s that takes this many times the budget
# means the ranker is too slow to score inline: it rests (fallback.retry_after_s).
INLINE_TIME_LIMIT_FACTOR = 3.0
# The stats file is rewritten at most this often while serving (and always when the
# engine goes idle and at shutdown).
STATS_FILE_INTERVAL_S = 1.0
# fallback.max_share compares a prompt's ranking cost with the engine's seconds per
# request: the mean gap between its last finishes while busy, less the inline ranking
# inside each gap, once MIN_FINISHES are known.
FINISH_WINDOW = 64
MIN_FINISHES = 8
# Seconds of inline ranking allowed after an idle period before MIN_FINISHES are known.
WARMUP_RANKING_S = 1.0


@dataclass
class SchedulerCounters:
    """What the scheduler did with scores (the worker counts what it scored)."""

    requests_unranked: int = 0  # finished unscored (admitted at once, or ranked FCFS under fallback.max_share)
    scores_applied: int = 0  # scores that re-keyed a live request
    scores_late: int = 0  # scores that came back after their request finished or was aborted
    rekeyed_waiting: int = 0
    rekeyed_running: int = 0  # scored after admission: the score orders preemption only
    online_resets: int = 0  # reset_prefix_cache() calls that cleared the online learner
    share_limited_steps: int = 0  # steps that skipped inline ranking: it would cost over fallback.max_share


class PARSScheduler(Scheduler):
    """vLLM V1 ``Scheduler`` that serves waiting requests in ascending PARS score order.

    Use it by name: ``--scheduler-cls pars_fast.vllm.PARSScheduler`` (settings in
    ``--additional-config '{"pars": {...}}'``, see ``pars_fast.vllm.config.PARSConfig``).
    Overrides, by vLLM method name: ``__init__``, ``add_request``, ``schedule``,
    ``_free_request``, ``shutdown`` (plus ``__new__`` to pick the async variant).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PARSScheduler:
        if cls is PARSScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                cls = PARSAsyncScheduler
        return super().__new__(cls)

    # vLLM: Scheduler.__init__
    def __init__(self, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        # Settings first: a bad config fails before vLLM sets up anything.
        config = self.pars_config = PARSConfig.from_vllm_config(vllm_config)
        _route_logs_like_vllm()
        check_vllm_version()  # warns (or, with PARS_FAST_STRICT_VLLM=1, fails) outside the tested range
        if config.ranker == "default":
            default_ranker_path()  # fails now, with what to run, if it was never trained
        super().__init__(vllm_config, *args, **kwargs)
        # PARS owns the order of both waiting queues; aging is folded into the priority.
        self.waiting = ScoredRequestQueue()
        self.kv_holding_waiting = ScoredRequestQueue()
        # Preemption victim = max (priority, arrival_time) = longest predicted response.
        self.policy = SchedulingPolicy.PRIORITY
        self._aging = config.aging
        self._min_queue = config.min_queue if config.min_queue != "auto" else 2 * self.max_num_running_reqs
        self._t0 = time.time()  # priorities count aging from here, to keep the ints small
        self._unscored: dict[str, Request] = {}  # arrival order; not scored, not submitted
        self._mean_score = 0.0  # running mean of applied scores: where unscored requests queue
        self._num_scores = 0
        self.counters = SchedulerCounters()
        self._given_up = ScoringStats()  # requests a hung or dead worker never scored
        self._warned_client_priority = False
        self._warned_budget = False
        # Seconds between the last finishes while the engine was busy (fallback.max_share).
        self._finish_gaps: deque[float] = deque(maxlen=FINISH_WINDOW)
        self._last_finish: float | None = None
        self._ranking_since_finish = 0.0  # inline ranking inside the current gap: not the model's time
        self._ranking_since_idle = 0.0  # until MIN_FINISHES are known, at most WARMUP_RANKING_S of it
        self._next_log = time.monotonic() + config.log_interval_s
        self._stats_file = _stats_path(config.stats_file, vllm_config)
        self._next_stats_write = 0.0

        # Where scoring runs. Model-free scorers, and "inline", run inside schedule().
        placement = _cpu_placement(vllm_config)
        mode = config.worker_mode(spare_cpus=None if placement is None else bool(placement.spare))
        self._guard: GuardedScorer | None = None
        self._worker: ScoringWorker | None = None
        self._inline_online: OnlineScorer | None = None
        self._score_everything = False
        self._decode_cap = PROMPT_DECODE_CAP
        tokenizer = None
        cheap = cheap_scorer(config)
        if cheap is not None:
            self._guard = GuardedScorer(cheap, config.fallback)
            self._score_everything = True  # microseconds: score every arrival before the step
            self._decode_cap = 0  # they read lengths, not text
        else:
            tokenizer = served_tokenizer(vllm_config.model_config)
            if mode == "inline":
                scorer = build_scorer(config, tokenizer, online=True)
                budget = config.fallback.budget_s
                limit = None if budget is None else INLINE_TIME_LIMIT_FACTOR * budget
                self._guard = GuardedScorer(scorer, config.fallback, time_limit_s=limit)
                scorer.warm_up()
                self._inline_online = scorer if isinstance(scorer, OnlineScorer) else None
            else:
                self._worker = ScoringWorker(config, tokenizer, mode, cpus=_worker_cpus(config, placement))
                self._worker.start()  # loads and warms up the ranker; a bad one fails here
        # Online learning needs a text ranker; traces work with any scorer.
        self._online = (self._worker is not None and config.online.enabled) or self._inline_online is not None
        self._observations: list[Observation] = []
        self._scores: dict[str, float] = {}  # the score each live request is ordered by
        self._trace: TraceWriter | None = None
        if config.trace is not None:
            if config.trace.prompts and tokenizer is None:
                tokenizer = served_tokenizer(vllm_config.model_config)
            self._trace = TraceWriter(config.trace, tokenizer)
        self._first_scheduled: dict[str, float] = {}  # for traces: when each request was first admitted
        logger.info(
            "%s: ranker=%s scoring=%s aging=%g/s min_queue=%d score_batch_max=%d%s",
            type(self).__name__,
            config.ranker,
            "inline" if self._worker is None else f"{mode} worker (pid {self._worker.info.get('pid')}, "
            f"cpus {self._worker.info.get('cpus', 'any')}, warm-up {self._worker.info.get('warmup_s', 0):.2f} s)",
            self._aging,
            self._min_queue,
            config.score_batch_max,
            "" if config.fallback.budget_s is None else f" budget_s={config.fallback.budget_s:g}",
        )
        self._write_stats()

    # vLLM: Scheduler.add_request
    def add_request(self, request: Request) -> None:
        is_new = request.request_id not in self.requests
        if is_new:
            if request.priority and not self._warned_client_priority:
                self._warned_client_priority = True
                logger.warning("PARS: client request priorities are ignored; the ranker's score sets the order")
            # FCFS key until scored (and for good if it never is): set before vLLM queues it.
            request.priority = self._priority(self._mean_score, request.arrival_time)
        super().add_request(request)
        if is_new:
            self._unscored[request.request_id] = request

    # vLLM: Scheduler.schedule
    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        if self._worker is not None:
            self._collect_scores()
        elif self._unscored and (self._score_everything or self._queue_is_deep()):
            self._score_inline()
        output = super().schedule(*args, **kwargs)
        if self._worker is not None and self._unscored and self._queue_is_deep():
            self._submit_waiting()
        if self._trace is not None and output.scheduled_new_reqs:
            stamp = time.time()
            for new in output.scheduled_new_reqs:
                self._first_scheduled.setdefault(new.req_id, stamp)
        if self._observations:
            self._flush_observations()
        now = time.monotonic()
        if self.pars_config.log_interval_s and now >= self._next_log:
            self._log_stats()
        if self._stats_file is not None and now >= self._next_stats_write:
            self._write_stats()
        return output

    # vLLM: Scheduler._free_request (every finish and abort passes here)
    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        rid = request.request_id
        now = time.perf_counter()
        if self._last_finish is not None:
            # Without the ranking's own stalls: they would make an expensive ranker look cheap.
            self._finish_gaps.append(max(0.0, now - self._last_finish - self._ranking_since_finish))
        self._last_finish = now
        self._ranking_since_finish = 0.0
        unscored = self._unscored.pop(rid, None) is not None
        if unscored:
            self.counters.requests_unranked += 1
        elif self._worker is not None:
            self._worker.cancel((rid,))
        score = self._scores.pop(rid, None)
        if self._online:
            self._observe(request, scored=score is not None)
        if self._trace is not None:
            self._trace_row(request, score)
        freed = super()._free_request(request, *args, **kwargs)
        if not self.requests:  # idle now: send what finished, and the stats file shows the final counts
            # An idle gap is not the engine's time per request, and what finished before it
            # (warm-ups, another workload) is not what comes next: measure afresh.
            self._last_finish = None
            self._finish_gaps.clear()
            self._ranking_since_idle = 0.0
            self._flush_observations()
            self._write_stats()
        return freed

    # vLLM: Scheduler.reset_prefix_cache (also called in vLLM's cache-reset cascade after a weight update)
    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        """Also forget what the online learner learned: its labels came from the model as it was."""
        if self._online:
            self._observations.clear()
            if self._worker is not None:
                self._worker.reset()
            else:
                self._inline_online.reset()
            self.counters.online_resets += 1
        return super().reset_prefix_cache(*args, **kwargs)

    # vLLM: Scheduler.shutdown
    def shutdown(self) -> None:
        if self._worker is not None:
            self._flush_observations()
            self._worker.close()
        if self._trace is not None:
            self._trace.close()
        self._write_stats()
        super().shutdown()

    # ------------------------------------------------------------------ PARS

    def pars_stats(self) -> dict[str, Any]:
        """Counters (requests scored, fallbacks, scoring seconds, ...) and queue lengths."""
        if self._worker is not None:
            scoring = dict(self._worker.counters.worker_stats)
            worker: dict[str, Any] = {k: v for k, v in asdict(self._worker.counters).items() if k != "worker_stats"}
            worker["in_flight"] = self._worker.in_flight
            worker["mode"] = self._worker.mode
            worker.update({k: v for k, v in self._worker.info.items() if k in ("pid", "cpus", "warmup_s")})
        else:
            scoring = self._guard.stats.to_dict() if self._guard is not None else ScoringStats().to_dict()
            worker = {"mode": "inline"}
            if self._inline_online is not None:
                scoring["online"] = self._inline_online.stats()
        given_up = self._given_up
        if given_up.requests_fallback:
            scoring["requests_fallback"] += given_up.requests_fallback
            for reason, n in given_up.fallback_reasons.items():
                scoring["fallback_reasons"][reason] = scoring["fallback_reasons"].get(reason, 0) + n
            scoring["last_fallback_reason"] = given_up.last_fallback_reason
        # Not get_request_counts(): inside a finish, vLLM prunes `running` after freeing.
        num_running = sum(not r.is_finished() for r in self.running)
        num_waiting = len(self.waiting) + len(self.kv_holding_waiting)
        if self._online:
            scoring.setdefault("online", {})
        if self._trace is not None:
            scoring["trace"] = self._trace.stats()
        return {
            **scoring,
            **asdict(self.counters),
            "worker": worker,
            "ranker": self.pars_config.ranker,
            "num_waiting": num_waiting,
            "num_running": num_running,
            "num_unscored": len(self._unscored),
        }

    def wait_for_scores(self, timeout_s: float = 60.0) -> bool:
        """Block until the worker has answered every job it holds (tests and benchmarks only;
        vLLM never calls this). The next ``schedule()`` applies the scores."""
        return self._worker is None or self._worker.wait_idle(timeout_s)

    def sync_worker(self, timeout_s: float = 60.0) -> bool:
        """Block until the worker has handled everything sent so far (finished requests
        learned from, stats current). Tests and benchmarks only."""
        if self._worker is None:
            return True
        self._flush_observations()
        return self._worker.sync(timeout_s)

    def _priority(self, score: float, arrival_time: float) -> int:
        return round((score + self._aging * (arrival_time - self._t0)) * PRIORITY_UNITS_PER_SCORE)

    def _queue_is_deep(self) -> bool:
        """True when at least ``min_queue`` requests wait beyond what this step can admit.

        Below that, order is left alone (FCFS): reordering a queue a few requests deep
        gains next to nothing, and it is where a long request's wait stretches the tail.
        """
        active_cap = getattr(self, "max_num_active_reqs", self.max_num_running_reqs)
        free = active_cap - len(self.running) - getattr(self, "num_waiting_for_streaming_input", 0)
        return len(self.waiting) + len(self.kv_holding_waiting) - max(0, free) >= self._min_queue

    def _job(self, request: Request) -> ScoreJob:
        ids = request.prompt_token_ids
        return ScoreJob(
            request_id=request.request_id,
            prompt_token_ids=None if ids is None or not self._decode_cap else list(ids[: self._decode_cap]),
            num_prompt_tokens=request.num_prompt_tokens,
            max_tokens=request.max_tokens,
        )

    def _observe(self, request: Request, scored: bool) -> None:
        """Queue a finished request for the online learner (sent once per step).

        One whose score never came back (never submitted, or finished first) carries its
        prompt, so the worker can embed it and learn from it anyway.
        """
        status = request.status
        label = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        if not scored and self._inline_online is not None:
            return  # inline, an unscored request would have to be embedded inside a step: skipped
        job = self._job(request) if not scored and label and self.pars_config.online.learn_unscored else None
        self._observations.append(
            Observation(
                request_id=request.request_id,
                output_tokens=request.num_output_tokens,
                length_capped=status == RequestStatus.FINISHED_LENGTH_CAPPED,
                aborted=not label,
                job=job,
            )
        )

    def _flush_observations(self) -> None:
        if self._observations:
            if self._worker is not None:
                self._worker.observe(self._observations)
            elif self._inline_online is not None:
                self._inline_online.observe(self._observations)  # microseconds per request: no embedding
        self._observations = []

    def _trace_row(self, request: Request, score: float | None) -> None:
        rid = request.request_id
        admitted = self._first_scheduled.pop(rid, None)
        ids = request.prompt_token_ids
        self._trace.write(
            TraceRow(
                request_id=rid,
                arrival_time=request.arrival_time,
                finish_time=time.time(),
                prompt_tokens=request.num_prompt_tokens,
                output_tokens=request.num_output_tokens,
                finish_reason=_finish_reason(request.status),
                score=score,
                queue_wait_s=None if admitted is None else max(0.0, admitted - request.arrival_time),
                ranker=self.pars_config.ranker,
                prompt_token_ids=list(ids) if self.pars_config.trace.prompts and ids is not None else None,
            )
        )

    def _ranking_pays(self) -> bool:
        """``fallback.max_share``: rank inline only while a prompt costs the ranker at most
        this share of the engine's time per finished request (over the last finishes).

        Scoring inline is serial with the model. Where it costs a large part of what serving
        a request costs (short responses, a slow CPU), it slows the engine, which deepens the
        queue, which calls for more scoring; then FCFS is the better order.
        """
        share = self.pars_config.fallback.max_share
        per_job = self._guard.seconds_per_job if self._guard is not None else 0.0
        if share is None or self._score_everything or per_job == 0:
            return True
        if len(self._finish_gaps) < MIN_FINISHES:
            # Not measured yet. Ranking stalls delay the first finishes too (a short request
            # needs tens of steps), so an expensive ranker could rank a whole burst first.
            return self._ranking_since_idle < WARMUP_RANKING_S
        return per_job <= share * (sum(self._finish_gaps) / len(self._finish_gaps))

    def _score_inline(self) -> None:
        """Score unscored requests in this step, within ``fallback.budget_s`` if one is set
        (and not at all while ranking would cost more than ``fallback.max_share``)."""
        guard = self._guard
        assert guard is not None
        if not self._ranking_pays():
            self.counters.share_limited_steps += 1  # FCFS keys: a prompt costs too much of a request
            return
        pending = list(self._unscored.values())
        budget = self.pars_config.fallback.budget_s
        batch_max = self.pars_config.score_batch_max
        start = time.perf_counter()
        i = 0
        while i < len(pending) and not guard.resting():
            n = batch_max
            if budget is not None and not self._score_everything:
                # A chunk must fit what is left of the budget. Its size comes from the
                # measured cost per prompt, with a 2x margin: small chunks cost more per
                # prompt than the batches the estimate mostly comes from.
                remaining = budget - (time.perf_counter() - start)
                per_job = guard.seconds_per_job
                n = 1 if per_job == 0 else min(batch_max, int(INLINE_BUDGET_MARGIN * remaining / per_job))
                if n < 1 and i == 0 and 0 < per_job <= remaining:
                    # One prompt fits: score it. This also re-measures a cost that a cold first
                    # call inflated; without it, one slow call would keep the ranker out for good.
                    n = 1
                if n < 1 or remaining <= 0:
                    if i == 0 and not self._warned_budget and per_job > budget:
                        self._warned_budget = True
                        logger.warning(
                            "PARS: one prompt costs the ranker %.1f ms, more than budget_s=%g s: "
                            "requests stay in FCFS order until it fits; raise fallback.budget_s or use a cheaper ranker",
                            per_job * 1e3, budget,
                        )
                    break  # the rest wait for the next step, in FCFS position
            chunk = pending[i : i + n]
            i += len(chunk)
            scores = guard.score([self._job(r) for r in chunk])
            for request, score in zip(chunk, scores.tolist()):
                del self._unscored[request.request_id]
                self._apply(request, score)
        spent = time.perf_counter() - start
        self._ranking_since_finish += spent
        self._ranking_since_idle += spent
        if guard.resting():  # a failure paused the ranker: the rest keep FCFS keys for good
            rest = [r for r in pending[i:] if r.request_id in self._unscored]
            for r in rest:
                del self._unscored[r.request_id]
            if rest:
                guard.score([self._job(r) for r in rest])  # counts them as cool-down fallbacks

    def _submit_waiting(self) -> None:
        """Hand the worker every unscored request that is still waiting after this step.

        Running requests without a score go along (after them) once anything waits,
        because then a preemption may have to choose among them.
        """
        waiting, running = [], []
        for request in self._unscored.values():
            if request.status == RequestStatus.RUNNING:
                running.append(request)
            else:
                waiting.append(request)
        if not waiting:
            return
        batch = waiting + running
        if self._worker.submit([self._job(r) for r in batch]):
            for request in batch:
                del self._unscored[request.request_id]

    def _collect_scores(self) -> None:
        results, given_up = self._worker.poll()
        for request_id, score in results:
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                self.counters.scores_late += 1
            else:
                self._apply(request, score)
        if given_up:
            record_fallback(self._given_up, len(given_up), "worker lost", "the worker hung or died with these in flight")

    def _apply(self, request: Request, score: float) -> None:
        """Re-key ``request`` by its score (NaN: it keeps its FCFS key)."""
        if math.isnan(score):
            return
        self._num_scores += 1
        self._mean_score += (score - self._mean_score) / self._num_scores
        self.counters.scores_applied += 1
        self._scores[request.request_id] = score
        priority = self._priority(score, request.arrival_time)
        if priority == request.priority:
            return
        request.priority = priority
        if request in self.waiting:
            self.waiting.update_request(request)
            self.counters.rekeyed_waiting += 1
        elif request in self.kv_holding_waiting:
            self.kv_holding_waiting.update_request(request)
            self.counters.rekeyed_waiting += 1
        else:  # running: admitted before its score came; the score still orders preemption
            self.counters.rekeyed_running += 1

    def _log_stats(self) -> None:
        self._next_log = time.monotonic() + self.pars_config.log_interval_s
        s = self.pars_stats()
        online = s.get("online") or {}
        logger.info(
            "PARS: scored=%d fallback=%d unranked=%d late=%d scoring=%.2fs (decode %.2fs, max batch %.1f ms) "
            "waiting=%d in_flight=%s%s",
            s["requests_scored"],
            s["requests_fallback"],
            s["requests_unranked"],
            s["scores_late"] + s["worker"].get("late_scores", 0),
            s["scoring_seconds"],
            s["decode_seconds"],
            s["max_batch_seconds"] * 1e3,
            s["num_waiting"],
            s["worker"].get("in_flight", 0),
            f" online: weight={online.get('weight', 0):.2f} accuracy base/online/blend="
            f"{online.get('accuracy_base')}/{online.get('accuracy_online')}/{online.get('accuracy_blend')} "
            f"memory={online.get('memory', 0)}" if online else "",
        )

    def _write_stats(self) -> None:
        from pars_fast.vllm.prometheus import publish  # pars_fast_* on vLLM's /metrics (docs/METRICS.md)

        publish(self.pars_stats(), getattr(self.vllm_config.parallel_config, "data_parallel_index", 0))
        if self._stats_file is None:
            return
        self._next_stats_write = time.monotonic() + STATS_FILE_INTERVAL_S
        try:
            tmp = self._stats_file.with_name(f".{self._stats_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**self.pars_stats(), "time": time.time()}, indent=1) + "\n")
            os.replace(tmp, self._stats_file)  # atomic: a reader never sees half a file
        except OSError as exc:
            logger.warning("PARS: cannot write stats file %s (%s); no longer writing it", self._stats_file, exc)
            self._stats_file = None


class PARSAsyncScheduler(PARSScheduler, AsyncScheduler):
    """PARS on top of vLLM's ``AsyncScheduler``; ``PARSScheduler`` picks it when async scheduling is on."""

    def __init__(self, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        if not vllm_config.scheduler_config.async_scheduling:
            logger.warning("PARSAsyncScheduler used with async scheduling off; use PARSScheduler, which picks the base")


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    # vLLM reports "length" for these (prompt too long), but no token was generated.
    RequestStatus.FINISHED_IGNORED: "ignored",
}


def _finish_reason(status: RequestStatus) -> str:
    """vLLM's finish status as a trace's finish_reason ("stop", "length", "abort", ...)."""
    return _FINISH_REASONS.get(status) or status.name.lower().removeprefix("finished_")


@dataclass(frozen=True)
class _CpuPlacement:
    """How vLLM's CPU backend lays its processes over this machine's CPUs."""

    model: frozenset[int]  # the model workers' OpenMP threads are bound here
    reserved: frozenset[int]  # left to the engine core and the front end
    spare: tuple[int, ...]  # neither: free for a scoring worker


def _cpu_placement(vllm_config: VllmConfig) -> _CpuPlacement | None:
    """vLLM's CPU binding (None off the CPU backend, or if its helper moved)."""
    try:
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return None
        from vllm.utils.ompmultiprocessing import OMPProcessManager

        manager = OMPProcessManager(vllm_config)
        model = frozenset(cpu for cpus in getattr(manager, "cpu_lists", []) for cpu in cpus)
        reserved = frozenset(getattr(manager, "reserved_cpu_list", []))
    except Exception as exc:  # an internal vLLM helper: if it moves, place nothing
        logger.debug("PARS: cannot read vLLM's CPU binding (%s)", exc)
        return None
    spare = tuple(sorted(set(os.sched_getaffinity(0)) - model - reserved))
    return _CpuPlacement(model, reserved, spare)


def _worker_cpus(config: PARSConfig, placement: _CpuPlacement | None) -> list[int] | None:
    """CPUs for a process worker: the configured ones; on vLLM's CPU backend the spare ones,
    else any not bound to the model (the engine core's); elsewhere, unpinned."""
    if config.cpus != "auto":
        return list(config.cpus)
    if placement is None:
        return None
    if placement.spare:
        return list(placement.spare)
    free = sorted(set(os.sched_getaffinity(0)) - placement.model)
    return free or None


def _stats_path(template: str | None, vllm_config: VllmConfig) -> Path | None:
    if not template:
        return None
    rank = getattr(vllm_config.parallel_config, "data_parallel_index", 0)
    path = Path(template.format(pid=os.getpid(), dp_rank=rank)).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _route_logs_like_vllm() -> None:
    """Send pars_fast logs where vLLM's go, unless the application configured logging."""
    ours, root = logging.getLogger("pars_fast"), logging.getLogger()
    if ours.handlers or root.handlers:
        return
    vllm_logger = logging.getLogger("vllm")
    for handler in vllm_logger.handlers:
        ours.addHandler(handler)
    ours.setLevel(vllm_logger.level)
