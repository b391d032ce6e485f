"""``PARSScheduler``: vLLM's V1 scheduler with a prompt-scored waiting queue.

How it plugs in (vLLM 0.32; the scheduler interface is not public, so it is pinned):

* ``__init__`` replaces ``self.waiting`` and ``self.kv_holding_waiting`` with
  ``ScoredRequestQueue`` right after ``Scheduler.__init__``; vLLM's own loop then pops
  them in key order.
* ``add_request`` gives a new request an FCFS key and notes it as unscored. It is in
  the queue from the start, so vLLM's counts and aborts see it like any request.
* ``schedule`` first scores the unscored arrivals in one batch and re-keys them in the
  heap (O(log n) each), then runs vLLM's step unchanged.

The key is ``Request.priority``, an int: ``round((score + aging * (arrival_time - t0))
* PRIORITY_UNITS_PER_SCORE)``. Aging is folded into the int (not left to the queue),
so the same number drives vLLM's preemption: ``self.policy`` is set to PRIORITY,
whose victim is the running request with the largest ``(priority, arrival_time)``,
i.e. the longest predicted response net of aging. Requests the ranker could not score
keep the running mean score as theirs, so they keep arrival order among themselves.

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
from pathlib import Path
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from pars_fast.queue import ScoredRequestQueue
from pars_fast.vllm.config import PARSConfig
from pars_fast.vllm.scoring import ArrivalScorer, load_scorer

logger = logging.getLogger("pars_fast.vllm")

# Integer priority units per score unit. Fine enough that distinct float32 scores stay
# distinct; small enough that |score| <= 1e9 plus years of aging fit in int64 and in a
# double's 53-bit mantissa.
PRIORITY_UNITS_PER_SCORE = 1_000_000


class PARSScheduler(Scheduler):
    """vLLM V1 ``Scheduler`` that serves waiting requests in ascending PARS score order.

    Use it by name: ``--scheduler-cls pars_fast.vllm.PARSScheduler`` (settings in
    ``--additional-config '{"pars": {...}}'``, see ``pars_fast.vllm.config.PARSConfig``).
    Overrides, by vLLM method name: ``__init__``, ``add_request``, ``schedule``,
    ``shutdown`` (plus ``__new__`` to pick the async variant).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PARSScheduler:
        if cls is PARSScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                cls = PARSAsyncScheduler
        return super().__new__(cls)

    # vLLM: Scheduler.__init__
    def __init__(self, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        # Settings and ranker first: a bad config fails before vLLM sets up anything.
        self.pars_config = PARSConfig.from_vllm_config(vllm_config)
        _route_logs_like_vllm()
        scorer = load_scorer(self.pars_config, vllm_config.model_config)
        super().__init__(vllm_config, *args, **kwargs)
        # PARS owns the order of both waiting queues; aging is folded into the priority.
        self.waiting = ScoredRequestQueue()
        self.kv_holding_waiting = ScoredRequestQueue()
        # Preemption victim = max (priority, arrival_time) = longest predicted response.
        self.policy = SchedulingPolicy.PRIORITY
        self._arrival_scorer = ArrivalScorer(scorer, self.pars_config)
        self._unscored: deque[Request] = deque()
        self._aging = self.pars_config.aging
        self._t0 = time.time()  # priorities count aging from here, to keep the ints small
        self._warned_client_priority = False
        self._next_log = time.monotonic() + self.pars_config.log_interval_s
        self._stats_file = _stats_path(self.pars_config.stats_file, vllm_config)
        logger.info(
            "%s: ranker=%s aging=%g/s score_batch_max=%d",
            type(self).__name__,
            self.pars_config.ranker,
            self._aging,
            self.pars_config.score_batch_max,
        )

    # vLLM: Scheduler.add_request
    def add_request(self, request: Request) -> None:
        is_new = request.request_id not in self.requests
        if is_new:
            if request.priority and not self._warned_client_priority:
                self._warned_client_priority = True
                logger.warning("PARS: client request priorities are ignored; the ranker's score sets the order")
            # FCFS key until scored (and for good if scoring fails): set before vLLM queues it.
            request.priority = self._priority(self._arrival_scorer.mean_score, request.arrival_time)
        super().add_request(request)
        if is_new:
            self._unscored.append(request)

    # vLLM: Scheduler.schedule
    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        if self._unscored:
            self._score_arrivals()
        return super().schedule(throttle_prefills)

    # vLLM: Scheduler.shutdown
    def shutdown(self) -> None:
        self._write_stats()
        super().shutdown()

    # ------------------------------------------------------------------ PARS

    def pars_stats(self) -> dict[str, Any]:
        """Counters (requests scored, fallbacks, scoring seconds, ...) and queue lengths."""
        num_running, num_waiting = self.get_request_counts()
        return {
            **self._arrival_scorer.stats.to_dict(),
            "ranker": self.pars_config.ranker,
            "num_waiting": num_waiting,
            "num_running": num_running,
            "num_unscored": sum(not r.is_finished() for r in self._unscored),
        }

    def _priority(self, score: float, arrival_time: float) -> int:
        return round((score + self._aging * (arrival_time - self._t0)) * PRIORITY_UNITS_PER_SCORE)

    def _score_arrivals(self) -> None:
        """Score up to ``score_batch_max`` arrivals in one batch and re-key them."""
        batch: list[Request] = []
        limit = self.pars_config.score_batch_max
        while self._unscored and len(batch) < limit:
            request = self._unscored.popleft()
            if not request.is_finished():  # aborted while unscored: nothing to do
                batch.append(request)
        if not batch:
            return
        start = time.perf_counter()
        scores = self._arrival_scorer.score(batch)
        for request, score in zip(batch, scores.tolist()):
            if math.isnan(score):
                continue  # keeps its FCFS key
            priority = self._priority(score, request.arrival_time)
            if priority == request.priority:
                continue
            if request in self.waiting:
                request.priority = priority
                self.waiting.update_request(request)
            elif request in self.kv_holding_waiting:
                request.priority = priority
                self.kv_holding_waiting.update_request(request)
            else:  # already running (admitted while over score_batch_max): still orders preemption
                request.priority = priority
        if logger.isEnabledFor(logging.DEBUG):
            num_running, num_waiting = self.get_request_counts()
            logger.debug(
                "PARS: scored %d arrivals in %.2f ms (%d fallback so far); waiting=%d running=%d unscored=%d",
                len(batch),
                (time.perf_counter() - start) * 1e3,
                self._arrival_scorer.stats.requests_fallback,
                num_waiting,
                num_running,
                len(self._unscored),
            )
        self._write_stats()
        if self.pars_config.log_interval_s and time.monotonic() >= self._next_log:
            self._next_log = time.monotonic() + self.pars_config.log_interval_s
            s = self._arrival_scorer.stats
            logger.info(
                "PARS: scored=%d fallback=%d scoring=%.2fs (decode %.2fs, max batch %.1f ms) waiting=%d",
                s.requests_scored,
                s.requests_fallback,
                s.scoring_seconds,
                s.decode_seconds,
                s.max_batch_seconds * 1e3,
                self.get_request_counts()[1],
            )

    def _write_stats(self) -> None:
        if self._stats_file is None:
            return
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
