"""pars_fast.sim.calibrate: the step recorder, the linear fit and the command.

The recorder is checked three ways: model-free on vLLM's real scheduler with step costs we
choose (sleeps), once in the engine core's synchronous loop and once in its async batch
queue, so each step must be charged its own cost; and inside a real vLLM engine, where
its token counts must add up to the requests' work.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections import deque

import numpy as np
import pytest

from pars_fast.sim import calibrate
from pars_fast.sim.calibrate import COEFFICIENTS, RECORDER_CLS, fit_linear, read_rows

TRUE = {"beta0_s": 2e-3, "prefill_s_per_token": 30e-6, "decode_s_per_token": 150e-6, "context_s_per_token": 0.5e-6}


def synthetic_rows(n: int, coef: dict[str, float], *, noise: float, hiccups: float, seed: int = 0) -> list[dict]:
    """Steps shaped like a serving run: decode-only, prefill-only and mixed, 5% multiplicative
    noise, and ``hiccups`` of them delayed 20-80 ms (a descheduled process)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        decode = int(rng.integers(0, 9))
        prefill = int(rng.integers(1, 600)) if rng.random() < 0.3 or decode == 0 else 0
        context = prefill + decode * int(rng.integers(20, 1500))
        cost = (coef["beta0_s"] + coef["prefill_s_per_token"] * prefill + coef["decode_s_per_token"] * decode
                + coef["context_s_per_token"] * context)
        cost *= 1 + noise * rng.standard_normal()
        if rng.random() < hiccups:
            cost += rng.uniform(0.02, 0.08)
        rows.append({"step": i, "dur_s": cost, "after_idle": False, "prefill_tokens": prefill, "decode_reqs": decode,
                     "context_tokens": context, "scheduled_tokens": prefill + decode})
    return rows


def test_fit_recovers_known_coefficients_through_noise_and_hiccups():
    rows = synthetic_rows(4000, TRUE, noise=0.05, hiccups=0.005)
    fit = fit_linear(rows, bootstrap=50)
    for name in COEFFICIENTS:
        assert fit[name] == pytest.approx(TRUE[name], rel=0.06), name
        # The bootstrap error bar is honest: the truth lies within a few of them.
        assert abs(fit[name] - TRUE[name]) < 5 * fit["fit"]["bootstrap_se"][name] + 1e-3 * TRUE[name], name
    assert fit["kind"] == "linear"
    assert fit["fit"]["kept"]["r2"] > 0.95
    assert fit["fit"]["trimmed_steps"] == 40
    json.dumps(fit)  # the file's content: plain JSON types only


def test_trimming_is_what_removes_the_hiccups():
    rows = synthetic_rows(4000, TRUE, noise=0.05, hiccups=0.005)

    def worst_error(fit):
        return max(abs(fit[name] / TRUE[name] - 1) for name in COEFFICIENTS)

    untrimmed, trimmed = fit_linear(rows, trim=0.0, bootstrap=0), fit_linear(rows, bootstrap=0)
    # ~20 steps delayed by 20-80 ms pull the least-squares fit: R² ~0.7, a coefficient ~10% off.
    assert untrimmed["fit"]["kept"]["r2"] < 0.8 and worst_error(untrimmed) > 0.05
    assert trimmed["fit"]["kept"]["r2"] > 0.98 and worst_error(trimmed) < 0.02


def test_fit_keeps_coefficients_non_negative_and_skips_unusable_rows():
    coef = dict(TRUE, context_s_per_token=0.0)
    rows = synthetic_rows(2000, coef, noise=0.1, hiccups=0.0)
    junk = [
        dict(rows[0], dur_s=5.0, after_idle=True),  # the wake-up after idle
        dict(rows[1], dur_s=None),  # an interval with idle time in it
        dict(rows[2], dur_s=5.0, prefill_tokens=0, decode_reqs=0, context_tokens=0, scheduled_tokens=0),  # no model run
    ]
    fit = fit_linear(rows + junk * 30, bootstrap=0)
    assert all(fit[name] >= 0 for name in COEFFICIENTS)
    assert fit["context_s_per_token"] < 0.05 * TRUE["context_s_per_token"]
    assert fit["beta0_s"] == pytest.approx(TRUE["beta0_s"], rel=0.1)
    assert fit["fit"]["dropped_rows"] == {"untimed (idle in the interval, or no output)": 30, "after_idle": 30, "no tokens": 30}
    with pytest.raises(ValueError, match="usable steps"):
        fit_linear(junk)


def test_refit_from_a_step_log_writes_the_cost_file(tmp_path, capsys):
    log = tmp_path / "steps.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(500, TRUE, noise=0.02, hiccups=0.0)) + '{"cut sho')
    parser = argparse.ArgumentParser()
    calibrate.configure_parser(parser)
    out = tmp_path / "cost.json"
    assert calibrate.run(parser.parse_args(["--from-log", str(log), "--out", str(out)])) == 0
    cost = json.loads(out.read_text())
    assert {"kind", "source", *COEFFICIENTS} <= set(cost) and cost["kind"] == "linear"
    assert cost["prefill_s_per_token"] == pytest.approx(TRUE["prefill_s_per_token"], rel=0.05)
    assert cost["command"].startswith("pars-fast sim calibrate --from-log")
    assert "R²" in capsys.readouterr().out


def test_steps_are_grouped_by_the_level_their_requests_came_from():
    # Request ids as the e2e runner names them, with the suffix vLLM 0.32 appends.
    def row(*ids):
        return {"reqs": [[i, 0, 1, 1] for i in ids]}

    assert calibrate.level_of(row("burst-3-9e1e2159", "burst-12-0123abcd")) == "burst"
    assert calibrate.level_of(row("1.5x-12-0123abcd")) == "1.5x"
    assert calibrate.level_of(row("warmup-1.5x-0-abcdef12")) == "warmup"
    assert calibrate.level_of(row("warmup-1.5x-0-abcdef12", "1.5x-0-12345678")) == "mixed"


# ---------------------------------------------------------------------- the recorder, model-free

PROMPTS = [10, 40, 70, 100, 130, 160]  # prompt tokens; all distinct
OUTPUTS = [3, 4, 5, 6, 7, 8]  # max_tokens


def _cost(output) -> float:
    """The step cost we impose: 20 ms when any prompt tokens are computed, else 2 ms."""
    return 0.02 if any(n > 1 for n in output.num_scheduled_tokens.values()) else 0.002


@pytest.fixture
def recorder(tiny_llama_dir, tmp_path):
    from pars_fast.sim import harness

    def build(async_scheduling: bool):
        config = harness.make_vllm_config(tiny_llama_dir, max_num_seqs=4, max_num_batched_tokens=64,
                                          async_scheduling=async_scheduling, enable_prefix_caching=False)
        path = tmp_path / f"steps-{async_scheduling}.jsonl"
        config.additional_config[calibrate.STEP_LOG_KEY] = str(path)
        scheduler = harness.make_scheduler(calibrate.StepRecorder, config)
        factory = harness.RequestFactory()
        for p, m in zip(PROMPTS, OUTPUTS, strict=True):
            scheduler.add_request(factory.make(list(range(p)), m))
        return scheduler, path

    return build


def _run_sync(scheduler) -> None:
    """EngineCore.step's order: schedule, the forward pass (a sleep here), update."""
    from pars_fast.sim.harness import fake_model_output

    while scheduler.has_requests():
        output = scheduler.schedule()
        time.sleep(_cost(output))
        scheduler.update_from_output(output, fake_model_output(scheduler, output))


def _run_async(scheduler) -> None:
    """EngineCore.step_with_batch_queue's order with a queue of 2: step k+1 is scheduled
    before step k's output is waited for (the wait is step k's forward pass)."""
    from pars_fast.sim.harness import fake_model_output

    queue: deque = deque()
    while scheduler.has_requests() or queue:
        if scheduler.has_requests():
            output = scheduler.schedule()
            queue.appendleft((output, fake_model_output(scheduler, output)))
            if len(queue) < 2 and (output.total_num_scheduled_tokens > 0 or scheduler.has_requests()):
                continue
        output, model_output = queue.pop()
        time.sleep(_cost(output))
        scheduler.update_from_output(output, model_output)


def _check_work(rows: list[dict]) -> None:
    """Every prompt token prefilled once, every output token but the last decoded once."""
    assert sum(r["prefill_tokens"] for r in rows) == sum(PROMPTS)
    assert sum(r["decode_reqs"] for r in rows) == sum(OUTPUTS) - len(OUTPUTS)
    per_request: dict[int, int] = {}
    for r in rows:
        for _, before, scheduled, prompt in r["reqs"]:
            assert before == per_request.get(prompt, 0)  # computed before = what earlier steps scheduled
            per_request[prompt] = before + scheduled
    assert per_request == {p: p + m - 1 for p, m in zip(PROMPTS, OUTPUTS, strict=True)}


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_each_step_is_charged_its_own_cost(recorder, async_scheduling):
    scheduler, path = recorder(async_scheduling)
    assert isinstance(scheduler, calibrate.AsyncStepRecorder) == async_scheduling
    (_run_async if async_scheduling else _run_sync)(scheduler)
    scheduler.shutdown()
    rows = read_rows(path)
    _check_work(rows)
    timed = [r for r in rows if r["dur_s"] is not None]
    # Only the empty step that tells the worker the last requests finished goes untimed.
    assert [r["scheduled_tokens"] for r in rows if r["dur_s"] is None] == [0]
    assert len(timed) == len(rows) - 1
    prefill = [r["dur_s"] for r in timed if r["prefill_tokens"]]
    decode = [r["dur_s"] for r in timed if not r["prefill_tokens"]]
    assert prefill and decode
    # An interval charged to the wrong step (off by one) would mix the two costs.
    assert min(prefill) >= 0.02
    assert np.median(decode) < 0.011, decode
    if not async_scheduling:
        # Sync: a step's duration is exactly the gap to the next schedule() call.
        for a, b in zip(rows, rows[1:]):
            if a["dur_s"] is not None:
                assert a["dur_s"] == pytest.approx(b["t"] - a["t"], abs=1e-9)


def test_idle_time_is_never_a_step_cost(recorder, tiny_llama_dir):
    from pars_fast.sim.harness import RequestFactory

    scheduler, path = recorder(False)
    _run_sync(scheduler)
    n_first = scheduler._steps
    time.sleep(0.3)  # the engine idles; then a new request arrives
    scheduler.add_request(RequestFactory().make(list(range(30)), 4, request_id="late"))
    _run_sync(scheduler)
    scheduler.shutdown()
    rows = read_rows(path)
    assert all(r["dur_s"] is None or r["dur_s"] < 0.2 for r in rows)
    assert [r["step"] for r in rows if r["after_idle"]] == [0, n_first]
    assert rows[n_first - 1]["dur_s"] is None  # the interval that ran into the idle time


# ---------------------------------------------------------------------- the recorder in a real engine


@pytest.mark.engine
def test_recorder_in_a_real_vllm_engine(tiny_llama_dir, tmp_path):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    path = tmp_path / "steps.jsonl"
    old = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    try:
        llm = LLM(model=str(tiny_llama_dir), dtype="bfloat16", max_model_len=512, max_num_seqs=4, enforce_eager=True,
                  scheduler_cls=RECORDER_CLS, additional_config={calibrate.STEP_LOG_KEY: str(path)}, seed=0)
    finally:
        if old is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = old
    try:
        prompts = [TokensPrompt(prompt_token_ids=[1000 + i] * p) for i, p in enumerate(PROMPTS)]
        params = [SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.0) for m in OUTPUTS]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == OUTPUTS
        # The engine core writes the log when it goes idle, just after the client has
        # its outputs: wait for that (a few ms) rather than race it.
        deadline = time.monotonic() + 20
        rows = read_rows(path) if path.exists() else []
        while sum(r["decode_reqs"] for r in rows) < sum(OUTPUTS) - len(OUTPUTS) and time.monotonic() < deadline:
            time.sleep(0.1)
            rows = read_rows(path) if path.exists() else []
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    _check_work(rows)
    timed = [r for r in rows if r["dur_s"] is not None]
    assert len(timed) >= len(rows) - 2 and all(r["dur_s"] > 0 for r in timed)
    assert rows[0]["after_idle"] and not any(r["after_idle"] for r in rows[1:])
    assert all(not r["async"] for r in rows)  # vLLM's CPU platform turns async scheduling off


@pytest.mark.slow
@pytest.mark.engine
def test_the_command_serves_bench_e2e_stream_and_fits_it(tmp_path):
    """The whole route: bench e2e's workload and engine settings, the recorder named through
    the e2e runner's PolicySpec, its log path through additional_config, then the fit."""
    parser = argparse.ArgumentParser()
    calibrate.configure_parser(parser)
    out, log = tmp_path / "cost.json", tmp_path / "steps.jsonl"
    args = parser.parse_args(["--n", "16", "--loads", "burst", "--out", str(out), "--step-log", str(log), "--no-progress"])
    assert calibrate.run(args) == 0
    cost = json.loads(out.read_text())
    rows = read_rows(log)
    burst = [r for r in rows if calibrate.level_of(r) == "burst"]
    prompts = cost["workload"]["n"] * cost["workload"]["prompt_len"]["mean"]
    assert sum(r["prefill_tokens"] for r in burst) == pytest.approx(prompts, abs=1)  # the mean is rounded to 0.1
    assert cost["per_level"]["burst"]["steps"] > 100
    assert cost["prefill_s_per_token"] > 0 and cost["beta0_s"] > 0
    assert cost["engine"]["max_num_seqs"] == 8 and cost["engine"]["scheduler_cls"] == RECORDER_CLS
