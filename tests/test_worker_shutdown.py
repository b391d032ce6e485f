"""A scoring worker process that answers "stopped" exits by itself, with code 0.

``ScoringWorker.close()`` sends "stop", waits for the answer, then gives the process
the rest of ``STOP_TIMEOUT_S`` to exit; it is SIGKILLed only when it does not answer, or
does not exit, in time. Stub rankers are imported by name (``f"{__name__}:Class"``) in
the worker process.
"""

from __future__ import annotations

import atexit
import signal
import time

import numpy as np
import pytest
from transformers import AutoTokenizer

from pars_fast.sim.harness import make_scheduler, make_vllm_config
from pars_fast.vllm import PARSScheduler
from pars_fast.vllm import worker as worker_module
from pars_fast.vllm.config import PARSConfig
from pars_fast.vllm.scoring import ScoreJob
from pars_fast.vllm.worker import STOP_TIMEOUT_S, ScoringWorker


class LengthRanker:
    def score(self, prompts: list[str]) -> np.ndarray:
        return np.array([len(p) for p in prompts], dtype=np.float32)


class SlowRanker(LengthRanker):
    """Each batch takes 30 s: longer than any stop timeout here."""

    def score(self, prompts: list[str]) -> np.ndarray:
        time.sleep(30)
        return super().score(prompts)


class SlowExitRanker(LengthRanker):
    """Answers "stopped" at once, then its process takes 30 s to exit (an atexit handler)."""

    def __init__(self) -> None:
        atexit.register(time.sleep, 30)


def spec(cls: type) -> str:
    return f"{__name__}:{cls.__name__}"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def start_worker(ranker: type, tokenizer) -> ScoringWorker:
    config = PARSConfig.from_sources({"ranker": spec(ranker), "worker": "process", "online": False}, environ={})
    worker = ScoringWorker(config, tokenizer, "process")
    worker.start()
    return worker


def test_a_stopped_worker_process_exits_with_code_0(tiny_llama_dir, monkeypatch):
    """Through the scheduler, as vLLM shuts it down: the process ends by itself. (The
    stop timeout is raised: on a loaded 2-core machine an interpreter's exit can take
    longer than the shipped 5 s, and this test is about who ends the process.)"""
    monkeypatch.setattr(worker_module, "STOP_TIMEOUT_S", 60.0)
    sched = make_scheduler(
        PARSScheduler, make_vllm_config(tiny_llama_dir, pars={"ranker": spec(LengthRanker), "worker": "process"})
    )
    proc = sched._worker._link._proc
    start = time.monotonic()
    sched.shutdown()
    assert proc.returncode == 0  # not -SIGKILL
    assert time.monotonic() - start < worker_module.STOP_TIMEOUT_S


def test_a_worker_busy_past_the_timeout_is_killed(tokenizer, monkeypatch):
    monkeypatch.setattr(worker_module, "STOP_TIMEOUT_S", 1.0)
    worker = start_worker(SlowRanker, tokenizer)
    proc = worker._link._proc
    assert worker.submit([ScoreJob("a", tokenizer("a prompt")["input_ids"], 3)]) == 1
    time.sleep(0.5)  # the worker is inside its 30 s batch: it reads "stop" after it
    start = time.monotonic()
    worker.close()
    assert proc.returncode == -signal.SIGKILL
    assert 0.9 < time.monotonic() - start < 5.0


def test_a_worker_that_stopped_but_does_not_exit_is_killed_at_the_timeout(tokenizer, monkeypatch):
    monkeypatch.setattr(worker_module, "STOP_TIMEOUT_S", 2.0)
    worker = start_worker(SlowExitRanker, tokenizer)
    proc = worker._link._proc
    start = time.monotonic()
    worker.close()
    assert proc.returncode == -signal.SIGKILL  # at the timeout, not 30 s later
    assert 1.9 < time.monotonic() - start < 6.0
