"""Ranking losses over one batch of scores and true response lengths.

* :func:`pairwise_margin_loss`: PARS. ``MarginRankingLoss(margin=1.0)`` on every
  in-batch pair that passes the δ filter ``|La - Lb| / max(La, Lb) >= δ``; target
  +1 when A had the longer response, so higher score = longer response. Pairs are
  formed inside the batch, so each prompt is encoded once per step (PARS samples
  10 random partners per prompt instead; in-batch pairs give every prompt
  ``batch - 1`` candidate partners for the same encoder cost).
* :func:`pointwise_loss`: baseline, MSE regression of the score on standardized
  ``log(1 + length)``.
* :func:`listmle_loss`: baseline, ListMLE over the whole batch as one list (as in
  vllm-ltr), ties in length broken at random.

All take ``scores [n]`` (float, with grad) and ``lengths [n]`` (int or float). A
**negative** length ``-L`` is a censored label, "at least L" (a response cut at
``max_tokens`` in a serving trace): the pairwise loss keeps a pair only when its
order is known (the shorter one is exact and the longer one, exact or not, is δ
longer); the pointwise loss only pulls a censored item's score up to its bound; ListMLE
reads ``L`` as the length.
"""

from __future__ import annotations

import torch

LOSSES = ("pairwise", "pointwise", "listmle")


def pair_mask(lengths: torch.Tensor, delta: float = 0.2) -> torch.Tensor:
    """Bool ``[n, n]``: True at ``(i, j)``, ``i < j``, when the pair passes the δ filter
    and its order is known (with censored labels: the shorter one is exact).

    Two zero lengths are a tie (0/0), never a pair.
    """
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    raw = lengths.to(torch.float64).flatten()
    length, exact = raw.abs(), raw >= 0
    diff = (length[:, None] - length[None, :]).abs()
    biggest = torch.maximum(length[:, None], length[None, :])
    # diff >= delta * max avoids a division by zero; tiny slack for float rounding at the boundary.
    keep = (diff > 0) & (diff >= delta * biggest - 1e-9)
    if not bool(exact.all()):
        shorter_exact = torch.where(length[:, None] > length[None, :], exact[None, :], exact[:, None])
        keep &= shorter_exact
    return torch.triu(keep, diagonal=1)


def pairwise_margin_loss(
    scores: torch.Tensor, lengths: torch.Tensor, delta: float = 0.2, margin: float = 1.0
) -> tuple[torch.Tensor, int]:
    """PARS loss: mean ``max(0, margin - y * (s_i - s_j))`` over δ-filtered in-batch pairs.

    ``y = sign(L_i - L_j)``. Returns ``(loss, number of pairs)``; with no pair the
    loss is a zero that still carries a graph, so a step can be skipped safely.
    """
    scores = scores.flatten()
    lengths = lengths.to(scores.device).flatten()
    if scores.shape != lengths.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and lengths {tuple(lengths.shape)} differ")
    i, j = pair_mask(lengths, delta).nonzero(as_tuple=True)
    if i.numel() == 0:
        return scores.sum() * 0.0, 0
    length = lengths.abs().to(scores.dtype)
    target = torch.sign(length[i] - length[j])
    loss = torch.nn.functional.margin_ranking_loss(scores[i], scores[j], target, margin=margin)
    return loss, int(i.numel())


def pointwise_loss(
    scores: torch.Tensor, lengths: torch.Tensor, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """MSE between scores and ``(log1p(length) - mean) / std``.

    Pass the training set's mean/std of ``log1p(length)`` so the target is ~N(0, 1)
    and a freshly initialised head starts near the optimum's scale.
    """
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    scores = scores.flatten()
    raw = lengths.to(scores.device).to(scores.dtype).flatten()
    target = (torch.log1p(raw.abs()) - mean) / std
    # A censored item is only pushed up to its bound: no loss once its score is above it.
    err = torch.where(raw < 0, torch.clamp(target - scores, min=0.0), scores - target)
    return (err**2).mean()


def listmle_loss(
    scores: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ListMLE: negative log-likelihood of the true order (longest first) under Plackett-Luce.

    ``sum_k [logsumexp(s_{π(k..n)}) - s_{π(k)}]`` divided by ``n`` (a per-item
    scale, so one learning rate fits any batch size). Ties are broken by a random
    permutation (``generator`` makes it reproducible).
    """
    scores = scores.flatten()
    lengths = lengths.to(scores.device).flatten().abs()
    n = scores.numel()
    if n == 0:
        return scores.sum() * 0.0
    perm = torch.randperm(n, generator=generator).to(scores.device)
    # Stable descending sort of the shuffled lengths = longest first, ties in random order.
    order = perm[torch.argsort(lengths[perm], descending=True, stable=True)]
    s = scores[order]
    # logsumexp over each suffix s[k:], computed as a reversed cumulative logsumexp.
    suffix_lse = torch.logcumsumexp(s.flip(0), dim=0).flip(0)
    return (suffix_lse - s).sum() / n


def compute_loss(
    name: str,
    scores: torch.Tensor,
    lengths: torch.Tensor,
    *,
    delta: float = 0.2,
    margin: float = 1.0,
    log_mean: float = 0.0,
    log_std: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, int]:
    """Dispatch by loss name; returns ``(loss, pairs or items used)``."""
    if name == "pairwise":
        return pairwise_margin_loss(scores, lengths, delta=delta, margin=margin)
    if name == "pointwise":
        return pointwise_loss(scores, lengths, mean=log_mean, std=log_std), scores.numel()
    if name == "listmle":
        return listmle_loss(scores, lengths, generator=generator), scores.numel()
    raise ValueError(f"unknown loss {name!r}; choose from {LOSSES}")


__all__ = ["LOSSES", "compute_loss", "listmle_loss", "pair_mask", "pairwise_margin_loss", "pointwise_loss"]
