"""A self-check before a ranker serves on the Triton kernels: same probe, two backends, compare the order.

The ``"triton"`` backend (what ``"auto"`` picks on CUDA) is checked against the
packed ``"torch"`` path on the same device, on a fixed probe batch shipped here
(:data:`PROBE_PROMPTS`: 32 prompts from 2 to 128 tokens). If Triton raises, returns
non-finite or wildly wrong scores, or orders the probe differently, the ranker
serves with the torch path instead and one WARNING line says why. Either way the
verdict is recorded on the ranker as ``ranker.backend_check`` (see
:func:`check_backend` for its keys), for the scheduler's stats.

**What must agree is the order, not the digits.** A scheduler only sorts by score,
so the criterion is the fraction of probe pairs whose order flips between the two
backends (:data:`MAX_FLIP_FRACTION`). Absolute differences are allowed to be large
(a kNN head turns 1e-6 embedding differences into 1e-3 score differences, see
docs/BENCHMARKS.md) and are only bounded against gross failures
(:data:`MAX_ABS_DIFF_OF_RANGE`).

``Ranker.load``/``Ranker(...)`` run the check by themselves when the backend resolves
to ``"triton"`` on a CUDA device (the probe costs milliseconds there, plus the
kernels' first compilation, which the first real batch would pay anyway).
Call :func:`check_backend` directly to force it elsewhere, e.g. on CPU tensors under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pars_fast.backends import make_backend

if TYPE_CHECKING:
    from pars_fast.ranker import Ranker

log = logging.getLogger(__name__)

# A flipped pair moves Kendall tau (against any ground truth) by at most 2 / pairs, so a
# flip fraction f moves the ranker's tau by at most 2f. 0.005 keeps that within 0.01,
# the bar the int8 CPU path had to meet (docs/BENCHMARKS.md); on the 496 pairs of the
# shipped probe it tolerates 2 flips of near-tied pairs. bf16 vs fp32 (tau 0.996,
# f = 0.002) passes; a kernel bug shuffles far more.
MAX_FLIP_FRACTION = 0.005

# Gross-failure bound only: max |score difference| <= this share of the reference's score
# range on the probe. Healthy fp32 backends differ by ~1e-6 of the range with a linear
# head and ~1e-3 with the default ranker's kNN head; wrong magnitudes (a scale or offset
# bug that keeps the order) would still corrupt aging and the online blend, which add
# score units.
MAX_ABS_DIFF_OF_RANGE = 0.1

CHECKED_BACKENDS = ("triton",)  # backends checked automatically on CUDA
REFERENCE_BACKEND = "torch"

_LONG = (
    "Here is the full log from our nightly build. The job checks out the repository, restores the cache, "
    "installs the toolchain and runs the unit tests, then the integration tests against a fresh database. "
    "It started failing three days ago, after we upgraded the compiler and the database driver at the same time. "
    "The first error is a timeout in the connection pool, then every later test fails with 'too many clients'. "
    "Locally everything passes, on the same commit, with the same container image and the same environment. "
)

# Fixed, varied prompts: 2 (empty) to 128 tokens once truncated (MiniLM WordPiece), questions
# that want one word and tasks that want pages, code, non-ASCII text. Varied scores make
# the pairs meaningful; no duplicates, so the reference has no ties.
PROBE_PROMPTS: tuple[str, ...] = (
    "",
    "hi",
    "Is 17 a prime number? Answer yes or no.",
    "What is the capital of Australia?",
    "Translate 'good morning' into French.",
    "Give me a synonym for 'fast'.",
    "How many legs does a spider have?",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "Write a haiku about autumn rain.",
    "What does HTTP status code 404 mean?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Explain the difference between a list and a tuple in Python.",
    "Write a SQL query that returns the ten most recent orders with their customer names.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n\nWhy is this slow, and how do I fix it?",
    "List five tips for a first job interview.",
    "Write a cover letter for a junior data analyst position at a hospital.",
    "Explain how TCP congestion control works, step by step, with examples.",
    "Write a 2,000-word essay on the causes and consequences of the fall of the Roman Empire.",
    "Write a complete REST API in Flask for a todo app with users, authentication, tests and documentation.",
    "Create a detailed 12-week marathon training plan for a beginner, week by week, with nutrition advice.",
    "Write the first chapter of a science-fiction novel about a colony ship that loses contact with Earth.",
    "请用中文解释一下量子计算的基本原理，并举几个例子。",
    "¿Cuál es la mejor manera de aprender a programar desde cero? Dame un plan detallado.",
    "Rewrite this sentence to sound more formal: we gotta ship the fix by friday or the client walks.",
    "I have 3 apples and eat one. Then I buy 5 more and give away half. How many do I have?",
    "Compare PostgreSQL and MongoDB for an e-commerce backend: data model, scaling, transactions, cost.",
    "Act as a Linux terminal. I type commands and you reply with what the terminal shows. My first command is pwd.",
    "Draft a privacy policy for a mobile fitness app that stores heart-rate data and syncs it to the cloud.",
    "Why is the sky blue? 🌤️ Explain it to a five-year-old.",
    _LONG + "What is the most likely cause?",
    _LONG + _LONG + "Walk me through a full debugging plan, with commands for each step.",
    "Proofread the following paragraph and list every change you made: " + _LONG,
)


def flip_stats(scores: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """``(flipped, pairs)``: pairs ``i < j`` that the reference orders (no tie) and ``scores``
    orders differently or ties. Non-finite scores make every pair they touch a flip."""
    s = np.asarray(scores, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    iu = np.triu_indices(len(r), k=1)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, counted below
        dr = np.sign(r[:, None] - r[None, :])[iu]
        ds = np.sign(s[:, None] - s[None, :])[iu]
    ordered = dr != 0
    flipped = ordered & ~(ds == dr)  # NaN signs compare unequal: counted as flips
    return int(flipped.sum()), int(ordered.sum())


def compare_scores(
    scores: np.ndarray,
    reference: np.ndarray,
    *,
    max_flip_fraction: float = MAX_FLIP_FRACTION,
    max_abs_diff_of_range: float = MAX_ABS_DIFF_OF_RANGE,
) -> dict[str, Any]:
    """The verdict on ``scores`` against ``reference`` (same probe): ``passed``, ``reason`` and the measures."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    if scores.shape != reference.shape:
        return {"passed": False, "reason": f"{scores.shape[0]} scores for {reference.shape[0]} probe prompts",
                "max_abs_diff": None, "flip_fraction": None, "flipped_pairs": None, "pairs": None,
                "max_abs_diff_allowed": None}
    span = float(reference.max() - reference.min()) if reference.size else 0.0
    allowed = max_abs_diff_of_range * span
    flipped, pairs = flip_stats(scores, reference)
    fraction = flipped / pairs if pairs else 0.0
    finite = bool(np.isfinite(scores).all())
    diff = float(np.abs(scores - reference).max()) if finite and scores.size else (0.0 if finite else None)
    out = {"max_abs_diff": diff, "flip_fraction": fraction, "flipped_pairs": flipped, "pairs": pairs,
           "max_abs_diff_allowed": allowed}
    if not finite:
        reason = f"{int((~np.isfinite(scores)).sum())} of {scores.size} scores are not finite"
    elif fraction > max_flip_fraction:
        reason = f"order differs: {flipped} of {pairs} probe pairs flip ({fraction:.3f} > {max_flip_fraction})"
    elif diff is not None and diff > allowed:
        reason = f"max |score difference| {diff:.3g} exceeds {allowed:.3g} ({max_abs_diff_of_range} of the score range)"
    else:
        return {"passed": True, "reason": "scores agree", **out}
    return {"passed": False, "reason": reason, **out}


def needs_check(backend_name: str, device: torch.device | str) -> bool:
    """Whether a ranker checks its backend by itself: a Triton backend on a CUDA device."""
    return backend_name in CHECKED_BACKENDS and torch.device(device).type == "cuda"


def check_backend(
    ranker: Ranker,
    probe: Sequence[str] | None = None,
    *,
    reference: str = REFERENCE_BACKEND,
    max_flip_fraction: float = MAX_FLIP_FRACTION,
    max_abs_diff_of_range: float = MAX_ABS_DIFF_OF_RANGE,
) -> dict[str, Any]:
    """Score ``probe`` (default :data:`PROBE_PROMPTS`) with the ranker's backend and with
    ``reference`` on the same device; switch the ranker to ``reference`` if they disagree.

    Sets and returns ``ranker.backend_check``, a JSON-ready dict::

        backend          the backend the ranker now serves with ("triton", or "torch" after a fallback)
        checked          the backend under test;  reference: the one it was compared with
        passed           True / False; None when the reference itself failed (nothing to judge by:
                         the backend under test keeps serving, unverified)
        reason           "scores agree", or why it fell back (the exception, the flips, ...)
        max_abs_diff     max |score difference| on the probe (None: an error or non-finite scores)
        flip_fraction    flipped_pairs / pairs;  flipped_pairs, pairs: counts over the probe's pairs
        max_flip_fraction, max_abs_diff_allowed: the thresholds applied
        probe_size       prompts in the probe;  seconds: the check's wall time

    A failure is logged as one WARNING line; a pass as one INFO line.
    """
    prompts = list(PROBE_PROMPTS if probe is None else probe)
    checked = ranker.backend_name
    t0 = time.perf_counter()
    record: dict[str, Any] = {
        "backend": checked, "checked": checked, "reference": reference, "passed": None, "reason": "",
        "max_abs_diff": None, "flip_fraction": None, "flipped_pairs": None, "pairs": None,
        "max_flip_fraction": max_flip_fraction, "max_abs_diff_allowed": None, "probe_size": len(prompts),
    }
    try:
        ref_backend = make_backend(reference, ranker.encoder, ranker.head, ranker.config.pooling, ranker.device)
        ref_scores = ranker.score_with_backend(ref_backend, prompts)
    except Exception as exc:  # cannot judge: keep the backend under test rather than refuse to serve
        record["reason"] = f"not verified: the {reference} reference failed ({_describe(exc)})"
        return _finish(ranker, record, t0, logging.WARNING)
    try:
        scores = ranker.score_with_backend(ranker.backend, prompts)
    except Exception as exc:  # any kernel failure (compile, launch, shape) means: do not serve with it
        verdict: dict[str, Any] = {"passed": False, "reason": f"{checked} raised {_describe(exc)}"}
    else:
        verdict = compare_scores(scores, ref_scores, max_flip_fraction=max_flip_fraction,
                                 max_abs_diff_of_range=max_abs_diff_of_range)
    record.update(verdict)
    if not record["passed"]:
        ranker.backend, ranker.backend_name = ref_backend, ref_backend.name
        record["backend"] = ref_backend.name
    return _finish(ranker, record, t0, logging.INFO if record["passed"] else logging.WARNING)


def _describe(exc: BaseException, limit: int = 300) -> str:
    """An exception on one short line (Triton compile errors span many lines)."""
    text = f"{type(exc).__name__}: " + " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _finish(ranker: Ranker, record: dict[str, Any], t0: float, level: int) -> dict[str, Any]:
    record["seconds"] = round(time.perf_counter() - t0, 4)
    ranker.backend_check = record
    parts = []
    if record["max_abs_diff"] is not None:
        parts.append(f"max |Δscore| {record['max_abs_diff']:.2g}")
    if record["pairs"]:
        parts.append(f"{record['flipped_pairs']}/{record['pairs']} pairs flipped")
    measured = ", ".join(parts) or "no comparable scores"
    if record["passed"]:
        what = f"ranker backend {record['checked']!r} agrees with {record['reference']!r} on {record['probe_size']} probe prompts"
    elif record["passed"] is None:
        what = f"ranker backend {record['checked']!r} serves unverified"
    else:
        what = f"ranker backend {record['checked']!r} failed its self-check; serving with {record['backend']!r}"
    log.log(level, "%s: %s (%s)", what, record["reason"], measured)
    return record


__all__ = [
    "MAX_ABS_DIFF_OF_RANGE",
    "MAX_FLIP_FRACTION",
    "PROBE_PROMPTS",
    "check_backend",
    "compare_scores",
    "flip_stats",
    "needs_check",
]
