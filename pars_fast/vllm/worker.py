"""The scoring worker: ranking off vLLM's critical path.

``PARSScheduler.schedule()`` never waits on the ranker. It hands :class:`ScoreJob` s
to a worker (:meth:`ScoringWorker.submit`, a message) and, at its next call, applies
whatever scores have come back (:meth:`ScoringWorker.poll`, non-blocking). Meanwhile
the worker decodes and scores them, batch by batch, while vLLM runs its model step.

Two placements share one loop (:func:`serve`) and one message protocol:

* ``"process"`` (the default for a text ranker): a child process started with
  ``python -m pars_fast.vllm.worker``. It has its own interpreter (no GIL shared with
  the engine core's busy loop) and its own torch thread settings; on vLLM's CPU
  backend it is pinned to the CPUs vLLM leaves to the engine core, so it never takes
  the model's cores, and it runs at a lower priority than the engine core (``nice``).
* ``"thread"``: a daemon thread in the engine-core process. Nothing to start, but it
  shares the interpreter, so its Python work competes with the engine core's loop.

docs/ARCHITECTURE.md ("Scoring off the critical path") has the measurements behind
the default.

Failure handling. A worker that raises turns the batch into NaN (FCFS) inside
:class:`~pars_fast.vllm.scoring.GuardedScorer`. A worker that makes no progress for
``fallback.deadline_s`` while it has jobs is declared hung: its jobs fall back to
FCFS, a process is killed (a thread is abandoned), and a new one starts after
``fallback.retry_after_s``. A worker that dies is handled the same way. A restarted
worker loads in the background and takes no jobs until it is ready; loading gets
``STARTUP_TIMEOUT_S``, not ``deadline_s`` (warm-up may include Triton autotuning).

Messages parent -> worker: ``("score", [jobs])``, ``("cancel", [ids])``,
``("observe", [observations])``, ``("reset", None)``, ``("sync", token)``,
``("stop", None)``; worker -> parent: ``("ready", info)``, ``("error", text)``,
``("scores", ids, scores, stats, skipped)`` (every job is answered once: scored, or
counted in ``skipped`` when cancelled before its batch), ``("stats", stats)``,
``("synced", token, stats)``, ``("stopped", stats)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from pars_fast.clock import REAL_CLOCK, Clock
from pars_fast.vllm.config import PARSConfig, PARSConfigError
from pars_fast.vllm.scoring import (
    GuardedScorer,
    Observation,
    OnlineScorer,
    ScoreJob,
    Scorer,
    ScoringStats,
    backend_check_of,
    build_scorer,
)

logger = logging.getLogger("pars_fast.vllm")

# Seconds to wait for a worker to load its ranker and warm up at engine start.
STARTUP_TIMEOUT_S = 300.0
# Seconds a worker gets to finish its batch and exit at shutdown before it is killed.
STOP_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------- the loop


class Channel(Protocol):
    """The worker's end of the message pipe."""

    def recv(self, timeout: float | None) -> Any | None:
        """The next message; waits up to ``timeout`` seconds (None: for ever), None if none came."""
        ...

    def send(self, msg: Any) -> None: ...


def serve(scorer: Scorer, config: PARSConfig, chan: Channel, clock: Clock = REAL_CLOCK) -> None:
    """Score jobs as they come, ``config.score_batch_max`` at a time, until told to stop.

    Every job is answered exactly once: with its score, or counted as skipped when it
    was cancelled (its request finished or was aborted meanwhile) before its batch
    started. With an :class:`~pars_fast.vllm.scoring.OnlineScorer`, finished requests
    (``observe``) are learned from at once, and those that were never scored are
    embedded when there is nothing to score, within ``online.cpu_fraction`` of the
    worker's time. Blocks only when it has nothing to do.
    """
    guard = GuardedScorer(scorer, config.fallback, clock=clock)
    online = scorer if isinstance(scorer, OnlineScorer) else None
    pending: deque[ScoreJob] = deque()
    cancelled: set[str] = set()
    next_learn = 0.0

    def stats() -> dict[str, Any]:
        out = guard.stats.to_dict()
        if online is not None:
            out["online"] = online.stats()
        return out

    while True:
        now = clock.now()
        if pending:
            timeout: float | None = 0.0
        elif online is not None and online.pending:
            timeout = max(0.0, next_learn - now)
        else:
            timeout = None
        msg = chan.recv(timeout)
        while msg is not None:
            kind, payload = msg
            if kind == "stop":
                chan.send(("stopped", stats()))
                return
            if kind == "score":
                pending.extend(payload)
            elif kind == "cancel":
                cancelled.update(payload)
            elif kind == "observe" and online is not None:
                online.observe(payload)
            elif kind == "reset" and online is not None:
                online.reset()
                chan.send(("stats", stats()))
            elif kind == "sync":  # everything sent before this is handled: learn the backlog too
                while online is not None and online.pending:
                    online.learn_pending(config.score_batch_max)
                chan.send(("synced", payload, stats()))
            msg = chan.recv(0.0)
        batch: list[ScoreJob] = []
        skipped = 0
        while pending and len(batch) < config.score_batch_max:
            job = pending.popleft()
            if job.request_id in cancelled:
                cancelled.discard(job.request_id)
                guard.stats.requests_skipped += 1
                skipped += 1
            else:
                batch.append(job)
        if not pending:
            cancelled.clear()  # ids whose scores were already on their way back
        if batch or skipped:
            scores = guard.score(batch).tolist() if batch else []
            chan.send(("scores", [j.request_id for j in batch], scores, stats(), skipped))
        elif online is not None and online.pending and clock.now() >= next_learn:
            start = clock.now()
            try:
                online.learn_pending(config.score_batch_max)
            except Exception as exc:  # learning is best effort; scoring goes on
                logger.warning("PARS: online learning from unscored requests failed (%s: %s)", type(exc).__name__, exc)
                online.reset()
            spent = clock.now() - start
            next_learn = clock.now() + spent * (1.0 / config.online.cpu_fraction - 1.0)
            chan.send(("stats", stats()))


# ---------------------------------------------------------------------- finished requests, compactly


class ObservationBatch:
    """Finished requests for the online learner, kept as columns of plain values: a
    sequence of :class:`~pars_fast.vllm.scoring.Observation` that builds each one only
    when read (in the worker).

    A GPU-sized step finishes dozens of requests. Building two frozen dataclasses for
    each (the observation and, for an unscored one, its job) in ``_free_request``, and
    pickling them in the sender thread, cost the engine about 3x what appending four
    values to lists costs (docs/BENCHMARKS.md, "A burst and a GPU-scale stream").
    """

    __slots__ = ("request_ids", "output_tokens", "flags", "prompts")

    CAPPED = 1  # stopped by max_tokens: "at least output_tokens"
    ABORTED = 2  # not a label: only forget the request

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.output_tokens: list[int] = []
        self.flags: list[int] = []
        # (prompt token ids, prompt tokens, max_tokens) of a request never scored, to embed it; else None
        self.prompts: list[tuple[Any, int, int | None] | None] = []

    def add(
        self,
        request_id: str,
        output_tokens: int,
        length_capped: bool,
        aborted: bool,
        prompt: tuple[Any, int, int | None] | None = None,
    ) -> None:
        self.request_ids.append(request_id)
        self.output_tokens.append(output_tokens)
        self.flags.append(self.CAPPED * length_capped | self.ABORTED * aborted)
        self.prompts.append(prompt)

    def __len__(self) -> int:
        return len(self.request_ids)

    def __getitem__(self, i: int) -> Observation:
        rid, flags, prompt = self.request_ids[i], self.flags[i], self.prompts[i]
        return Observation(
            request_id=rid,
            output_tokens=self.output_tokens[i],
            length_capped=bool(flags & self.CAPPED),
            aborted=bool(flags & self.ABORTED),
            job=None if prompt is None else ScoreJob(rid, *prompt),
        )

    def __iter__(self) -> Iterator[Observation]:
        return (self[i] for i in range(len(self.request_ids)))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_observation_batch, (self.request_ids, self.output_tokens, self.flags, self.prompts))


def _observation_batch(request_ids: list[str], output_tokens: list[int], flags: list[int], prompts: list[Any]) -> ObservationBatch:
    batch = ObservationBatch()
    batch.request_ids, batch.output_tokens, batch.flags, batch.prompts = request_ids, output_tokens, flags, prompts
    return batch


# ---------------------------------------------------------------------- parent side

# Messages the parent may have queued for a process worker before sends are refused
# (submit() sends fewer jobs, or none, and the rest stay unscored; observations are
# dropped and counted). A full queue means the worker is far behind; piling more on
# helps nobody.
SEND_QUEUE_MAX = 64
# Prompt tokens in one "score" message at most (a job with more still goes, alone). A
# process link's sender thread pickles a message in one call that holds the GIL: at
# about 12 ns a token id, 65,536 tokens hold it about 1 ms, so the engine thread never
# waits longer for it (a burst of 128 prompts of 2,000 tokens in one message held it
# 3.2 ms). docs/BENCHMARKS.md, "A burst and a GPU-scale stream".
MESSAGE_TOKENS_MAX = 65_536


@dataclass
class WorkerCounters:
    """What the scheduler's side of the worker saw."""

    starts: int = 0
    restarts: int = 0  # after a hang, a death or a load that never finished
    hung: int = 0  # workers given up on (no progress for deadline_s)
    died: int = 0
    load_timeouts: int = 0  # (re)starts that did not finish loading within STARTUP_TIMEOUT_S
    jobs_submitted: int = 0
    jobs_cancelled: int = 0
    jobs_given_up: int = 0  # in flight when their worker hung or died: FCFS
    sends_refused: int = 0  # submits refused because the send queue was full
    observations_dropped: int = 0  # finished requests not sent to the online learner (queue full or no worker)
    worker_stats: dict[str, Any] = field(default_factory=lambda: ScoringStats().to_dict())


class Link(Protocol):
    """The parent's end of a worker: a process, a thread, or (``pars_fast.sim``) a model of one.

    ``send`` never blocks; it raises ``QueueFullError`` when the link cannot take more
    now and ``OSError``/``EOFError`` when the worker is gone. ``recv`` waits at most
    ``timeout`` seconds and returns None if nothing came."""

    def send(self, msg: Any) -> None: ...

    def recv(self, timeout: float) -> Any | None: ...

    def push_back(self, msgs: list[Any]) -> None: ...

    def is_alive(self) -> bool: ...

    def kill(self, grace_s: float = 0.0) -> None:
        """End the worker: give it ``grace_s`` seconds to exit by itself (it answered
        "stopped"), then force it."""
        ...


class QueueFullError(RuntimeError):
    """The link's send queue is full: try again at a later step."""


class ScoringWorker:
    """The scheduler's handle on a scoring worker (``mode`` ``"process"`` or ``"thread"``).

    ``start()`` launches it and waits until its ranker is loaded and warmed up (a bad
    ranker fails the engine's start-up, with the worker's error). Afterwards nothing
    here blocks: ``submit``/``cancel``/``observe`` queue a message, ``poll`` drains
    the answers. A restarted worker loads in the background: it takes no jobs until it
    reports ready, and gets ``STARTUP_TIMEOUT_S`` to do so, apart from ``deadline_s``.

    It keeps no per-request state: the worker answers every job exactly once (a score,
    or "skipped" for a cancelled one), so a count of jobs outstanding is all it needs.
    Which request a score belongs to, and whether it still matters, is the scheduler's
    record (:mod:`pars_fast.vllm.book`).

    ``clock`` and ``open_link`` are the simulator's seams: a virtual clock, and a model
    of the worker in place of a process or thread.
    """

    def __init__(
        self,
        config: PARSConfig,
        tokenizer: Any,
        mode: str,
        cpus: Sequence[int] | None = None,
        clock: Clock = REAL_CLOCK,
        open_link: Callable[[ScoringWorker], Link] | None = None,
    ) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"worker mode must be 'process' or 'thread', got {mode!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.mode = mode
        self.cpus = list(cpus) if cpus else None
        self.clock = clock
        self._open_link = open_link
        self.counters = WorkerCounters()
        self.info: dict[str, Any] = {}
        self._link: Link | None = None
        self._ready = False
        self._loading_since = 0.0
        self._outstanding = 0  # jobs sent and not yet answered
        self._last_progress = 0.0
        self._restart_at: float | None = None
        self._synced = 0  # last sync token answered
        self._loss_unreported = False  # submit() found the worker gone: poll() reports it

    # -- lifecycle

    def start(self, wait: bool = True) -> None:
        """Launch the worker; with ``wait``, block until it is ready (engine start-up)."""
        if self._open_link is not None:
            link: Link = self._open_link(self)
        else:
            link = _ProcessLink(self) if self.mode == "process" else _ThreadLink(self)
        self._link = link
        self._ready = False
        self._loading_since = self.clock.now()
        self.counters.starts += 1
        if not wait:
            return
        deadline = self.clock.now() + STARTUP_TIMEOUT_S
        while not self._ready:
            remaining = deadline - self.clock.now()
            msg = link.recv(timeout=max(0.0, remaining))
            if msg is None:
                if remaining > 0:
                    continue
                link.kill()
                self._link = None
                raise PARSConfigError(f"PARS: the scoring worker did not start within {STARTUP_TIMEOUT_S:g} s")
            if msg[0] == "ready":
                self._on_ready(msg[1])
            elif msg[0] in ("error", "died"):
                link.kill()
                self._link = None
                raise PARSConfigError(f"PARS: the scoring worker failed to start: {msg[1]}")

    def _on_ready(self, info: dict[str, Any]) -> None:
        self.info = info
        self._ready = True
        self._last_progress = self.clock.now()  # the no-progress deadline counts from here

    @property
    def alive(self) -> bool:
        return self._link is not None

    @property
    def accepting(self) -> bool:
        """Whether ``submit`` can take jobs now: check it before building any."""
        return self._link is not None and self._ready

    @property
    def in_flight(self) -> int:
        """Jobs sent and not yet answered."""
        return self._outstanding

    def close(self) -> None:
        """Stop the worker: let it finish its current batch and exit; kill it if it has not
        answered "stopped", or not exited, within STOP_TIMEOUT_S."""
        link, self._link = self._link, None
        if link is None:
            return
        deadline = self.clock.now() + STOP_TIMEOUT_S
        grace = 0.0
        try:
            link.send(("stop", None))
            while (remaining := deadline - self.clock.now()) > 0:
                msg = link.recv(timeout=remaining)
                if msg is None:
                    continue
                if msg[0] == "stopped":
                    self.counters.worker_stats = msg[1]
                    # It is exiting: let it, for the rest of the time (SIGKILL only after that).
                    grace = max(0.0, deadline - self.clock.now())
                    break
        except (OSError, EOFError, QueueFullError):
            pass
        link.kill(grace_s=grace)
        self._outstanding = 0

    # -- traffic

    def submit(self, jobs: Sequence[ScoreJob]) -> int:
        """Queue jobs for scoring, in order; returns how many were sent (0 when the worker
        cannot take any now; fewer than ``len(jobs)`` when the link filled up meanwhile).

        One message holds at most ``score_batch_max`` jobs and MESSAGE_TOKENS_MAX prompt
        tokens, so no single hand-off is large (see MESSAGE_TOKENS_MAX)."""
        if not jobs or not self.accepting:
            return 0
        if self._outstanding == 0:
            self._last_progress = self.clock.now()  # the no-progress clock restarts with new work
        batch_max = self.config.score_batch_max
        sent = 0
        while sent < len(jobs):
            end, tokens = sent, 0
            while end < len(jobs) and end - sent < batch_max:
                ids = jobs[end].prompt_token_ids
                tokens += 0 if ids is None else len(ids)
                if tokens > MESSAGE_TOKENS_MAX and end > sent:
                    break
                end += 1
            try:
                self._link.send(("score", list(jobs[sent:end])))
            except QueueFullError:
                self.counters.sends_refused += 1
                break
            except (OSError, EOFError, ValueError):
                self._lost("died", f"its pipe closed ({self.mode} worker)")
                self._loss_unreported = True  # the next poll() tells the scheduler
                return 0  # everything outstanding, these included, was just given up
            self._outstanding += end - sent
            self.counters.jobs_submitted += end - sent
            sent = end
        return sent

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Jobs whose requests finished: the worker skips them if it has not started them
        (and answers "skipped"), else their scores come back and are dropped."""
        if request_ids and self._link is not None:
            self.counters.jobs_cancelled += len(request_ids)
            self._send_quietly(("cancel", list(request_ids)))

    def observe(self, observations: Sequence[Observation]) -> None:
        """Finished requests, for the online learner (dropped, and counted, when they cannot be sent)."""
        if not isinstance(observations, (list, ObservationBatch)):
            observations = list(observations)
        if not self._send_quietly(("observe", observations)):
            self.counters.observations_dropped += len(observations)

    def reset(self) -> None:
        """Make the worker forget what traffic taught its online learner."""
        self._send_quietly(("reset", None))

    def _send_quietly(self, msg: Any) -> bool:
        if self._link is None:
            return False
        try:
            self._link.send(msg)
            return True
        except (OSError, EOFError, ValueError, QueueFullError):
            return False  # a dead link is noticed at the next poll

    def poll(self) -> tuple[list[tuple[str, float]], bool]:
        """``(scores that arrived, lost)``; never blocks.

        ``lost``: the worker hung, died or never finished loading; every job that was
        outstanding is given up (the scheduler keeps those requests in FCFS order).
        Also restarts a lost worker once ``retry_after_s`` has passed.
        """
        results: list[tuple[str, float]] = []
        now = self.clock.now()
        if self._link is None:
            lost, self._loss_unreported = self._loss_unreported, False
            if not lost and self._restart_at is not None and now >= self._restart_at:
                self._restart_at = None
                self.counters.restarts += 1
                logger.info("PARS: restarting the scoring worker")
                self.start(wait=False)
            return results, lost
        while True:
            try:
                msg = self._link.recv(timeout=0.0)
            except (OSError, EOFError):
                msg = ("died", "its pipe closed")
            if msg is None:
                break
            kind = msg[0]
            if kind == "scores":
                _, ids, scores, stats, skipped = msg
                self._last_progress = now
                self._outstanding = max(0, self._outstanding - len(ids) - skipped)
                self.counters.worker_stats = stats
                results.extend(zip(ids, scores))
            elif kind == "stats":
                self.counters.worker_stats = msg[1]
            elif kind == "synced":
                self.counters.worker_stats = msg[2]
                self._synced = max(self._synced, msg[1])
            elif kind == "ready":  # a restarted worker finished loading
                self._on_ready(msg[1])
            elif kind in ("error", "died"):
                self._lost("died", msg[1])
                return results, True
        if not self._link.is_alive():
            self._lost("died", "it exited")
            return results, True
        if not self._ready:
            if now - self._loading_since > STARTUP_TIMEOUT_S:
                self.counters.load_timeouts += 1
                self._lost("hung", f"it did not finish loading in {STARTUP_TIMEOUT_S:g} s")
                return results, True
        elif self._outstanding and now - self._last_progress > self.config.fallback.deadline_s:
            self._lost("hung", f"no scores for {now - self._last_progress:.1f} s")
            return results, True
        return results, False

    def sync(self, timeout_s: float = 60.0) -> bool:
        """Block until the worker has handled every message sent so far, its scores and
        stats included (tests and benchmarks only). The answers are kept for ``poll``."""
        if self._link is None:
            return False
        token = self._synced + 1
        self._send_quietly(("sync", token))
        return self._wait_for(lambda msg: msg[0] == "synced" and msg[1] >= token, timeout_s, keep=False) is not None

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Block until the worker has answered every job sent so far (tests and benchmarks
        only). The answers are kept for ``poll``, which applies them."""
        if not self._outstanding:
            return True
        unanswered = self._outstanding

        def answers_all(msg: Any) -> bool:
            nonlocal unanswered
            if msg[0] == "scores":
                unanswered -= len(msg[2]) + msg[4]
            return unanswered <= 0 or msg[0] in ("error", "died")

        return self._wait_for(answers_all, timeout_s, keep=True) is not None

    def _wait_for(self, done: Callable[[Any], bool], timeout_s: float, keep: bool) -> Any | None:
        """Read messages until ``done(msg)``; push everything read back for ``poll`` (the
        matching message too when ``keep``). Returns the matching message or None."""
        deadline = self.clock.now() + timeout_s
        held: list[Any] = []
        found = None
        while self._link is not None and (remaining := deadline - self.clock.now()) > 0:
            msg = self._link.recv(timeout=min(0.05, remaining))
            if msg is None:
                continue
            if msg[0] == "synced":
                self.counters.worker_stats = msg[2]
                self._synced = max(self._synced, msg[1])
            if done(msg):
                found = msg
                if keep:
                    held.append(msg)
                break
            held.append(msg)
        if held and self._link is not None:
            self._link.push_back(held)
        return found

    def _lost(self, what: str, detail: str) -> None:
        """The worker hung or died: give up its jobs (FCFS), drop it, restart it later."""
        link, self._link = self._link, None
        if link is not None:
            link.kill()
        given_up, self._outstanding = self._outstanding, 0
        self._ready = False
        self.counters.jobs_given_up += given_up
        setattr(self.counters, what, getattr(self.counters, what) + 1)
        retry = self.config.fallback.retry_after_s
        self._restart_at = self.clock.now() + retry
        logger.warning(
            "PARS: the scoring worker %s (%s); %d request(s) keep their FCFS order; restarting it in %g s",
            what, detail, given_up, retry,
        )


# ---------------------------------------------------------------------- transports


class _QueueChannel:
    """The worker's end of a thread link."""

    def __init__(self, inbox: queue.SimpleQueue, outbox: queue.SimpleQueue) -> None:
        self.inbox, self.outbox = inbox, outbox

    def recv(self, timeout: float | None) -> Any | None:
        try:
            return self.inbox.get(block=timeout != 0.0, timeout=timeout or None)
        except queue.Empty:
            return None

    def send(self, msg: Any) -> None:
        self.outbox.put(msg)


class _ThreadLink:
    """A daemon thread in this process, with two queues."""

    def __init__(self, owner: ScoringWorker) -> None:
        self._to_worker: queue.SimpleQueue = queue.SimpleQueue()
        self._from_worker: queue.SimpleQueue = queue.SimpleQueue()
        self._held: deque[Any] = deque()
        chan = _QueueChannel(self._to_worker, self._from_worker)
        self._thread = threading.Thread(
            target=_thread_main, args=(owner.config, owner.tokenizer, chan), name="pars-scoring", daemon=True
        )
        self._thread.start()

    def send(self, msg: Any) -> None:
        if not self._thread.is_alive():
            raise EOFError("the scoring thread has exited")
        self._to_worker.put(msg)  # an unbounded in-process queue: never blocks

    def push_back(self, msgs: list[Any]) -> None:
        self._held.extendleft(reversed(msgs))

    def recv(self, timeout: float) -> Any | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._from_worker.get(timeout=timeout) if timeout > 0 else self._from_worker.get_nowait()
        except queue.Empty:
            return None

    def is_alive(self) -> bool:
        return self._thread.is_alive() or bool(self._held) or not self._from_worker.empty()

    def kill(self, grace_s: float = 0.0) -> None:
        # A thread cannot be killed: it is abandoned (a daemon), and its queues with it.
        self._to_worker.put(("stop", None))
        if grace_s > 0:
            self._thread.join(timeout=grace_s)


def _thread_main(config: PARSConfig, tokenizer: Any, chan: _QueueChannel) -> None:
    try:
        scorer = build_scorer(config, tokenizer, online=True)
        info = _warm_up(scorer)
    except Exception as exc:
        chan.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    chan.send(("ready", info))
    try:
        serve(scorer, config, chan)
    except Exception as exc:  # on_error="raise", or a bug: the parent gives its jobs up
        logger.exception("PARS: the scoring thread failed")
        chan.send(("error", f"{type(exc).__name__}: {exc}"))


class _ConnChannel:
    """The worker's end of a process link."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def recv(self, timeout: float | None) -> Any | None:
        if timeout is not None and not self.conn.poll(timeout):
            return None
        return self.conn.recv()

    def send(self, msg: Any) -> None:
        self.conn.send(msg)


class _ProcessLink:
    """A child process (``python -m pars_fast.vllm.worker FD``) over a socket pair.

    The engine thread never touches the socket. Sends go through a bounded queue to a
    sender thread, which pickles and writes them: a burst of long prompts is megabytes,
    and a blocking ``Connection.send`` would hold ``schedule()`` until the worker, busy
    with a batch, reads (``QueueFullError`` when ``SEND_QUEUE_MAX`` messages are waiting).
    Answers are read by a receiver thread into an in-process queue, so ``recv(0)`` and
    ``is_alive()`` make no system call: a poll of the socket and a ``waitpid`` cost each
    step 70 us (measured in the GPU-scale benchmark, where the step follows the model's
    wait on a cold cache). The worker's exit shows as the end of its socket.
    """

    def __init__(self, owner: ScoringWorker) -> None:
        parent_sock, child_sock = socket.socketpair()
        env = dict(os.environ)
        # The engine core may run with the CPU worker's OpenMP settings; the ranker sets its own.
        for key in ("OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"):
            env.pop(key, None)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pars_fast.vllm.worker", str(child_sock.fileno())],
            pass_fds=(child_sock.fileno(),),
            env=env,
        )
        child_sock.close()
        self._conn = Connection(parent_sock.detach())
        self._held: deque[Any] = deque()
        init = {
            "config": owner.config,
            "tokenizer": owner.tokenizer,
            "sys_path": list(sys.path),
            "cpus": owner.cpus,
            "nice": owner.config.nice,
        }
        self._conn.send_bytes(pickle.dumps(init))
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._send_error: BaseException | None = None
        self._ended = False  # the socket reached its end: the worker exited
        self._sender = threading.Thread(target=self._send_loop, name="pars-send", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="pars-recv", daemon=True)
        self._sender.start()
        self._receiver.start()

    def _send_loop(self) -> None:
        while True:
            msg = self._outbox.get()
            if msg is _CLOSE:
                return
            try:
                self._conn.send(msg)
            except (OSError, EOFError, ValueError) as exc:
                self._send_error = exc
                return

    def _recv_loop(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (OSError, EOFError) as exc:
                self._ended = True
                self._inbox.put(("died", f"its pipe closed ({type(exc).__name__})"))
                return
            except Exception as exc:  # a message that does not unpickle here: treat the worker as broken
                self._inbox.put(("error", f"unreadable message ({type(exc).__name__}: {exc})"))
                return
            self._inbox.put(msg)

    def push_back(self, msgs: list[Any]) -> None:
        self._held.extendleft(reversed(msgs))

    def send(self, msg: Any) -> None:
        if self._send_error is not None or not self._sender.is_alive():
            raise EOFError(f"the scoring worker's pipe closed ({self._send_error})")
        if self._outbox.qsize() >= SEND_QUEUE_MAX:
            raise QueueFullError(f"{SEND_QUEUE_MAX} messages are waiting to be sent")
        self._outbox.put(msg)

    def recv(self, timeout: float) -> Any | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
        except queue.Empty:
            return None

    def is_alive(self) -> bool:
        return not self._ended and self._send_error is None

    def kill(self, grace_s: float = 0.0) -> None:
        """SIGKILL the process unless it exits within ``grace_s`` (after "stopped" it is
        already on its way out: killing it then would only turn exit code 0 into -9)."""
        if self._proc.poll() is None and grace_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=grace_s)
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        # The worker is gone, so a send in progress fails at once and the socket ends:
        # both threads exit.
        self._outbox.put(_CLOSE)
        self._sender.join(timeout=1.0)
        self._receiver.join(timeout=1.0)
        self._conn.close()


# Tells a sender thread to exit.
_CLOSE = object()


def _warm_up(scorer: Scorer, clock: Clock = REAL_CLOCK) -> dict[str, Any]:
    start = clock.now()
    warm = getattr(scorer, "warm_up", None)
    if warm is not None:
        warm()
    info = {"pid": os.getpid(), "warmup_s": clock.now() - start, "scorer": scorer.name}
    check = backend_check_of(scorer)
    if check is not None:
        info["backend_check"] = check
    return info


def _process_main(fd: int) -> int:
    """Entry point of the worker process: read the init message, load, warm up, serve."""
    conn = Connection(fd)
    logging.basicConfig(level=logging.INFO, format=f"(PARSWorker pid={os.getpid()}) %(levelname)s %(message)s")
    try:
        init = pickle.loads(conn.recv_bytes())
        for path in init["sys_path"]:  # the engine core's import path (e.g. a user's ranker module)
            if path not in sys.path:
                sys.path.append(path)
        if init["cpus"]:
            os.sched_setaffinity(0, init["cpus"])
        if init["nice"]:
            os.nice(init["nice"])
        config: PARSConfig = init["config"]
        if config.threads is not None:
            import torch

            torch.set_num_threads(config.threads)
        scorer = build_scorer(config, init["tokenizer"], online=True)
        info = _warm_up(scorer)
        info["cpus"] = sorted(os.sched_getaffinity(0))
    except Exception as exc:
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return 1
    conn.send(("ready", info))
    try:
        serve(scorer, config, _ConnChannel(conn))
    except (EOFError, OSError):
        return 0  # the engine core went away
    except Exception as exc:
        logging.getLogger("pars_fast.vllm").exception("PARS: the scoring worker failed")
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_process_main(int(sys.argv[1])))
