"""When PARS ranks, and how much: the ranking policy, decided from plain numbers.

``PARSScheduler`` asks :class:`RankingPolicy` three questions each step and tells it
what happened; the policy reads no clock, imports no vLLM and holds no request, so it
is tested with numbers alone (tests/test_policy.py):

* **Is the queue deep enough to order?** (:meth:`RankingPolicy.queue_is_deep`) Order
  only changes who runs next among requests that cannot all be admitted now. Below
  ``min_queue`` requests waiting beyond what a step admits, the queue stays FCFS: a
  shallow queue gains next to nothing from reordering, and it is where a long
  request's wait stretches the tail.
* **Does ranking inline pay?** (:meth:`RankingPolicy.inline_pays`, ``fallback.max_share``)
  Scoring inside ``schedule()`` is serial with the model. It is done only while one
  prompt costs the ranker at most ``max_share`` of the engine's time per request,
  measured as the mean gap between recent finishes of requests that *ran* (an abort
  of a queued request says nothing about the engine's speed), less the ranking done
  inside each gap. Until enough finishes are known, at most ``warmup_s`` of ranking
  is allowed after an idle period.
* **How many prompts fit this step?** (:meth:`RankingPolicy.next_chunk`,
  ``fallback.budget_s``) Chunks are sized from the measured cost per prompt to fill
  at most half of what is left of the budget. When one prompt's estimated cost
  exceeds the whole budget the ranker is *locked out*; a stale estimate (one stall,
  a cold first call) would keep it out for good, so every ``probe_interval_s`` one
  prompt is scored anyway to measure it afresh. Lock-outs and probes are counted.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass

__all__ = ["PolicyCounters", "RankingPolicy"]

# A chunk fills at most this fraction of what is left of the inline budget, at the
# measured cost per prompt: small chunks cost more per prompt than the batches the
# estimate mostly comes from.
INLINE_BUDGET_MARGIN = 0.5
# max_share's measure: the mean gap over the last FINISH_WINDOW finishes, used once
# MIN_FINISHES are known.
FINISH_WINDOW = 64
MIN_FINISHES = 8
# Seconds of inline ranking allowed after an idle period, before MIN_FINISHES are known:
# ranking stalls delay the first finishes too (a short request needs tens of steps), so
# without a cap an expensive ranker could rank a whole burst before being measured.
WARMUP_RANKING_S = 1.0
# While locked out (one prompt's estimated cost exceeds budget_s), score one prompt this
# often to re-measure the cost.
PROBE_INTERVAL_S = 10.0


@dataclass
class PolicyCounters:
    share_limited_steps: int = 0  # steps that ranked nothing: a prompt cost over max_share of a request
    lockout_steps: int = 0  # steps on which one prompt's estimated cost exceeded budget_s
    probes: int = 0  # single prompts scored during a lock-out, to re-measure the cost


class RankingPolicy:
    """Decides when and how much the scheduler ranks. See the module docstring.

    ``rank_everything``: a model-free scorer (oracle, prompt length) that costs
    microseconds: every arrival is scored, whatever the depth, with no budget.
    """

    def __init__(
        self,
        *,
        min_queue: int,
        budget_s: float | None,
        max_share: float | None,
        batch_max: int,
        rank_everything: bool = False,
        warmup_s: float = WARMUP_RANKING_S,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        if min_queue < 1 or batch_max < 1:
            raise ValueError(f"min_queue and batch_max must be >= 1, got {min_queue}, {batch_max}")
        self.min_queue = min_queue
        self.budget_s = budget_s
        self.max_share = max_share
        self.batch_max = batch_max
        self.rank_everything = rank_everything
        self.warmup_s = warmup_s
        self.probe_interval_s = probe_interval_s
        self.counters = PolicyCounters()
        self._gaps: deque[float] = deque(maxlen=FINISH_WINDOW)
        self._last_finish: float | None = None
        self._ranking_since_finish = 0.0  # inline ranking inside the current gap: not the model's time
        self._ranking_since_idle = 0.0
        self._last_probe = -math.inf

    # ------------------------------------------------------------------ decisions

    def queue_is_deep(self, waiting: int, free_slots: int, left_waiting: int = 0) -> bool:
        """True when at least ``min_queue`` requests wait beyond what a step can admit.

        ``waiting``: requests queued now; ``free_slots``: running slots free now;
        ``left_waiting``: requests the previous step could not admit (a KV-bound engine
        admits fewer than its free slots, and that count is what shows it).
        """
        if self.rank_everything:
            return True
        return max(left_waiting, waiting - max(0, free_slots)) >= self.min_queue

    def inline_pays(self, cost_per_prompt: float) -> bool:
        """``fallback.max_share``: may the scheduler rank inline at this cost per prompt?"""
        if self.max_share is None or self.rank_everything or cost_per_prompt <= 0:
            return True
        if len(self._gaps) < MIN_FINISHES:
            pays = self._ranking_since_idle < self.warmup_s
        else:
            pays = cost_per_prompt <= self.max_share * (sum(self._gaps) / len(self._gaps))
        if not pays:
            self.counters.share_limited_steps += 1
        return pays

    def next_chunk(self, *, now: float, spent_s: float, cost_per_prompt: float, first: bool) -> int:
        """Prompts to score in the next inline chunk of this step (0: stop for this step).

        ``spent_s``: ranking already done in this step; ``cost_per_prompt``: the measured
        estimate (0 before any measurement); ``first``: no chunk was scored this step yet.
        """
        if self.rank_everything or self.budget_s is None:
            return self.batch_max
        remaining = self.budget_s - spent_s
        if remaining <= 0:
            return 0
        if cost_per_prompt <= 0:
            return 1  # not measured yet: one prompt measures it
        n = min(self.batch_max, int(INLINE_BUDGET_MARGIN * remaining / cost_per_prompt))
        if n >= 1 or not first:
            return max(n, 0)
        if cost_per_prompt <= remaining:
            return 1  # one prompt fits (and re-measures a cost a cold call inflated)
        self.counters.lockout_steps += 1
        if now - self._last_probe >= self.probe_interval_s:
            self._last_probe = now
            self.counters.probes += 1
            return 1
        return 0

    def locked_out(self, cost_per_prompt: float) -> bool:
        """One prompt's estimated cost exceeds the whole budget."""
        return self.budget_s is not None and not self.rank_everything and cost_per_prompt > self.budget_s

    # ------------------------------------------------------------------ what happened

    def on_ranking(self, seconds: float) -> None:
        """Inline ranking took ``seconds`` of a step (not the model's time)."""
        self._ranking_since_finish += seconds
        self._ranking_since_idle += seconds

    def on_finish(self, now: float, ran: bool) -> None:
        """A request finished at ``now``. Only one that ran to its end (``ran``) measures
        the engine's time per request; aborts and rejections do not."""
        if not ran:
            return
        if self._last_finish is not None:
            self._gaps.append(max(0.0, now - self._last_finish - self._ranking_since_finish))
        self._last_finish = now
        self._ranking_since_finish = 0.0

    def on_idle(self) -> None:
        """The engine went idle: an idle gap is not the engine's time per request, and what
        finished before it (warm-ups, another workload) is not what comes next."""
        self._gaps.clear()
        self._last_finish = None
        self._ranking_since_finish = 0.0
        self._ranking_since_idle = 0.0

    # ------------------------------------------------------------------ report

    @property
    def seconds_per_request(self) -> float | None:
        """The engine's measured time per finished request (None until MIN_FINISHES)."""
        return sum(self._gaps) / len(self._gaps) if len(self._gaps) >= MIN_FINISHES else None

    def stats(self) -> dict[str, int]:
        return asdict(self.counters)
