"""Tests of pars_fast.aging: the aged priority, its wait bound, and the order it
gives in ScoredRequestQueue. Every expected number is worked out by hand in a
comment; none is recomputed with the production formula.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pars_fast.aging import PRIORITY_UNITS_PER_SCORE, aged_priority, aging_wait_bound, prompt_cost
from pars_fast.queue import ScoredRequestQueue


class Duck:
    """The three attributes the queue reads."""

    def __init__(self, request_id: str, priority: int, arrival_time: float) -> None:
        self.request_id = request_id
        self.priority = priority
        self.arrival_time = arrival_time

    def __repr__(self) -> str:
        return f"Duck({self.request_id}, p={self.priority}, t={self.arrival_time})"


# --------------------------------------------------------------- priority --


@pytest.mark.parametrize(
    "score, arrival, origin, rate, want",
    [
        (2.0, 10.5, 10.0, 0.01, 2_005_000),  # 2 + 0.01 x 0.5 = 2.005 score units
        (2.0, 10.5, 10.0, 0.0, 2_000_000),  # no aging: the score alone
        (-1.5, 7.0, 7.0, 3.0, -1_500_000),  # at the origin: the score alone, negative too
        (0.0, 8.0, 10.0, 0.5, -1_000_000),  # before the origin: 0.5 x -2 = -1
        (0.5, 1.7e9 + 3600, 1.7e9, 0.01, 36_500_000),  # an hour after a Unix-time origin: 0.5 + 36
        (1e-6, 1.7e9 + 3600, 1.7e9, 0.01, 36_000_001),  # one unit still shows at that magnitude
        (2e-6, 1.7e9 + 3600, 1.7e9, 0.01, 36_000_002),
        (0.1234567, 0.0, 0.0, 0.01, 123_457),  # rounded to the nearest unit (123456.7)
    ],
)
def test_aged_priority_hand_worked(score, arrival, origin, rate, want):
    got = aged_priority(score, arrival, origin, rate)
    assert type(got) is int and got == want


def test_units_per_score():
    assert PRIORITY_UNITS_PER_SCORE == 1_000_000
    # 1e9 score units plus ten years of aging at 0.01/s (3,153,600) stay exact in a
    # double: below 2**53 = 9,007,199,254,740,992 units.
    assert aged_priority(1e9, 10 * 365 * 86_400.0, 0.0, 0.01) == 1_003_153_600_000_000 < 2**53


# ------------------------------------------------------------ wait bound --


def test_prompt_cost_hand_worked():
    assert prompt_cost(1024, 0.5) == 5.0  # ten doublings
    assert prompt_cost(1, 0.5) == prompt_cost(0, 0.5) == 0.0  # an empty prompt costs what one token does
    assert prompt_cost(8192, 0.0) == 0.0


def test_wait_bound_hand_worked():
    assert aging_wait_bound(1.0, 3.0, 0.5) == 4.0  # (3 - 1) / 0.5
    assert aging_wait_bound(0.0, 2.8, 0.01) == pytest.approx(280.0)  # the default ranker's 5-95% range
    assert aging_wait_bound(-2.0, 6.0, 4.0) == 2.0  # (6 + 2) / 4
    assert aging_wait_bound(5.0, 5.0, 1.0) == 0.0  # one score: nothing overtakes anything
    assert aging_wait_bound(0.0, 100.0, 0.0) == math.inf  # no aging, no bound


@pytest.mark.parametrize(
    "s_min, s_max, rate, match",
    [
        (1.0, 0.0, 1.0, "need s_min <= s_max"),
        (math.nan, 1.0, 1.0, "need s_min <= s_max"),
        (0.0, 1.0, -0.01, "rate must be finite and >= 0"),
        (0.0, 1.0, math.inf, "rate must be finite and >= 0"),
        (0.0, 1.0, math.nan, "rate must be finite and >= 0"),
    ],
)
def test_wait_bound_rejects_bad_arguments(s_min, s_max, rate, match):
    with pytest.raises(ValueError, match=match):
        aging_wait_bound(s_min, s_max, rate)


# --------------------------------------------------------------- ordering --


def pop_order_long_among_shorts(rate: float) -> list[str]:
    """A long request (score 3) arrives at t = 100; short ones (score 1) arrive
    every 0.5 s from 100.5 to 106.0. All are queued with their aged priorities."""
    origin = 100.0
    q = ScoredRequestQueue()
    q.add_request(Duck("long", aged_priority(3.0, 100.0, origin, rate), 100.0))
    for k in range(1, 13):
        t = 100.0 + 0.5 * k
        q.add_request(Duck(f"s{t}", aged_priority(1.0, t, origin, rate), t))
    return [q.pop_request().request_id for _ in range(len(q))]


def test_long_request_is_overtaken_exactly_until_the_bound():
    # Rate 0.5: the bound is (3 - 1) / 0.5 = 4 s. Priorities (units of 1e-6 score):
    # long 3,000,000; short at 103.5: 1 + 0.5 x 3.5 = 2,750,000 (ahead of long);
    # at 104.0: 1 + 2 = 3,000,000 (ties, and long arrived first); at 104.5: 3,250,000.
    assert aging_wait_bound(1.0, 3.0, 0.5) == 4.0
    shorts_before = ["s100.5", "s101.0", "s101.5", "s102.0", "s102.5", "s103.0", "s103.5"]
    shorts_after = ["s104.0", "s104.5", "s105.0", "s105.5", "s106.0"]
    assert pop_order_long_among_shorts(0.5) == [*shorts_before, "long", *shorts_after]
    # Without aging every short one overtakes it (and a steady stream would starve it).
    assert pop_order_long_among_shorts(0.0) == [*shorts_before, *shorts_after, "long"]
    # Twice the rate halves the window: overtaken only by arrivals before 102.0.
    assert pop_order_long_among_shorts(1.0)[:4] == ["s100.5", "s101.0", "s101.5", "long"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    reqs=st.lists(st.tuples(st.floats(0, 100), st.floats(0, 1000)), min_size=2, max_size=40),
    rate=st.floats(0.01, 100),
)
def test_bound_holds_for_every_pair(reqs, rate):
    """A request (s_a, t_a) comes out before every request arriving after
    t_a + (s_a - s_min) / rate, whatever their scores (s_min = 0 here)."""
    q = ScoredRequestQueue()
    ducks = [Duck(f"r{i}", aged_priority(s, t, 0.0, rate), t) for i, (s, t) in enumerate(reqs)]
    q.prepend_requests(ducks)
    rank = {d.request_id: n for n, d in enumerate(q)}
    for (s_a, t_a), a in zip(reqs, ducks):
        deadline = t_a + s_a / rate
        for b in ducks:
            # Slack for double rounding in the aged score (~1e-16 relative), in seconds.
            if b.arrival_time > deadline + 1e-9 * max(1.0, deadline) * (1 + rate):
                assert rank[a.request_id] < rank[b.request_id], (a, b)
