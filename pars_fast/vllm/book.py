"""One record per live request: what PARS knows about it, from arrival to free.

``PARSScheduler`` keeps a :class:`Tracked` per request vLLM holds, in a
:class:`RequestBook`: its scoring state, its score, and when it was first admitted.
``_free_request`` forgets a request with one call (:meth:`RequestBook.forget`), so
nothing can outlive it; a score that comes back later finds no record and is dropped.

The book also answers, in O(1) per change, the one question scoring asks each step:
*which unscored requests, in which order?* (:meth:`RequestBook.pick_unscored`):
waiting ones first, oldest first (under FCFS keys they are the next to be admitted,
so their scores change the most), then running ones (admitted before they were
scored: their score only orders preemption). The scheduler tells the book when vLLM
admits, resumes or preempts a request (from each step's ``SchedulerOutput``), so the
two sides stay correct without scanning the queue.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["RequestBook", "ScoreState", "Tracked"]


class ScoreState(Enum):
    UNSCORED = "unscored"  # no score yet; can be picked for scoring
    SUBMITTED = "submitted"  # handed to the scoring worker; its score is on the way
    SCORED = "scored"  # ordered by its score
    UNRANKED = "unranked"  # keeps its FCFS key for good (a fallback, or a state PARS does not rank)


@dataclass(slots=True, eq=False)
class Tracked:
    """What PARS knows about one live request."""

    request: Any  # vllm.v1.request.Request
    state: ScoreState = ScoreState.UNSCORED
    score: float | None = None
    running: bool = False  # admitted and not preempted since
    admitted_at: float | None = None  # wall time it was first scheduled (for traces)
    rescore: bool = False  # its prompt changed while its score was on the way: drop that score, score again

    @property
    def request_id(self) -> str:
        return self.request.request_id


class RequestBook:
    """The :class:`Tracked` records of every live request, with the unscored ones indexed
    by whether they wait or run (insertion order = arrival order)."""

    def __init__(self) -> None:
        self._records: dict[str, Tracked] = {}
        self._waiting_unscored: dict[str, Tracked] = {}
        self._running_unscored: dict[str, Tracked] = {}

    # ------------------------------------------------------------------ lifecycle

    def add(self, request: Any, state: ScoreState = ScoreState.UNSCORED) -> Tracked:
        rec = Tracked(request, state)
        self._records[request.request_id] = rec
        if state is ScoreState.UNSCORED:
            self._waiting_unscored[request.request_id] = rec
        return rec

    def forget(self, request_id: str) -> Tracked | None:
        """Drop the request's record (its finish or abort); None if it had none."""
        rec = self._records.pop(request_id, None)
        if rec is not None:
            self._waiting_unscored.pop(request_id, None)
            self._running_unscored.pop(request_id, None)
        return rec

    def get(self, request_id: str) -> Tracked | None:
        return self._records.get(request_id)

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Tracked]:
        return iter(self._records.values())

    # ------------------------------------------------------------------ vLLM moved it

    def admitted(self, request_id: str, wall: float) -> None:
        """vLLM scheduled the request (new or resumed)."""
        rec = self._records.get(request_id)
        if rec is None:
            return
        rec.running = True
        if rec.admitted_at is None:
            rec.admitted_at = wall
        moved = self._waiting_unscored.pop(request_id, None)
        if moved is not None:
            self._running_unscored[request_id] = moved

    def preempted(self, request_id: str) -> None:
        rec = self._records.get(request_id)
        if rec is None:
            return
        rec.running = False
        moved = self._running_unscored.pop(request_id, None)
        if moved is not None:
            self._waiting_unscored[request_id] = moved

    # ------------------------------------------------------------------ scoring states

    def pick_unscored(self, limit: int, *, with_running: bool = True) -> list[Tracked]:
        """Up to ``limit`` unscored records, waiting first (oldest first), then running ones
        (only when some wait: a running request's score matters only if something waits).
        Nothing changes until :meth:`set_state` moves each one on."""
        if not self._waiting_unscored or limit <= 0:
            return []
        out = list(itertools.islice(self._waiting_unscored.values(), limit))
        if with_running and len(out) < limit:
            out += itertools.islice(self._running_unscored.values(), limit - len(out))
        return out

    def set_state(self, rec: Tracked, state: ScoreState, score: float | None = None) -> None:
        """Move a record to ``state`` (and ``score``); UNSCORED puts it back in the index,
        at the end (its prompt changed: it is a new arrival as far as order goes)."""
        rec.state = state
        rec.score = score
        rid = rec.request_id
        if state is ScoreState.UNSCORED:
            (self._running_unscored if rec.running else self._waiting_unscored)[rid] = rec
        else:
            self._waiting_unscored.pop(rid, None)
            self._running_unscored.pop(rid, None)

    @property
    def num_waiting_unscored(self) -> int:
        return len(self._waiting_unscored)

    @property
    def num_unscored(self) -> int:
        return len(self._waiting_unscored) + len(self._running_unscored)

    def with_state(self, state: ScoreState) -> list[Tracked]:
        """Every record in ``state`` (O(n): for rare events, such as a lost worker)."""
        return [rec for rec in self._records.values() if rec.state is state]

    def index_sizes(self) -> dict[str, int]:
        """Sizes of every map, for the test that all of them drain when the engine idles."""
        return {"records": len(self._records), "waiting_unscored": len(self._waiting_unscored),
                "running_unscored": len(self._running_unscored)}
