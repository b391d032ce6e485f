"""Serving traces: one JSONL row per finished request, and reading them back for training.

``PARSScheduler`` with ``"trace": {"path": ...}`` appends a row per finished request::

    {"request_id": "...", "arrival_time": 1764633600.12, "finish_time": 1764633603.52,
     "prompt_tokens": 412, "output_tokens": 187, "finish_reason": "stop",
     "score": -0.42, "queue_wait_s": 1.93, "ranker": "default", "prompt": "..."}

* ``finish_reason``: ``"stop"`` (EOS or a stop string: the model was done), ``"length"``
  (stopped by ``max_tokens``: the model had more to say), ``"abort"``, or vLLM's other
  finish states (``"ignored"``, ``"error"``, ...).
* ``score``: the score the request was ordered by (null: it never needed one, or the
  ranker fell back to FCFS for it). ``queue_wait_s``: arrival to first admission (null
  for a request aborted before it ran).
* ``prompt``: only with ``"prompts": true``. Off by default: prompts are user data.

Files rotate by size: ``trace.jsonl`` is renamed ``trace.jsonl.1`` (``.1`` to ``.2``,
and so on, ``backups`` of them) when it would grow past ``max_bytes``.

**Censoring, in one place** (:func:`label_of`): a ``"stop"`` row is an exact label; a
``"length"`` row says "at least ``output_tokens``" (a censored label); aborted,
ignored and failed rows are no labels at all. :func:`pars_fast.data.load_trace_samples`
turns trace files into training samples; the pairwise loss then uses only the pairs
whose order is known (see ``pars_fast.losses.pair_mask``).

This module imports nothing from the rest of pars_fast (the engine core imports it on
every start); the data side depends on it, never the reverse.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger("pars_fast.traces")

FINISH_REASONS = ("stop", "length", "abort", "ignored", "error", "repetition")


@dataclass(frozen=True)
class TraceConfig:
    """``additional_config["pars"]["trace"]``: where and how to write traces."""

    path: str
    prompts: bool = False  # include the prompt text (user data: off by default)
    max_bytes: int = 100 * 2**20  # rotate when the file would grow past this
    backups: int = 5  # rotated files kept: path.1 (newest) .. path.N

    @classmethod
    def parse(cls, value: Any, source: str) -> TraceConfig | None:
        if value is None or value is False:
            return None
        if isinstance(value, TraceConfig):
            return value
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict):
            raise ValueError(f'{source}: expected a file path or an object like {{"path": "trace.jsonl"}}, got {value!r}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        if not isinstance(value.get("path"), str) or not value["path"]:
            raise ValueError(f"{source}.path: expected a file path, got {value.get('path')!r}")
        out = cls(**value)
        if not isinstance(out.prompts, bool):
            raise ValueError(f"{source}.prompts: expected true or false, got {out.prompts!r}")
        for name in ("max_bytes", "backups"):
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "max_bytes" else 0):
                raise ValueError(f"{source}.{name}: expected a {'positive' if name == 'max_bytes' else 'non-negative'} integer, got {v!r}")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TraceRow:
    """One finished request. ``prompt_token_ids`` is decoded into ``prompt`` when prompts are on."""

    request_id: str
    arrival_time: float
    finish_time: float
    prompt_tokens: int
    output_tokens: int
    finish_reason: str
    score: float | None
    queue_wait_s: float | None
    ranker: str
    prompt_token_ids: list[int] | None = None


class TraceWriter:
    """Appends trace rows from a background thread, so no file I/O (or prompt decoding)
    happens on the scheduler's critical path. ``write`` never blocks; ``close`` flushes."""

    def __init__(self, config: TraceConfig, tokenizer: Any = None) -> None:
        self.config = config
        self.path = Path(config.path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer = tokenizer
        self.rows_written = 0
        self.rotations = 0
        self.errors = 0
        self._queue: queue.SimpleQueue[TraceRow | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="pars-trace", daemon=True)
        self._thread.start()

    def write(self, row: TraceRow) -> None:
        self._queue.put(row)

    def close(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    def stats(self) -> dict[str, Any]:
        return {"path": str(self.path), "rows": self.rows_written, "rotations": self.rotations, "errors": self.errors}

    def _run(self) -> None:
        while True:
            rows = [self._queue.get()]
            while True:  # take what is queued: one write per batch
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = rows[-1] is None
            rows = [r for r in rows if r is not None]
            if rows:
                try:
                    self._append(rows)
                except Exception as exc:  # a full disk must not take serving down
                    self.errors += len(rows)
                    if self.errors == len(rows):
                        logger.warning("PARS: cannot write trace %s (%s); rows are dropped", self.path, exc)
            if done:
                return

    def _append(self, rows: Sequence[TraceRow]) -> None:
        texts: list[str | None] = [None] * len(rows)
        if self.config.prompts and self.tokenizer is not None:
            wanted = [i for i, r in enumerate(rows) if r.prompt_token_ids is not None]
            decoded = self.tokenizer.batch_decode([rows[i].prompt_token_ids for i in wanted], skip_special_tokens=True)
            for i, text in zip(wanted, decoded):
                texts[i] = text
        lines = []
        for row, text in zip(rows, texts):
            d = asdict(row)
            del d["prompt_token_ids"]
            if self.config.prompts:
                d["prompt"] = text
            lines.append(json.dumps(d, ensure_ascii=False) + "\n")
        size = self.path.stat().st_size if self.path.exists() else 0
        chunk: list[bytes] = []
        for line in (text.encode() for text in lines):
            if size and size + len(line) > self.config.max_bytes:  # this row would overflow the file
                self._flush(chunk)
                chunk, size = [], 0
                self._rotate()
            chunk.append(line)
            size += len(line)
        self._flush(chunk)

    def _flush(self, chunk: list[bytes]) -> None:
        if chunk:
            with open(self.path, "ab") as f:
                f.write(b"".join(chunk))
            self.rows_written += len(chunk)

    def _rotate(self) -> None:
        n = self.config.backups
        if n == 0:
            self.path.unlink(missing_ok=True)
        else:
            oldest = self.path.with_name(f"{self.path.name}.{n}")
            oldest.unlink(missing_ok=True)
            for i in range(n - 1, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i}")
                if src.exists():
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.rotations += 1


# ---------------------------------------------------------------------- reading


def label_of(row: dict[str, Any]) -> tuple[int, bool] | None:
    """``(output tokens, exact)`` of a trace row, or None when it is no label.

    ``"stop"``: exact. ``"length"``: at least that many (censored). Anything else
    (aborted, ignored, failed, ...) taught nothing about the response length.
    """
    reason = row.get("finish_reason")
    tokens = row.get("output_tokens")
    if not isinstance(tokens, int) or tokens < 0:
        return None
    if reason == "stop":
        return tokens, True
    if reason == "length":
        return tokens, False
    return None


def is_trace(path: str | os.PathLike[str]) -> bool:
    """Whether a JSONL file is a serving trace: its first non-blank row has trace fields."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    return False
                return isinstance(obj, dict) and "finish_reason" in obj and "prompt_tokens" in obj
    return False


def trace_files(path: str | os.PathLike[str]) -> list[Path]:
    """A trace file and its rotated backups, oldest first."""
    base = Path(path).expanduser()
    backups = sorted(base.parent.glob(base.name + ".*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    return [p for p in backups if p.suffix[1:].isdigit()] + ([base] if base.exists() else [])


def iter_trace_rows(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows of a trace (backups included, oldest first); a torn last line is skipped."""
    for file in trace_files(path):
        with open(file, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("skipping unreadable trace line %s:%d", file, lineno)


def summarize_rows(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Counts of rows per finish reason (for reports)."""
    out: dict[str, int] = {}
    for row in rows:
        reason = str(row.get("finish_reason"))
        out[reason] = out.get(reason, 0) + 1
    return out
