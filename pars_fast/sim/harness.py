"""Drive a real vLLM V1 scheduler without a model: for tests and step-overhead benchmarks.

The simulator's engine loop (``pars_fast.sim.engine``) is built on it, and the scheduler
tests and step benchmarks use it directly.

vLLM's own scheduler test helpers (``tests/v1/core/utils.py`` upstream) are not in the
wheel, so this is our version: a real ``VllmConfig`` for a local model folder, a KV
cache of a chosen number of blocks, requests with vLLM's prefix-cache block hasher, and
a stand-in for the model runner that samples one token per request that finished its
prefill. ``schedule() -> fake output -> update_from_output()`` is exactly the engine
core's loop minus the forward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

# Any id inside the tiny Llama's vocabulary; requests use ignore_eos, so it never stops one.
SAMPLED_TOKEN_ID = 1000


def make_vllm_config(
    model: str | Path,
    *,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 2048,
    max_model_len: int = 2048,
    block_size: int = 16,
    num_blocks: int = 1024,
    policy: str = "fcfs",
    async_scheduling: bool = False,
    enable_prefix_caching: bool = True,
    pars: dict[str, Any] | None = None,
) -> VllmConfig:
    """A ``VllmConfig`` for ``model`` (a local folder) with a KV cache of ``num_blocks`` blocks."""
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        enable_chunked_prefill=True,
        policy=policy,
    )
    model_config = ModelConfig(model=str(model), dtype="float32", seed=0, max_model_len=max_model_len)
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config,
        model_config=model_config,
        cache_config=cache_config,
        additional_config={"pars": pars} if pars is not None else {},
    )
    # The platform hook (CPU: always off) has run; the scheduler under test decides here.
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    vllm_config.cache_config.num_gpu_blocks = num_blocks
    return vllm_config


def make_scheduler(scheduler_cls: type[Scheduler], vllm_config: VllmConfig, log_stats: bool = False, **extra: Any) -> Scheduler:
    """Build ``scheduler_cls`` the way the engine core does, on a model-free KV cache.

    ``extra`` goes to the constructor too (``pars_runtime=`` for ``PARSScheduler``)."""
    block_size = vllm_config.cache_config.block_size
    num_blocks = vllm_config.cache_config.num_gpu_blocks
    kv_cache_config = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=1, dtype=torch.float32))
        ],
    )
    return scheduler_cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=log_stats,
        **extra,
    )


class RequestFactory:
    """Engine-core ``Request`` objects with the block hasher the engine would attach."""

    def __init__(self, block_size: int = 16) -> None:
        hash_fn = get_hash_fn_by_name("sha256")
        init_none_hash(hash_fn)
        self._hasher = get_request_block_hasher(block_size, hash_fn)
        self._ids = itertools.count()

    def make(
        self,
        prompt_token_ids: list[int],
        max_tokens: int,
        *,
        request_id: str | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> Request:
        return Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            pooling_params=None,
            arrival_time=arrival_time,
            priority=priority,
            cache_salt=cache_salt,
            block_hasher=self._hasher,
        )


def fake_model_output(scheduler: Scheduler, output: SchedulerOutput) -> ModelRunnerOutput:
    """What the model runner returns: one token per request past its prefill, none mid-prefill."""
    req_ids = list(output.num_scheduled_tokens)
    sampled = [[] if scheduler.requests[r].is_prefill_chunk else [SAMPLED_TOKEN_ID] for r in req_ids]
    return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled)


@dataclass
class StepResult:
    admitted: list[str] = field(default_factory=list)  # new requests scheduled for the first time
    resumed: list[str] = field(default_factory=list)  # preempted requests scheduled again
    preempted: list[str] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (request id, finish reason)


def step(scheduler: Scheduler) -> StepResult:
    """One engine-core step: ``schedule()``, a fake forward pass, ``update_from_output()``."""
    output = scheduler.schedule()
    result = StepResult(
        admitted=[r.req_id for r in output.scheduled_new_reqs],
        resumed=list(output.scheduled_cached_reqs.resumed_req_ids),
        preempted=sorted(output.preempted_req_ids),
    )
    engine_outputs = scheduler.update_from_output(output, fake_model_output(scheduler, output))
    for outputs in engine_outputs.values():
        for out in outputs.outputs:
            if out.finish_reason is not None:
                result.finished.append((out.request_id, str(out.finish_reason)))
    return result


def run_until_idle(scheduler: Scheduler, max_steps: int = 100_000) -> list[StepResult]:
    """Step until the scheduler has nothing left; fails loudly instead of looping forever."""
    results = []
    for _ in range(max_steps):
        if not scheduler.has_requests():
            return results
        results.append(step(scheduler))
    raise RuntimeError(f"scheduler still busy after {max_steps} steps")


def admission_order(results: Iterable[StepResult]) -> list[str]:
    return [rid for r in results for rid in r.admitted]


def finish_order(results: Iterable[StepResult]) -> list[str]:
    return [rid for r in results for rid, _ in r.finished]
