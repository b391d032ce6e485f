"""Per-request timings of one run and the summary metrics computed from them.

All times are seconds on the machine's monotonic clock, relative to the start of the
run (the first arrival). The client records when it submitted a request and when the
last output arrived; vLLM's engine core records when the request was queued, first
scheduled and produced its first token (``RequestOutput.metrics``), on the same
clock (CLOCK_MONOTONIC is system-wide, so the engine-core subprocess agrees with it).

Definitions (as in vllm-ltr and vLLM's serving benchmark):

* latency: submit -> last token received (end to end, client side);
* TTFT: submit -> first token;
* normalized latency: latency / output tokens (s per token), which weighs short
  requests stuck behind long ones the way a user feels it;
* wait: queued -> first scheduled, inside the engine (the queueing delay the
  scheduling order controls); the maximum shows starvation;
* throughput: requests (tokens) completed / (last finish - first submit);
* ITL: decode seconds per output token, over all requests (sum of last token - first
  token, over the sum of output tokens - 1): token-weighted, so a stall that hits one
  short request does not dominate it;
* TPOT: the same per request, then averaged over requests (vLLM's serving benchmark's
  "time per output token"), for requests with more than one token;
* step cost: ITL divided by the mean number of running requests. On a compute-bound
  engine (this CPU) a decode step's time grows with the batch, so an order that keeps
  more requests in flight raises ITL with no engine slowdown at all; the step cost
  takes that out and isolates what the scheduler adds to each step;
* saturated throughput (:func:`saturated_tps`): tokens per second while every slot of
  the engine was busy, which is the engine's capacity on this workload, free of the
  tail of a burst (its last, half-empty batches).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

# Every key ``summarize`` returns, in report order (tests check the JSON has them all).
SUMMARY_KEYS = (
    "n",
    "output_tokens",
    "latency_mean",
    "latency_p50",
    "latency_p90",
    "latency_p99",
    "ttft_mean",
    "ttft_p90",
    "norm_latency_mean",
    "norm_latency_p90",
    "wait_mean",
    "wait_max",
    "throughput_rps",
    "throughput_tps",
    "itl_mean",
    "tpot_mean",
    "tpot_p90",
    "running_mean",
    "step_cost_ms",
    "makespan_s",
    "preemptions",
    "scoring_ms_per_request",
)


class MetricsError(ValueError):
    """Timings that cannot be summarized (empty, missing, or out of order)."""


@dataclass(frozen=True)
class RequestTiming:
    """What happened to one request. Times in seconds from the run's start."""

    idx: int
    prompt_len: int
    max_tokens: int
    output_tokens: int
    arrival: float  # when the stream said it arrives
    submit: float  # when the client handed it to the engine
    first_token: float
    finish: float
    queued: float | None = None  # engine core; None if vLLM gave no metrics
    scheduled: float | None = None
    preemptions: int = 0

    @property
    def latency(self) -> float:
        return self.finish - self.submit

    @property
    def ttft(self) -> float:
        return self.first_token - self.submit

    @property
    def norm_latency(self) -> float:
        return self.latency / self.output_tokens

    @property
    def wait(self) -> float:
        if self.queued is None or self.scheduled is None:
            return self.ttft  # an upper bound: queueing + prefill
        return self.scheduled - self.queued

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestTiming:
        names = {f.name for f in fields(cls)}
        missing = {"idx", "output_tokens", "submit", "first_token", "finish"} - set(d)
        if missing:
            raise MetricsError(f"request timing lacks {sorted(missing)}: {dict(d)}")
        return cls(**{k: v for k, v in d.items() if k in names})

    def check(self) -> None:
        """Raise :class:`MetricsError` unless the timestamps are possible."""
        where = f"request {self.idx}"
        values = [self.submit, self.first_token, self.finish]
        if not all(math.isfinite(v) for v in values):
            raise MetricsError(f"{where}: non-finite timestamp in {values}")
        if self.output_tokens < 1:
            raise MetricsError(f"{where}: produced {self.output_tokens} tokens; a completed request has >= 1")
        if not self.submit <= self.first_token <= self.finish:
            raise MetricsError(
                f"{where}: timestamps out of order (submit {self.submit:.6f}, first token "
                f"{self.first_token:.6f}, finish {self.finish:.6f})"
            )
        if self.queued is not None and self.scheduled is not None and self.scheduled < self.queued:
            raise MetricsError(f"{where}: scheduled ({self.scheduled:.6f}) before queued ({self.queued:.6f})")


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (linear interpolation between order statistics, numpy's default)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        raise MetricsError("percentile of no values")
    return float(np.percentile(a, q))


def summarize(timings: Sequence[RequestTiming], scoring_s_per_request: float | None = None) -> dict[str, Any]:
    """Summary metrics of one run (see the module docstring); keys are ``SUMMARY_KEYS``."""
    if not timings:
        raise MetricsError("no completed requests to summarize")
    ids = [t.idx for t in timings]
    if len(set(ids)) != len(ids):
        raise MetricsError(f"duplicate request ids in timings: {sorted(i for i in set(ids) if ids.count(i) > 1)}")
    for t in timings:
        t.check()
    lat = np.array([t.latency for t in timings])
    ttft = np.array([t.ttft for t in timings])
    norm = np.array([t.norm_latency for t in timings])
    wait = np.array([t.wait for t in timings])
    tokens = int(sum(t.output_tokens for t in timings))
    decoding = [t for t in timings if t.output_tokens > 1]
    decode_tokens = sum(t.output_tokens - 1 for t in decoding)
    itl = sum(t.finish - t.first_token for t in decoding) / decode_tokens if decode_tokens else math.nan
    tpot = np.array([(t.finish - t.first_token) / (t.output_tokens - 1) for t in decoding])
    scheduled = [t.finish - t.scheduled for t in timings if t.scheduled is not None]
    span = max(t.finish for t in timings) - min(t.submit for t in timings)
    if span <= 0:
        raise MetricsError(f"run lasted {span} s; cannot compute throughput")
    running = sum(scheduled) / span if len(scheduled) == len(timings) else math.nan
    return {
        "n": len(timings),
        "output_tokens": tokens,
        "latency_mean": float(lat.mean()),
        "latency_p50": percentile(lat, 50),
        "latency_p90": percentile(lat, 90),
        "latency_p99": percentile(lat, 99),
        "ttft_mean": float(ttft.mean()),
        "ttft_p90": percentile(ttft, 90),
        "norm_latency_mean": float(norm.mean()),
        "norm_latency_p90": percentile(norm, 90),
        "wait_mean": float(wait.mean()),
        "wait_max": float(wait.max()),
        "throughput_rps": len(timings) / span,
        "throughput_tps": tokens / span,
        "itl_mean": itl,
        "tpot_mean": float(tpot.mean()) if tpot.size else math.nan,
        "tpot_p90": percentile(tpot, 90) if tpot.size else math.nan,
        "running_mean": running,
        "step_cost_ms": 1e3 * itl / running if running and running > 0 else math.nan,
        "makespan_s": float(span),
        "preemptions": int(sum(t.preemptions for t in timings)),
        "scoring_ms_per_request": None if scoring_s_per_request is None else 1e3 * scoring_s_per_request,
    }


def saturated_tps(timings: Sequence[RequestTiming], slots: int) -> float | None:
    """Tokens per second while at least ``slots`` requests were in the system (all slots busy).

    The window runs from the first submit to the finish after which fewer than ``slots``
    requests remain: for a burst, the start of its tail. A request's
    tokens are taken as produced evenly between its first and last token. None when the
    engine was never saturated.
    """
    if slots < 1:
        raise MetricsError(f"slots must be >= 1, got {slots}")
    if len(timings) < slots:
        return None
    start = min(t.submit for t in timings)
    finishes = sorted(t.finish for t in timings)
    end = finishes[len(finishes) - slots]  # after this finish, fewer than `slots` are left
    if end <= start:
        return None
    tokens = 0.0
    for t in timings:
        if t.first_token >= end:
            continue
        if t.finish <= end or t.output_tokens <= 1:
            tokens += t.output_tokens
        else:  # the first token, then the rest evenly up to its finish
            rate = (t.output_tokens - 1) / (t.finish - t.first_token)
            tokens += 1 + rate * (end - t.first_token)
    return tokens / (end - start)


def ratio(numerator: Mapping[str, Any], denominator: Mapping[str, Any], key: str) -> float:
    """``numerator[key] / denominator[key]`` (e.g. FCFS mean latency over PARS's)."""
    a, b = numerator.get(key), denominator.get(key)
    if a is None or b is None or b == 0:
        return math.nan
    return float(a) / float(b)
