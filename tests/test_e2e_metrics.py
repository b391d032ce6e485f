"""End-to-end metrics, workload and report on hand-made data (no engine; fast)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pars_fast.data import Sample
from pars_fast.e2e.benchmark import BenchConfig, client_priorities, comparisons
from pars_fast.e2e.metrics import SUMMARY_KEYS, MetricsError, RequestTiming, percentile, ratio, saturated_tps, summarize
from pars_fast.e2e.report import markdown_report, markdown_table, ratio_table, write_report
from pars_fast.e2e.workload import WorkloadError, arrival_offsets, build_workload, load_name, parse_load


def _t(idx, submit, first, finish, tokens, queued=None, scheduled=None, preemptions=0):
    return RequestTiming(
        idx=idx, prompt_len=5, max_tokens=tokens, output_tokens=tokens, arrival=submit, submit=submit,
        first_token=first, finish=finish, queued=queued, scheduled=scheduled, preemptions=preemptions,
    )


# Three requests worked out by hand:
#   idx  submit first finish tokens queued scheduled   latency ttft  norm      wait
#   0    0.0    0.5   2.0    4      0.0    0.25        2.0     0.5   0.5       0.25
#   1    0.0    1.0   5.0    10     0.0    0.75        5.0     1.0   0.5       0.75
#   2    1.0    4.0   9.0    2      1.0    3.5         8.0     3.0   4.0       2.5
HAND = [
    _t(0, 0.0, 0.5, 2.0, 4, 0.0, 0.25),
    _t(1, 0.0, 1.0, 5.0, 10, 0.0, 0.75, preemptions=1),
    _t(2, 1.0, 4.0, 9.0, 2, 1.0, 3.5),
]


# A burst of four on two slots, one token a second after each first token:
#   idx first finish tokens
#   0   1     11     11     finishes at 11: from then on, fewer than 2 remain (the tail)
#   1   1     6      6
#   2   6     10     5
#   3   10    14     5      2 of its tokens fall in the saturated window [0, 11]
BURST = [_t(0, 0.0, 1.0, 11.0, 11), _t(1, 0.0, 1.0, 6.0, 6), _t(2, 0.0, 6.0, 10.0, 5), _t(3, 0.0, 10.0, 14.0, 5)]


def test_saturated_throughput_excludes_the_tail_of_a_burst():
    assert saturated_tps(BURST, slots=2) == pytest.approx((11 + 6 + 5 + 2) / 11)
    assert saturated_tps(BURST, slots=1) == pytest.approx(27 / 14)  # one slot: busy to the end
    assert saturated_tps(BURST[:1], slots=2) is None  # never saturated
    assert summarize(BURST)["itl_mean"] == pytest.approx(1.0)
    assert math.isnan(summarize(BURST)["running_mean"])  # no engine timestamps here
    assert summarize(BURST)["throughput_tps"] == pytest.approx(27 / 14)  # the tail lowers the plain rate
    with pytest.raises(MetricsError, match="slots"):
        saturated_tps(BURST, slots=0)


def test_summary_matches_hand_computed_values():
    s = summarize(HAND, scoring_s_per_request=0.002)
    assert list(s) == list(SUMMARY_KEYS)
    # ITL, token-weighted: (1.5 + 4 + 5) s of decoding for (3 + 9 + 1) tokens after the first
    assert s["itl_mean"] == pytest.approx(10.5 / 13)
    # Running: (2 - 0.25) + (5 - 0.75) + (9 - 3.5) = 11.5 request-seconds over 9 s
    assert s["running_mean"] == pytest.approx(11.5 / 9)
    assert s["step_cost_ms"] == pytest.approx(1e3 * (10.5 / 13) / (11.5 / 9))
    assert s["n"] == 3 and s["output_tokens"] == 16
    assert s["latency_mean"] == pytest.approx(5.0)
    # numpy's linear interpolation: sorted [2, 5, 8]; P90 at rank 1.8 -> 5 + 0.8 * 3.
    assert s["latency_p50"] == pytest.approx(5.0)
    assert s["latency_p90"] == pytest.approx(7.4)
    assert s["latency_p99"] == pytest.approx(7.94)
    assert s["ttft_mean"] == pytest.approx(1.5)
    assert s["ttft_p90"] == pytest.approx(1.0 + 0.8 * 2.0)
    assert s["norm_latency_mean"] == pytest.approx(5.0 / 3)
    assert s["norm_latency_p90"] == pytest.approx(0.5 + 0.8 * 3.5)
    assert s["wait_mean"] == pytest.approx(3.5 / 3)
    assert s["wait_max"] == pytest.approx(2.5)
    # Span: first submit 0.0 -> last finish 9.0.
    assert s["makespan_s"] == pytest.approx(9.0)
    assert s["throughput_rps"] == pytest.approx(3 / 9)
    assert s["throughput_tps"] == pytest.approx(16 / 9)
    assert s["preemptions"] == 1
    assert s["scoring_ms_per_request"] == pytest.approx(2.0)


def test_wait_falls_back_to_ttft_without_engine_timestamps():
    t = _t(0, 1.0, 3.0, 4.0, 2)
    assert t.wait == pytest.approx(2.0)
    assert summarize([t])["scoring_ms_per_request"] is None


def test_percentile_agrees_with_a_direct_order_statistic():
    rng = np.random.default_rng(0)
    values = rng.exponential(size=101)
    # With 101 values, P90 is exactly the 91st smallest (rank 90).
    assert percentile(values, 90) == pytest.approx(np.sort(values)[90])
    with pytest.raises(MetricsError):
        percentile([], 50)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "no completed requests"),
        ([_t(0, 0.0, 1.0, 2.0, 3), _t(0, 0.0, 1.0, 2.0, 3)], "duplicate"),
        ([_t(0, 1.0, 0.5, 2.0, 3)], "out of order"),
        ([_t(0, 0.0, 3.0, 2.0, 3)], "out of order"),
        ([_t(0, 0.0, 1.0, 2.0, 0)], "produced 0 tokens"),
        ([_t(0, 0.0, 1.0, 2.0, 3, queued=1.0, scheduled=0.5)], "scheduled"),
        ([_t(0, 0.0, 1.0, float("nan"), 3)], "non-finite"),
    ],
)
def test_impossible_timings_are_rejected_with_a_reason(bad, message):
    with pytest.raises(MetricsError, match=message):
        summarize(bad)


def test_timing_round_trips_through_json_and_names_missing_fields():
    t = HAND[1]
    assert RequestTiming.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(MetricsError, match="finish"):
        RequestTiming.from_dict({"idx": 0, "output_tokens": 1, "submit": 0.0, "first_token": 0.1})


def test_ratio_and_missing_values():
    assert ratio({"a": 6.0}, {"a": 2.0}, "a") == pytest.approx(3.0)
    assert math.isnan(ratio({"a": 1.0}, {"a": 0.0}, "a"))
    assert math.isnan(ratio({"a": None}, {"a": 1.0}, "a"))


# ---------------------------------------------------------------------- workload


def test_arrivals_burst_and_poisson_are_seeded_and_scale_with_rate():
    assert np.array_equal(arrival_offsets(5, None, seed=1), np.zeros(5))
    a = arrival_offsets(4000, 2.0, seed=7)
    assert a[0] == 0.0 and np.all(np.diff(a) > 0)
    assert np.array_equal(a, arrival_offsets(4000, 2.0, seed=7))
    assert not np.array_equal(a, arrival_offsets(4000, 2.0, seed=8))
    # Mean gap 1/rate (4000 exponential gaps: standard error ~1.6%).
    assert np.mean(np.diff(a)) == pytest.approx(0.5, rel=0.06)
    # The same seed at twice the rate is the same stream, twice as fast.
    assert np.allclose(arrival_offsets(4000, 4.0, seed=7), a / 2)
    with pytest.raises(WorkloadError):
        arrival_offsets(3, 0.0, seed=0)


@pytest.mark.parametrize("text, factor", [("burst", None), ("1.5", 1.5), ("3x", 3.0), (" 0.8X ", 0.8)])
def test_parse_load(text, factor):
    assert parse_load(text) == factor
    assert load_name(parse_load(text)) == ("burst" if factor is None else f"{factor:g}x")


@pytest.mark.parametrize("text", ["fast", "-1", "0", "nan", "inf"])
def test_parse_load_rejects_nonsense(text):
    with pytest.raises(WorkloadError):
        parse_load(text)


class WordTokenizer:
    """One token per word, plus [CLS]/[SEP] when special tokens are asked for."""

    def __call__(self, texts, add_special_tokens=True, verbose=False):
        extra = 2 if add_special_tokens else 0
        return {"input_ids": [list(range(len(t.split()) + extra)) for t in texts]}


def test_workload_drops_what_does_not_fit_and_clips_on_request():
    samples = [
        Sample("a " * 3, 10),  # prompt 5 tokens
        Sample("b " * 40, 10),  # prompt 42 > max_prompt_tokens=32: dropped
        Sample("c " * 3, 100),  # 5 + 100 > max_model_len=64: dropped
        Sample("d " * 3, 50),  # fits; clipped to 20
        Sample("e " * 3, 0),  # nothing to generate: dropped
        Sample("f " * 3, 20),
    ]
    w = build_workload(samples, WordTokenizer(), n=3, seed=0, max_model_len=64, max_prompt_tokens=32, max_response_tokens=20)
    assert len(w) == 3
    assert sorted(j.max_tokens for j in w.jobs) == [10, 20, 20]
    assert {j.prompt.split()[0] for j in w.jobs} == {"a", "d", "f"}
    assert [j.idx for j in w.jobs] == [0, 1, 2]
    assert all(j.prompt_len == 5 for j in w.jobs)
    # Counts are of the samples visited (in the seeded order) until 3 fitted.
    info = w.info
    assert info.examined == 3 + info.dropped_too_long + info.dropped_empty
    assert info.clipped == 1
    full = build_workload(samples, WordTokenizer(), n=3, seed=0, max_model_len=64, max_prompt_tokens=32, max_response_tokens=20)
    assert full.info.available == 6
    # Same seed, same stream; another seed, another order.
    again = build_workload(samples, WordTokenizer(), n=3, seed=0, max_model_len=64, max_prompt_tokens=32, max_response_tokens=20)
    assert [j.prompt for j in again.jobs] == [j.prompt for j in w.jobs]
    with pytest.raises(WorkloadError, match="only 3 of 6 samples fit"):
        build_workload(samples, WordTokenizer(), n=4, max_model_len=64, max_prompt_tokens=32)
    # A seed whose order visits a fitting sample last sees, and counts, every drop.
    seed = next(s for s in range(100) if np.random.default_rng(s).permutation(6)[-1] in (0, 3, 5))
    every = build_workload(samples, WordTokenizer(), n=3, seed=seed, max_model_len=64, max_prompt_tokens=32)
    assert (every.info.examined, every.info.dropped_too_long, every.info.dropped_empty) == (6, 2, 1)


def test_client_priorities_are_ranks_lowest_score_first():
    scores = np.array([0.3, -2.0, 5.0, 0.3, 1.0])
    prio = client_priorities(scores)
    assert prio == [1, 0, 4, 2, 3]  # the tie keeps arrival order
    assert sorted(prio) == list(range(5))


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown policies"):
        BenchConfig(out_dir="x", policies=["fcfs", "lifo"]).check()
    with pytest.raises(ValueError, match="distinct"):
        BenchConfig(out_dir="x", loads=[1.5, 1.5]).check()
    with pytest.raises(ValueError, match="schedule"):
        BenchConfig(out_dir="x", schedule="parallel").check()


# ---------------------------------------------------------------------- report


def _fake_result() -> dict:
    rng = np.random.default_rng(3)
    runs = {}
    for k, policy in enumerate(["fcfs", "pars", "sjf"]):
        levels = {}
        for load in ["burst", "3x"]:
            timings = []
            for i in range(20):
                submit = 0.0 if load == "burst" else i * 0.1
                finish = submit + (3 - k) * rng.uniform(1, 5)
                timings.append(_t(i, submit, submit + 0.1, finish, 1 + i))
            levels[load] = {
                "rate_rps": None if load == "burst" else 10.0,
                "summary": summarize(timings, None if policy == "fcfs" else 0.001),
                "pars_stats": None,
                "requests": [t.to_dict() for t in timings],
            }
        runs[policy] = {"engine_start_s": 1.0, "warmup_s": 1.0, "levels": levels}
    return {
        "meta": {
            "config": {"max_num_seqs": 8, "max_model_len": 2048, "dtype": "auto"},
            "model": "tiny",
            "ranker": "r",
            "aging": 0.0,
            "environment": {"cpu": "cpu", "cpu_count": 2, "torch": "2"},
            "wall_s": 60.0,
        },
        "workload": {"n": 20, "source": "hand", "seed": 0, "response_len": {"mean": 10, "p50": 10, "p90": 18},
                     "dropped_too_long": 0, "clipped": 0, "max_response_tokens": None},
        "capacity_rps": 3.3,
        "loads": ["burst", "3x"],
        "policies": ["fcfs", "pars", "sjf"],
        "runs": runs,
        "comparisons": comparisons(runs, ["burst", "3x"]),
    }


def test_report_tables_and_plots(tmp_path):
    result = _fake_result()
    table = markdown_table(result)
    assert table.count("\n") == 1 + 2 * 3  # header, rule, 2 loads x 3 policies
    fcfs = result["runs"]["fcfs"]["levels"]["burst"]["summary"]
    assert f"| burst | fcfs | {fcfs['latency_mean']:.2f} |" in table
    assert "3x (10.00 req/s)" in table
    ratios = ratio_table(result)
    expected = fcfs["latency_mean"] / result["runs"]["pars"]["levels"]["burst"]["summary"]["latency_mean"]
    assert f"{expected:.2f}×" in ratios
    files = write_report(result, tmp_path, prefix="t")
    for key in ("cdf", "bars"):
        data = files[key].read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    assert "Capacity 3.300 req/s" in files["markdown"].read_text()
    assert "t_latency_cdf.png" in markdown_report(result, [files["cdf"]])


def test_demo_verdict_tells_the_truth_both_ways():
    from pars_fast.demo import verdict

    def level(mean):
        return {"summary": {"latency_mean": mean}}

    result = {
        "loads": ["burst", "3x"],
        "runs": {
            "fcfs": {"levels": {"burst": level(10.0), "3x": level(4.0)}},
            "pars": {"levels": {"burst": level(8.0), "3x": level(5.0)}},
        },
    }
    burst, heavy = verdict(result)
    assert burst.startswith("Verdict (burst): PARS beat FCFS") and "1.25x" in burst
    assert heavy.startswith("Verdict (3x): PARS was SLOWER than FCFS") and "0.80x" in heavy
    assert verdict({"loads": ["burst"], "runs": {"fcfs": {}}}) == []  # no PARS run, no verdict
    # Repeats: the paired median decides, and pairs on both sides of 1 are called noise.
    result["comparisons"] = {"burst": {"FCFS/PARS mean latency": 1.1}, "3x": {"FCFS/PARS mean latency": 1.2}}
    result["comparison_ranges"] = {"burst": {"FCFS/PARS mean latency": [0.9, 1.3]},
                                   "3x": {"FCFS/PARS mean latency": [1.1, 1.3]}}
    burst, heavy = verdict(result)
    assert burst.startswith("Verdict (burst): no clear winner") and "pairs 0.90-1.30x" in burst
    assert heavy.startswith("Verdict (3x): PARS beat FCFS") and "1.20x" in heavy


def test_repeats_report_medians_and_the_paired_range():
    from pars_fast.e2e.benchmark import comparison_ranges, comparisons, with_repeat

    def level(mean, tps):
        summary = {"latency_mean": mean, "throughput_tps": tps, "scoring_ms_per_request": None}
        return {"rate_rps": None, "summary": summary, "pars_stats": {"first": mean}, "requests": [mean]}

    fcfs, pars = level(10.0, 100.0), level(10.0, 90.0)
    for f, p in ((12.0, 6.0), (11.0, 12.0)):
        fcfs, pars = with_repeat(fcfs, level(f, 80.0)), with_repeat(pars, level(p, 130.0))
    assert fcfs["summary"]["latency_mean"] == 11.0 and pars["summary"]["latency_mean"] == 10.0  # medians
    assert fcfs["summary"]["throughput_tps"] == 80.0  # 100, 80, 80
    assert pars["summary"]["scoring_ms_per_request"] is None  # missing in every repeat stays missing
    assert len(pars["repeats"]) == 3 and pars["requests"] == [10.0] and pars["pars_stats"] == {"first": 10.0}

    runs = {"fcfs": {"levels": {"burst": fcfs}}, "pars": {"levels": {"burst": pars}}}
    # Paired FCFS/PARS: 10/10, 12/6, 11/12 -> median 1.0 (the medians' ratio would say 1.1).
    assert comparisons(runs, ["burst"])["burst"]["FCFS/PARS mean latency"] == 1.0
    lo, hi = comparison_ranges(runs, ["burst"])["burst"]["FCFS/PARS mean latency"]
    assert (round(lo, 3), hi) == (0.917, 2.0)

    result = {"loads": ["burst"], "comparisons": comparisons(runs, ["burst"]),
              "comparison_ranges": comparison_ranges(runs, ["burst"])}
    assert "1.00× (0.92–2.00)" in ratio_table(result)
