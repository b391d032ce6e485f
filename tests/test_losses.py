"""Ranking losses: hand-computed values, the δ pair filter, gradients, edge cases."""

import math

import pytest
import torch

from pars_fast.losses import (
    LOSSES,
    compute_loss,
    listmle_loss,
    pair_mask,
    pairwise_margin_loss,
    pointwise_loss,
)


def test_pair_mask_delta_filter_by_hand():
    # lengths 100, 85, 80, 0: ratios |a-b|/max(a,b)
    #   100-85: 0.15 (drop)  100-80: 0.20 (keep, boundary)  85-80: 0.0588 (drop)
    #   x-0: 1.0 (keep)
    lengths = torch.tensor([100, 85, 80, 0])
    got = pair_mask(lengths, delta=0.2)
    want = torch.tensor(
        [
            [False, False, True, True],
            [False, False, False, True],
            [False, False, False, True],
            [False, False, False, False],
        ]
    )
    assert torch.equal(got, want)


def test_pair_mask_ties_and_zero_zero_are_never_pairs():
    got = pair_mask(torch.tensor([0, 0, 7, 7]), delta=0.0)
    # delta=0 keeps every pair with different lengths, but never ties (incl. 0/0).
    assert got.sum() == 4
    assert not got[0, 1] and not got[2, 3]


def test_pair_mask_rejects_bad_delta():
    with pytest.raises(ValueError, match="delta"):
        pair_mask(torch.tensor([1, 2]), delta=1.5)


def test_pairwise_margin_loss_by_hand():
    # Pairs kept at delta 0.2: (0,1) 10 vs 100, (0,2) 10 vs 50, (1,2) 100 vs 50.
    scores = torch.tensor([0.5, 1.0, 2.0], requires_grad=True)
    lengths = torch.tensor([10, 100, 50])
    loss, n = pairwise_margin_loss(scores, lengths, delta=0.2, margin=1.0)
    # y=-1 (0 shorter): max(0, 1 + (0.5-1.0)) = 0.5
    # y=-1:             max(0, 1 + (0.5-2.0)) = 0.0
    # y=+1 (1 longer):  max(0, 1 - (1.0-2.0)) = 2.0
    assert n == 3
    assert loss.item() == pytest.approx((0.5 + 0.0 + 2.0) / 3)
    loss.backward()
    # d/ds: pair(0,1) active: +1/3 on s0, -1/3 on s1; pair(1,2) active: -1/3 on s1, +1/3 on s2.
    assert scores.grad.tolist() == pytest.approx([1 / 3, -2 / 3, 1 / 3])


def test_pairwise_loss_matches_a_pair_by_pair_loop():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(32, generator=g)
    lengths = torch.randint(1, 600, (32,), generator=g)
    loss, n = pairwise_margin_loss(scores, lengths, delta=0.2, margin=0.7)
    s, ln = scores.tolist(), lengths.tolist()
    hinges = []
    for i in range(32):
        for j in range(i + 1, 32):
            a, b = ln[i], ln[j]
            if a != b and abs(a - b) >= 0.2 * max(a, b):
                y = 1.0 if a > b else -1.0
                hinges.append(max(0.0, 0.7 - y * (s[i] - s[j])))
    assert n == len(hinges) > 0
    assert loss.item() == pytest.approx(sum(hinges) / len(hinges), rel=1e-5)


def test_listmle_matches_the_plackett_luce_likelihood():
    # Distinct lengths: the true order is unique, NLL = -sum_k log(exp(s_k) / sum_{m >= k} exp(s_m)).
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(12, generator=g, dtype=torch.float64)
    lengths = torch.randperm(12, generator=g) * 10 + 5
    order = sorted(range(12), key=lambda i: -int(lengths[i]))
    s = [float(scores[i]) for i in order]
    nll = -sum(math.log(math.exp(s[k]) / sum(math.exp(v) for v in s[k:])) for k in range(12))
    assert listmle_loss(scores, lengths).item() == pytest.approx(nll / 12, rel=1e-9)


def test_pairwise_loss_without_pairs_is_zero_with_graph():
    scores = torch.tensor([0.3, 0.7], requires_grad=True)
    loss, n = pairwise_margin_loss(scores, torch.tensor([100, 99]), delta=0.2)
    assert n == 0 and loss.item() == 0.0
    loss.backward()  # must not raise: the trainer may call it
    assert scores.grad.tolist() == [0.0, 0.0]


def test_pairwise_loss_shape_mismatch():
    with pytest.raises(ValueError, match="differ"):
        pairwise_margin_loss(torch.zeros(3), torch.tensor([1, 2]))


def test_pointwise_loss_by_hand():
    lengths = torch.tensor([0, math.e - 1])  # log1p -> 0, 1
    scores = torch.tensor([1.0, 1.0])
    # target (log1p - 0.5) / 0.5 = -1, +1 -> squared errors 4, 0
    assert pointwise_loss(scores, lengths, mean=0.5, std=0.5).item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="std"):
        pointwise_loss(scores, lengths, std=0.0)


def test_listmle_by_hand():
    # True order (longest first): item 1 (30), item 2 (20), item 0 (10).
    scores = torch.tensor([0.0, 2.0, 1.0])
    lengths = torch.tensor([10, 30, 20])
    s = [2.0, 1.0, 0.0]
    want = (
        math.log(math.exp(s[0]) + math.exp(s[1]) + math.exp(s[2])) - s[0]
        + math.log(math.exp(s[1]) + math.exp(s[2])) - s[1]
        + 0.0
    ) / 3
    assert listmle_loss(scores, lengths).item() == pytest.approx(want, rel=1e-6)


def test_listmle_prefers_correct_order_and_breaks_ties_reproducibly():
    lengths = torch.tensor([5, 50, 500])
    good = listmle_loss(torch.tensor([0.0, 1.0, 2.0]), lengths)
    bad = listmle_loss(torch.tensor([2.0, 1.0, 0.0]), lengths)
    assert good < bad
    tied = torch.tensor([7, 7, 7, 1])
    scores = torch.tensor([0.1, 0.5, 0.9, -1.0])
    a = listmle_loss(scores, tied, generator=torch.Generator().manual_seed(3))
    b = listmle_loss(scores, tied, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


def test_gradient_pushes_longer_prompt_up():
    for name in LOSSES:
        scores = torch.zeros(2, requires_grad=True)
        loss, _ = compute_loss(name, scores, torch.tensor([10, 400]), log_mean=3.0, log_std=2.0)
        loss.backward()
        # gradient descent moves s1 (longer response) above s0
        assert scores.grad[1] < scores.grad[0], name


def test_compute_loss_unknown():
    with pytest.raises(ValueError, match="unknown loss"):
        compute_loss("hinge", torch.zeros(2), torch.tensor([1, 2]))


def test_censored_pairs_are_kept_only_when_their_order_is_known():
    """-L = "at least L": a pair is known when its shorter member is exact."""
    # 10 exact, 30 censored (>= 30), 20 exact, 50 censored (>= 50)
    lengths = torch.tensor([10.0, -30.0, 20.0, -50.0])
    mask = pair_mask(lengths, delta=0.2)
    got = {(int(i), int(j)) for i, j in mask.nonzero().tolist()}
    # (10, >=30), (10, 20), (10, >=50), (>=30 vs 20: 20 is shorter and exact), (20, >=50).
    # Not (>=30, >=50): either could be longer.
    assert got == {(0, 1), (0, 2), (0, 3), (1, 2), (2, 3)}
    # Brute force over random labels: known <=> shorter one exact, and the delta filter.
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(1, 200, (30,), generator=g).float() * torch.where(torch.rand(30, generator=g) < 0.4, -1.0, 1.0)
    mask = pair_mask(raw, 0.2)
    for i in range(30):
        for j in range(i + 1, 30):
            a, b = abs(raw[i].item()), abs(raw[j].item())
            shorter_exact = (raw[j] >= 0) if a > b else (raw[i] >= 0)
            want = a != b and abs(a - b) >= 0.2 * max(a, b) and bool(shorter_exact)
            assert bool(mask[i, j]) == want, (raw[i], raw[j])


def test_censored_labels_in_the_losses():
    scores = torch.tensor([0.0, 5.0, 1.0], requires_grad=True)
    # The censored item (>= 30) scored high: no pointwise loss pulls it down...
    lengths = torch.tensor([10.0, -30.0, 20.0])
    mean, std = 0.0, 1.0
    loss = pointwise_loss(scores, lengths, mean, std)
    want = ((0.0 - math.log1p(10)) ** 2 + 0.0 + (1.0 - math.log1p(20)) ** 2) / 3  # 5 > log1p(30): no loss
    assert loss.item() == pytest.approx(want)
    # ... and when below its bound, it is pulled up like an exact label.
    low = pointwise_loss(torch.tensor([0.0, 1.0, 1.0]), lengths, mean, std)
    assert low.item() == pytest.approx(((math.log1p(10)) ** 2 + (math.log1p(30) - 1) ** 2 + (1 - math.log1p(20)) ** 2) / 3)
    # The pairwise loss uses exactly the known pairs, with the true direction.
    loss, n = pairwise_margin_loss(scores, lengths, delta=0.2, margin=1.0)
    assert n == 3  # (10, >=30), (10, 20), (>=30 > 20)
    pairs = [(1, 0), (2, 0), (1, 2)]  # (longer, shorter)
    assert loss.item() == pytest.approx(sum(max(0.0, 1.0 - (scores[a] - scores[b]).item()) for a, b in pairs) / 3)
