"""``PARSScheduler``: vLLM's V1 scheduler with a prompt-scored waiting queue.

How it plugs in (vLLM 0.32; the scheduler interface is not public, so it is pinned):

* ``__init__`` replaces ``self.waiting`` and ``self.kv_holding_waiting`` with
  ``ScoredRequestQueue`` right after ``Scheduler.__init__``, and starts the scoring
  worker (:mod:`pars_fast.vllm.worker`), which loads and warms up the ranker.
* ``add_request`` gives a new request an FCFS key and a record (:mod:`pars_fast.vllm.book`).
  It is in the queue from the start, so vLLM's counts and aborts see it like any request.
* ``schedule``, before vLLM's step: applies the scores the worker sent back (re-keying
  each request in O(log n)), or, with the ranker inline, scores what fits the step's
  budget. Then vLLM's step runs unchanged. After it, with a worker, the unscored
  requests still waiting are handed to it. It never waits on the ranker.
* ``_free_request`` (every finish and abort goes through it) forgets the request's
  record and cancels its scoring job if one is in flight.
* ``_update_request_as_session`` (a streaming-input session's next chunk) treats the
  session as a new arrival: FCFS key at its new arrival time, scored again.

**Score only when order matters.** A request that vLLM admits at once needs no score:
order cannot change when it runs. When and how much to rank is decided by
:class:`~pars_fast.vllm.policy.RankingPolicy` from plain numbers (queue depth, free
slots, the ranker's cost, the engine's time per request), so at light load the ranker
does nothing at all. The model-free rankers (oracle, prompt-length) cost microseconds
and score every arrival inline, before the step.

The key is ``Request.priority``, an int: ``round((score + w * log2(prompt tokens) + aging * (arrival_time - t0))
* PRIORITY_UNITS_PER_SCORE)`` (:mod:`pars_fast.aging`, the one aging mechanism). Aging
is in the int, so the same number drives vLLM's preemption: ``self.policy`` is set to PRIORITY,
whose victim is the running request with the largest ``(priority, arrival_time)``,
i.e. the longest predicted request net of aging. A request without a score keeps
the running mean score as its own: it holds its arrival-order place among the scored.
The prompt term (``prompt_weight``, text rankers only) is the prompt's own cost, known
at arrival, so it orders unscored requests too.

Time comes from one :class:`~pars_fast.clock.Clock` (``pars_runtime``, see
:mod:`pars_fast.vllm.runtime`): the machine's in production, a virtual one in
``pars_fast.sim``, which runs this very code on simulated time.

vLLM runs ``AsyncScheduler`` when async scheduling is on; ``PARSScheduler(...)`` then
builds a ``PARSAsyncScheduler`` (same PARS logic on top of ``AsyncScheduler``), so one
class name serves both modes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm.config import VllmConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.request_queue import SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from pars_fast.aging import PRIORITY_UNITS_PER_SCORE, aged_priority, prompt_cost
from pars_fast.queue import ScoredRequestQueue
from pars_fast.traces import TraceRow, TraceWriter
from pars_fast.vllm.book import RequestBook, ScoreState, Tracked
from pars_fast.vllm.compat import check_vllm_version
from pars_fast.vllm.config import PARSConfig
from pars_fast.vllm.policy import RankingPolicy
from pars_fast.vllm import prometheus
from pars_fast.vllm.runtime import SchedulerRuntime
from pars_fast.vllm.scoring import (
    PROMPT_DECODE_CAP,
    GuardedScorer,
    Observation,
    OnlineScorer,
    ScoreJob,
    ScoringStats,
    backend_check_of,
    build_scorer,
    cheap_scorer,
    default_ranker_path,
    event_log,
    log_event,
    record_fallback,
    served_tokenizer,
)
from pars_fast.vllm.worker import ObservationBatch, ScoringWorker

logger = logging.getLogger("pars_fast.vllm")

# An inline chunk sized to fit fallback.budget_s that takes this many times the budget
# means the ranker is too slow to score inline: it rests (fallback.retry_after_s).
INLINE_TIME_LIMIT_FACTOR = 3.0
# The stats file is rewritten at most this often while serving (and always when the
# engine goes idle and at shutdown).
STATS_FILE_INTERVAL_S = 1.0
# A worker holds at most this many batches of jobs at a time: enough that it never idles
# between steps, few enough that a burst of thousands is handed over a batch at a time
# (each step's hand-off stays small), oldest waiting first.
MAX_BATCHES_IN_FLIGHT = 4
# Seconds per step an inline online learner may spend learning from finished requests;
# the rest wait for the next steps (it runs on the engine thread).
ONLINE_INLINE_BUDGET_S = 0.002
# Finished requests an inline online learner may hold back before dropping the oldest.
ONLINE_INLINE_BACKLOG = 4096


@dataclass
class SchedulerCounters:
    """What the scheduler did with scores (the worker counts what it scored)."""

    requests_unranked: int = 0  # finished unscored (admitted at once, or ranked FCFS under fallback.max_share)
    scores_applied: int = 0  # scores that re-keyed a live request
    scores_late: int = 0  # scores that came back after their request finished, or for a prompt that changed
    rekeyed_waiting: int = 0
    rekeyed_running: int = 0  # scored after admission: the score orders preemption only
    online_resets: int = 0  # reset_prefix_cache() calls that cleared the online learner
    rank_steps: int = 0  # steps that scored inline or handed jobs to the worker
    remote_kv_unranked: int = 0  # P/D decode-side requests: vLLM drains them first, so never scored
    sessions_rescored: int = 0  # streaming-input sessions whose next chunk made them a new arrival
    online_dropped: int = 0  # finished requests an inline online learner had no time for


class PARSScheduler(Scheduler):
    """vLLM V1 ``Scheduler`` that serves waiting requests in ascending PARS score order.

    Use it by name: ``--scheduler-cls pars_fast.vllm.PARSScheduler`` (settings in
    ``--additional-config '{"pars": {...}}'``, see ``pars_fast.vllm.config.PARSConfig``).
    Overrides, by vLLM method name: ``__init__``, ``add_request``, ``schedule``,
    ``_free_request``, ``_update_request_as_session``, ``reset_prefix_cache``,
    ``shutdown`` (plus ``__new__`` to pick the async variant).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> PARSScheduler:
        if cls is PARSScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                cls = PARSAsyncScheduler
        return super().__new__(cls)

    # vLLM: Scheduler.__init__
    def __init__(
        self, vllm_config: VllmConfig, *args: Any, pars_runtime: SchedulerRuntime | None = None, **kwargs: Any
    ) -> None:
        runtime = pars_runtime or SchedulerRuntime()
        self.clock = runtime.clock
        # Settings first: a bad config fails before vLLM sets up anything.
        config = self.pars_config = PARSConfig.from_vllm_config(vllm_config)
        _route_logs_like_vllm()
        check_vllm_version()  # warns (or, with PARS_FAST_STRICT_VLLM=1, fails) outside the tested range
        _warn_about_other_priority_users(vllm_config)
        if config.ranker == "default" and (runtime.build_scorer is None or runtime.open_link is None):
            default_ranker_path()  # fails now, with what to run, if it was never trained
        super().__init__(vllm_config, *args, **kwargs)
        # PARS owns the order of both waiting queues; aging is folded into the priority.
        self.waiting = ScoredRequestQueue()
        self.kv_holding_waiting = ScoredRequestQueue()
        # Preemption victim = max (priority, arrival_time) = longest predicted response.
        self.policy = SchedulingPolicy.PRIORITY
        self._aging = config.aging
        self._t0 = self.clock.wall()  # priorities count aging from here, to keep the ints small
        self._book = RequestBook(is_admitted=_is_admitted)
        self._mean_score = 0.0  # running mean of applied scores: where unscored requests queue
        self._num_scores = 0
        self._left_waiting = 0  # requests the last step could not admit
        self.counters = SchedulerCounters()
        self._ranking_queue_depth = event_log()  # requests waiting at each step that ranked
        self._given_up = ScoringStats()  # requests a hung or dead worker never scored
        self._warned_client_priority = False
        self._warned_budget = False
        self._next_log = self.clock.now() + config.log_interval_s
        self._stats_file = _stats_path(config.stats_file, vllm_config)
        self._metrics = prometheus.enabled()  # pars_fast_* on vLLM's /metrics (docs/METRICS.md)
        self._next_stats_write = 0.0

        # Where scoring runs. Model-free scorers, and "inline", run inside schedule().
        spare = runtime.spare_cpus
        placement = None
        if spare is None:
            placement = _cpu_placement(vllm_config)
            spare = None if placement is None else bool(placement.spare)
        mode = config.worker_mode(spare_cpus=spare)
        self._guard: GuardedScorer | None = None
        self._worker: ScoringWorker | None = None
        self._inline_online: OnlineScorer | None = None
        self._decode_cap = PROMPT_DECODE_CAP
        tokenizer = None
        cheap = cheap_scorer(config)
        # The prompt's cost joins text rankers' scores; the references (oracle, prompt length) stay pure.
        self._prompt_weight = config.prompt_weight if cheap is None else 0.0
        if cheap is not None:
            self._guard = GuardedScorer(cheap, config.fallback, clock=self.clock)
            self._decode_cap = 0  # they read lengths, not text
        elif mode == "inline":
            if runtime.build_scorer is None:
                tokenizer = served_tokenizer(vllm_config.model_config)
                scorer = build_scorer(config, tokenizer, online=True)
            else:
                scorer = runtime.build_scorer(config, None)
            budget = config.fallback.budget_s
            limit = None if budget is None else INLINE_TIME_LIMIT_FACTOR * budget
            self._guard = GuardedScorer(scorer, config.fallback, time_limit_s=limit, clock=self.clock)
            warm_up = getattr(scorer, "warm_up", None)
            if warm_up is not None:
                warm_up()
            self._inline_online = scorer if isinstance(scorer, OnlineScorer) else None
        else:
            if runtime.open_link is None:
                tokenizer = served_tokenizer(vllm_config.model_config)
            self._worker = ScoringWorker(
                config, tokenizer, mode, cpus=_worker_cpus(config, placement), clock=self.clock, open_link=runtime.open_link
            )
            self._worker.start()  # loads and warms up the ranker; a bad one fails here
        self._max_in_flight = MAX_BATCHES_IN_FLIGHT * config.score_batch_max
        self._ranking = RankingPolicy(
            min_queue=(
                config.min_queue
                if config.min_queue != "auto"
                else auto_min_queue(self.max_num_running_reqs, self._worker.mode if self._worker is not None else "inline")
            ),
            budget_s=config.fallback.budget_s,
            max_share=config.fallback.max_share,
            batch_max=config.score_batch_max,
            rank_everything=cheap is not None,
        )
        # Online learning needs a text ranker; traces work with any scorer.
        self._online = (self._worker is not None and config.online.enabled) or self._inline_online is not None
        self._observations = self._new_observations()
        self._cancels: list[str] = []  # finished requests whose jobs the worker may skip: sent once a step
        self._trace: TraceWriter | None = None
        if config.trace is not None:
            if config.trace.prompts and tokenizer is None:
                tokenizer = served_tokenizer(vllm_config.model_config)
            self._trace = TraceWriter(config.trace, tokenizer)
        logger.info(
            "%s: ranker=%s scoring=%s aging=%g/s prompt_weight=%g min_queue=%d score_batch_max=%d%s",
            type(self).__name__,
            config.ranker,
            "inline" if self._worker is None else f"{mode} worker (pid {self._worker.info.get('pid')}, "
            f"cpus {self._worker.info.get('cpus', 'any')}, warm-up {self._worker.info.get('warmup_s', 0):.2f} s)",
            self._aging,
            self._prompt_weight,
            self._ranking.min_queue,
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
            request.priority = self._priority(self._mean_score, request)
        super().add_request(request)
        if is_new:
            params = request.kv_transfer_params
            if params and params.get("do_remote_prefill"):
                # A P/D decode node: vLLM waits for the remote KV, then runs it ahead of the
                # queue; a score would order nothing.
                self._book.add(request, ScoreState.UNRANKED)
                self.counters.remote_kv_unranked += 1
            else:
                self._book.add(request)

    # vLLM: Scheduler.schedule
    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        if self._worker is not None:
            self._collect_scores()
        elif (
            self._book.num_waiting_unscored
            and self._ranking.queue_is_deep(self._queue_depth(), self._free_slots(), self._left_waiting)
            and self._book.has_waiting_unscored()
        ):
            self._score_inline()
        output = super().schedule(*args, **kwargs)
        if self._trace is not None or getattr(output, "preempted_req_ids", None):
            self._note_moves(output)
        self._left_waiting = self._queue_depth()
        # Everything for the worker goes at the end of the step, so that a process link's
        # sender thread pickles it while the model runs, not while the next step does.
        self._send_cancels()
        if (
            self._worker is not None
            and self._book.num_waiting_unscored
            and self._ranking.queue_is_deep(self._left_waiting, 0, self._left_waiting)
        ):
            self._submit_waiting()
        if self._observations:
            self._flush_observations()
        now = self.clock.now()
        if self.pars_config.log_interval_s and now >= self._next_log:
            self._log_stats()
        if (self._stats_file is not None or self._metrics) and now >= self._next_stats_write:
            self._write_stats()
        return output

    # vLLM: Scheduler._free_request (every finish and abort passes here)
    def _free_request(self, request: Request, *args: Any, **kwargs: Any) -> Any:
        rid = request.request_id
        rec = self._book.forget(rid)
        # Only a request that ran to its end measures the engine's time per request.
        status = request.status
        self._ranking.on_finish(
            self.clock.now(), ran=status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        )
        scored = rec is not None and rec.state is ScoreState.SCORED
        tried = rec is not None and rec.state is not ScoreState.UNSCORED  # it reached a scorer
        if rec is not None:
            if rec.state is ScoreState.UNSCORED:
                self.counters.requests_unranked += 1
            elif rec.state is ScoreState.SUBMITTED and self._worker is not None:
                self._cancels.append(rid)  # sent with the next step's messages
        if self._online:
            self._observe(request, scored=scored, tried=tried)
        if self._trace is not None:
            self._trace_row(request, rec)
        freed = super()._free_request(request, *args, **kwargs)
        if self._is_idle():  # send what finished, and the stats file shows the final counts
            self._ranking.on_idle()
            self._send_cancels()
            self._flush_observations(everything=True)
            self._write_stats()
        return freed

    # vLLM: Scheduler._update_request_as_session (a streaming-input session's next chunk)
    def _update_request_as_session(self, session: Request, update: Any) -> None:
        """The session's prompt grew and its arrival time was reset: for ordering it is a
        new arrival, so it gets a new FCFS key and is scored again (its old score was for
        a prompt it no longer has)."""
        super()._update_request_as_session(session, update)
        session.priority = self._priority(self._mean_score, session)
        for queue in (self.waiting, self.kv_holding_waiting):
            if session in queue:
                queue.update_request(session)
        rec = self._book.get(session.request_id)
        if rec is None:
            return
        self._book.preempted(session.request_id)  # it waits again
        self.counters.sessions_rescored += 1
        if rec.state is ScoreState.SUBMITTED:
            rec.rescore = True  # the score on its way is for the old prompt
        elif rec.state is not ScoreState.UNRANKED:
            self._book.set_state(rec, ScoreState.UNSCORED)

    # vLLM: Scheduler.reset_prefix_cache (also called in vLLM's cache-reset cascade after a weight update)
    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        """Also forget what the online learner learned: its labels came from the model as it was."""
        if self._online:
            self._observations = self._new_observations()
            if self._worker is not None:
                self._worker.reset()
            else:
                self._inline_online.reset()
            self.counters.online_resets += 1
        return super().reset_prefix_cache(*args, **kwargs)

    # vLLM: Scheduler.shutdown
    def shutdown(self) -> None:
        if self._worker is not None:
            self._send_cancels()
            self._flush_observations(everything=True)
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
            worker.update({k: v for k, v in self._worker.info.items() if k in ("pid", "cpus", "warmup_s", "backend_check")})
        else:
            scoring = self._guard.stats.to_dict() if self._guard is not None else ScoringStats().to_dict()
            worker = {"mode": "inline"}
            check = None if self._guard is None else backend_check_of(self._guard.scorer)
            if check is not None:
                worker["backend_check"] = check
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
        if self._online:
            scoring.setdefault("online", {})
        if self._trace is not None:
            scoring["trace"] = self._trace.stats()
        return {
            **scoring,
            **asdict(self.counters),
            **self._ranking.stats(),
            "worker": worker,
            "ranker": self.pars_config.ranker,
            "min_queue": self._ranking.min_queue,
            "prompt_weight": self._prompt_weight,
            "num_waiting": self._queue_depth(),
            "num_running": num_running,
            "num_unscored": self._book.num_unscored,
            "ranking_queue_depth": self._ranking_queue_depth,
        }

    def wait_for_scores(self, timeout_s: float = 60.0) -> bool:
        """Block until the worker has answered every job sent so far (tests and benchmarks
        only; vLLM never calls this). The next ``schedule()`` applies the scores."""
        if self._worker is None:
            return True
        self._send_cancels()
        return self._worker.wait_idle(timeout_s)

    def sync_worker(self, timeout_s: float = 60.0) -> bool:
        """Block until the worker has handled everything sent so far (finished requests
        learned from, stats current). Tests and benchmarks only."""
        if self._worker is None:
            self._flush_observations(everything=True)
            return True
        self._send_cancels()
        self._flush_observations(everything=True)
        return self._worker.sync(timeout_s)

    def _priority(self, score: float, request: Request) -> int:
        """The request's key: its score (or the mean score while it has none), plus the
        prompt's cost term, aged by its arrival time."""
        score += prompt_cost(request.num_prompt_tokens, self._prompt_weight)
        return aged_priority(score, request.arrival_time, self._t0, self._aging)

    def _queue_depth(self) -> int:
        """Requests queued for admission (a streaming session paused for input is queued,
        but waits for its client, not for a slot)."""
        return len(self.waiting) + len(self.kv_holding_waiting) - self.num_waiting_for_streaming_input

    def _free_slots(self) -> int:
        """Running slots free now (vLLM counts paused streaming sessions as active)."""
        cap = getattr(self, "max_num_active_reqs", self.max_num_running_reqs)
        return cap - len(self.running) - self.num_waiting_for_streaming_input

    def _is_idle(self) -> bool:
        """Nothing running or queued (sessions paused for input aside). Not ``self.requests``:
        a KV connector may hold finished requests there until their blocks are freed."""
        return len(self._book) <= self.num_waiting_for_streaming_input

    def _note_moves(self, output: SchedulerOutput) -> None:
        """Tell the book which requests this step preempted, and, for traces, which it
        admitted and resumed (the book needs no word of admissions otherwise)."""
        book = self._book
        if self._trace is not None:
            wall = self.clock.wall()
            for new in output.scheduled_new_reqs:
                book.admitted(new.req_id, wall)
            for rid in getattr(output.scheduled_cached_reqs, "resumed_req_ids", None) or ():
                book.admitted(rid, wall)
        for rid in getattr(output, "preempted_req_ids", None) or ():
            book.preempted(rid)

    def _job(self, request: Request) -> ScoreJob:
        return ScoreJob(
            request_id=request.request_id,
            prompt_token_ids=self._prompt_ids(request),
            num_prompt_tokens=request.num_prompt_tokens,
            max_tokens=request.max_tokens,
        )

    def _prompt_ids(self, request: Request) -> list[int] | None:
        """The token ids a scorer reads: the request's own list, not a copy (copying a
        burst's prompts cost the step milliseconds). Nothing changes a prompt but a
        streaming session's next chunk, so only a session's is copied, and a prompt over
        the decode cap is cut (a copy, rarely)."""
        ids = request.prompt_token_ids
        cap = self._decode_cap
        if ids is None or not cap:
            return None
        if len(ids) > cap or getattr(request, "resumable", False):
            return ids[:cap]
        return ids

    def _new_observations(self) -> ObservationBatch | deque[Observation]:
        """An empty buffer of finished requests for the online learner: columns for a
        worker (pickled by its sender thread), Observations for the inline learner."""
        return ObservationBatch() if self._worker is not None else deque()

    def _observe(self, request: Request, scored: bool, tried: bool) -> None:
        """Queue a finished request for the online learner (sent once per step).

        One whose score never came back (never submitted, or finished first) carries its
        prompt, so the worker can embed it and learn from it anyway.
        """
        status = request.status
        label = status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH_CAPPED)
        capped = status == RequestStatus.FINISHED_LENGTH_CAPPED
        observations = self._observations
        if isinstance(observations, ObservationBatch):
            prompt = None
            if not scored and label and self.pars_config.online.learn_unscored:
                prompt = (self._prompt_ids(request), request.num_prompt_tokens, request.max_tokens)
            observations.add(request.request_id, request.num_output_tokens, capped, not label, prompt)
            return
        # Inline, an unscored request would have to be embedded inside a step, so it is no
        # label. One that reached the scorer is still sent, as "aborted" (forget only): a NaN
        # score or an overrun batch left a record for it in the learner; the others left none.
        if not tried:
            return
        observations.append(
            Observation(
                request_id=request.request_id,
                output_tokens=request.num_output_tokens,
                length_capped=capped,
                aborted=not (label and scored),
            )
        )

    def _flush_observations(self, everything: bool = False) -> None:
        """Send finished requests to the worker's learner, or learn from them inline: on the
        engine thread, so at most ONLINE_INLINE_BUDGET_S per step (``everything``: all)."""
        if not self._observations:
            return
        if self._worker is not None:
            self._worker.observe(self._observations)
            self._observations = self._new_observations()
            return
        online = self._inline_online
        if online is None:
            self._observations.clear()
            return
        start = self.clock.now()
        while self._observations and (everything or self.clock.now() - start < ONLINE_INLINE_BUDGET_S):
            online.observe([self._observations.popleft()])
        while len(self._observations) > ONLINE_INLINE_BACKLOG:
            self._observations.popleft()
            self.counters.online_dropped += 1

    def _trace_row(self, request: Request, rec: Tracked | None) -> None:
        ids = request.prompt_token_ids
        admitted = None if rec is None else rec.admitted_at
        self._trace.write(
            TraceRow(
                request_id=request.request_id,
                arrival_time=request.arrival_time,
                finish_time=self.clock.wall(),
                prompt_tokens=request.num_prompt_tokens,
                output_tokens=request.num_output_tokens,
                finish_reason=_finish_reason(request.status),
                score=rec.score if rec is not None and rec.state is ScoreState.SCORED else None,
                queue_wait_s=None if admitted is None else max(0.0, admitted - request.arrival_time),
                ranker=self.pars_config.ranker,
                prompt_token_ids=list(ids) if self.pars_config.trace.prompts and ids is not None else None,
            )
        )

    def _note_ranking(self) -> None:
        self.counters.rank_steps += 1
        log_event(self._ranking_queue_depth, self._queue_depth())

    def _score_inline(self) -> None:
        """Score unscored requests in this step, waiting ones first, within
        ``fallback.budget_s`` (and not at all while ranking would cost more than
        ``fallback.max_share``); the policy sizes each chunk."""
        guard, policy = self._guard, self._ranking
        assert guard is not None
        if not policy.inline_pays(guard.seconds_per_job):
            return  # FCFS keys: a prompt costs too much of a request
        self._note_ranking()
        start = self.clock.now()
        spent = 0.0
        first = True
        while not guard.resting():
            locked_out = first and policy.locked_out(guard.seconds_per_job)
            n = policy.next_chunk(now=start + spent, spent_s=spent, cost_per_prompt=guard.seconds_per_job, first=first)
            if n == 0:
                if locked_out and not self._warned_budget:
                    self._warned_budget = True
                    logger.warning(
                        "PARS: one prompt costs the ranker %.1f ms, more than budget_s=%g s: requests stay in FCFS "
                        "order, and one prompt is scored every %g s to re-measure; raise fallback.budget_s or use a "
                        "cheaper ranker",
                        guard.seconds_per_job * 1e3, policy.budget_s, policy.probe_interval_s,
                    )
                break
            chunk = self._book.pick_unscored(n)
            if not chunk:
                break
            scores = guard.score([self._job(rec.request) for rec in chunk], remeasure=locked_out)
            for rec, score in zip(chunk, scores.tolist()):
                self._apply(rec, score)
            spent = self.clock.now() - start
            first = False
        policy.on_ranking(spent)
        if guard.resting():  # a failure paused the ranker: the rest keep FCFS keys for good
            rest = self._book.pick_unscored(self._book.num_unscored)
            for rec in rest:
                self._book.set_state(rec, ScoreState.UNRANKED)
            if rest:
                guard.score([self._job(rec.request) for rec in rest])  # counts them as cool-down fallbacks

    def _submit_waiting(self) -> None:
        """Hand the worker the unscored requests still waiting after this step, oldest
        first (then unscored running ones, whose score orders preemption), up to
        MAX_BATCHES_IN_FLIGHT batches in flight."""
        worker = self._worker
        if not worker.accepting:  # down or reloading: build nothing
            return
        chunk = self._book.pick_unscored(self._max_in_flight - worker.in_flight)
        if not chunk:
            return
        self._note_ranking()
        sent = worker.submit([self._job(rec.request) for rec in chunk])
        for rec in chunk[:sent]:
            self._book.set_state(rec, ScoreState.SUBMITTED)

    def _send_cancels(self) -> None:
        """Tell the worker which of its jobs finished (one message for the step's finishes)."""
        if self._cancels:
            if self._worker is not None:
                self._worker.cancel(self._cancels)
            self._cancels = []

    def _collect_scores(self) -> None:
        results, lost = self._worker.poll()
        book = self._book
        for request_id, score in results:
            rec = book.get(request_id)
            if rec is None or rec.state is not ScoreState.SUBMITTED:
                self.counters.scores_late += 1  # finished or aborted meanwhile
            elif rec.rescore:  # its prompt changed after it was sent: score it again
                rec.rescore = False
                book.set_state(rec, ScoreState.UNSCORED)
                self.counters.scores_late += 1
            else:
                self._apply(rec, score)
        if lost:
            given_up = book.with_state(ScoreState.SUBMITTED)
            for rec in given_up:
                book.set_state(rec, ScoreState.UNRANKED)
            if given_up:
                record_fallback(self._given_up, len(given_up), "worker lost", "the worker hung or died with these in flight")

    def _apply(self, rec: Tracked, score: float) -> None:
        """Re-key a request by its score (NaN: it keeps its FCFS key for good)."""
        if math.isnan(score):
            self._book.set_state(rec, ScoreState.UNRANKED)
            return
        self._book.set_state(rec, ScoreState.SCORED, score)
        self._num_scores += 1
        self._mean_score += (score - self._mean_score) / self._num_scores
        self.counters.scores_applied += 1
        request = rec.request
        priority = self._priority(score, request)
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
        self._next_log = self.clock.now() + self.pars_config.log_interval_s
        s = self.pars_stats()
        online = s.get("online") or {}
        logger.info(
            "PARS: scored=%d fallback=%d unranked=%d late=%d scoring=%.2fs (decode %.2fs, max batch %.1f ms) "
            "waiting=%d in_flight=%s%s",
            s["requests_scored"],
            s["requests_fallback"],
            s["requests_unranked"],
            s["scores_late"],
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
        """Publish the counters: to vLLM's /metrics and/or the stats file (at most once a
        STATS_FILE_INTERVAL_S while serving, and at idle and shutdown)."""
        if self._stats_file is None and not self._metrics:
            return
        self._next_stats_write = self.clock.now() + STATS_FILE_INTERVAL_S
        stats = self.pars_stats()
        if self._metrics:
            prometheus.publish(stats, getattr(self.vllm_config.parallel_config, "data_parallel_index", 0))
        if self._stats_file is None:
            return
        try:
            tmp = self._stats_file.with_name(f".{self._stats_file.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**stats, "time": self.clock.wall()}, indent=1) + "\n")
            os.replace(tmp, self._stats_file)  # atomic: a reader never sees half a file
        except OSError as exc:
            logger.warning("PARS: cannot write stats file %s (%s); no longer writing it", self._stats_file, exc)
            self._stats_file = None


# vLLM's statuses of an admitted request: running, or a streaming session paused between
# turns (it keeps its place; its next chunk makes it a new arrival).
_ADMITTED = frozenset({RequestStatus.RUNNING, RequestStatus.WAITING_FOR_STREAMING_REQ})


def _is_admitted(request: Request) -> bool:
    return request.status in _ADMITTED


def auto_min_queue(max_num_seqs: int, scoring: str) -> int:
    """``min_queue: "auto"``: rank once this many requests wait beyond what a step admits.

    ``scoring``: where the ranker runs. In a worker process (a GPU server's spare CPUs)
    ranking costs the engine nothing, so any backlog is ranked: on a simulated H100 the
    2 x ``max_num_seqs`` gate (2,048 there) kept PARS from ranking at all below 2x capacity
    (docs/BENCHMARKS.md, "Simulated GPU serving"). Inline or in a thread, ranking takes
    the engine core's time, so only a backlog of two full batches pays for it (measured
    on the CPU engine: docs/BENCHMARKS.md, "When to rank")."""
    return 1 if scoring == "process" else 2 * max_num_seqs


def _warn_about_other_priority_users(vllm_config: VllmConfig) -> None:
    """PARS writes ``Request.priority`` (scores x 1e6 plus aging): any other reader of it
    now sees those numbers. LMCache's vLLM connector skips saving the KV of requests whose
    priority exceeds its ``priority_limit``: with PARS that gate cuts at an arbitrary score."""
    limit = lmcache_priority_limit(getattr(vllm_config, "kv_transfer_config", None), os.environ)
    if limit is not None:
        logger.warning(
            "PARS: LMCache's priority_limit=%s is set, but PARS sets Request.priority to score x %d plus aging, so "
            "LMCache would skip saving the KV of requests by their predicted length; unset priority_limit "
            "(LMCACHE_PRIORITY_LIMIT, or its LMCACHE_CONFIG_FILE) when serving with PARS "
            "(docs/ARCHITECTURE.md, 'Other users of priority')",
            limit, PRIORITY_UNITS_PER_SCORE,
        )


def lmcache_priority_limit(kv_transfer_config: Any, environ: Mapping[str, str]) -> Any:
    """The ``priority_limit`` an LMCache connector of this engine would apply, or None.

    LMCache reads it from the connector's extra config (``lmcache.priority_limit``), else
    ``LMCACHE_PRIORITY_LIMIT``, else the YAML file named by ``LMCACHE_CONFIG_FILE`` (its
    remote config service is not read). A ``MultiConnector`` is searched through its
    ``connectors``. LMCache's multi-process connector (``LMCacheMPConnector``) has no
    such gate. 0 is a limit too (every request with a positive priority skipped)."""
    connectors = []
    stack = [kv_transfer_config]
    while stack:
        kv = stack.pop()
        name = str(_field(kv, "kv_connector") or "")
        extra = _field(kv, "kv_connector_extra_config") or {}
        if name == "MultiConnector":
            stack.extend(extra.get("connectors") or ())
        elif "lmcache" in name.lower() and name != "LMCacheMPConnector":
            connectors.append(extra)
    if not connectors:
        return None
    for extra in connectors:  # the last word: vLLM's --kv-transfer-config
        if extra.get("lmcache.priority_limit") is not None:
            return extra["lmcache.priority_limit"]
    if environ.get("LMCACHE_PRIORITY_LIMIT") not in (None, ""):
        return environ["LMCACHE_PRIORITY_LIMIT"]
    path = environ.get("LMCACHE_CONFIG_FILE")
    if path:
        import yaml  # vLLM's own dependency

        try:
            with open(path) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:  # LMCache itself will complain; PARS only checks
            logger.debug("PARS: could not read LMCACHE_CONFIG_FILE %s (%s)", path, exc)
        else:
            if isinstance(loaded, dict) and loaded.get("priority_limit") is not None:
                return loaded["priority_limit"]
    return None


def _field(obj: Any, name: str) -> Any:
    """A KV transfer config's field, whether it is vLLM's object or a plain dict (MultiConnector's entries)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


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
