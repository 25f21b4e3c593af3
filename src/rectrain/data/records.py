"""Training batches for user-level differential privacy: one row per *user*, Poisson-sampled.

DP-SGD protects a *record*: the unit whose per-sample gradient is clipped and whose presence the
noise hides. For a recommender the person is the user, so every row here holds one user's data and
nothing of anyone else's (a per-row gradient is then a per-user gradient):

* :class:`PointwiseUserRecords` (NCF): up to ``events_per_user`` of the user's training positives,
  each with its ``n_negatives`` fresh negatives, padded to ``(B, T)`` with a 0/1 ``weight``;
* :class:`SequenceUserRecords` (two-tower): up to ``windows_per_user`` of the user's training
  windows, padded to ``(B, K, L)``; an absent window has no valid target.

Each step includes every user independently with probability ``sample_rate`` (Poisson sampling,
which the privacy accountant's amplification-by-sampling analysis assumes), so the number of rows
varies; an epoch is ``round(1 / sample_rate)`` steps. Draws come from generators seeded by
(seed, epoch), like the other batch builders, so a resumed run repeats the same batches.
No Lightning here; ``rectrain.tasks.datamodule`` hands these to the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

from rectrain.data.batching import NegativeSampler, PointwiseSpec, SequenceSpec, _epoch_generator


@dataclass
class UserRecordSpec:
    """What a task trained with user-level DP asks of its batches.

    ``inner`` is the task's usual spec (negatives, max length); ``sample_rate`` the probability that
    a user is in a step; the caps bound the work per user and step (a record may be a random subset
    of the user's events: what is protected is whatever of the user's data any step reads).
    """

    inner: PointwiseSpec | SequenceSpec
    sample_rate: float
    events_per_user: int = 64
    windows_per_user: int = 1


def poisson_users(users: np.ndarray, sample_rate: float, generator: torch.Generator) -> np.ndarray:
    """Each of ``users`` independently with probability ``sample_rate`` (sorted; may be empty)."""
    keep = torch.rand(len(users), generator=generator, dtype=torch.float64).numpy() < sample_rate
    return users[keep]


def _first_k_per_group(groups: np.ndarray, k: int, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A uniformly random subset of at most ``k`` positions per group of the sorted ``groups``.

    Returns (positions into ``groups``, slot of each within its group 0..k-1).
    """
    keys = torch.rand(len(groups), generator=generator, dtype=torch.float64).numpy()
    order = np.lexsort((keys, groups))  # by group, random inside
    g = groups[order]
    starts = np.r_[0, np.flatnonzero(g[1:] != g[:-1]) + 1] if len(g) else np.zeros(0, np.int64)
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    keep = rank < k
    return order[keep], rank[keep]


class _PoissonEpochs:
    """Shared by both record builders: the users that own records and the epoch's Poisson draws."""

    def __init__(self, record_users: np.ndarray, sample_rate: float, seed: int) -> None:
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.record_users = np.unique(np.asarray(record_users, np.int64))
        self.sample_rate, self.seed = float(sample_rate), seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, round(1.0 / self.sample_rate))

    def _steps(self) -> Iterator[tuple[np.ndarray, torch.Generator]]:
        gen = _epoch_generator(self.seed, self.epoch, 0)
        for _ in range(len(self)):
            yield poisson_users(self.record_users, self.sample_rate, gen), gen


class PointwiseUserRecords(_PoissonEpochs):
    """NCF batches with one user per row: ``user`` (B,), ``item``/``label``/``weight`` (B, T)
    (BPR: ``pos_item``/``neg_item``/``weight``), T = (events per user in the batch) x (1 + negatives)
    (BPR: x negatives).

    Args:
        users, items: training events (any order).
        spec: the record spec (its ``inner`` is a :class:`PointwiseSpec`).
        sampler: draws negatives (rejecting the user's own positives when it holds them).
        seed: base of each epoch's seed.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, spec: UserRecordSpec, sampler: NegativeSampler,
                 seed: int = 0) -> None:
        super().__init__(users, spec.sample_rate, seed)
        order = np.argsort(np.asarray(users, np.int64), kind="stable")
        self.users = np.asarray(users, np.int64)[order]
        self.items = np.asarray(items, np.int64)[order]
        self.indptr = np.searchsorted(self.users, np.arange(int(self.users.max(initial=-1)) + 2))
        self.spec, self.inner, self.sampler = spec, spec.inner, sampler

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        k = self.inner.n_negatives
        for chosen, gen in self._steps():
            b = len(chosen)
            event_rows, events = _group_members(self.indptr, chosen)
            picked, slot = _first_k_per_group(event_rows, self.spec.events_per_user, gen)
            rows, items = event_rows[picked], self.items[events[picked]]
            width = int(slot.max()) + 1 if len(slot) else 1
            user = torch.from_numpy(chosen)
            pos = torch.zeros(b, width, dtype=torch.long)
            weight = torch.zeros(b, width)
            pos[rows, slot] = torch.from_numpy(items)
            weight[rows, slot] = 1.0
            neg = self.sampler.sample_for_users(user.repeat_interleave(width), k, gen).view(b, width, k) \
                if self.inner.exclude_positives else self.sampler.sample((b, width, k), gen)
            if self.inner.pairwise:
                yield {"user": user, "pos_item": pos[:, :, None].expand(-1, -1, k).reshape(b, width * k),
                       "neg_item": neg.reshape(b, width * k), "weight": weight[:, :, None].expand(-1, -1, k).reshape(b, width * k)}
            else:
                yield {"user": user, "item": torch.cat([pos, neg.reshape(b, width * k)], dim=1),
                       "label": torch.cat([torch.ones(b, width), torch.zeros(b, width * k)], dim=1),
                       "weight": torch.cat([weight, weight[:, :, None].expand(-1, -1, k).reshape(b, width * k)], dim=1)}


def _group_members(indptr: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For the chosen groups of a CSR layout: (row of each member in ``chosen``, member positions), vectorised."""
    starts = indptr[chosen]
    counts = indptr[chosen + 1] - starts
    rows = np.repeat(np.arange(len(chosen)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, np.repeat(starts, counts) + offsets


class SequenceUserRecords(_PoissonEpochs):
    """Two-tower batches with one user per row: ``items`` (B, K, L), ``lengths`` (B, K), ``targets``
    (B, K, L) with -1 where there is no target (padding, context-only positions, absent windows),
    ``users`` (B,).

    Args:
        inputs, lengths, targets, owners: every training window as :class:`SequenceBatches` holds
            them ((N, L), (N,), (N, L)) and the user owning each (N,).
        spec: the record spec; at most ``windows_per_user`` windows per user and step.
        seed: base of each epoch's seed.
    """

    def __init__(self, inputs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, owners: np.ndarray,
                 spec: UserRecordSpec, seed: int = 0) -> None:
        super().__init__(owners, spec.sample_rate, seed)
        order = np.argsort(np.asarray(owners, np.int64), kind="stable")
        self.owners = np.asarray(owners, np.int64)[order]
        index = torch.from_numpy(order)
        self.inputs, self.lengths, self.targets = inputs[index], lengths[index], targets[index]
        self.indptr = np.searchsorted(self.owners, np.arange(int(self.owners.max(initial=-1)) + 2))
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for chosen, gen in self._steps():
            b = len(chosen)
            window_rows, windows = _group_members(self.indptr, chosen)
            picked, slot = _first_k_per_group(window_rows, self.spec.windows_per_user, gen)
            rows, source = torch.from_numpy(window_rows[picked]), torch.from_numpy(windows[picked])
            slots = torch.from_numpy(slot)
            k = int(slot.max()) + 1 if len(slot) else 1
            width = int(self.lengths[source].max()) if len(source) else 1  # trim unused padding columns
            items = torch.zeros(b, k, width, dtype=torch.long)
            targets = torch.full((b, k, width), -1, dtype=torch.long)
            lengths = torch.ones(b, k, dtype=torch.long)  # an absent window: length 1, no target
            items[rows, slots] = self.inputs[source, :width]
            targets[rows, slots] = self.targets[source, :width]
            lengths[rows, slots] = self.lengths[source]
            yield {"items": items, "lengths": lengths, "targets": targets, "users": torch.from_numpy(chosen)}
