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
``fallback.retry_after_s``. A worker that dies is handled the same way. Messages
parent -> worker: ``("score", [jobs])``, ``("cancel", [ids])``, ``("stop", None)``;
worker -> parent: ``("ready", info)``, ``("error", text)``, ``("scores", ids, scores,
stats)``, ``("stopped", stats)``.
"""

from __future__ import annotations

import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from pars_fast.vllm.config import PARSConfig, PARSConfigError
from pars_fast.vllm.scoring import (
    GuardedScorer,
    Observation,
    OnlineScorer,
    ScoreJob,
    Scorer,
    ScoringStats,
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


def serve(scorer: Scorer, config: PARSConfig, chan: Channel) -> None:
    """Score jobs as they come, ``config.score_batch_max`` at a time, until told to stop.

    Cancelled jobs (their request finished or was aborted meanwhile) are skipped. With
    an :class:`~pars_fast.vllm.scoring.OnlineScorer`, finished requests (``observe``)
    are learned from at once, and those that were never scored are embedded when there
    is nothing to score, within ``online.cpu_fraction`` of the worker's time. Blocks
    only when it has nothing to do.
    """
    guard = GuardedScorer(scorer, config.fallback)
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
        now = time.monotonic()
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
        while pending and len(batch) < config.score_batch_max:
            job = pending.popleft()
            if job.request_id in cancelled:
                cancelled.discard(job.request_id)
                guard.stats.requests_skipped += 1
            else:
                batch.append(job)
        if not pending:
            cancelled.clear()  # ids whose scores were already on their way back
        if batch:
            scores = guard.score(batch)
            chan.send(("scores", [j.request_id for j in batch], scores.tolist(), stats()))
        elif online is not None and online.pending and time.monotonic() >= next_learn:
            start = time.monotonic()
            try:
                online.learn_pending(config.score_batch_max)
            except Exception as exc:  # learning is best effort; scoring goes on
                logger.warning("PARS: online learning from unscored requests failed (%s: %s)", type(exc).__name__, exc)
                online.reset()
            spent = time.monotonic() - start
            next_learn = time.monotonic() + spent * (1.0 / config.online.cpu_fraction - 1.0)
            chan.send(("stats", stats()))


# ---------------------------------------------------------------------- parent side


@dataclass
class WorkerCounters:
    """What the scheduler's side of the worker saw."""

    starts: int = 0
    restarts: int = 0  # after a hang or a death
    hung: int = 0  # workers given up on (no progress for deadline_s)
    died: int = 0
    jobs_submitted: int = 0
    jobs_cancelled: int = 0
    jobs_given_up: int = 0  # in flight when their worker hung or died: FCFS
    late_scores: int = 0  # answers for cancelled or given-up jobs, dropped
    worker_stats: dict[str, Any] = field(default_factory=lambda: ScoringStats().to_dict())


class ScoringWorker:
    """The scheduler's handle on a scoring worker (``mode`` ``"process"`` or ``"thread"``).

    ``start()`` launches it and waits until its ranker is loaded and warmed up (a bad
    ranker fails the engine's start-up, with the worker's error). Afterwards nothing
    here blocks: ``submit``/``cancel`` send a message, ``poll`` drains the answers.
    """

    def __init__(
        self,
        config: PARSConfig,
        tokenizer: Any,
        mode: str,
        cpus: Sequence[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if mode not in ("process", "thread"):
            raise ValueError(f"worker mode must be 'process' or 'thread', got {mode!r}")
        self.config = config
        self.tokenizer = tokenizer
        self.mode = mode
        self.cpus = list(cpus) if cpus else None
        self.clock = clock
        self.counters = WorkerCounters()
        self.info: dict[str, Any] = {}
        self._link: _Link | None = None
        self._inflight: dict[str, float] = {}  # request id -> submit time
        self._last_progress = 0.0
        self._restart_at: float | None = None
        self._synced = 0  # last sync token answered

    # -- lifecycle

    def start(self, wait: bool = True) -> None:
        link = _ProcessLink(self) if self.mode == "process" else _ThreadLink(self)
        self._link = link
        self._last_progress = self.clock()
        self.counters.starts += 1
        if not wait:
            return
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            msg = link.recv(timeout=max(0.0, deadline - time.monotonic()))
            if msg is None:
                link.kill()
                raise PARSConfigError(f"PARS: the scoring worker did not start within {STARTUP_TIMEOUT_S:g} s")
            if msg[0] == "ready":
                self.info = msg[1]
                return
            if msg[0] == "error":
                link.kill()
                raise PARSConfigError(f"PARS: the scoring worker failed to start: {msg[1]}")

    @property
    def alive(self) -> bool:
        return self._link is not None

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def close(self) -> None:
        """Stop the worker: let it finish its current batch, then exit (kill it if it won't)."""
        link, self._link = self._link, None
        if link is None:
            return
        try:
            link.send(("stop", None))
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while (msg := link.recv(timeout=max(0.0, deadline - time.monotonic()))) is not None:
                if msg[0] == "stopped":
                    self.counters.worker_stats = msg[1]
                    break
        except (OSError, EOFError):
            pass
        link.kill()
        self._inflight.clear()

    # -- traffic

    def submit(self, jobs: Sequence[ScoreJob]) -> bool:
        """Queue jobs for scoring; False (nothing sent) when no worker is running."""
        if self._link is None or not jobs:
            return False
        now = self.clock()
        if not self._inflight:
            self._last_progress = now  # the no-progress clock starts with the first job
        try:
            self._link.send(("score", list(jobs)))
        except (OSError, EOFError, ValueError):
            self._lost("died", f"its pipe closed ({self.mode} worker)")
            return False
        for job in jobs:
            self._inflight[job.request_id] = now
        self.counters.jobs_submitted += len(jobs)
        return True

    def cancel(self, request_ids: Sequence[str]) -> None:
        """Forget jobs whose requests finished; the worker skips them if it has not started them."""
        ids = [rid for rid in request_ids if self._inflight.pop(rid, None) is not None]
        if ids:
            self.counters.jobs_cancelled += len(ids)
            self._send_quietly(("cancel", ids))

    def observe(self, observations: Sequence[Observation]) -> None:
        """Finished requests, for the online learner (dropped while no worker runs)."""
        self._send_quietly(("observe", list(observations)))

    def reset(self) -> None:
        """Make the worker forget what traffic taught its online learner."""
        self._send_quietly(("reset", None))

    def _send_quietly(self, msg: Any) -> None:
        if self._link is not None:
            try:
                self._link.send(msg)
            except (OSError, EOFError, ValueError):
                pass  # noticed at the next poll

    def poll(self) -> tuple[list[tuple[str, float]], list[str]]:
        """``(scores that arrived, request ids given up on)``; never blocks.

        Also restarts a worker that hung or died, once ``retry_after_s`` has passed.
        """
        results: list[tuple[str, float]] = []
        given_up: list[str] = []
        now = self.clock()
        if self._link is None:
            if self._restart_at is not None and now >= self._restart_at:
                self._restart_at = None
                self.counters.restarts += 1
                logger.info("PARS: restarting the scoring worker")
                self.start(wait=False)
            return results, given_up
        while True:
            try:
                msg = self._link.recv(timeout=0.0)
            except (OSError, EOFError):
                msg = ("died", "its pipe closed")
            if msg is None:
                break
            kind = msg[0]
            if kind == "scores":
                _, ids, scores, stats = msg
                self._last_progress = now
                self.counters.worker_stats = stats
                for rid, score in zip(ids, scores):
                    if self._inflight.pop(rid, None) is not None:
                        results.append((rid, score))
                    else:  # its request finished or was aborted meanwhile
                        self.counters.late_scores += 1
            elif kind == "stats":
                self.counters.worker_stats = msg[1]
            elif kind == "synced":
                self.counters.worker_stats = msg[2]
                self._synced = max(self._synced, msg[1])
            elif kind == "ready":  # a restarted worker finished loading
                self.info = msg[1]
                self._last_progress = now
            elif kind in ("error", "died"):
                given_up += self._lost("died", msg[1])
                return results, given_up
        if not self._link.is_alive():
            given_up += self._lost("died", "it exited")
        elif self._inflight and now - self._last_progress > self.config.fallback.deadline_s:
            given_up += self._lost("hung", f"no scores for {now - self._last_progress:.1f} s")
        return results, given_up

    def sync(self, timeout_s: float = 60.0) -> bool:
        """Block until the worker has handled every message sent so far, its scores and
        stats included (tests and benchmarks only). The answers are kept for ``poll``."""
        if self._link is None:
            return False
        token = self._synced + 1
        self._send_quietly(("sync", token))
        deadline = time.monotonic() + timeout_s
        held: list[Any] = []
        while self._synced < token and time.monotonic() < deadline and self._link is not None:
            msg = self._link.recv(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
            if msg is None:
                continue
            if msg[0] == "synced":
                self.counters.worker_stats = msg[2]
                self._synced = max(self._synced, msg[1])
            else:
                held.append(msg)
        self._link_push_back(held)
        return self._synced >= token

    def _link_push_back(self, msgs: list[Any]) -> None:
        if msgs and self._link is not None:
            self._link.push_back(msgs)

    def wait_idle(self, timeout_s: float = 60.0) -> bool:
        """Block until every submitted job's score has arrived (tests and benchmarks only)."""
        deadline = time.monotonic() + timeout_s
        while self._inflight and self._link is not None and time.monotonic() < deadline:
            if self._link.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
                return True  # an answer is ready: the caller's poll() takes it
        return not self._inflight

    def _lost(self, what: str, detail: str) -> list[str]:
        """The worker hung or died: give up its jobs (FCFS), drop it, restart it later."""
        link, self._link = self._link, None
        if link is not None:
            link.kill()
        given_up = list(self._inflight)
        self._inflight.clear()
        self.counters.jobs_given_up += len(given_up)
        setattr(self.counters, what, getattr(self.counters, what) + 1)
        retry = self.config.fallback.retry_after_s
        self._restart_at = self.clock() + retry
        logger.warning(
            "PARS: the scoring worker %s (%s); %d request(s) keep their FCFS order; restarting it in %g s",
            what, detail, len(given_up), retry,
        )
        return given_up


# ---------------------------------------------------------------------- transports


class _Link(Protocol):
    def push_back(self, msgs: list[Any]) -> None: ...

    def send(self, msg: Any) -> None: ...

    def recv(self, timeout: float) -> Any | None: ...

    def wait(self, timeout: float) -> bool: ...

    def is_alive(self) -> bool: ...

    def kill(self) -> None: ...


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
        self._to_worker.put(msg)

    def push_back(self, msgs: list[Any]) -> None:
        self._held.extendleft(reversed(msgs))

    def recv(self, timeout: float) -> Any | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._from_worker.get(timeout=timeout) if timeout > 0 else self._from_worker.get_nowait()
        except queue.Empty:
            return None

    def wait(self, timeout: float) -> bool:
        if not self._held:
            msg = self.recv(timeout)
            if msg is not None:
                self._held.append(msg)
        return bool(self._held)

    def is_alive(self) -> bool:
        return self._thread.is_alive() or bool(self._held) or not self._from_worker.empty()

    def kill(self) -> None:
        # A thread cannot be killed: it is abandoned (a daemon), and its queues with it.
        self._to_worker.put(("stop", None))


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
    """A child process (``python -m pars_fast.vllm.worker FD``) over a socket pair."""

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

    def push_back(self, msgs: list[Any]) -> None:
        self._held.extendleft(reversed(msgs))

    def send(self, msg: Any) -> None:
        self._conn.send(msg)

    def recv(self, timeout: float) -> Any | None:
        if self._held:
            return self._held.popleft()
        if not self._conn.poll(timeout):
            return None
        return self._conn.recv()

    def wait(self, timeout: float) -> bool:
        return bool(self._held) or self._conn.poll(timeout)

    def is_alive(self) -> bool:
        return self._proc.poll() is None

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._conn.close()


def _warm_up(scorer: Scorer) -> dict[str, Any]:
    start = time.perf_counter()
    warm = getattr(scorer, "warm_up", None)
    if warm is not None:
        warm()
    return {"pid": os.getpid(), "warmup_s": time.perf_counter() - start, "scorer": scorer.name}


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
