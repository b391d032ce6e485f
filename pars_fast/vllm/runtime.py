"""What ``PARSScheduler`` takes from its surroundings besides vLLM's config.

In production every field keeps its default: the machine's clock, the ranker named
in the config, a real worker process or thread. ``pars_fast.sim`` replaces them to
run the very same scheduler on simulated time: a virtual clock, scores computed once
per workload, and a model of the worker that answers after a modelled latency. vLLM
never passes a runtime; ``PARSScheduler(vllm_config, ..., pars_runtime=...)`` is the
simulator's (and the tests') entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pars_fast.clock import REAL_CLOCK, Clock

if TYPE_CHECKING:
    from pars_fast.vllm.config import PARSConfig
    from pars_fast.vllm.scoring import Scorer
    from pars_fast.vllm.worker import Link, ScoringWorker

__all__ = ["SchedulerRuntime"]


@dataclass(frozen=True)
class SchedulerRuntime:
    clock: Clock = REAL_CLOCK
    # Builds the text ranker's scorer for inline scoring, from the config and the served
    # tokenizer (None when ``build_scorer`` is given: the scheduler then loads no tokenizer).
    # None: pars_fast.vllm.scoring.build_scorer.
    build_scorer: Callable[[PARSConfig, Any], Scorer] | None = None
    # Opens the link to a scoring worker. None: a real process or thread.
    open_link: Callable[[ScoringWorker], Link] | None = None
    # Whether CPUs beyond the model's and the engine core's are free (worker "auto").
    # None: read vLLM's CPU binding (off vLLM's CPU backend: a GPU server, spare CPUs).
    spare_cpus: bool | None = None

