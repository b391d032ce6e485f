"""The request stream of the end-to-end benchmark: which prompts, how long, when.

* **Prompts and lengths.** Held-out ShareGPT prompts (``pars_fast.data``'s test split,
  which the ranker never trains on), or any JSONL of ``{"prompt", "response_len"}``.
  Response lengths are counted in the *serving model's* tokenizer, and each request
  runs with ``max_tokens = response_len`` and ``ignore_eos=True``: every policy does
  exactly the same work, only the order differs (vLLM's own serving benchmark replays
  ShareGPT this way).
* **Fitting the model.** Like vLLM's ShareGPT sampler, a sample is *dropped* (not
  truncated) when its prompt exceeds ``max_prompt_tokens`` or prompt + response exceeds
  ``max_model_len``: truncating a prompt would change what the ranker reads, and
  shortening a response would change the true length. ``max_response_tokens``
  optionally *clips* responses (the oracle then sees the clipped length, which is
  the real work) to bound the run time on a CPU; it is off by default and recorded.
* **Arrivals.** A burst (everything at t=0) or Poisson arrivals at a rate. Unit
  exponential gaps are drawn from the seed and scaled by 1/rate, so one seed gives
  the same stream shape at every rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pars_fast.data import Sample


class WorkloadError(ValueError):
    """The workload cannot be built as asked (too few samples, bad limits)."""


@dataclass(frozen=True)
class Job:
    """One request of the stream. ``idx`` is its arrival order."""

    idx: int
    prompt: str
    prompt_token_ids: list[int]
    max_tokens: int  # the true response length (after the optional clip)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class WorkloadInfo:
    """How the stream was drawn, for the report."""

    source: str
    seed: int
    available: int  # samples in the source
    examined: int  # visited in the seeded order until n fitted; the counts below are of these
    dropped_too_long: int  # prompt or prompt + response did not fit
    dropped_empty: int  # zero-length response (max_tokens must be >= 1)
    clipped: int  # responses shortened to max_response_tokens
    max_model_len: int
    max_prompt_tokens: int
    max_response_tokens: int | None
    n: int = 0
    prompt_len: dict[str, float] = field(default_factory=dict)
    response_len: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Workload:
    jobs: list[Job]
    info: WorkloadInfo

    def __len__(self) -> int:
        return len(self.jobs)


def load_samples(data: str, tokenizer: Any) -> list[Sample]:
    """Samples named by ``data``: ``sharegpt`` (its held-out test split), ``humaneval``
    (164 code prompts; the canonical solution's length), or a ``.jsonl`` path.

    ``tokenizer`` (the serving model's) counts ShareGPT and HumanEval response lengths; a
    JSONL's ``response_len`` is taken as given (it must already be in the serving tokenizer).
    """
    from pars_fast.data import load_humaneval, load_jsonl, sharegpt_split

    if data in ("sharegpt", "sharegpt-test"):
        _, test = sharegpt_split(tokenizer=tokenizer)
        return test
    if data == "humaneval":
        return load_humaneval(tokenizer=tokenizer)
    path = Path(data)
    if path.suffix == ".jsonl" or path.is_file():
        return load_jsonl(path, tokenizer=tokenizer)
    raise WorkloadError(
        f"unknown data {data!r}: use 'sharegpt' (its held-out test split), 'humaneval', or a path to a .jsonl file"
    )


def build_workload(
    samples: Sequence[Sample],
    tokenizer: Any,
    n: int,
    *,
    seed: int = 0,
    max_model_len: int = 2048,
    max_prompt_tokens: int = 1024,
    max_response_tokens: int | None = None,
    source: str = "",
) -> Workload:
    """Draw ``n`` requests (seeded, without replacement) from the samples that fit.

    Prompts are tokenized here with ``tokenizer`` (special tokens included, as vLLM
    does for a text prompt), so the engine gets exactly these token ids.
    """
    if n < 1:
        raise WorkloadError(f"need at least 1 request, got n={n}")
    if max_prompt_tokens < 1 or max_model_len < 2:
        raise WorkloadError(f"max_prompt_tokens must be >= 1 and max_model_len >= 2, got {max_prompt_tokens}, {max_model_len}")
    if max_response_tokens is not None and max_response_tokens < 1:
        raise WorkloadError(f"max_response_tokens must be >= 1, got {max_response_tokens}")
    if not samples:
        raise WorkloadError(f"no samples in {source or 'the data'}")

    from pars_fast.data import clean_text

    # Visit samples in a seeded order and keep the first n that fit, so only those
    # few are tokenized (the test split has ~1k prompts, some very long).
    order = np.random.default_rng(seed).permutation(len(samples))
    jobs: list[Job] = []
    too_long = empty = clipped = examined = 0
    batch = max(64, 2 * n)
    for start in range(0, len(order), batch):
        chunk = [samples[int(i)] for i in order[start : start + batch]]
        ids = tokenizer([clean_text(s.prompt) for s in chunk], add_special_tokens=True, verbose=False)["input_ids"]
        for sample, prompt_ids in zip(chunk, ids, strict=True):
            examined += 1
            length = int(sample.response_len)
            if length < 1:
                empty += 1
                continue
            if len(prompt_ids) > max_prompt_tokens or len(prompt_ids) + length > max_model_len:
                too_long += 1
                continue
            if max_response_tokens is not None and length > max_response_tokens:
                length = max_response_tokens
                clipped += 1
            jobs.append(Job(len(jobs), sample.prompt, list(prompt_ids), length))
            if len(jobs) == n:
                break
        if len(jobs) == n:
            break
    if len(jobs) < n:
        raise WorkloadError(
            f"only {len(jobs)} of {len(samples)} samples fit (prompt <= {max_prompt_tokens} tokens, "
            f"prompt + response <= max_model_len={max_model_len}); asked for n={n}"
        )
    info = WorkloadInfo(
        source=source,
        seed=seed,
        available=len(samples),
        examined=examined,
        dropped_too_long=too_long,
        dropped_empty=empty,
        clipped=clipped,
        max_model_len=max_model_len,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        n=n,
        prompt_len=_describe([j.prompt_len for j in jobs]),
        response_len=_describe([j.max_tokens for j in jobs]),
    )
    return Workload(jobs, info)


def _describe(values: Sequence[int]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    p10, p50, p90 = np.percentile(a, [10, 50, 90])
    return {"mean": round(float(a.mean()), 1), "p10": float(p10), "p50": float(p50), "p90": float(p90), "max": float(a.max())}


# ---------------------------------------------------------------------- arrivals


def parse_load(spec: str) -> float | None:
    """``"burst"`` -> None; ``"1.5"`` or ``"1.5x"`` -> 1.5 (a multiple of the measured capacity)."""
    text = spec.strip().lower()
    if text == "burst":
        return None
    try:
        factor = float(text.removesuffix("x"))
    except ValueError:
        raise WorkloadError(f"bad load {spec!r}: use 'burst' or a multiple of capacity such as 1.5") from None
    if not math.isfinite(factor) or factor <= 0:
        raise WorkloadError(f"bad load {spec!r}: the capacity multiple must be > 0")
    return factor


def load_name(factor: float | None) -> str:
    return "burst" if factor is None else f"{factor:g}x"


def arrival_offsets(n: int, rate: float | None, seed: int) -> np.ndarray:
    """Arrival time of each of ``n`` requests, in seconds from the start (first at 0).

    ``rate=None`` is a burst (all at 0). Otherwise Poisson arrivals at ``rate`` req/s.
    """
    if n < 1:
        raise WorkloadError(f"need n >= 1, got {n}")
    if rate is None:
        return np.zeros(n)
    if not math.isfinite(rate) or rate <= 0:
        raise WorkloadError(f"arrival rate must be > 0 req/s, got {rate}")
    # Seeded separately from the sample draw, and independent of the rate.
    gaps = np.random.default_rng([seed, 1]).exponential(1.0, n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)]) / rate
