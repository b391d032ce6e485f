"""vLLM V1 integration: ``--scheduler-cls pars_fast.vllm.PARSScheduler``.

Settings go in ``--additional-config '{"pars": {...}}'`` (or ``additional_config=`` of
``vllm.LLM``/``AsyncEngineArgs``); see :class:`PARSConfig` for the keys. The scheduler
classes import vLLM, so they load on first access; the config classes and the version
guard (``check_vllm_version``, tested range ``TESTED_VLLM``) do not.
"""

from importlib import import_module
from typing import TYPE_CHECKING

from pars_fast.vllm.compat import TESTED_VLLM, check_vllm_version
from pars_fast.vllm.config import FallbackConfig, PARSConfig, PARSConfigError

_LAZY = {
    "PARSScheduler": "pars_fast.vllm.scheduler",
    "PARSAsyncScheduler": "pars_fast.vllm.scheduler",
    "ScoringStats": "pars_fast.vllm.scoring",
}

__all__ = [
    "TESTED_VLLM",
    "FallbackConfig",
    "PARSAsyncScheduler",
    "PARSConfig",
    "PARSConfigError",
    "PARSScheduler",
    "ScoringStats",
    "check_vllm_version",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pars_fast.vllm' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from pars_fast.vllm.scheduler import PARSAsyncScheduler, PARSScheduler
    from pars_fast.vllm.scoring import ScoringStats
