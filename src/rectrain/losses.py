"""Every loss the tasks train with, as plain torch functions tested on hand-made batches
(tests/test_losses.py); ``tasks/`` computes scores and calls these, so a test here tests training.

* NCF family (:mod:`rectrain.tasks.ncf`): pointwise binary cross-entropy (:func:`bce_loss`) or
  pairwise BPR (:func:`bpr_loss`);
* two-tower (:mod:`rectrain.tasks.two_tower`): softmax over the whole catalog
  (:func:`full_softmax_loss`), or over sampled candidates: in-batch negatives with logQ correction
  and accidental-hit masking, extra shared negatives (GRU4Rec's mixed negatives), softmax
  (:func:`sampled_softmax_loss`) or BPR-max (:func:`bpr_max_loss`).

Each of the first three takes an optional per-example ``weight`` (0 on padding): then the loss is
``sum(weight * loss) / max(sum(weight), 1)``, the per-user record loss of user-level DP training
(:mod:`rectrain.privacy`); without it, the plain mean.

Why logQ: with in-batch negatives an item is a candidate as often as it is a target, so popular
items are over-represented as negatives and the model learns to push them down. Subtracting the
log of each candidate's expected count in the candidate set (Yi et al. 2019, "Sampling-bias-corrected
neural modeling") makes the sampled softmax an unbiased estimate of the full one.

Why accidental-hit masking: when two rows of a batch share a target, each row would otherwise be
trained to score its own positive low in the other row's column.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

NEG_INF = -1e9  # finite, so a row whose negatives are all masked gives a defined loss


def _reduce(losses: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean, or the weighted mean over the examples that count (``weight`` 0 on padding)."""
    if weight is None:
        return losses.mean()
    return (losses * weight).sum() / weight.sum().clamp(min=1.0)


def bce_loss(logits: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pointwise binary cross-entropy on (user, item) logits: positives (label 1) and sampled negatives
    (label 0), NCF's recipe. Shapes: (N,) logits and labels, optional (N,) weight."""
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return _reduce(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"), weight)


def bpr_loss(positive: torch.Tensor, negative: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise BPR, ``-log sigmoid(s(u, i+) - s(u, i-))``: (N,) positive and negative scores."""
    return _reduce(-F.logsigmoid(positive - negative), weight)


def full_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """Cross-entropy over the whole catalog: (N, I) logits (the model's scores of every item, repeat
    bonus included), (N,) target items. Exact, and affordable for catalogs up to ~10^5 items."""
    if weight is None:
        return F.cross_entropy(logits, targets)
    return _reduce(F.cross_entropy(logits, targets, reduction="none"), weight)


def candidate_logits(queries: torch.Tensor, targets: torch.Tensor, candidate_items: torch.Tensor,
                     candidate_vectors: torch.Tensor, log_q: torch.Tensor | None = None,
                     temperature: float = 1.0, history: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """Logits of every query against a shared candidate set, corrected and masked.

    Args:
        queries: (N, d) query vectors.
        targets: (N,) each query's positive item; the positive of row i must be candidate i
            (in-batch candidates first: ``candidate_items[:N] == targets``).
        candidate_items: (C,) item index of each candidate column (C >= N).
        candidate_vectors: (C, d).
        log_q: (C,) log of each candidate's expected count in the candidate set; subtracted
            from its logit (logQ correction). None: no correction.
        temperature: logits are divided by this before the correction.
        history: optional ((N, H) item indices, (N, H) score bonus) per row: each candidate column
            whose item is in row n's history gets that bonus added (the two-tower repeat bonus).

    Returns:
        (N, C) logits; column i is row i's positive; any other column holding row i's target
        item is set to a large negative value (accidental hit).
    """
    logits = queries @ candidate_vectors.T / temperature  # (N, C)
    if history is not None:
        logits = logits + history_bonus_columns(candidate_items, *history)
    if log_q is not None:
        logits = logits - log_q[None, :]
    n = targets.shape[0]
    hits = candidate_items[None, :] == targets[:, None]  # (N, C)
    hits[torch.arange(n, device=hits.device), torch.arange(n, device=hits.device)] = False  # keep the positive
    return logits.masked_fill(hits, NEG_INF)


def sampled_softmax_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with row i's positive in column i (see :func:`candidate_logits`)."""
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def bpr_max_loss(logits: torch.Tensor, regularization: float = 1.0) -> torch.Tensor:
    """GRU4Rec's BPR-max: -log sum_j s_j sigmoid(r_i - r_j) + reg * sum_j s_j r_j^2, s = softmax(negatives).

    Masked columns (accidental hits) get zero softmax weight.
    """
    n = logits.shape[0]
    eye = torch.eye(n, logits.shape[1], dtype=torch.bool, device=logits.device)
    positive = logits[eye]  # (N,)
    negatives = logits.masked_fill(eye, NEG_INF)  # (N, C)
    weights = torch.softmax(negatives, dim=1)  # (N, C), ~0 on the positive and masked columns
    valid = negatives > NEG_INF / 2
    diff = torch.sigmoid(positive[:, None] - negatives) * weights
    loss = -torch.log(diff.sum(1) + 1e-10)
    reg = (weights * torch.where(valid, negatives, torch.zeros_like(negatives)) ** 2).sum(1)
    return (loss + regularization * reg).mean()


def expected_count_log_q(candidate_items: torch.Tensor, n_in_batch: int, unigram: torch.Tensor,
                         n_extra: int = 0, extra_probabilities: torch.Tensor | None = None) -> torch.Tensor:
    """log E[count of each candidate's item in the candidate set].

    In-batch candidates are ``n_in_batch`` draws from the target distribution ``unigram`` (I,);
    extra negatives are ``n_extra`` draws from ``extra_probabilities`` (I,). The expected count of
    item j is ``n_in_batch * unigram[j] + n_extra * extra[j]``.
    """
    expected = n_in_batch * unigram[candidate_items]
    if n_extra and extra_probabilities is not None:
        expected = expected + n_extra * extra_probabilities[candidate_items]
    return torch.log(expected.clamp_min(1e-12))


def history_bonus_columns(candidate_items: torch.Tensor, history_items: torch.Tensor,
                          history_values: torch.Tensor) -> torch.Tensor:
    """(C,) candidate items, (N, H) history items and their bonus -> (N, C) bonus per candidate column.

    A candidate item can fill several columns (in-batch targets repeat), so the bonus is summed per
    distinct item (N, U) and spread back to the columns: memory N x C, never N x H x C.
    """
    unique, inverse = torch.unique(candidate_items, return_inverse=True)  # sorted (U,), (C,)
    where = torch.searchsorted(unique, history_items).clamp(max=unique.numel() - 1)  # (N, H)
    found = unique[where] == history_items
    per_item = torch.zeros(history_items.shape[0], unique.numel(), dtype=history_values.dtype,
                           device=history_values.device)
    per_item = per_item.scatter_add(1, where, history_values * found.to(history_values.dtype))  # (N, U)
    return per_item[:, inverse]  # (N, C)


__all__ = ["bce_loss", "bpr_loss", "full_softmax_loss", "candidate_logits", "history_bonus_columns",
           "sampled_softmax_loss", "bpr_max_loss", "expected_count_log_q", "NEG_INF"]
