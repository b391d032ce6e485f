"""The ``pars-fast`` command line.

Each sub-command lives in the module that owns its job; that module defines
``configure_parser(parser)`` and ``run(args) -> int``. Modules are imported only
when their command runs, so ``pars-fast --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("pars_fast.demo", "small end-to-end run: FCFS vs PARS vs oracle SJF on a CPU vLLM engine"),
    "train": ("pars_fast.training", "train a ranker (PARS pairwise, or a baseline loss)"),
    "eval": ("pars_fast.evaluation", "Kendall tau / pairwise accuracy of a ranker on held-out data"),
    "score": ("pars_fast.evaluation:score", "score prompts read from stdin, one per line"),
    "serve": ("pars_fast.serve", "start vLLM's OpenAI server with the PARS scheduler"),
    "bench": ("pars_fast.bench", "benchmarks (bench e2e: FCFS vs PARS vs SJF on a real engine)"),
    "sim": ("pars_fast.sim.cli", "simulate serving on a GPU: vLLM's own scheduler on a virtual clock (sim calibrate: fit step costs)"),
}
# Sub-commands that live in a module of their own: (command, sub-command) -> (module, one-line help).
SUBCOMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("sim", "calibrate"): ("pars_fast.sim.calibrate", "fit the linear step-cost model to a real vLLM engine's steps"),
}


def _usage() -> str:
    lines = ["usage: pars-fast COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `pars-fast COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from pars_fast import __version__

        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pars-fast: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, help_ = COMMANDS[command]
    if rest and (command, rest[0]) in SUBCOMMANDS:
        target, help_ = SUBCOMMANDS[(command, rest[0])]
        command, rest = f"{command} {rest[0]}", rest[1:]
    module_name, _, prefix = target.partition(":")
    module = import_module(module_name)
    configure = getattr(module, f"{prefix}_configure_parser" if prefix else "configure_parser")
    run = getattr(module, f"{prefix}_run" if prefix else "run")
    parser = argparse.ArgumentParser(prog=f"pars-fast {command}", description=help_)
    configure(parser)
    return int(run(parser.parse_args(rest)) or 0)


if __name__ == "__main__":
    sys.exit(main())
