"""RankingPolicy: when and how much PARS ranks, decided from plain numbers.

No vLLM, no clock, no sleeps: every decision is checked against numbers worked out by
hand from the rules in pars_fast/vllm/policy.py.
"""

from __future__ import annotations

import pytest

from pars_fast.vllm.policy import MIN_FINISHES, PROBE_INTERVAL_S, WARMUP_RANKING_S, RankingPolicy


def policy(**kw) -> RankingPolicy:
    args = {"min_queue": 4, "budget_s": 0.1, "max_share": 0.2, "batch_max": 32}
    args.update(kw)
    return RankingPolicy(**args)


# ---------------------------------------------------------------------- depth


def test_queue_is_deep_counts_requests_beyond_the_free_slots():
    p = policy(min_queue=4)
    assert not p.queue_is_deep(waiting=5, free_slots=2)  # 3 beyond
    assert p.queue_is_deep(waiting=6, free_slots=2)  # 4 beyond
    assert p.queue_is_deep(waiting=4, free_slots=-3)  # more running than slots: none free, not "3 extra"


def test_a_kv_bound_engine_is_deep_by_what_its_last_step_left_waiting():
    """KV cache, not slots, limits admission on a GPU: 200 free slots say nothing when the
    last step could only admit a few; what it left waiting is the backlog."""
    p = policy(min_queue=64)
    assert not p.queue_is_deep(waiting=100, free_slots=200)
    assert p.queue_is_deep(waiting=100, free_slots=200, left_waiting=64)


def test_model_free_rankers_rank_every_queue_without_a_budget():
    p = policy(rank_everything=True, min_queue=1000)
    assert p.queue_is_deep(waiting=1, free_slots=10)
    assert p.next_chunk(now=0.0, spent_s=5.0, cost_per_prompt=1.0, first=False) == 32
    assert p.inline_pays(cost_per_prompt=100.0)


# ---------------------------------------------------------------------- budget


def test_chunks_fill_half_of_what_is_left_of_the_budget():
    p = policy(budget_s=0.1, batch_max=32)
    # 0.5 * 0.1 / 0.002 = 25 prompts; then 0.5 * (0.1 - 0.05) / 0.002 = 12.
    assert p.next_chunk(now=0.0, spent_s=0.0, cost_per_prompt=0.002, first=True) == 25
    assert p.next_chunk(now=0.0, spent_s=0.05, cost_per_prompt=0.002, first=False) == 12
    assert p.next_chunk(now=0.0, spent_s=0.0, cost_per_prompt=0.0001, first=True) == 32  # capped by batch_max
    assert p.next_chunk(now=0.0, spent_s=0.1, cost_per_prompt=0.002, first=False) == 0  # spent
    assert p.next_chunk(now=0.0, spent_s=0.0, cost_per_prompt=0.0, first=True) == 1  # unmeasured: one measures it


def test_budget_slack_a_chunk_never_plans_past_the_budget():
    """Whatever the cost estimate, a planned chunk costs at most half of what is left, so
    the step's ranking stays within budget_s plus one misestimated prompt."""
    p = policy(budget_s=0.1, batch_max=1000)
    for cost in (0.0005, 0.001, 0.003, 0.007, 0.02, 0.04):
        spent = 0.0
        first = True
        while (n := p.next_chunk(now=0.0, spent_s=spent, cost_per_prompt=cost, first=first)) > 0:
            assert n * cost <= 0.5 * (0.1 - spent) + cost  # the one-prompt rule allows one
            spent += n * cost
            first = False
        assert spent <= 0.1 + 1e-12


def test_one_prompt_that_fits_is_scored_even_over_half_the_budget():
    """A cold first call measured 80 ms against budget_s 0.1: half of the budget holds no
    prompt, but one fits, so one is scored (and re-measures the cost)."""
    p = policy(budget_s=0.1)
    assert p.next_chunk(now=0.0, spent_s=0.0, cost_per_prompt=0.08, first=True) == 1
    assert p.next_chunk(now=0.0, spent_s=0.08, cost_per_prompt=0.08, first=False) == 0
    assert p.counters.lockout_steps == 0


def test_a_cost_over_the_whole_budget_locks_out_but_probes_every_interval():
    """One 0.6 s stall made the estimate exceed budget_s: without probes nothing would
    ever re-measure it. A probe is allowed once per PROBE_INTERVAL_S and counted."""
    p = policy(budget_s=0.1)
    assert p.locked_out(0.6) and not p.locked_out(0.05)
    assert p.next_chunk(now=100.0, spent_s=0.0, cost_per_prompt=0.6, first=True) == 1  # first probe
    assert p.next_chunk(now=100.0 + PROBE_INTERVAL_S / 2, spent_s=0.0, cost_per_prompt=0.6, first=True) == 0
    assert p.next_chunk(now=100.0 + PROBE_INTERVAL_S, spent_s=0.0, cost_per_prompt=0.6, first=True) == 1
    assert p.counters.lockout_steps == 3 and p.counters.probes == 2


# ---------------------------------------------------------------------- max_share and warm-up


def finishes(p: RankingPolicy, gaps: list[float], start: float = 0.0) -> float:
    t = start
    p.on_finish(t, ran=True)
    for g in gaps:
        t += g
        p.on_finish(t, ran=True)
    return t


def test_max_share_compares_a_prompt_with_the_engines_time_per_request():
    p = policy(max_share=0.2)
    finishes(p, [0.05] * MIN_FINISHES)  # 50 ms per request
    assert p.seconds_per_request == pytest.approx(0.05)
    assert p.inline_pays(0.010)  # 20% of a request
    assert not p.inline_pays(0.011)
    assert p.counters.share_limited_steps == 1
    assert policy(max_share=None).inline_pays(10.0)


def test_inline_ranking_inside_a_gap_is_not_the_engines_time():
    """Ranking stalls lengthen the gaps between finishes; counted as engine time they would
    make an expensive ranker look affordable."""
    p = policy(max_share=0.2)
    t = 0.0
    p.on_finish(t, ran=True)
    for _ in range(MIN_FINISHES):
        p.on_ranking(0.04)  # 40 ms of the 50 ms gap was ranking
        t += 0.05
        p.on_finish(t, ran=True)
    assert p.seconds_per_request == pytest.approx(0.01)
    assert not p.inline_pays(0.005)  # 50% of the engine's 10 ms


def test_aborts_do_not_count_as_the_engines_time_per_request():
    """A client cancelling 64 queued requests at once must not drive the mean gap to ~0."""
    p = policy(max_share=0.2)
    t = finishes(p, [0.05] * MIN_FINISHES)
    for _ in range(64):
        p.on_finish(t, ran=False)
    assert p.seconds_per_request == pytest.approx(0.05)
    assert p.inline_pays(0.01)


def test_warm_up_allows_a_second_of_ranking_until_the_engine_is_measured():
    p = policy(max_share=0.2)
    assert p.seconds_per_request is None
    assert p.inline_pays(5.0)  # nothing measured, nothing ranked yet
    p.on_ranking(WARMUP_RANKING_S)
    assert not p.inline_pays(0.001)
    finishes(p, [0.05] * MIN_FINISHES)  # measured now: the share decides
    assert p.inline_pays(0.001)


def test_idle_measures_afresh():
    p = policy(max_share=0.2)
    finishes(p, [0.001] * MIN_FINISHES)  # a workload where ranking never paid
    assert not p.inline_pays(0.01)
    p.on_idle()
    assert p.seconds_per_request is None and p.inline_pays(0.01)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        policy(min_queue=0)
    with pytest.raises(ValueError):
        policy(batch_max=0)
