"""Drive a real vLLM V1 scheduler without a model: for tests and step-overhead benchmarks.

The simulator's engine loop (``pars_fast.sim.engine``) is built on it, and the scheduler
tests and step benchmarks use it directly.

vLLM's own scheduler test helpers (``tests/v1/core/utils.py`` upstream) are not in the
wheel, so this is our version: a real ``VllmConfig`` for a local model folder, a KV
cache of a chosen number of blocks, requests with vLLM's prefix-cache block hasher, and
a stand-in for the model runner that samples one token per request that finished its
prefill. ``schedule() -> fake output -> update_from_output()`` is exactly the engine
core's loop minus the forward pass: :func:`step` is ``EngineCore.step`` (one step at a
time), :class:`BatchQueue` is ``EngineCore.step_with_batch_queue`` (the next step is
scheduled before the last one's output is back, as under async scheduling).

The request states vLLM reaches besides waiting and running can be driven too:

* streaming-input sessions: ``RequestFactory.make(..., resumable=True)``, then
  ``add_request`` of the same id with the next chunk (vLLM's ``StreamingUpdate``);
* P/D disaggregation: ``make_vllm_config(..., kv_connector="NixlConnector")`` builds
  vLLM's real NIXL connector (its scheduler side needs no NIXL library and no peer), and
  ``make(..., kv_transfer_params=...)`` passes the parameters the way the front end
  does. The stand-in model runner then plays the connector's worker side: every KV
  transfer the scheduler waits for (a remote prefill's KV to load,
  ``WAITING_FOR_REMOTE_KVS``; the blocks of a finished request held for a remote
  decode to read) is reported done in the next step's output.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus
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
    kv_connector: str | None = None,
    kv_role: str = "kv_both",
) -> VllmConfig:
    """A ``VllmConfig`` for ``model`` (a local folder) with a KV cache of ``num_blocks`` blocks.

    ``kv_connector``: a vLLM KV connector by its registered name (``"NixlConnector"``:
    P/D disaggregation), in ``kv_role`` (``"kv_producer"``: a prefill node,
    ``"kv_consumer"``: a decode node, ``"kv_both"``)."""
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
        kv_transfer_config=None if kv_connector is None else KVTransferConfig(kv_connector=kv_connector, kv_role=kv_role),
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
        resumable: bool = False,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> Request:
        """``resumable``: an input of a streaming-input session (the first opens it; a later
        one with the same id and ``resumable=True`` is its next chunk; one with
        ``resumable=False`` closes it). ``kv_transfer_params``: for a KV connector, passed
        in the sampling parameters' ``extra_args`` as vLLM's front end passes them."""
        extra_args = None if kv_transfer_params is None else {"kv_transfer_params": dict(kv_transfer_params)}
        return Request(
            request_id=request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids=list(prompt_token_ids),
            sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args),
            pooling_params=None,
            arrival_time=arrival_time,
            priority=priority,
            cache_salt=cache_salt,
            block_hasher=self._hasher,
            resumable=resumable,
        )


def remote_prefill_params(remote_request_id: str, num_blocks: int = 1) -> dict[str, Any]:
    """``kv_transfer_params`` of a request sent to a decode node after a remote prefill
    (what a P/D proxy forwards from the prefill node's response)."""
    return {
        "do_remote_prefill": True,
        "do_remote_decode": False,
        "remote_block_ids": [list(range(num_blocks))],
        "remote_engine_id": "prefill-engine",
        "remote_request_id": remote_request_id,
        "remote_host": "127.0.0.1",
        "remote_port": 5600,
        "tp_size": 1,
    }


# A request sent to a prefill node: its KV is kept after it finishes, for the decode
# node to read (the connector frees the blocks once it has).
REMOTE_DECODE_PARAMS: dict[str, Any] = {"do_remote_decode": True}


def sampling_ids(scheduler: Scheduler, output: SchedulerOutput) -> set[str]:
    """The requests that sample a token in the step ``output`` just scheduled: those whose
    scheduled tokens reach the end of their known tokens (decode, or a prefill's last
    chunk). Read it right after ``schedule()``: vLLM resets ``is_prefill_chunk`` each time
    it schedules a request, so with two steps in flight it describes the newest one."""
    requests = scheduler.requests
    return {r for r in output.num_scheduled_tokens if not requests[r].is_prefill_chunk}


def kv_transfers_done(scheduler: Scheduler, reported: Collection[str] = ()) -> KVConnectorOutput | None:
    """The connector's worker side, done with every transfer the scheduler waits for:
    remote KV loads (``WAITING_FOR_REMOTE_KVS``) are received, and the blocks of finished
    requests that the connector held (for a remote decode to read, or for a load that
    was still running when the request was aborted) are sent. ``reported``: transfers in
    outputs not applied yet (steps in flight), each reported once. None without a connector."""
    if getattr(scheduler, "connector", None) is None:
        return None
    received = scheduler.finished_recving_kv_req_ids
    recving = {
        rid for rid, r in scheduler.requests.items()
        if r.status == RequestStatus.WAITING_FOR_REMOTE_KVS and rid not in received and rid not in reported
    }
    # vLLM keeps a finished request in `requests` only while a connector holds its blocks.
    sending = {rid for rid, r in scheduler.requests.items() if r.is_finished() and rid not in reported}
    return KVConnectorOutput(finished_recving=recving or None, finished_sending=sending or None)


def _kv_reported(model_output: ModelRunnerOutput) -> set[str]:
    kv = model_output.kv_connector_output
    return set() if kv is None else {*(kv.finished_recving or ()), *(kv.finished_sending or ())}


def fake_model_output(
    scheduler: Scheduler, output: SchedulerOutput, sampling: Collection[str] | None = None, kv_reported: Collection[str] = ()
) -> ModelRunnerOutput:
    """What the model runner returns: one token per request past its prefill, none
    mid-prefill (``sampling``: those that sample, from :func:`sampling_ids` at schedule
    time; by default read now), and with a KV connector, the transfers it finished
    (``kv_reported``: those already in the outputs of steps in flight)."""
    if sampling is None:
        sampling = sampling_ids(scheduler, output)
    req_ids = list(output.num_scheduled_tokens)
    sampled = [[SAMPLED_TOKEN_ID] if r in sampling else [] for r in req_ids]
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled,
        kv_connector_output=kv_transfers_done(scheduler, kv_reported),
    )


@dataclass
class StepResult:
    admitted: list[str] = field(default_factory=list)  # new requests scheduled for the first time
    resumed: list[str] = field(default_factory=list)  # preempted requests scheduled again
    preempted: list[str] = field(default_factory=list)
    finished: list[tuple[str, str]] = field(default_factory=list)  # (request id, finish reason)


def _schedule(
    scheduler: Scheduler, result: StepResult, kv_reported: Collection[str] = ()
) -> tuple[SchedulerOutput, ModelRunnerOutput]:
    """``schedule()`` and the model's output for that step, decided now."""
    output = scheduler.schedule()
    result.admitted += [r.req_id for r in output.scheduled_new_reqs]
    result.resumed += list(output.scheduled_cached_reqs.resumed_req_ids)
    result.preempted += sorted(output.preempted_req_ids)
    return output, fake_model_output(scheduler, output, kv_reported=kv_reported)


def _update(scheduler: Scheduler, output: SchedulerOutput, model_output: ModelRunnerOutput, result: StepResult) -> None:
    engine_outputs = scheduler.update_from_output(output, model_output)
    for outputs in engine_outputs.values():
        for out in outputs.outputs:
            if out.finish_reason is not None:
                result.finished.append((out.request_id, str(out.finish_reason)))


def step(scheduler: Scheduler) -> StepResult:
    """One engine-core step: ``schedule()``, a fake forward pass, ``update_from_output()``."""
    result = StepResult()
    _update(scheduler, *_schedule(scheduler, result), result)
    return result


class BatchQueue:
    """vLLM's ``EngineCore.step_with_batch_queue``: up to ``size`` steps in flight.

    Each :meth:`step` schedules a new step if the scheduler has work, and returns at once
    while the queue has room (the model is still running the earlier step); otherwise it
    waits for the oldest step's output and applies it (``update_from_output``). With
    ``AsyncScheduler`` and ``size=2`` this is vLLM's async scheduling: step N+1 is
    scheduled before step N's tokens are known. Which requests sample in a step is
    decided when it is scheduled (:func:`sampling_ids`).
    """

    def __init__(self, scheduler: Scheduler, size: int = 2) -> None:
        if size < 1:
            raise ValueError(f"a batch queue holds at least one step, got {size}")
        self.scheduler = scheduler
        self.size = size
        self._queue: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()  # oldest first
        self.max_in_flight = 0  # the most steps that were in flight at once

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._queue) or self.scheduler.has_requests()

    def step(self) -> StepResult:
        """Schedule a step, or apply the oldest step's output, or both (a full queue)."""
        sched, result = self.scheduler, StepResult()
        if sched.has_requests():
            in_flight_kv = set().union(*(_kv_reported(m) for _, m in self._queue))
            output, model_output = _schedule(sched, result, in_flight_kv)
            self._queue.append((output, model_output))
            self.max_in_flight = max(self.max_in_flight, len(self._queue))
            if len(self._queue) < self.size and (output.total_num_scheduled_tokens > 0 or sched.has_requests()):
                return result  # the model runs it; schedule the next one meanwhile
        elif not self._queue:
            return result
        _update(sched, *self._queue.popleft(), result)
        return result

    def run_until_idle(self, max_steps: int = 100_000) -> list[StepResult]:
        """Step until nothing is queued or in flight; fails loudly instead of looping forever."""
        results = []
        for _ in range(max_steps):
            if not self.busy:
                return results
            results.append(self.step())
        raise RuntimeError(f"scheduler still busy after {max_steps} steps")


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
