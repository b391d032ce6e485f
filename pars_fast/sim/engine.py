"""The engine core's loop without the forward pass, on a virtual clock.

:class:`SimEngine` runs a real vLLM V1 scheduler (vLLM's own ``Scheduler`` under FCFS or
priority, or ``PARSScheduler`` and its async variant) on vLLM's real KV cache manager,
sized like the GPU's, and does each step as vLLM's ``EngineCore`` does:

1. add the requests that arrived by virtual now;
2. ``schedule()`` (a ``PARSScheduler`` ranking inline spends virtual time here);
3. price the step with a cost model (:mod:`pars_fast.sim.costs`) from what it computes:
   each request's new tokens and the KV tokens it already holds;
4. build the model runner's output: one token per request that is decoding or finishes
   its prefill this step; a request stops at its true length (``max_tokens``, as vLLM's
   own serving benchmark replays ShareGPT);
5. ``update_from_output()``, at the time the forward pass ends.

With async scheduling (vLLM's default on GPUs) the loop is ``EngineCore.step_with_batch_queue``:
the next step is scheduled while the current one runs, so two are in flight, and a
step's output is applied when its forward pass ends. The clock never steps through idle
time: with nothing to run it jumps to the next arrival.

Everything the scheduler's choices depend on is real vLLM code: admission under
``max_num_seqs``, ``max_num_batched_tokens`` and chunked prefill, prefix caching, KV
block allocation, and vLLM's own preemptions when the cache runs out.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pars_fast.clock import VirtualClock
from pars_fast.e2e.metrics import RequestTiming
from pars_fast.sim.costs import CostModelError, StepBatch, StepCost

__all__ = ["Deployment", "SimEngine", "SimError", "SimRun", "sim_model_dir"]

# A sampled token id inside any vocabulary; requests ignore EOS, so it never stops one.
SAMPLED_TOKEN_ID = 1000
# Queue-depth samples kept per run (evenly thinned): enough for a plot.
DEPTH_SAMPLES = 2000
# Steps in a row that may schedule nothing, with requests left and nothing to wait for,
# before the run is declared stuck.
MAX_EMPTY_STEPS = 3


class SimError(RuntimeError):
    """The simulation cannot go on: a bad step cost, a request lost or stuck."""


@dataclass(frozen=True)
class Deployment:
    """The served model and the engine's settings, as vLLM would run them on the GPU."""

    model: str
    gpu: str
    tp: int
    num_blocks: int  # KV cache blocks (per rank)
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    async_scheduling: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SimError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def for_gpu(
        cls,
        model: str,
        gpu: str,
        tp: int = 1,
        *,
        max_model_len: int = 8192,
        gpu_memory_utilization: float = 0.9,
        **overrides: Any,
    ) -> Deployment:
        """vLLM's defaults on that GPU (its OpenAI server's ``max_num_seqs`` and
        ``max_num_batched_tokens``, async scheduling, prefix caching) with the KV cache
        sized from GPU memory; ``overrides`` replace any field."""
        from pars_fast.sim.costs import kv_capacity_blocks, vllm_serving_defaults

        d = vllm_serving_defaults(gpu)
        fields = {
            "model": model,
            "gpu": gpu,
            "tp": tp,
            "num_blocks": kv_capacity_blocks(model=model, gpu=gpu, tp=tp, gpu_memory_utilization=gpu_memory_utilization,
                                             block_size=d["block_size"]),
            "max_num_seqs": d["max_num_seqs"],
            "max_num_batched_tokens": d["max_num_batched_tokens"],
            "max_model_len": max_model_len,
            "block_size": d["block_size"],
            "enable_prefix_caching": d["enable_prefix_caching"],
            "async_scheduling": d["async_scheduling"],
        }
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sim_model_dir() -> Path:
    """A model folder for vLLM's ``ModelConfig``: the scheduler reads only its limits, so a
    tiny Llama with a long context stands for the simulated model (no weights are run)."""
    from pars_fast.paths import home
    from pars_fast.tiny_llama import build_tiny_llama

    return build_tiny_llama(home() / "models" / "tiny-llama-sim", max_position_embeddings=131072)


@dataclass
class SimRun:
    """What one simulated run produced."""

    timings: list[RequestTiming]
    makespan_s: float  # virtual seconds from the first arrival to the last finish
    steps: int
    preemptions: int
    depth: list[tuple[float, int, int]]  # (t, waiting, running), thinned to DEPTH_SAMPLES
    wall_s: float  # real seconds the simulation took
    schedule_s: float  # real seconds inside schedule() (the scheduler's own Python)
    update_s: float  # real seconds inside update_from_output()
    skipped: int = 0  # requests that did not fit max_model_len, not run
    pars_stats: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Track:
    """A request's timeline in one run."""

    idx: int
    prompt_len: int
    max_tokens: int
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    finish: float | None = None
    output_tokens: int = 0
    preemptions: int = 0


class SimEngine:
    """Runs requests through ``scheduler_cls`` on ``deployment``, priced by ``cost``.

    ``pars``: ``additional_config["pars"]`` for a ``PARSScheduler``; ``policy``: vLLM's
    scheduling policy (``"fcfs"`` or ``"priority"``); ``runtime``: builds the
    ``pars_runtime`` for a ``PARSScheduler`` from the run's clock (None: vLLM's own
    scheduler, which takes none); ``priorities``: request index -> vLLM priority (for
    ``"priority"``).
    """

    def __init__(
        self,
        scheduler_cls: type,
        deployment: Deployment,
        cost: StepCost,
        *,
        pars: dict[str, Any] | None = None,
        policy: str = "fcfs",
        runtime: Callable[[VirtualClock], Any] | None = None,
        priorities: Sequence[int] | None = None,
    ) -> None:
        self.scheduler_cls = scheduler_cls
        self.deployment = deployment
        self.cost = cost
        self.pars = pars
        self.policy = policy
        self.runtime = runtime
        self.priorities = priorities

    def _scheduler(self, clock: VirtualClock) -> Any:
        from pars_fast.sim.harness import make_scheduler, make_vllm_config

        d = self.deployment
        vllm_config = make_vllm_config(
            sim_model_dir(),
            max_num_seqs=d.max_num_seqs,
            max_num_batched_tokens=d.max_num_batched_tokens,
            max_model_len=d.max_model_len,
            block_size=d.block_size,
            num_blocks=d.num_blocks,
            policy=self.policy,
            async_scheduling=d.async_scheduling,
            enable_prefix_caching=d.enable_prefix_caching,
            pars=self.pars,
        )
        extra = {} if self.runtime is None else {"pars_runtime": self.runtime(clock)}
        cls = self.scheduler_cls
        if d.async_scheduling:
            from vllm.v1.core.sched.async_scheduler import AsyncScheduler
            from vllm.v1.core.sched.scheduler import Scheduler

            if cls is Scheduler:  # as vLLM picks its scheduler class when async scheduling is on
                cls = AsyncScheduler
        return make_scheduler(cls, vllm_config, **extra)

    def run(self, requests: Sequence[Any], progress: Callable[[int], None] | None = None) -> SimRun:
        """Serve ``requests`` (``pars_fast.sim.workload.SimRequest``: arrival order, true
        output lengths) and return every request's timings.

        Every request must finish exactly once with exactly its true length; anything
        else is a :class:`SimError`, as is a step the cost model prices at a non-finite
        or non-positive time. Requests that do not fit ``max_model_len`` are skipped and
        counted.
        """
        replica = self.start()
        try:
            for r in sorted(requests, key=lambda r: (r.arrival_s, r.idx)):
                replica.run_until(r.arrival_s)
                replica.add(r)
                if progress is not None:
                    progress(replica.finished)
            replica.drain(progress)
        finally:
            replica.close()
        return replica.result()

    def start(self) -> Replica:
        """A running engine to feed request by request (``Replica.add``), as a router does."""
        return Replica(self)


class Replica:
    """One simulated engine on its own virtual clock, stepped as vLLM's engine core steps.

    ``run_until(t)`` runs every step that starts before ``t``; ``add(request)`` hands it
    a request that arrived at ``request.arrival_s`` (it joins at the next step, as in
    vLLM, where new requests are added between steps); ``drain()`` runs until all have
    finished. Several replicas advanced arrival by arrival are a cluster behind a router.
    """

    def __init__(self, engine: SimEngine) -> None:
        from pars_fast.sim.harness import RequestFactory

        self.engine = engine
        self.clock = VirtualClock(0.0)
        self.sched = engine._scheduler(self.clock)
        self.deployment = d = engine.deployment
        self.factory = RequestFactory(block_size=d.block_size)
        self.tracks: dict[str, _Track] = {}
        self.arrivals: deque[Any] = deque()  # added, not yet handed to the scheduler
        self.finished = 0
        self.skipped = 0
        self.steps = 0
        self.preemptions = 0
        self.schedule_s = 0.0
        self.update_s = 0.0
        self.depth: list[tuple[float, int, int]] = []
        self._in_flight: deque[tuple[Any, list[str], float]] = deque()  # (output, sampling ids, end time)
        self._gpu_free_at = 0.0
        self._empty_steps = 0
        self._max_in_flight = 2 if d.async_scheduling else 1
        self._wall0 = time.perf_counter()
        self._pars_stats: dict[str, Any] | None = None

    # ------------------------------------------------------------------ feeding

    def add(self, r: Any) -> None:
        d = self.deployment
        if r.prompt_len + r.output_tokens > d.max_model_len or r.output_tokens < 1:
            self.skipped += 1  # as vLLM's front end would refuse it (and bench e2e skips it)
            return
        self.arrivals.append(r)

    @property
    def load(self) -> int:
        """Requests it holds (running, waiting or not yet admitted): a router's measure."""
        return len(self.tracks) - self.finished + len(self.arrivals)

    @property
    def busy(self) -> bool:
        return bool(self.arrivals or self.sched.has_requests() or self._in_flight)

    def run_until(self, t: float) -> None:
        """Run the steps that start before ``t``; an idle engine just waits for ``t``."""
        while self.clock.now() < t:
            if not (self.sched.has_requests() or self._in_flight):
                if not self.arrivals or self.arrivals[0].arrival_s >= t:
                    self.clock.advance_to(t)
                    return
            self._step()

    def drain(self, progress: Callable[[int], None] | None = None) -> None:
        while self.busy:
            self._step()
            if progress is not None:
                progress(self.finished)

    # ------------------------------------------------------------------ one step

    def _admit(self) -> None:
        now = self.clock.now()
        engine = self.engine
        while self.arrivals and self.arrivals[0].arrival_s <= now:
            r = self.arrivals.popleft()
            rid = str(r.idx)
            priority = 0 if engine.priorities is None else int(engine.priorities[r.idx])
            req = self.factory.make(list(r.prompt_token_ids), r.output_tokens, request_id=rid,
                                    arrival_time=r.arrival_s, priority=priority, cache_salt=r.cache_salt)
            self.tracks[rid] = _Track(r.idx, r.prompt_len, r.output_tokens, r.arrival_s)
            self.sched.add_request(req)

    def _step(self) -> None:
        """Schedule one step (or, with a step in flight and no room, finish the oldest)."""
        sched, clock = self.sched, self.clock
        if not sched.has_requests() and not self._in_flight:
            clock.advance_to(max(clock.now(), self.arrivals[0].arrival_s))  # idle: jump to the next arrival
        if len(self._in_flight) >= self._max_in_flight:
            self._finish_oldest()
            return
        self._admit()
        t0 = time.perf_counter()
        output = sched.schedule()
        self.schedule_s += time.perf_counter() - t0
        start = clock.now()  # after any inline ranking
        if not output.total_num_scheduled_tokens:
            # Nothing to run: the engine core skips the model, then still updates.
            sched.update_from_output(output, _runner_output(output, []))
            if self._in_flight:
                self._finish_oldest()
            elif self.arrivals and not sched.has_requests():
                clock.advance_to(max(clock.now(), self.arrivals[0].arrival_s))
            else:
                self._empty_steps += 1
                if self._empty_steps > MAX_EMPTY_STEPS:
                    raise SimError(f"step {self.steps}: {len(sched.requests)} request(s) left and none can be scheduled")
            return
        self._empty_steps = 0
        batch, sampling = _step_batch(sched, output)
        cost = self.engine.cost
        dt = cost.step_s(batch)
        if not (isinstance(dt, (int, float)) and math.isfinite(dt) and dt > 0):
            raise SimError(
                f"cost model {getattr(cost, 'name', cost)!r} priced step {self.steps} at {dt!r} s "
                f"(must be finite and > 0): {len(batch.prefill_chunks)} prefill chunks of "
                f"{batch.prefill_tokens} tokens, {batch.decode_tokens} decoding requests"
            )
        begin = max(start, self._gpu_free_at)
        self._gpu_free_at = begin + dt
        for new in output.scheduled_new_reqs:
            tr = self.tracks[new.req_id]
            if tr.scheduled is None:
                tr.scheduled = begin
        for rid in output.preempted_req_ids or ():
            self.tracks[rid].preemptions += 1
            self.preemptions += 1
        self._in_flight.append((output, sampling, self._gpu_free_at))
        self.steps += 1
        self._sample_depth(begin)
        if len(self._in_flight) >= self._max_in_flight or not sched.has_requests():
            self._finish_oldest()
        # else (async): the next step is scheduled while this one runs

    def _finish_oldest(self) -> None:
        output, sampling, end = self._in_flight.popleft()
        self.clock.advance_to(max(self.clock.now(), end))
        t0 = time.perf_counter()
        engine_outputs = self.sched.update_from_output(output, _runner_output(output, sampling))
        self.update_s += time.perf_counter() - t0
        for outs in engine_outputs.values():
            for out in outs.outputs:
                tr = self.tracks[out.request_id]
                if out.new_token_ids:
                    if tr.first_token is None:
                        tr.first_token = end
                    tr.output_tokens += len(out.new_token_ids)
                if out.finish_reason is not None:
                    if tr.finish is not None:
                        raise SimError(f"request {tr.idx} finished twice")
                    tr.finish = end
                    self.finished += 1

    def _sample_depth(self, t: float) -> None:
        if len(self.depth) >= 2 * DEPTH_SAMPLES:
            self.depth = self.depth[::2]  # thin evenly; later samples are taken half as often
        stride = 1 << max(0, self.steps.bit_length() - DEPTH_SAMPLES.bit_length())
        if self.steps % stride == 0:
            self.depth.append((t, self.sched.get_request_counts()[1], len(self.sched.running)))

    # ------------------------------------------------------------------ the end

    def close(self) -> None:
        if self._pars_stats is None and hasattr(self.sched, "pars_stats"):
            self._pars_stats = self.sched.pars_stats()
        self.sched.shutdown()

    def result(self) -> SimRun:
        lost = [tr.idx for tr in self.tracks.values() if tr.finish is None]
        if lost or self.arrivals:
            raise SimError(f"{len(lost) + len(self.arrivals)} request(s) never finished (first: {lost[:5]})")
        wrong = [(tr.idx, tr.output_tokens, tr.max_tokens) for tr in self.tracks.values() if tr.output_tokens != tr.max_tokens]
        if wrong:
            raise SimError(f"{len(wrong)} request(s) produced the wrong number of tokens (idx, got, true): {wrong[:5]}")
        timings = [
            RequestTiming(
                idx=tr.idx, prompt_len=tr.prompt_len, max_tokens=tr.max_tokens, output_tokens=tr.output_tokens,
                arrival=tr.arrival, submit=tr.arrival, first_token=tr.first_token, finish=tr.finish,
                queued=tr.arrival, scheduled=tr.scheduled, preemptions=tr.preemptions,
            )
            for tr in sorted(self.tracks.values(), key=lambda t: t.idx)
        ]
        first = min((t.arrival for t in timings), default=0.0)
        return SimRun(
            timings=timings,
            makespan_s=max((t.finish for t in timings), default=0.0) - first,
            steps=self.steps,
            preemptions=self.preemptions,
            depth=self.depth,
            wall_s=time.perf_counter() - self._wall0,
            schedule_s=self.schedule_s,
            update_s=self.update_s,
            skipped=self.skipped,
            pars_stats=self._pars_stats,
        )


def _step_batch(sched: Any, output: Any) -> tuple[StepBatch, list[str]]:
    """What the step computes, and which requests sample a token in it.

    vLLM advanced each request's ``num_computed_tokens`` by its scheduled tokens inside
    ``schedule()``, so the tokens already in its KV cache are that minus the new ones. A
    request samples when this step reaches the end of its known tokens (decode, or the
    last chunk of a prefill): ``is_prefill_chunk`` is False.
    """
    prefill: list[tuple[int, int]] = []
    decode: list[int] = []
    sampling: list[str] = []
    requests = sched.requests
    for rid, n in output.num_scheduled_tokens.items():
        req = requests[rid]
        before = req.num_computed_tokens - n
        if n == 1 and before >= req.num_prompt_tokens:
            decode.append(before + 1)
        else:
            prefill.append((n, before))
        if not req.is_prefill_chunk:
            sampling.append(rid)
    return StepBatch(tuple(prefill), tuple(decode)), sampling


def _runner_output(output: Any, sampling: list[str]) -> Any:
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(output.num_scheduled_tokens)
    sample = set(sampling)
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=[[SAMPLED_TOKEN_ID] if r in sample else [] for r in req_ids],
    )


def check_cost(cost: StepCost) -> None:
    """A cost model must price a one-token decode step at a finite, positive time."""
    dt = cost.step_s(StepBatch(decode_contexts=(1,)))
    if not (math.isfinite(dt) and dt > 0):
        raise CostModelError(f"{cost.name}: a one-token decode step costs {dt!r} s")
