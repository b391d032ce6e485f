"""The one clock PARS reads: real time in production, virtual time in the simulator.

Every place in the scheduler, the scoring worker's parent side, the guard around the
ranker, the ranking policy, the online learner's pacing and the trace writer asks a
:class:`Clock` for the time instead of calling :mod:`time`. Production passes nothing
and gets :data:`REAL_CLOCK`; ``pars_fast.sim`` passes a :class:`VirtualClock`, so the
same code runs, unchanged, on simulated time.

Two readings, because vLLM uses two:

* :meth:`Clock.now`: seconds on a monotonic clock, for intervals and deadlines;
* :meth:`Clock.wall`: seconds since the epoch, the clock of ``Request.arrival_time``
  (vLLM's front end stamps arrivals with ``time.time()``), of traces and of the stats file.

A virtual clock returns the same virtual seconds for both.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["REAL_CLOCK", "Clock", "RealClock", "VirtualClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds: for intervals and deadlines."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch: the clock of ``Request.arrival_time``."""
        ...


class RealClock:
    """The machine's clocks."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "RealClock()"


REAL_CLOCK = RealClock()


class VirtualClock:
    """Simulated time: it moves only when told to (``advance``, ``advance_to``)."""

    def __init__(self, start: float = 0.0) -> None:
        self._t = float(start)

    def now(self) -> float:
        return self._t

    def wall(self) -> float:
        return self._t

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` (>= 0) pass: work that takes time on the simulated machine."""
        if not seconds >= 0:  # also refuses NaN
            raise ValueError(f"time cannot move by {seconds!r} s")
        self._t += seconds

    def advance_to(self, t: float) -> None:
        """Jump forward to ``t`` (a later time; an earlier one is an error)."""
        if not t >= self._t:
            raise ValueError(f"time cannot go back from {self._t!r} to {t!r}")
        self._t = float(t)

    def __repr__(self) -> str:
        return f"VirtualClock(t={self._t!r})"
