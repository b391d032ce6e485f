"""PARS scheduler settings: ``additional_config={"pars": {...}}``, mirrored by ``PARS_FAST_*``.

Precedence, highest first: the ``"pars"`` dict of vLLM's ``additional_config``, then the
environment variable ``PARS_FAST_<KEY>`` (upper case; ``fallback`` takes JSON), then the
default. Everything is checked when the scheduler is built, so a typo or a missing ranker
folder stops the engine at start-up instead of at the first request.

This module imports neither vLLM nor torch, so ``pars-fast serve`` can validate settings
before it starts a server.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pars_fast.online import OnlineConfig
from pars_fast.traces import TraceConfig

ENV_PREFIX = "PARS_FAST_"

# Ranker names that are not folders.
BUILTIN_RANKERS = ("default", "oracle", "prompt-length")

WORKER_MODES = ("auto", "process", "thread", "inline")

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# "package.module:attribute" names a ranker object to import (e.g. a stub in tests).
_IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class PARSConfigError(ValueError):
    """A PARS setting is unknown, has the wrong type, or names a missing ranker."""


@dataclass(frozen=True)
class FallbackConfig:
    """What happens when the ranker cannot order requests.

    Requests it cannot score keep an FCFS key (see ``PARSScheduler``) and serving goes on.
    """

    # Seconds ranking may add to one scheduler step when a text ranker scores inline:
    # arrivals are scored in chunks sized from the measured cost per prompt, and what
    # does not fit waits for the next step in FCFS position. It bounds the stall that
    # running requests see; a chunk that takes 3x the budget means the ranker is too
    # slow to run inline, and it rests (retry_after_s). None: no limit. A background
    # worker adds only the microseconds it takes to apply its scores.
    budget_s: float | None = 0.1
    # Rank inline only while one prompt costs the ranker at most this share of the
    # engine's time per request (measured over the last finishes). Inline scoring is
    # serial with the model: where a prompt costs a large part of what serving it costs
    # (short responses, a slow CPU), scoring slows the engine, which deepens the queue,
    # which calls for more scoring; there FCFS order is the better one. The measure is
    # rough (PARS's own order finishes short requests first), hence the generous 0.2: on
    # this project's CPU it separates ShareGPT (~5%) from HumanEval (~35%). None: always rank.
    max_share: float | None = 0.2
    # Seconds a background worker may go without returning a score while it has work;
    # then it is declared hung, its requests keep their FCFS keys, and it is restarted.
    deadline_s: float = 30.0
    # After a failure, skip the ranker for this many seconds (arrivals go FCFS), so a
    # broken or overloaded ranker is not paid for at every step.
    retry_after_s: float = 30.0
    # "fcfs": fall back and keep serving; "raise": let the error stop the engine (debugging).
    on_error: str = "fcfs"

    @classmethod
    def parse(cls, value: Any, source: str) -> FallbackConfig:
        if isinstance(value, FallbackConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise PARSConfigError(f"{source}: expected a JSON object, got {value!r} ({exc})") from None
        if not isinstance(value, Mapping):
            raise PARSConfigError(f"{source}: expected an object like {{\"budget_s\": 1.0}}, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise PARSConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        budget = value.get("budget_s", cls.budget_s)
        if budget is not None:
            budget = _positive_float(budget, f"{source}.budget_s")
        share = value.get("max_share", cls.max_share)
        if share is not None:
            share = _positive_float(share, f"{source}.max_share")
            if share > 1:
                raise PARSConfigError(f"{source}.max_share: expected a fraction in (0, 1], got {share!r}")
        deadline = _positive_float(value.get("deadline_s", cls.deadline_s), f"{source}.deadline_s")
        retry = _non_negative_float(value.get("retry_after_s", cls.retry_after_s), f"{source}.retry_after_s")
        on_error = value.get("on_error", cls.on_error)
        if on_error not in ("fcfs", "raise"):
            raise PARSConfigError(f"{source}.on_error: expected 'fcfs' or 'raise', got {on_error!r}")
        return cls(budget_s=budget, max_share=share, deadline_s=deadline, retry_after_s=retry, on_error=on_error)


@dataclass(frozen=True)
class PARSConfig:
    """Settings of ``PARSScheduler``; precedence as in the module docstring."""

    # "default" (the bundled ranker, trained on first use), "oracle" (each request's
    # max_tokens is its true length: oracle SJF for benchmarks), "prompt-length" (baseline:
    # longer prompt = longer response), a ranker folder, or "package.module:attr".
    ranker: str = "default"
    # Score units a request gains per second of waiting, so none starves: a request
    # whose score is D above another's is served first once it has waited D / aging s more.
    # Scaled to the default ranker, whose held-out scores have std 0.94 and a 5-95th
    # percentile range of 2.8: that range is crossed after 93 s. Chosen on a simulated
    # H100 serving Llama-3.1-8B at 1.5x capacity (docs/BENCHMARKS.md, "Simulated GPU
    # serving", the aging curve, with prompt_weight 0.5): 0.03 keeps 95% of 0.01's
    # mean-latency gain in log terms (FCFS/PARS 1.84x against 1.90x) while its P99 falls
    # from 1.59x to 1.41x FCFS's. A ranker whose scores spread wider needs it scaled by
    # the same factor (and prompt_weight too). Oracle scores are tokens.
    aging: float = 0.03
    # Score units added per doubling of the prompt's tokens: the part of a request's cost
    # that its prompt states exactly (prefill compute, KV space). The ranker predicts the
    # response; on a GPU, where each step's prefill chunk slows every decode in it, the
    # prompt's own cost matters as much. 0 orders by the ranker's score alone. Chosen on a
    # simulated H100 serving Llama-3.1-8B, on the default ranker's validation prompts
    # (docs/BENCHMARKS.md, "The prompt's cost"): 0.5 is within 3% of the best mean latency
    # there (w = 1) at 1.5x, 2x and on a burst, with better per-token latency at 2x, and
    # the score still weighs as much as a 4x longer prompt. The term is free, so it orders
    # requests before they are scored.
    # Text rankers only (oracle and prompt-length are references and stay pure).
    prompt_weight: float = 0.5
    # Rank only when at least this many requests wait beyond what a step can admit; below
    # that the queue stays FCFS. "auto": 1 when the ranker runs in a worker process (it
    # costs the engine nothing there), else twice max_num_seqs. A queue a few requests deep
    # gains next to nothing from reordering, and it is where reordering stretches the
    # tail (docs/BENCHMARKS.md, "When to rank"). The oracle and prompt-length rankers
    # order every queue (they are references, and cost nothing).
    min_queue: int | str = "auto"
    # Prompt tokens a pars_fast ranker reads (its encoder's cut). None: the ranker's own.
    max_prompt_tokens: int | None = None
    # Most prompts scored in one batch. Scores are applied batch by batch, so a smaller
    # batch orders a burst sooner; a larger one costs a little less per prompt.
    score_batch_max: int = 32
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    # Where a text ranker scores: "process" (a child process: no GIL shared with the
    # engine core, pinned to spare CPUs), "thread" (in the engine-core process), "inline"
    # (inside schedule(), under fallback.budget_s), or "auto": inline for the model-free
    # rankers (oracle, prompt-length); for a text ranker, process when the machine has
    # CPUs that neither the model nor the engine core uses (a GPU server), else inline:
    # on vLLM's CPU backend every other core runs the model, and a ranker competing
    # with the engine core for its core slows every step more than scoring inline does
    # (docs/ARCHITECTURE.md, "Where the ranker runs").
    worker: str = "auto"
    # Ranker backend passed to Ranker.load ("auto", "torch", "triton", ...).
    backend: str = "auto"
    # Device of a text ranker: "cpu", "cuda", "cuda:1", ..., or "auto" (cuda if available,
    # else cpu). CPU by default, GPU servers included: one CPU thread scores ~130 ShareGPT
    # prompts/s (the default ranker, int8; benchmarks/ranker_cost.py), more than a GPU
    # serves (Llama-3.1-8B on one H100: ~60 requests/s at saturation), while on the GPU each
    # engine core's worker would add a CUDA context and MiniLM, ~0.5-0.7 GiB that vLLM sized
    # its KV cache without (docs/ARCHITECTURE.md, "The ranker's memory on a GPU server").
    device: str = "cpu"
    # CPUs the process worker may run on: "auto" (on vLLM's CPU backend, the CPUs it
    # does not bind model workers to; elsewhere any), or a list of CPU ids.
    cpus: str | tuple[int, ...] = "auto"
    # Niceness of the process worker: the engine core's own work goes first.
    nice: int = 5
    # CPU threads the ranker scores with. One is fastest next to a busy vLLM process
    # (OpenMP threads that share a core wait on each other), and keeps up with ~130
    # prompts/s in full batches (~80/s one by one); raise it where one engine core must
    # rank more arrivals than that. None: torch's setting.
    threads: int | None = 1
    # JSON file the engine core rewrites with the counters, at most once a second while
    # serving and again when it goes idle and at shutdown; "{pid}" and "{dp_rank}" are
    # filled in. None: no file.
    stats_file: str | None = None
    # Seconds between INFO log lines with the counters; 0 turns them off.
    log_interval_s: float = 60.0
    # Online adaptation to the served model's own output lengths (a text ranker's, in a
    # worker or inline, where it is bounded per step): true/false or an object of
    # OnlineConfig's fields (pars_fast.online).
    online: OnlineConfig = field(default_factory=OnlineConfig)
    # One JSONL row per finished request: a path, or {"path", "prompts", "max_bytes",
    # "backups"} (pars_fast.traces.TraceConfig). None: no trace.
    trace: TraceConfig | None = None

    @classmethod
    def from_sources(
        cls, pars: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> PARSConfig:
        """Merge the ``"pars"`` dict over ``PARS_FAST_*`` variables over defaults, and check it."""
        pars = {} if pars is None else pars
        if not isinstance(pars, Mapping):
            raise PARSConfigError(
                f'additional_config["pars"] must be an object like {{"ranker": "oracle"}}, got {pars!r}'
            )
        environ = os.environ if environ is None else environ
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(pars) - set(known))
        if unknown:
            raise PARSConfigError(f'additional_config["pars"]: unknown key(s) {unknown}; known keys: {known}')
        raw: dict[str, tuple[Any, str]] = {}
        for name in known:
            env_name = ENV_PREFIX + name.upper()
            if name in pars:
                raw[name] = (pars[name], f'additional_config["pars"]["{name}"]')
            elif env_name in environ:
                raw[name] = (environ[env_name], env_name)
        return cls._checked(raw)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any, environ: Mapping[str, str] | None = None) -> PARSConfig:
        additional = getattr(vllm_config, "additional_config", None) or {}
        if not isinstance(additional, Mapping):
            raise PARSConfigError(f"vLLM additional_config must be a dict to hold PARS settings, got {additional!r}")
        return cls.from_sources(additional.get("pars"), environ)

    @classmethod
    def _checked(cls, raw: Mapping[str, tuple[Any, str]]) -> PARSConfig:
        kwargs: dict[str, Any] = {}
        if "ranker" in raw:
            value, src = raw["ranker"]
            if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
                raise PARSConfigError(f"{src}: expected a ranker name or folder, got {value!r}")
            kwargs["ranker"] = str(value).strip()
        if "aging" in raw:
            kwargs["aging"] = _non_negative_float(*raw["aging"])
        if "prompt_weight" in raw:
            kwargs["prompt_weight"] = _non_negative_float(*raw["prompt_weight"])
        if "min_queue" in raw:
            value, src = raw["min_queue"]
            kwargs["min_queue"] = "auto" if value == "auto" else _positive_int(value, src)
        if "max_prompt_tokens" in raw:
            value, src = raw["max_prompt_tokens"]
            kwargs["max_prompt_tokens"] = None if value in (None, "") else _positive_int(value, src)
        if "score_batch_max" in raw:
            kwargs["score_batch_max"] = _positive_int(*raw["score_batch_max"])
        if "fallback" in raw:
            kwargs["fallback"] = FallbackConfig.parse(*raw["fallback"])
        if "worker" in raw:
            value, src = raw["worker"]
            if value not in WORKER_MODES:
                raise PARSConfigError(f"{src}: expected one of {list(WORKER_MODES)}, got {value!r}")
            kwargs["worker"] = value
        if "device" in raw:
            value, src = raw["device"]
            if not isinstance(value, str) or not _DEVICE.match(value):
                raise PARSConfigError(f"{src}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")
            kwargs["device"] = value
        if "cpus" in raw:
            kwargs["cpus"] = _cpus(*raw["cpus"])
        if "nice" in raw:
            value, src = raw["nice"]
            if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
                raise PARSConfigError(f"{src}: expected an integer niceness (0-19), got {value!r}")
            if not 0 <= int(value) <= 19:
                raise PARSConfigError(f"{src}: expected a niceness in 0..19, got {value!r}")
            kwargs["nice"] = int(value)
        if "backend" in raw:
            value, src = raw["backend"]
            if not isinstance(value, str) or not value:
                raise PARSConfigError(f"{src}: expected a backend name such as 'auto', got {value!r}")
            kwargs["backend"] = value
        if "threads" in raw:
            value, src = raw["threads"]
            kwargs["threads"] = None if value in (None, "") else _positive_int(value, src)
        if "stats_file" in raw:
            value, src = raw["stats_file"]
            if value not in (None, "") and not isinstance(value, (str, os.PathLike)):
                raise PARSConfigError(f"{src}: expected a file path, got {value!r}")
            if value not in (None, ""):
                try:
                    str(value).format(pid=0, dp_rank=0)
                except (KeyError, IndexError, ValueError) as exc:
                    raise PARSConfigError(f"{src}: only {{pid}} and {{dp_rank}} can be filled in, got {value!r} ({exc!r})") from None
            kwargs["stats_file"] = None if value in (None, "") else str(value)
        if "log_interval_s" in raw:
            kwargs["log_interval_s"] = _non_negative_float(*raw["log_interval_s"])
        if "online" in raw:
            value, src = raw["online"]
            if isinstance(value, str):  # from the environment: true/false or JSON
                value = _json_or_bool(value, src)
            try:
                kwargs["online"] = OnlineConfig.parse(value, src)
            except (TypeError, ValueError) as exc:
                raise PARSConfigError(str(exc)) from None
        if "trace" in raw:
            value, src = raw["trace"]
            if isinstance(value, str) and value.lstrip().startswith("{"):
                value = _json_or_bool(value, src)
            try:
                kwargs["trace"] = TraceConfig.parse(value, src)
            except (TypeError, ValueError) as exc:
                raise PARSConfigError(str(exc)) from None
        config = cls(**kwargs)
        config.ranker_kind()  # a missing folder fails here, at start-up
        return config

    def ranker_kind(self) -> str:
        """``"builtin"``, ``"import"`` or ``"folder"``; raises if a folder does not exist."""
        if self.ranker in BUILTIN_RANKERS:
            return "builtin"
        path = Path(self.ranker).expanduser()
        if path.exists():
            if not path.is_dir():
                raise PARSConfigError(f"PARS ranker {self.ranker!r} is a file; a ranker is a folder (Ranker.save)")
            return "folder"
        if _IMPORT_SPEC.match(self.ranker):
            return "import"
        raise PARSConfigError(
            f"PARS ranker folder not found: {str(path)!r}. Use a ranker folder (pars-fast train --out DIR), "
            f"one of {list(BUILTIN_RANKERS)}, or 'package.module:attr'."
        )

    def worker_mode(self, spare_cpus: bool | None = None) -> str:
        """Where scoring runs: ``"inline"``, ``"thread"`` or ``"process"`` (``"auto"`` resolved).

        ``spare_cpus``: whether the machine has CPUs neither the model nor the engine core
        uses (None: not known, e.g. off vLLM's CPU backend, where the model is on a GPU).
        """
        if self.worker != "auto":
            return self.worker
        if self.ranker in ("oracle", "prompt-length"):
            return "inline"
        return "inline" if spare_cpus is False else "process"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, for ``additional_config={"pars": config.to_dict()}``."""
        return asdict(self)


def _json_or_bool(value: str, source: str) -> Any:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise PARSConfigError(f"{source}: expected true, false or a JSON object, got {value!r} ({exc})") from None


def _cpus(value: Any, source: str) -> str | tuple[int, ...]:
    """ "auto", or CPU ids as a list or a string like "1,3-5"."""
    if value == "auto":
        return "auto"
    if isinstance(value, str):
        try:
            ids: list[int] = []
            for part in value.split(","):
                lo, _, hi = part.strip().partition("-")
                ids += range(int(lo), int(hi or lo) + 1)
            value = ids
        except ValueError:
            raise PARSConfigError(f"{source}: expected 'auto', a list of CPU ids or a string like '1,3-5', got {value!r}") from None
    if not isinstance(value, (list, tuple)) or not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
        raise PARSConfigError(f"{source}: expected 'auto' or a non-empty list of CPU ids, got {value!r}")
    return tuple(sorted(set(value)))


def _positive_int(value: Any, source: str) -> int:
    if isinstance(value, bool):
        raise PARSConfigError(f"{source}: expected a positive integer, got {value!r}")
    try:
        number = int(value) if isinstance(value, (int, str)) else None
    except ValueError:
        number = None
    if number is None or number <= 0:
        raise PARSConfigError(f"{source}: expected a positive integer, got {value!r}")
    return number


def _float(value: Any, source: str) -> float:
    if isinstance(value, bool):
        raise PARSConfigError(f"{source}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PARSConfigError(f"{source}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise PARSConfigError(f"{source}: expected a finite number, got {value!r}")
    return number


def _non_negative_float(value: Any, source: str) -> float:
    number = _float(value, source)
    if number < 0:
        raise PARSConfigError(f"{source}: expected a number >= 0, got {value!r}")
    return number


def _positive_float(value: Any, source: str) -> float:
    number = _float(value, source)
    if number <= 0:
        raise PARSConfigError(f"{source}: expected a number > 0, got {value!r}")
    return number
