"""End-to-end benchmark on a real vLLM engine: FCFS vs PARS vs oracle SJF.

* ``workload``: held-out ShareGPT (or JSONL) requests with their true lengths; arrivals.
* ``runner``: one policy on one ``AsyncLLM`` engine, in its own process.
* ``benchmark``: every policy on the same stream; capacity measured from the FCFS burst.
* ``metrics``: per-request timings -> latency, TTFT, normalized latency, wait, throughput.
* ``report``: Markdown table, ratios, latency CDF and bar plots.

CLI: ``pars-fast bench e2e`` (``pars_fast.bench``) and ``pars-fast demo`` (``pars_fast.demo``).
"""

from pars_fast.e2e.benchmark import DEFAULT_LOADS, DEFAULT_POLICIES, POLICIES, BenchConfig, BenchError, run_benchmark
from pars_fast.e2e.metrics import SUMMARY_KEYS, RequestTiming, summarize
from pars_fast.e2e.report import markdown_report, write_report

__all__ = [
    "DEFAULT_LOADS",
    "DEFAULT_POLICIES",
    "POLICIES",
    "SUMMARY_KEYS",
    "BenchConfig",
    "BenchError",
    "RequestTiming",
    "markdown_report",
    "run_benchmark",
    "summarize",
    "write_report",
]
