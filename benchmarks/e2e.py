"""End-to-end benchmark script: FCFS vs PARS vs oracle SJF on a real vLLM engine.

Same as ``pars-fast bench e2e`` (all its options work), for running from a checkout::

    python benchmarks/e2e.py --n 200 --loads burst,0.8,1.5,3 --out e2e-results

Not a pytest-benchmark file: one run takes tens of minutes on a CPU. The engines run
in spawned subprocesses, hence the ``__main__`` guard.
"""

import argparse
import sys

from pars_fast.bench import add_e2e_arguments, run_e2e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_e2e_arguments(parser, n=200, loads="burst,0.8,1.5,3", out="pars-fast-e2e")
    return run_e2e(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
