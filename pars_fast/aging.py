"""Aging against starvation: the one mechanism, folded into ``Request.priority``.

Lower priorities are served first, so under shortest-job-first a request with a
long predicted response (a high score) could wait forever behind a steady
stream of short ones. PARSScheduler prevents that by setting every request's
priority to its score plus ``rate`` score units per second of arrival time,
counted from a fixed origin (the scheduler's start), in integer units::

    priority = round((score + rate * (arrival_time - origin)) * PRIORITY_UNITS_PER_SCORE)

(``aged_priority``). A later arrival gets a larger priority for the same score;
the term depends on the arrival time, not on the current time, so a queued
request's priority never has to be recomputed as time passes (every queued
request "ages" at the same rate, which leaves their relative order unchanged).
``ScoredRequestQueue`` orders by ``(priority, arrival_time)`` and adds nothing.

The bound. Let every score lie in ``[s_min, s_max]``. A request with score ``s``
arriving at ``t_a`` is admitted before anything that arrives after
``t_a + (s - s_min) / rate``: even with the lowest score, ``s_min``, such a
request's aged score is larger (one arriving exactly then ties, and a tie goes to
the earlier arrival; rounding to integer units is monotone, so it can turn an
order into a tie but never reverse it). So new arrivals can overtake a request
for at most ``(s_max - s_min) / rate`` seconds (``aging_wait_bound``), and its
wait is at most that plus the time to serve what was queued ahead of it when
that window closed.
``rate = 0`` turns aging off: no bound.

The same number drives preemption. vLLM's PRIORITY policy preempts the running
request with the largest ``(priority, arrival_time)``, so with aging in the
priority it evicts the longest predicted response net of aging: preemption and
admission agree on one order. That is why aging lives here and not in the queue.
"""

from __future__ import annotations

import math

__all__ = ["PRIORITY_UNITS_PER_SCORE", "aged_priority", "aging_wait_bound", "prompt_cost"]

# Integer priority units per score unit (vLLM's Request.priority is an int). Fine
# enough that scores 1e-6 apart get distinct priorities (closer ones, such as
# neighbouring float32 scores near 1.0, 1.2e-7 apart, may tie; a tie goes to the
# earlier arrival). Small enough that |score| <= 1e9 plus years of aging (0.01/s is
# 3.2e5 score units a year) stays below 2**53 units: exact in an int64 and in a
# double's 53-bit mantissa, which is how ScoredRequestQueue compares priorities.
PRIORITY_UNITS_PER_SCORE = 1_000_000


def aged_priority(score: float, arrival_time: float, origin: float, rate: float) -> int:
    """``Request.priority`` for a request with ``score`` arriving at ``arrival_time``.

    ``round((score + rate * (arrival_time - origin)) * PRIORITY_UNITS_PER_SCORE)``:
    ``rate`` is in score units per second of arrival time, ``origin`` a fixed time
    (seconds, the same clock as ``arrival_time``) that keeps the ints small. Lower
    is served first. Python's ``round`` (half to even) makes the int.
    """
    return round((score + rate * (arrival_time - origin)) * PRIORITY_UNITS_PER_SCORE)


def prompt_cost(num_prompt_tokens: int, weight: float) -> float:
    """The prompt's own cost in score units, added to a request's score before aging:
    ``weight`` per doubling of its tokens (``prompt_weight``). It widens the score range
    the wait bound below is computed on by ``weight * log2(longest / shortest prompt)``."""
    return weight * math.log2(max(1, num_prompt_tokens)) if weight else 0.0


def aging_wait_bound(s_min: float, s_max: float, rate: float) -> float:
    """Seconds during which later arrivals can get a lower aged priority than a request.

    With scores in ``[s_min, s_max]`` and aging ``rate`` (score units per second),
    a request with score ``s`` is admitted before every request that arrives more
    than ``(s - s_min) / rate`` seconds after it, so ``(s_max - s_min) / rate``
    bounds the window in which new arrivals can overtake any request; its total
    wait is this plus the time to serve what was ahead of it when the window
    closed. Returns ``inf`` when ``rate`` is 0 (no aging, no bound).
    """
    if not (s_max >= s_min):
        raise ValueError(f"aging_wait_bound: need s_min <= s_max, got {s_min} > {s_max}")
    if not (rate >= 0.0) or math.isinf(rate):
        raise ValueError(f"aging_wait_bound: rate must be finite and >= 0, got {rate}")
    return math.inf if rate == 0.0 else (s_max - s_min) / rate
