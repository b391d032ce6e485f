"""One record per live request: what PARS knows about it, from arrival to free.

``PARSScheduler`` keeps a :class:`Tracked` per request vLLM holds, in a
:class:`RequestBook`: its scoring state, its score, and when it was first admitted.
``_free_request`` forgets a request with one call (:meth:`RequestBook.forget`), so
nothing can outlive it; a score that comes back later finds no record and is dropped.

The book also answers, in O(1) per change, the one question scoring asks each step:
*which unscored requests, in which order?* (:meth:`RequestBook.pick_unscored`):
waiting ones first, oldest first (under FCFS keys they are the next to be admitted,
so their scores change the most), then running ones (admitted before they were
scored: their score only orders preemption). An admission costs the book nothing: a
step admits dozens of requests, most of them scored or never to be scored, so the
unscored waiting index is corrected when it is read (a record whose request vLLM has
admitted since moves to the running index, once). The scheduler tells the book about
preemptions (rare), which move a record back.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
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
    admitted_at: float | None = None  # wall time it was first scheduled (kept for traces only)
    rescore: bool = False  # its prompt changed while its score was on the way: drop that score, score again

    @property
    def request_id(self) -> str:
        return self.request.request_id


def _never_admitted(request: Any) -> bool:
    return False


class RequestBook:
    """The :class:`Tracked` records of every live request, with the unscored ones indexed
    by whether they wait or run (insertion order = arrival order).

    ``is_admitted(request)``: whether vLLM holds the request as admitted (running, or a
    session paused between turns); the book reads it to correct its waiting index."""

    def __init__(self, is_admitted: Callable[[Any], bool] = _never_admitted) -> None:
        self._is_admitted = is_admitted
        self._records: dict[str, Tracked] = {}
        # Unscored and not known to be admitted: may hold requests admitted since (see pick_unscored).
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
        """vLLM scheduled the request (new or resumed): only its first admission time is
        kept (for traces); the unscored index needs no call (see the module docstring)."""
        rec = self._records.get(request_id)
        if rec is not None and rec.admitted_at is None:
            rec.admitted_at = wall

    def preempted(self, request_id: str) -> None:
        """The request waits again (preempted, or a session's next chunk arrived)."""
        moved = self._running_unscored.pop(request_id, None)
        if moved is not None:
            self._waiting_unscored[request_id] = moved

    # ------------------------------------------------------------------ scoring states

    def _settle(self, limit: int) -> list[Tracked]:
        """The first ``limit`` records of the waiting index that really wait; records met
        on the way whose requests were admitted move to the running index (once each)."""
        waiting, is_admitted = self._waiting_unscored, self._is_admitted
        out: list[Tracked] = []
        moved: list[str] = []
        for rid, rec in waiting.items():
            if is_admitted(rec.request):
                moved.append(rid)
            else:
                out.append(rec)
                if len(out) >= limit:
                    break
        running = self._running_unscored
        for rid in moved:
            running[rid] = waiting.pop(rid)
        return out

    def has_waiting_unscored(self) -> bool:
        """Whether an unscored request waits (amortized O(1): see :meth:`_settle`)."""
        return bool(self._waiting_unscored) and bool(self._settle(1))

    def pick_unscored(self, limit: int, *, with_running: bool = True) -> list[Tracked]:
        """Up to ``limit`` unscored records, waiting first (oldest first), then running ones
        (only when some wait: a running request's score matters only if something waits).
        Nothing changes until :meth:`set_state` moves each one on."""
        if not self._waiting_unscored or limit <= 0:
            return []
        out = self._settle(limit)
        if not out:
            return []
        if with_running and len(out) < limit:
            out += itertools.islice(self._running_unscored.values(), limit - len(out))
        return out

    def set_state(self, rec: Tracked, state: ScoreState, score: float | None = None) -> None:
        """Move a record to ``state`` (and ``score``); UNSCORED puts it back in the index,
        at the end (its prompt changed: it is a new arrival as far as order goes)."""
        rec.state = state
        rec.score = score
        rid = rec.request_id
        self._running_unscored.pop(rid, None)
        if state is ScoreState.UNSCORED:
            self._waiting_unscored.pop(rid, None)
            self._waiting_unscored[rid] = rec  # corrected to running on the next read if admitted
        else:
            self._waiting_unscored.pop(rid, None)

    @property
    def num_waiting_unscored(self) -> int:
        """Unscored requests waiting, at most (some may have been admitted since: see :meth:`_settle`)."""
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
