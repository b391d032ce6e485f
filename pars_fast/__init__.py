"""pars_fast: prompt-aware shortest-job-first scheduling for vLLM.

PARS ("Ranking Before Serving", arXiv 2510.03243) scores each prompt with a small
BERT-family ranker trained by pairwise learning-to-rank; a higher score means a
longer expected response, and the waiting queue runs in ascending score order.
"""

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public API, imported lazily so `import pars_fast` stays cheap (no torch, no vLLM).
_EXPORTS = {
    "ScoredRequestQueue": "pars_fast.queue",
    "Ranker": "pars_fast.ranker",
    "RankerConfig": "pars_fast.ranker",
    "PARSScheduler": "pars_fast.vllm.scheduler",
    "PARSConfig": "pars_fast.vllm.config",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pars_fast' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # for type checkers and IDEs
    from pars_fast.queue import ScoredRequestQueue
    from pars_fast.ranker import Ranker, RankerConfig
    from pars_fast.vllm.config import PARSConfig
    from pars_fast.vllm.scheduler import PARSScheduler
