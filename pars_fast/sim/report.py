"""``pars-fast sim``'s outputs: results.json, a Markdown report and PNG curves against load.

Every output says it is a simulation, with the step-cost model, the ranker's cost and
where their numbers come from next to the results (the project's rule: a simulated
win is labelled as simulation, with its cost model and fidelity stated beside it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pars_fast.e2e.report import COLORS, _fmt, _save, markdown_table, ratio_table

# (column title, summary key, scale, format): vllm-ltr's and vLLM's serving benchmark's metrics.
SIM_COLUMNS = (
    ("mean (s)", "latency_mean", 1.0, "{:.2f}"),
    ("P90 (s)", "latency_p90", 1.0, "{:.2f}"),
    ("P99 (s)", "latency_p99", 1.0, "{:.2f}"),
    ("TTFT mean (s)", "ttft_mean", 1.0, "{:.2f}"),
    ("TTFT P90 (s)", "ttft_p90", 1.0, "{:.2f}"),
    ("TPOT mean (ms)", "tpot_mean", 1e3, "{:.1f}"),
    ("per-token mean (s/tok)", "norm_latency_mean", 1.0, "{:.3f}"),
    ("per-token P90 (s/tok)", "norm_latency_p90", 1.0, "{:.3f}"),
    ("max wait (s)", "wait_max", 1.0, "{:.1f}"),
    ("req/s", "throughput_rps", 1.0, "{:.2f}"),
    ("tok/s", "throughput_tps", 1.0, "{:.0f}"),
    ("preemptions", "preemptions", 1.0, "{:.0f}"),
)

SIMULATION_NOTE = (
    "**Simulation, not a measurement.** vLLM's own V1 scheduler code (and PARSScheduler's) ran on a "
    "virtual clock, with vLLM's real KV cache manager sized to the GPU; only the forward pass is "
    "modelled, by the step cost below. Fidelity: docs/BENCHMARKS.md, \"Simulated GPU serving\"."
)


def write_outputs(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, results.md and the plots to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    plots = plot_curves(result, out)
    md = out / "results.md"
    md.write_text(markdown_report(result, [p.relative_to(out) for p in plots]))
    return {"json": path, "markdown": md, **{p.stem: p for p in plots}}


def _pars_line(meta: dict[str, Any], cfg: dict[str, Any]) -> str:
    shipped = meta.get("pars_defaults") or {}
    text = "PARS: " + (", ".join(f"{k} {v}" for k, v in shipped.items()) or "–") + " (shipped defaults)"
    if cfg.get("pars"):
        text += f"; every pars policy with {json.dumps(cfg['pars'])}"
    if cfg.get("variants"):
        text += "; variants: " + ", ".join(f"{name} {json.dumps(v)}" for name, v in cfg["variants"].items())
    return text + "; pars-frozen: online adaptation off."


def markdown_report(result: dict[str, Any], plots: Sequence[Path] = ()) -> str:
    meta, cfg, dep = result["meta"], result["meta"]["config"], result["meta"]["deployment"]
    first = next(iter(result["workload"].values()))
    lines = [
        SIMULATION_NOTE,
        "",
        f"Deployment: `{dep['model']}` on {cfg['replicas']} × {dep['tp']} × {dep['gpu']} "
        f"({cfg['router']} router) — {dep['num_blocks']:,} KV blocks of {dep['block_size']} tokens, "
        f"max_num_seqs {dep['max_num_seqs']}, max_num_batched_tokens {dep['max_num_batched_tokens']}, "
        f"max_model_len {dep['max_model_len']}, async scheduling {'on' if dep['async_scheduling'] else 'off'}, "
        f"prefix caching {'on' if dep['enable_prefix_caching'] else 'off'}.",
        f"Step cost: {meta['step_cost']['description']}",
        f"Ranker: `{Path(str(meta['ranker'])).name if meta['ranker'] else '–'}`; its cost: "
        f"{meta['ranker_cost']['per_batch_s'] * 1e3:.2f} ms a batch + {meta['ranker_cost']['per_prompt_s'] * 1e3:.2f} ms "
        f"a prompt ({meta['ranker_cost']['source']}).",
        _pars_line(meta, cfg),
        f"Workload: {cfg['n']:,} requests from {first['source']} ({cfg['arrivals']} arrivals, seed {cfg['seed']}), "
        f"tokenized with {first.get('tokenizer')}; response tokens mean {first['response_len']['mean']:.0f}, "
        f"p50 {first['response_len']['p50']:.0f}, p90 {first['response_len']['p90']:.0f}.",
    ]
    if result.get("capacity_rps"):
        how = f"FCFS on a burst of {result['capacity']['n']:,}, saturated window" if result["capacity"].get("measured") else "given"
        lines.append(f"Capacity: {result['capacity_rps']:.2f} req/s ({how}).")
    lines += [f"Simulated in {meta['wall_s'] / 60:.1f} min of wall time: `{meta['command']}`.", "",
              markdown_table(result, SIM_COLUMNS, machine_load=False), "", ratio_table(result), "", targets_table(result)]
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


def targets_table(result: dict[str, Any]) -> str:
    """PARS against the ends of the range: FCFS/PARS, share of SJF's log gain, P99 vs FCFS."""
    targets = result.get("targets") or {}
    policies = [p for p in result["policies"] if p not in ("fcfs", "sjf")]
    if not targets or not policies:
        return ""
    head = ["load", "FCFS/SJF mean"]
    for p in policies:
        head += [f"FCFS/{p} mean", f"{p} share of SJF's log gain", f"{p} P99 / FCFS P99"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for load in result["loads"]:
        row = targets.get(load, {})
        cells = [load, _fmt(row.get("fcfs_over_sjf_mean"), "{:.2f}×", 1.0)]
        for p in policies:
            cells += [
                _fmt(row.get(f"fcfs_over_{p}_mean"), "{:.2f}×", 1.0),
                _fmt(row.get(f"{p}_share_of_sjf_log_gain"), "{:.2f}", 1.0),
                _fmt(row.get(f"{p}_p99_over_fcfs_p99"), "{:.2f}×", 1.0),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rated(result: dict[str, Any]) -> list[tuple[str, float]]:
    """(load, req/s) of the Poisson loads, by rate."""
    first = next(iter(result["runs"].values()))["levels"]
    rated = [(load, first[load]["rate_rps"]) for load in result["loads"] if first[load]["rate_rps"]]
    return sorted(rated, key=lambda x: x[1])


def plot_curves(result: dict[str, Any], out: Path) -> list[Path]:
    """Curves against load (req/s; the burst as a separate point on the right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "sim_latency": [("mean latency (s)", "latency_mean", 1.0), ("P90 latency (s)", "latency_p90", 1.0),
                        ("P99 latency (s)", "latency_p99", 1.0)],
        "sim_ttft_tpot": [("mean TTFT (s)", "ttft_mean", 1.0), ("mean TPOT (ms)", "tpot_mean", 1e3)],
        "sim_per_token": [("mean per-token latency (s/token)", "norm_latency_mean", 1.0),
                          ("P90 per-token latency (s/token)", "norm_latency_p90", 1.0)],
        "sim_throughput": [("throughput (req/s)", "throughput_rps", 1.0), ("preemptions", "preemptions", 1.0)],
    }
    rated = _rated(result)
    capacity = result.get("capacity_rps")
    paths = []
    for name, metrics in panels.items():
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.6), squeeze=False)
        for ax, (title, key, scale) in zip(axes[0], metrics):
            for policy in result["policies"]:
                levels = result["runs"][policy]["levels"]
                xs = [rate for _, rate in rated]
                ys = [_value(levels[load]["summary"].get(key), scale) for load, _ in rated]
                ax.plot(xs, ys, marker="o", ms=3, label=policy, color=COLORS.get(policy))
            if capacity:
                ax.axvline(capacity, color="0.6", lw=0.8, ls="--")
            ax.set_xlabel("arrival rate (req/s)" + (", dashed: capacity" if capacity else ""))
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=8)
        fig.suptitle("SIMULATION", fontsize=9, color="0.4", x=0.99, ha="right")
        fig.tight_layout()
        paths.append(_save(fig, out / f"{name}.png"))
    paths.append(plot_depth(result, out / "sim_queue_depth.png"))
    return paths


def plot_depth(result: dict[str, Any], path: Path) -> Path:
    """Waiting requests over time, per policy: the highest Poisson load and the burst."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rated = _rated(result)
    loads = ([rated[-1][0]] if rated else []) + [load for load in result["loads"] if load == "burst"]
    loads = loads or result["loads"][:1]
    fig, axes = plt.subplots(1, len(loads), figsize=(5.5 * len(loads), 3.6), squeeze=False)
    for ax, load in zip(axes[0], loads):
        for policy in result["policies"]:
            depth = result["runs"][policy]["levels"][load]["depth"]
            ax.plot([d[0] for d in depth], [d[1] for d in depth], label=policy, color=COLORS.get(policy), lw=1)
        ax.set_title(f"waiting requests, load {load}")
        ax.set_xlabel("simulated time (s)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("SIMULATION", fontsize=9, color="0.4", x=0.99, ha="right")
    fig.tight_layout()
    return _save(fig, path)


def _value(v: Any, scale: float) -> float:
    return math.nan if v is None else float(v) * scale
