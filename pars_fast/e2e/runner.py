"""One scheduling policy on one real vLLM engine, in its own process.

Each policy gets its own ``AsyncLLM`` engine (the scheduler class is fixed when an
engine is built) in a fresh spawned process, so nothing is shared between policies
and a crash costs one policy. ``PolicyEngine`` is the parent's handle: it starts the
process, which builds the engine and warms it up, then serves load levels on
command, so the caller decides the order (``pars_fast.e2e.benchmark`` interleaves
the policies level by level: on a shared machine, a slow minute then hits every
policy alike instead of one).

Serving a level: a submitter sleeps until each request's arrival time and hands it
to the engine (in arrival order, so FCFS order is arrival order); one task per
request waits for its final output. Before every level the engine is idle, gets the
same short warm-up (excluded) and a moment to settle.

vLLM writes its logs to stdout and stderr; the child points both at a log file and
keeps the terminal only for its progress bars.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

from pars_fast.aging import aged_priority, prompt_cost
from pars_fast.e2e.metrics import RequestTiming
from pars_fast.e2e.workload import arrival_offsets

# Seconds of quiet after each warm-up, so every level starts on an idle engine whose
# last outputs have been fully processed.
SETTLE_S = 1.0
# Output tokens of each warm-up request: enough to run prefill and a few decode steps.
WARMUP_TOKENS = 8
# Seconds vLLM's engine core gets to exit after SIGTERM, and its model worker to exit
# before the engine core kills it. vLLM's defaults (5 s each) are too short for CPU
# engines on a busy 2-core machine: the worker spends its exit in the garbage collector
# (6 s alone at load 8; 46 s, and 74 s to the engine core's exit, for two engines
# stopping together), the engine core is SIGKILLed while still waiting for it, and the
# shared-memory ring buffer it would unlink on exit (and the semaphores of processes
# killed) are left to Python's resource tracker, which warns about "leaked" objects at
# exit. Only a stuck process waits this long.
ENGINE_SHUTDOWN_S = 240.0
WORKER_SHUTDOWN_S = 120
# Seconds the parent waits for a policy process to exit after "stop": the engine's
# shutdown above, then the process's own exit.
CLOSE_TIMEOUT_S = ENGINE_SHUTDOWN_S + 60.0


@dataclass
class EngineSettings:
    """Engine arguments shared by every policy of a run (only the scheduler differs)."""

    model: str
    dtype: str = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 8
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    # Off: each load level replays the same prompts, and a cached prefix would make
    # later levels cheaper than the first.
    enable_prefix_caching: bool = False
    seed: int = 0
    kv_cache_gib: int = 1  # CPU only (VLLM_CPU_KVCACHE_SPACE); GPU engines size their own cache
    extra_args: dict[str, Any] = field(default_factory=dict)

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            model=self.model,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            # Per-request engine timestamps (queued, scheduled, first token) need stats on.
            disable_log_stats=False,
        )
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        kwargs.update(self.extra_args)
        return kwargs


@dataclass
class PolicySpec:
    """How one policy configures the engine and the client."""

    name: str
    scheduler_cls: str | None = None  # None: vLLM's own Scheduler
    scheduling_policy: str = "fcfs"  # vLLM's --scheduling-policy
    pars: dict[str, Any] | None = None  # additional_config["pars"] for PARSScheduler
    # Client-side priorities (lower = sooner), one per job, for vLLM's priority policy.
    priorities: list[int] | None = None
    # Client-side ranker time per request (pars-priority), measured by the caller.
    client_scoring_s_per_request: float | None = None
    # A ranker folder the client scores each prompt with *as it arrives*, sending the
    # score as vLLM's priority (pars-frontend: the ranker in the serving front end).
    frontend_ranker: str | None = None
    frontend_aging: float = 0.0
    frontend_prompt_weight: float = 0.0
    # More of vLLM's additional_config, merged with "pars" (e.g. a step recorder's "step_log").
    additional_config: dict[str, Any] | None = None


@dataclass
class RunSpec:
    """What one policy process needs: engine, policy and the request stream."""

    policy: PolicySpec
    engine: EngineSettings
    prompt_token_ids: list[list[int]]
    max_tokens: list[int]
    prompts: list[str] | None = None  # the prompt texts (a front-end ranker reads them)
    seed: int = 0
    progress: bool = True
    stats_file: str | None = None  # where PARSScheduler writes its counters

    def validate(self) -> None:
        n = len(self.prompt_token_ids)
        if n == 0 or len(self.max_tokens) != n:
            raise ValueError(f"need the same number (>= 1) of prompts and max_tokens, got {n} and {len(self.max_tokens)}")
        if any(m < 1 for m in self.max_tokens):
            raise ValueError("every request needs max_tokens >= 1")
        if self.policy.priorities is not None and len(self.policy.priorities) != n:
            raise ValueError(f"{len(self.policy.priorities)} priorities for {n} requests")
        if self.policy.frontend_ranker is not None and (self.prompts is None or len(self.prompts) != n):
            raise ValueError("a front-end ranker needs the prompt texts, one per request")

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = self.engine.engine_kwargs()
        if self.policy.scheduler_cls:
            kwargs["scheduler_cls"] = self.policy.scheduler_cls
        kwargs["scheduling_policy"] = self.policy.scheduling_policy
        # Merged, not replaced: --engine-arg additional_config=... and the policy's own keys stay.
        extra = {**(kwargs.get("additional_config") or {}), **(self.policy.additional_config or {})}
        if self.policy.pars is not None:
            pars = dict(self.policy.pars)
            if self.stats_file:
                pars["stats_file"] = self.stats_file
            extra["pars"] = pars
        if extra:
            kwargs["additional_config"] = extra
        return kwargs


class RunError(RuntimeError):
    """A policy process failed; the message says why and where its log is."""


# ---------------------------------------------------------------------- parent side


class PolicyEngine:
    """Parent's handle on one policy's engine process.

    ``start()`` launches it (engine build + warm-up happen in the background);
    ``wait_ready()`` waits for that; ``run_level(name, rate)`` serves the whole stream
    once (``rate=None``: burst) and returns the raw level result; ``close()`` stops it.
    """

    def __init__(self, spec: RunSpec, log_path: str | Path | None, timeout_s: float | None = None) -> None:
        """``log_path=None`` leaves vLLM's logs on the terminal."""
        spec.validate()
        self.spec = spec
        self.name = spec.policy.name
        self.log_path = Path(log_path) if log_path is not None else None
        self.timeout_s = timeout_s
        self.info: dict[str, Any] = {}
        self._proc: Any = None
        self._conn: Connection | None = None
        self._t_start = 0.0

    def start(self) -> None:
        self._t_start = time.monotonic()
        ctx = multiprocessing.get_context("spawn")  # no fork of a parent that may hold torch threads
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main,
            args=(child, asdict(self.spec), None if self.log_path is None else str(self.log_path)),
            name=f"pars-e2e-{self.name}",
        )
        self._proc.start()
        child.close()
        self._conn = parent

    def wait_ready(self) -> dict[str, Any]:
        self.info = self._receive("ready", what="start its engine")
        # Spawn + imports + engine build + warm-up, as the parent saw it.
        self.info["ready_s"] = time.monotonic() - self._t_start
        return self.info

    def run_level(self, load: str, rate: float | None) -> dict[str, Any]:
        self._send({"cmd": "run", "load": load, "rate": rate})
        return self._receive("done", what=f"serve load {load!r}")["level"]

    def stop(self) -> None:
        """Ask the process to shut its engine down (returns at once; ``close()`` waits)."""
        if self._proc is not None and self._proc.is_alive() and self._conn is not None:
            try:
                self._send({"cmd": "stop"})
            except (OSError, ValueError):
                pass

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the engine and wait for the process (politely, then by force: a process
        terminated leaves its semaphores and its engine's shared memory to the resource
        tracker, which warns about them)."""
        if self._proc is None:
            return
        self.stop()
        self._proc.join(timeout_s)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(10)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def _send(self, msg: dict[str, Any]) -> None:
        assert self._conn is not None, "start() first"
        self._conn.send(json.dumps(msg))

    def _receive(self, event: str, what: str) -> dict[str, Any]:
        assert self._conn is not None and self._proc is not None, "start() first"
        deadline = None if self.timeout_s is None else time.monotonic() + self.timeout_s
        while True:
            # Poll in slices, so a dead process is noticed instead of waited on forever.
            if self._conn.poll(1.0):
                try:
                    msg = json.loads(self._conn.recv())
                except EOFError:
                    msg = {"event": "error", "error": "the process closed its pipe"}
                if msg.get("event") == event:
                    return msg
                raise RunError(f"policy {self.name!r} failed to {what}: {msg.get('error')}\nlog: {self.log_path}\n{self.log_tail()}")
            if not self._proc.is_alive():
                raise RunError(
                    f"policy {self.name!r} died (exit code {self._proc.exitcode}) trying to {what}; "
                    f"log: {self.log_path}\n{self.log_tail()}"
                )
            if deadline is not None and time.monotonic() > deadline:
                raise RunError(f"policy {self.name!r} did not {what} within {self.timeout_s} s; log: {self.log_path}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None:
            return "(logs went to the terminal)"
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ---------------------------------------------------------------------- child side


def _child_main(conn: Connection, spec_dict: dict[str, Any], log_path: str | None) -> None:
    """Entry point of the policy process."""
    bars = _redirect_output(log_path) if log_path is not None else sys.stdout
    spec = RunSpec(
        policy=PolicySpec(**spec_dict["policy"]),
        engine=EngineSettings(**spec_dict["engine"]),
        **{k: v for k, v in spec_dict.items() if k not in ("policy", "engine")},
    )
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.engine.kv_cache_gib))
    # Read by the engine core (a child of this process) when it stops its worker.
    os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", str(WORKER_SHUTDOWN_S))
    try:
        asyncio.run(_serve(conn, spec, bars))
    except BaseException:
        error = traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
        try:
            conn.send(json.dumps({"event": "error", "error": error.strip().splitlines()[-1]}))
        except OSError:
            pass
        raise SystemExit(1) from None
    finally:
        conn.close()


def _redirect_output(log_path: str) -> TextIO:
    """Point fds 1 and 2 (and so vLLM's logs and its subprocesses') at the log file.

    Returns a stream on the original stdout, for the progress bars.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    bars = os.fdopen(os.dup(1), "w", buffering=1)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return bars


async def _serve(conn: Connection, spec: RunSpec, bars: TextIO) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    loop = asyncio.get_running_loop()
    t_start = time.monotonic()
    frontend = None
    if spec.policy.frontend_ranker is not None:
        import torch

        from pars_fast.ranker import Ranker

        torch.set_num_threads(1)  # a front end shares its cores with the engine core
        frontend = Ranker.load(spec.policy.frontend_ranker, device="cpu")
        frontend.score(["warm up", "the quick brown fox jumps over the lazy dog " * 20])
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**spec.engine_kwargs()))
    engine_start_s = time.monotonic() - t_start
    try:
        # Token ids in, rendered once up front (the same for every policy); only
        # arrival_time is set at submission.
        rendered = engine.renderer.render_cmpl([{"prompt_token_ids": ids} for ids in spec.prompt_token_ids])

        def params(max_tokens: int) -> SamplingParams:
            # Greedy and no detokenizing: the tokens are irrelevant (ignore_eos fixes the
            # length), so spend no CPU on sampling or text.
            return SamplingParams(
                max_tokens=max_tokens,
                ignore_eos=True,
                temperature=0.0,
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )

        async def warm_up(tag: str) -> float:
            # A full batch of real prompts, a few tokens each: prefill, decode, and for
            # PARS the ranker. Not measured.
            t0 = time.monotonic()
            k = min(spec.engine.max_num_seqs, len(rendered))
            tasks = [
                await _submit(engine, f"warmup-{tag}-{i}", rendered[i], params(min(WARMUP_TOKENS, spec.max_tokens[i])), 0)
                for i in range(k)
            ]
            await asyncio.gather(*tasks)
            await asyncio.sleep(SETTLE_S)
            return time.monotonic() - t0

        warmup_s = await warm_up("start")
        conn.send(json.dumps({"event": "ready", "engine_start_s": engine_start_s, "warmup_s": warmup_s}))
        while True:
            msg = json.loads(await loop.run_in_executor(None, conn.recv))
            if msg["cmd"] == "stop":
                break
            if msg["cmd"] != "run":
                raise ValueError(f"unknown command {msg!r}")
            load, rate = msg["load"], msg["rate"]
            await warm_up(load)
            # Every level starts from the same state: the warm-up's requests (the stream's
            # own prompts, cut at a few tokens) and earlier levels (the same prompts again)
            # must not have taught PARS's online learner anything.
            await engine.reset_prefix_cache()
            await asyncio.sleep(SETTLE_S)
            before = _read_stats(spec.stats_file)
            load_before = _loadavg()
            offsets = arrival_offsets(len(rendered), rate, spec.seed)
            timings, frontend_s = await _replay(engine, rendered, spec, offsets, params, load, bars, frontend)
            scored = _stats_delta(before, _read_stats(spec.stats_file))
            per_request = spec.policy.client_scoring_s_per_request
            if frontend is not None:
                per_request = frontend_s / len(timings)
            if scored is not None and scored["requests"] > 0:
                per_request = scored["scoring_seconds"] / scored["requests"]
            level = {
                "load": load,
                "rate_rps": rate,
                "requests": [t.to_dict() for t in timings],
                "scoring_s_per_request": per_request,
                "pars_stats": scored,
                # 1-minute load average around the level: how busy the machine was
                # (others' jobs included), to judge the timings by.
                "loadavg": [load_before, _loadavg()],
            }
            conn.send(json.dumps({"event": "done", "level": level}))
    finally:
        # A timeout: without one vLLM kills its engine core 5 s after asking it to stop.
        engine.shutdown(timeout=ENGINE_SHUTDOWN_S)
        del engine
        gc.collect()  # while modules are alive: AsyncLLM.__del__ at exit would fail noisily


async def _submit(engine: Any, request_id: str, prompt: dict[str, Any], params: Any, priority: int) -> asyncio.Future:
    """Hand one request to the engine (returns once it is queued) and a future of its final output."""
    prompt = dict(prompt, arrival_time=time.time())  # the engine's arrival clock: now
    collector = await engine.add_request(request_id, prompt, params, priority=priority)

    async def final() -> tuple[Any, float]:
        while True:
            out = collector.get_nowait() or await collector.get()
            if out.finished:
                return out, time.monotonic()

    return asyncio.ensure_future(final())


async def _replay(
    engine: Any,
    rendered: list[dict[str, Any]],
    spec: RunSpec,
    offsets: Any,
    params: Any,
    load: str,
    bars: TextIO,
    frontend: Any = None,
) -> tuple[list[RequestTiming], float]:
    """Submit every request at its arrival time; wait for all; return their timings and the
    seconds a front-end ranker spent scoring (0 without one)."""
    from tqdm import tqdm

    n = len(rendered)
    priorities = spec.policy.priorities or [0] * n
    bar = tqdm(total=n, desc=f"{spec.policy.name:>13} {load:>5}", unit="req", disable=not spec.progress, file=bars)
    t0 = time.monotonic()
    frontend_s = 0.0
    submitted: list[tuple[int, float, asyncio.Future]] = []
    for i in range(n):
        delay = t0 + float(offsets[i]) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        submit = time.monotonic()
        priority = int(priorities[i])
        if frontend is not None:
            # Scored on arrival, in the front end's event loop (as a server would), before
            # the request reaches the engine; the prompt's cost and aging as PARSScheduler
            # folds them in.
            score = float(frontend.score([spec.prompts[i]])[0])  # type: ignore[index]
            score += prompt_cost(len(spec.prompt_token_ids[i]), spec.policy.frontend_prompt_weight)
            priority = aged_priority(score, submit, t0, spec.policy.frontend_aging)
            frontend_s += time.monotonic() - submit
        task = await _submit(engine, f"{load}-{i}", rendered[i], params(spec.max_tokens[i]), priority)
        task.add_done_callback(lambda _t: bar.update(1))
        submitted.append((i, submit, task))
    await asyncio.gather(*(task for _, _, task in submitted))
    bar.close()

    timings = []
    for i, submit, task in submitted:
        out, finish = task.result()
        produced = len(out.outputs[0].token_ids)
        if produced != spec.max_tokens[i]:
            raise RunError(
                f"{spec.policy.name}/{load}: request {i} produced {produced} tokens, expected "
                f"max_tokens={spec.max_tokens[i]} (ignore_eos); finish_reason={out.outputs[0].finish_reason}"
            )
        m = out.metrics  # engine-core timestamps on the same monotonic clock
        first = m.first_token_ts if m is not None and m.first_token_ts else finish
        timings.append(
            RequestTiming(
                idx=i,
                prompt_len=len(spec.prompt_token_ids[i]),
                max_tokens=spec.max_tokens[i],
                output_tokens=produced,
                arrival=float(offsets[i]),
                submit=submit - t0,
                # Stamped in the engine core; clamp to the client's own observations.
                first_token=min(max(first, submit), finish) - t0,
                finish=finish - t0,
                queued=(m.queued_ts - t0) if m is not None and m.queued_ts else None,
                scheduled=(m.scheduled_ts - t0) if m is not None and m.scheduled_ts else None,
                preemptions=int(m.num_preemptions) if m is not None else 0,
            )
        )
    return timings, frontend_s


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _read_stats(path: str | None) -> dict[str, Any] | None:
    if not path or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """PARSScheduler counters accumulated during one level (warm-ups and other levels excluded)."""
    if after is None:
        return None
    before = before or {}

    def d(key: str) -> float:
        return float(after.get(key, 0) or 0) - float(before.get(key, 0) or 0)

    return {
        "requests": int(d("requests_scored")),
        "fallback": int(d("requests_fallback")),
        "batches": int(d("batches")),
        "scoring_seconds": d("scoring_seconds"),
        "decode_seconds": d("decode_seconds"),
        "max_batch_seconds": float(after.get("max_batch_seconds", 0.0)),
        "unranked": int(d("requests_unranked")),
        "skipped": int(d("requests_skipped")),
        "late": int(d("scores_late")),
        "share_limited_steps": int(d("share_limited_steps")),  # ranking skipped: it would cost over max_share
        "ranker": after.get("ranker"),
        "worker": after.get("worker"),
        "online": after.get("online"),  # the learner at the end of the level (reset before it)
    }
