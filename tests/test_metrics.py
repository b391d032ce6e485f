"""Ranking metrics on hand-made values, and against a brute-force reference."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pars_fast.metrics import bootstrap_se, kendall_tau, pairwise_accuracy, pairwise_counts, ranking_metrics, spearman


def test_perfect_and_reversed():
    lengths = [10, 20, 30, 40]
    assert kendall_tau([1, 2, 3, 4], lengths) == pytest.approx(1.0)
    assert kendall_tau([4, 3, 2, 1], lengths) == pytest.approx(-1.0)
    assert spearman([4, 3, 2, 1], lengths) == pytest.approx(-1.0)
    assert pairwise_accuracy([1, 2, 3, 4], lengths, delta=0.2) == 1.0
    assert pairwise_accuracy([4, 3, 2, 1], lengths, delta=0.2) == 0.0


def test_kendall_tau_by_hand():
    # 4 items, 6 pairs; one discordant pair (items 2, 3): tau = (5 - 1) / 6
    assert kendall_tau([1, 2, 4, 3], [10, 20, 30, 40]) == pytest.approx(4 / 6)


def test_pairwise_accuracy_by_hand_with_filter_and_ties():
    lengths = [100, 90, 50, 10]
    scores = [3.0, 4.0, 1.0, 1.0]
    # Pairs at delta=0.2 (100-90 fails: 0.1):
    #   (100,50) 3>1 ok; (100,10) 3>1 ok; (90,50) 4>1 ok; (90,10) ok; (50,10) tie -> 0.5
    correct, pairs = pairwise_counts(scores, lengths, delta=0.2)
    assert pairs == 5 and correct == 4.5
    assert pairwise_accuracy(scores, lengths, delta=0.2) == pytest.approx(0.9)
    # delta=0 adds (100,90), which is wrong: 4.5 / 6
    assert pairwise_accuracy(scores, lengths, delta=0.0) == pytest.approx(4.5 / 6)


def test_nan_when_nothing_to_rank():
    assert math.isnan(kendall_tau([1.0], [3]))
    assert math.isnan(kendall_tau([1.0, 2.0], [5, 5]))
    assert math.isnan(spearman([1.0, 1.0], [5, 6]))
    assert math.isnan(pairwise_accuracy([1.0, 2.0], [100, 99], delta=0.2))


def test_bad_input():
    with pytest.raises(ValueError, match="differ"):
        ranking_metrics([1.0, 2.0], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        kendall_tau([1.0, float("nan")], [1, 2])
    with pytest.raises(ValueError, match="delta"):
        pairwise_accuracy([1.0, 2.0], [1, 2], delta=-0.1)


def test_ranking_metrics_keys():
    m = ranking_metrics([0.1, 0.5, 0.2], [10, 100, 40])
    assert set(m) >= {"kendall_tau", "pairwise_accuracy", "spearman", "n", "n_pairs", "delta"}
    assert m["n"] == 3 and m["n_pairs"] == 3


def _brute(scores, lengths, delta):
    correct = pairs = 0.0
    for i, j in itertools.combinations(range(len(scores)), 2):
        a, b = lengths[i], lengths[j]
        if a == b or abs(a - b) < delta * max(a, b) - 1e-9:
            continue
        pairs += 1
        agree = np.sign(a - b) * np.sign(scores[i] - scores[j])
        correct += 1.0 if agree > 0 else 0.5 if agree == 0 else 0.0
    return correct, int(pairs)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 60)), min_size=0, max_size=40),
    st.sampled_from([0.0, 0.2, 0.5]),
)
def test_pairwise_counts_match_brute_force(items, delta):
    scores = [float(s) for s, _ in items]
    lengths = [n for _, n in items]
    assert pairwise_counts(scores, lengths, delta) == _brute(scores, lengths, delta)


def _brute_pure(scores, lengths, delta):
    """The δ-filtered pair count in plain Python floats (no numpy), for large inputs."""
    correct = 0.0
    pairs = 0
    n = len(scores)
    for i in range(n):
        a, si = lengths[i], scores[i]
        for j in range(i + 1, n):
            b = lengths[j]
            if a == b or abs(a - b) < delta * max(a, b) - 1e-9:
                continue
            pairs += 1
            d = (si - scores[j]) * (a - b)
            correct += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return correct, pairs


def test_blocked_pair_count_on_large_input():
    # n > the 1024-row block: blocks must not drop or double-count pairs.
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 1000, 1100).tolist()
    scores = (np.asarray(lengths) + rng.normal(0, 200, 1100)).round(0).tolist()  # rounding makes score ties
    correct, pairs = pairwise_counts(scores, lengths, 0.2)
    want_correct, want_pairs = _brute_pure(scores, lengths, 0.2)
    assert pairs == want_pairs
    assert correct == pytest.approx(want_correct)


def _tau_b(x, y):
    """Kendall τ-b from its definition: (concordant - discordant) / sqrt((n0 - n1)(n0 - n2))."""
    conc = disc = ties_x = ties_y = 0
    n = len(x)
    for i, j in itertools.combinations(range(n), 2):
        dx, dy = x[i] - x[j], y[i] - y[j]
        if dx == 0:
            ties_x += 1
        if dy == 0:
            ties_y += 1
        if dx * dy > 0:
            conc += 1
        elif dx * dy < 0:
            disc += 1
    n0 = n * (n - 1) / 2
    return (conc - disc) / math.sqrt((n0 - ties_x) * (n0 - ties_y))


def test_kendall_tau_matches_the_definition_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(5):
        x = rng.integers(0, 8, 60).tolist()  # many ties on both sides
        y = rng.integers(0, 12, 60).tolist()
        assert kendall_tau(x, y) == pytest.approx(_tau_b(x, y), abs=1e-12)


def test_bootstrap_se_matches_tau_null_standard_deviation():
    # For independent scores and lengths, tau's sampling SD is sqrt(2(2n+5) / (9n(n-1))) (Kendall 1938).
    rng = np.random.default_rng(2)
    n = 400
    se = bootstrap_se(rng.normal(size=n), rng.integers(1, 10_000, n), n_boot=300)
    want = math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1)))
    assert se == pytest.approx(want, rel=0.2)
    assert math.isnan(bootstrap_se([1.0, 2.0], [3, 4]))
