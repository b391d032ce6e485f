"""PARS's counters as ``pars_fast_*`` series on vLLM's ``/metrics``.

The scheduler runs in vLLM's engine-core process (one per data-parallel rank), and
``/metrics`` is served by the API server, another process. The exporter uses
prometheus_client's **multiprocess mode**, the mechanism vLLM 0.32 itself relies on
for several API servers (``vllm/v1/metrics/prometheus.py``):

* When ``PROMETHEUS_MULTIPROC_DIR`` is set, vLLM's ``/metrics``
  (``vllm/entrypoints/serve/instrumentator/metrics.py``) serves a registry holding only
  a ``MultiProcessCollector`` over that folder, and every prometheus_client metric, in
  any process, is backed by a ``<type>_<pid>.db`` file in it.
* Engine cores are spawned by the API server (or by ``vllm serve``'s parent), so they
  inherit the variable: :func:`publish`, called by the scheduler where it writes its
  stats, writes the PARS values into that folder and vLLM's own ``/metrics`` shows them.
  No PARS code runs in the API server.

Who sets the folder: ``pars-fast serve`` creates a fresh temporary one per run (see
:func:`ensure_multiprocess_dir`) unless one is set. vLLM sets one itself only with
``--api-server-count`` > 1; with one API server (``python -m
vllm.entrypoints.openai.api_server``, ``vllm serve``) the operator sets
``PROMETHEUS_MULTIPROC_DIR`` to an empty folder before starting it. Without it,
:func:`publish` does nothing (one INFO line says so): the engine core has no way into
the API server's in-memory registry. Note that in multiprocess mode vLLM's ``/metrics``
loses the per-process ``process_*``/``python_*`` series (multiprocess mode cannot merge
them); vLLM's ``vllm:*`` series are all there.

What that gives:

* **DP ranks**: each rank's engine core writes its own files; every series carries a
  ``dp_rank`` label. Sum over it for the server.
* **Several API servers**: each one's ``/metrics`` merges the whole folder, so each shows
  every rank's PARS series once (only engine cores write them: no double counting).
* **Restarts and stale files**: the folder is per run under ``pars-fast serve`` (a
  ``TemporaryDirectory``, removed at exit). A folder the operator sets must be emptied
  before each start, as vLLM's own warning says: a dead process's counters stay in the
  sum (they only grow, so ``rate()`` is unaffected) and its gauges keep their last value
  until a new process writes (gauges are "mostrecent": the newest write of any process
  wins per label set). A rank whose engine core died keeps its last gauge values; vLLM
  shuts the whole server down when an engine core dies.
* **Other nodes**: ranks started ``--headless`` on another node write to that node's
  folder, which this API server cannot read.

Alternatives weighed: a collector in the API server over the ``stats_file`` JSON works
only where PARS code runs in the API server (``pars-fast serve``, not vLLM's own server)
and needs a stats file; a vLLM stat-logger plugin (``vllm.stat_logger_plugins``) runs in
the API server but would need the PARS counters smuggled through vLLM's
``SchedulerStats``. Multiprocess mode needs neither.

The scheduler hands over its cumulative ``pars_stats()`` dict; counters are increased by
the difference from the last call (a total that went down, e.g. a restarted scoring
worker's, counts as a reset: its new value is added). Two per-event series are read
from "event logs" in the dict, ``{"count": total events, "recent": [last values, oldest
first]}``, when present: ``scoring_batch_seconds`` (wall seconds of each ranker batch)
and ``ranking_queue_depth`` (requests waiting at each step that ranked). Events past the
``recent`` window between two calls are counted (``pars_fast_events_missed_total``) but
cannot be observed.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("pars_fast.vllm")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Ranker batches: a model-free ranker takes microseconds, MiniLM on a CPU 10-500 ms,
# and fallback.deadline_s (30 s) is where a worker is declared hung.
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Waiting requests when ranking ran: at least min_queue (default 2 x max_num_seqs), up to thousands.
QUEUE_DEPTH_BUCKETS = tuple(float(2**i) for i in range(15))  # 1 .. 16384

# stats key -> (series name, help). Cumulative counts and seconds in pars_stats().
COUNTERS = {
    "requests_scored": ("pars_fast_requests_scored_total", "Requests that got a usable ranker score."),
    "requests_unranked": (
        "pars_fast_requests_unranked_total",
        "Requests that finished without a score (admitted at once, or FCFS under fallback.max_share).",
    ),
    "scoring_seconds": ("pars_fast_scoring_seconds_total", "Wall seconds the ranker spent scoring (decode + score)."),
    "batches": ("pars_fast_scoring_batches_total", "Batches handed to the ranker (cool-down ones included)."),
    "share_limited_steps": (
        "pars_fast_share_limited_steps_total",
        "Scheduler steps that skipped inline ranking: a prompt cost over fallback.max_share of a request.",
    ),
}
FALLBACK = ("pars_fast_requests_fallback_total", "Requests left in FCFS order by a ranker failure, by reason.")
# stats key -> (series name, help, buckets): event logs {"count", "recent"}.
HISTOGRAMS = {
    "scoring_batch_seconds": ("pars_fast_scoring_batch_seconds", "Wall seconds of each ranker batch.", BATCH_SECONDS_BUCKETS),
    "ranking_queue_depth": (
        "pars_fast_ranking_queue_depth",
        "Requests waiting at each scheduler step that ranked.",
        QUEUE_DEPTH_BUCKETS,
    ),
}
MISSED = ("pars_fast_events_missed_total", "Events of a histogram that fell out of the stats' recent window unobserved.")
MAX_BATCH = ("pars_fast_scoring_batch_max_seconds", "Longest ranker batch so far, seconds.")
ACCURACY = (
    "pars_fast_online_accuracy",
    "Online pairwise accuracy over the last window, by predictor (base ranker, online learner, blend).",
)
WEIGHT = ("pars_fast_online_blend_weight", "Weight of the online learner in the blended score (0: base ranker only).")
INFO = ("pars_fast_scheduler_info", "1, labelled with the ranker and where it scores.")
PREDICTORS = ("base", "online", "blend")


def series_names() -> set[str]:
    """Metric family names this module exports (without the _bucket/_sum/_count suffixes)."""
    names = {name for name, _ in COUNTERS.values()} | {h[0] for h in HISTOGRAMS.values()}
    return names | {FALLBACK[0], MISSED[0], MAX_BATCH[0], ACCURACY[0], WEIGHT[0], INFO[0]}


def enabled() -> bool:
    """Whether :func:`publish` reaches ``/metrics``: multiprocess mode is on in this process."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path or not os.path.isdir(path):
        return False
    from prometheus_client import values

    # prometheus_client picks file-backed values once, when it is first imported.
    return bool(getattr(values.ValueClass, "_multiprocess", False))


# pars-fast serve's folder: referenced for the life of the process, removed at interpreter exit.
_tmpdir: tempfile.TemporaryDirectory | None = None


def ensure_multiprocess_dir() -> str:
    """Turn on multiprocess mode for this process and the engine cores it will spawn.

    For the API server's process (``pars-fast serve``), before vLLM is imported: a fresh
    temporary folder, removed at exit, unless ``PROMETHEUS_MULTIPROC_DIR`` is set.
    """
    global _tmpdir
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        _tmpdir = tempfile.TemporaryDirectory(prefix="pars-fast-prometheus-")
        path = os.environ[MULTIPROC_ENV] = _tmpdir.name
    else:
        os.makedirs(path, exist_ok=True)
    if "prometheus_client" in sys.modules and not enabled():
        logger.warning(
            "PARS: prometheus_client was imported before %s was set, so this process's metrics "
            "are not in %s; pars_fast_* may still show, vLLM's own may not", MULTIPROC_ENV, path,
        )
    return path


@dataclass
class _Seen:
    """What the last call exported for one rank: counters and event counts."""

    counters: dict[str, float] = field(default_factory=dict)
    fallbacks: dict[str, float] = field(default_factory=dict)
    events: dict[str, int] = field(default_factory=dict)
    gauges: dict[tuple, float] = field(default_factory=dict)

    def changed(self, key: tuple, value: float) -> bool:
        """Whether a gauge's value differs from the last one set (NaN equals NaN)."""
        last = self.gauges.get(key)
        if last is not None and (last == value or (math.isnan(last) and math.isnan(value))):
            return False
        self.gauges[key] = value
        return True


class _Exporter:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        # registry=None: the values live in the multiprocess files; nothing to register
        # in this process (and no duplicate-name errors if a scheduler is built twice).
        rank = ["dp_rank"]
        self.counters = {key: Counter(name, doc, rank, registry=None) for key, (name, doc) in COUNTERS.items()}
        self.fallback = Counter(*FALLBACK, rank + ["reason"], registry=None)
        self.histograms = {
            key: Histogram(name, doc, rank, buckets=buckets, registry=None) for key, (name, doc, buckets) in HISTOGRAMS.items()
        }
        self.missed = Counter(*MISSED, rank + ["series"], registry=None)
        # "mostrecent": the newest write wins across processes (a restarted engine core's, say).
        self.max_batch = Gauge(*MAX_BATCH, rank, registry=None, multiprocess_mode="mostrecent")
        self.accuracy = Gauge(*ACCURACY, rank + ["predictor"], registry=None, multiprocess_mode="mostrecent")
        self.weight = Gauge(*WEIGHT, rank, registry=None, multiprocess_mode="mostrecent")
        self.info = Gauge(*INFO, rank + ["ranker", "worker"], registry=None, multiprocess_mode="mostrecent")
        self.seen: dict[str, _Seen] = {}

    def publish(self, stats: Mapping[str, Any], dp_rank: int) -> None:
        rank = str(dp_rank)
        seen = self.seen.setdefault(rank, _Seen())
        for key, counter in self.counters.items():
            _advance(counter.labels(rank), seen.counters, key, stats.get(key))
        for reason, total in (stats.get("fallback_reasons") or {}).items():
            _advance(self.fallback.labels(rank, str(reason)), seen.fallbacks, str(reason), total)
        for key, histogram in self.histograms.items():
            log = stats.get(key)
            if not isinstance(log, Mapping) or not _number(log.get("count")):
                continue
            count, recent = int(log["count"]), list(log.get("recent") or ())
            new = count - seen.events.get(key, 0)
            if new < 0:  # the source restarted its count
                new = count
            seen.events[key] = count
            observed = recent[len(recent) - min(new, len(recent)) :]
            _observe_all(histogram.labels(rank), [float(v) for v in observed if _number(v)])
            if new > len(observed):
                self.missed.labels(rank, HISTOGRAMS[key][0]).inc(new - len(observed))
        # Gauges are written only when they change: each write is a timestamped file write.
        if _number(stats.get("max_batch_seconds")) and seen.changed(("max_batch",), stats["max_batch_seconds"]):
            self.max_batch.labels(rank).set(stats["max_batch_seconds"])
        online = stats.get("online")
        if isinstance(online, Mapping) and online:
            for predictor in PREDICTORS:
                value = online.get(f"accuracy_{predictor}")
                # None: not judged yet (or reset); NaN so a stale value does not linger.
                value = float(value) if _number(value) else math.nan
                if seen.changed(("accuracy", predictor), value):
                    self.accuracy.labels(rank, predictor).set(value)
            if _number(online.get("weight")) and seen.changed(("weight",), online["weight"]):
                self.weight.labels(rank).set(online["weight"])
        if "ranker" in stats:
            worker = stats.get("worker")
            mode = str(worker.get("mode", "")) if isinstance(worker, Mapping) else ""
            if seen.changed(("info", str(stats["ranker"]), mode), 1.0):
                self.info.labels(rank, str(stats["ranker"]), mode).set(1)


def _number(value: Any) -> bool:
    """A finite int or float (a NaN total would stick a counter for good)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _observe_all(child: Any, values: list[float]) -> None:
    """``child.observe(v)`` for each value, as one write per bucket touched plus one for the sum.

    observe() makes two file writes per value; a second's worth of ranking steps on a GPU
    (hundreds) would then cost milliseconds inside a scheduler step. This reads
    prometheus_client's Histogram internals (stable since 0.4), so it falls back to
    observe() if they move.
    """
    if not values:
        return
    bounds, buckets, total = (getattr(child, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            child.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bucket with value <= le, as observe() picks
    total.inc(sum(values))
    for bucket, n in zip(buckets, counts):
        if n:
            bucket.inc(n)


def _advance(counter: Any, seen: dict[str, float], key: str, total: Any) -> None:
    """Raise ``counter`` to the cumulative ``total`` (a lower total is a restarted source)."""
    if not _number(total):
        return
    delta = total - seen.get(key, 0)
    if delta < 0:
        delta = total
    seen[key] = total
    if delta > 0:
        counter.inc(delta)


_exporter: _Exporter | None = None
_off = False  # not in multiprocess mode, or a write failed: publish() is a no-op


def publish(stats: Mapping[str, Any], dp_rank: int = 0) -> None:
    """Export one ``PARSScheduler.pars_stats()`` snapshot of data-parallel rank ``dp_rank``.

    Called by the scheduler where it writes its stats (at most once a second while
    serving, and when idle and at shutdown). Never raises: metrics must not stop serving.
    """
    global _exporter, _off
    if _off:
        return
    try:
        if _exporter is None:
            if not enabled():
                _off = True
                logger.info(
                    "PARS: %s is not set (or was set after prometheus_client was imported), so the "
                    "pars_fast_* metrics are not exported; see docs/METRICS.md", MULTIPROC_ENV,
                )
                return
            _exporter = _Exporter()
        _exporter.publish(stats, dp_rank)
    except Exception as exc:  # a full disk, a removed folder: stop exporting, keep serving
        _off = True
        logger.warning("PARS: cannot export metrics to %s (%r); no longer exporting them", os.environ.get(MULTIPROC_ENV), exc)
