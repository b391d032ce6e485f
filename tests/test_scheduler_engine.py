"""PARSScheduler inside a real vLLM engine on the CPU (tiny random Llama).

The engine core runs in a subprocess, so the scheduler class, its config and the stub
ranker are all resolved there by name: this checks the route a user's
``--scheduler-cls pars_fast.vllm.PARSScheduler --additional-config ...`` takes. One
engine start costs ~30 s, so one engine serves the whole module.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time

import numpy as np
import pytest

pytestmark = pytest.mark.engine

SCHEDULER_CLS = "pars_fast.vllm.PARSScheduler"


class DigitRanker:
    """Stub ranker: a prompt's score is the first integer in its text.

    Imported by name in the engine-core process, where it only sees text decoded
    from token ids by the served tokenizer, so the numbers also check the decode.
    """

    def score(self, prompts: list[str]) -> np.ndarray:
        return np.array([float(re.search(r"\d+", p).group()) if re.search(r"\d+", p) else 0.0 for p in prompts])


class _KVSpace:
    """A small CPU KV cache for the tiny model, restored afterwards."""

    def __enter__(self) -> None:
        self._old = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"

    def __exit__(self, *exc: object) -> None:
        if self._old is None:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = self._old


def _engine_kwargs(model_dir, pars: dict) -> dict:
    return dict(
        model=str(model_dir),
        dtype="bfloat16",
        max_model_len=512,
        max_num_seqs=1,  # one slot: completion order = the scheduler's admission order
        enforce_eager=True,
        scheduler_cls=SCHEDULER_CLS,
        additional_config={"pars": pars},
        seed=0,
    )


@pytest.fixture(scope="module")
def engine(tiny_llama_dir, tmp_path_factory):
    from vllm import LLM

    stats_file = tmp_path_factory.mktemp("pars") / "stats.json"
    pars = {"ranker": f"{__name__}:DigitRanker", "stats_file": str(stats_file)}
    with _KVSpace():
        llm = LLM(**_engine_kwargs(tiny_llama_dir, pars))
    yield llm, stats_file
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def _finish_order(llm, prompts: list[tuple[str, str, int]]) -> list[str]:
    """Add (id, prompt, max_tokens) requests at once and return ids in the order they finish."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    for request_id, prompt, max_tokens in prompts:
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0))
    order: list[str] = []
    deadline = time.monotonic() + 120
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, f"engine stalled; finished so far: {order}"
        order += [out.request_id for out in engine.step() if out.finished]
    return order


def test_engine_serves_burst_in_score_order(engine):
    llm, stats_file = engine
    numbers = [40, 7, 93, 15, 61, 2, 28, 77]
    # The blocker (score 0) takes the only slot; the burst queues behind it and is scored there.
    burst = [("blocker", "0 keeps the engine busy", 200)]
    burst += [(f"r{n}", f"{n} is the number of this request", 4) for n in numbers]
    order = _finish_order(llm, burst)
    assert order == ["blocker"] + [f"r{n}" for n in sorted(numbers)]
    stats = json.loads(stats_file.read_text())
    assert stats["ranker"].endswith(":DigitRanker")
    assert stats["requests_scored"] == len(burst) and stats["requests_fallback"] == 0
    assert stats["scoring_seconds"] > 0


def test_engine_aborts_waiting_requests(engine):
    llm, stats_file = engine
    from vllm import SamplingParams

    eng = llm.llm_engine
    params = SamplingParams(max_tokens=100, ignore_eos=True, temperature=0)
    eng.add_request("busy", "0 busy", params)
    for i in range(1, 5):
        eng.add_request(f"w{i}", f"{i} waiting", SamplingParams(max_tokens=3, ignore_eos=True, temperature=0))
    eng.abort_request(["w2", "w3"])
    finished = []
    deadline = time.monotonic() + 120
    while eng.has_unfinished_requests():
        assert time.monotonic() < deadline, f"engine stalled; finished so far: {finished}"
        finished += [out.request_id for out in eng.step() if out.finished]
    assert finished == ["busy", "w1", "w4"]


def test_bad_ranker_folder_stops_engine_start(tiny_llama_dir, tmp_path, capfd):
    from vllm import LLM

    missing = tmp_path / "no-such-ranker"
    with _KVSpace(), pytest.raises(RuntimeError, match="Engine core initialization failed") as info:
        LLM(**_engine_kwargs(tiny_llama_dir, {"ranker": str(missing)}))
    # The engine core fails while building the scheduler; its message names the folder.
    err = capfd.readouterr().err
    assert f"PARS ranker folder not found: '{missing}'" in err + str(info.value)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pars_fast_serve_answers_completions_and_its_trace_trains_a_ranker(tiny_llama_dir, tmp_path, monkeypatch):
    """`pars-fast serve` starts vLLM's OpenAI server with PARS: it serves completions, writes a
    trace of what finished, and `pars-fast train --data` trains a ranker on that trace."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from pars_fast.cli import main
    from pars_fast.ranker import Ranker
    from pars_fast.traces import iter_trace_rows

    port = _free_port()
    stats_file = tmp_path / "serve-stats.json"
    trace = tmp_path / "trace.jsonl"
    log = (tmp_path / "server.log").open("w")
    cmd = [
        sys.executable, "-m", "pars_fast.cli", "serve",
        "--model", str(tiny_llama_dir), "--ranker", f"{__name__}:DigitRanker", "--pars-stats-file", str(stats_file),
        "--pars-worker", "process",  # the worker process inside a real server (auto scores inline on this CPU)
        "--additional-config", json.dumps({"pars": {"trace": {"path": str(trace), "prompts": True}}}),
        "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "1", "--enforce-eager",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, "server exited:\n" + (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "server did not come up:\n" + (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        # Three prompts for one slot: two wait (min_queue "auto" = 1 with a worker process), so the ranker,
        # in its worker process, scores them (40 tokens each: long enough for its answer to come back).
        prompts = ["3 little pigs", "7 dwarfs", "1 ring"]
        body = json.dumps({"model": str(tiny_llama_dir), "prompt": prompts, "max_tokens": 40, "ignore_eos": True})
        req = urllib.request.Request(base + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            completion = json.loads(resp.read())
        assert completion["usage"]["completion_tokens"] == 40 * len(prompts)
        stats = json.loads(stats_file.read_text())  # rewritten when the engine went idle
        assert stats["ranker"].endswith(":DigitRanker") and stats["worker"]["mode"] == "process"
        assert stats["requests_scored"] + stats["requests_unranked"] == len(prompts)
        assert stats["requests_scored"] >= 2 and stats["requests_fallback"] == 0
        # Traffic for the trace: the random model stops when it samples one of ~1/8 of the
        # vocabulary (a "stop", an exact label) or at max_tokens (a "length", censored).
        stop_ids = list(range(1000, 30000, 8))
        topics = ["tea", "chess", "rivers", "jazz", "rome", "bees", "clouds", "maps", "salt", "ink", "owls", "glass"]
        for i, topic in enumerate(topics * 2):
            body = json.dumps({"model": str(tiny_llama_dir), "prompt": f"tell me about {topic} ({i})",
                               "max_tokens": 24, "stop_token_ids": stop_ids, "seed": i})
            req = urllib.request.Request(base + "/v1/completions", body.encode(), {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as resp:
                json.loads(resp.read())
        expected = len(prompts) + 2 * len(topics)
        deadline = time.monotonic() + 30  # the trace writer is a background thread
        while (len(list(iter_trace_rows(trace))) if trace.exists() else 0) < expected and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its engine core, which we started
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
    rows = list(iter_trace_rows(trace))
    assert len(rows) == expected and {r["finish_reason"] for r in rows} == {"stop", "length"}
    assert all(r["prompt"] and r["prompt_tokens"] > 0 and r["queue_wait_s"] is not None for r in rows)
    scored = [r for r in rows if r["score"] is not None]
    assert len(scored) == stats["scores_applied"] >= 2  # the score each request was ordered by
    monkeypatch.setenv("PARS_FAST_HOME", str(tmp_path / "home"))
    out = tmp_path / "from-trace"
    assert main(["train", "--data", str(trace), "--mode", "head", "--epochs", "2", "--no-progress", "--out", str(out)]) == 0
    assert Ranker.load(out, backend="torch", device="cpu").metadata["training_data"]["n_train"] > 0
