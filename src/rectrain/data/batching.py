"""Training batches built by tensor indexing: no per-sample Python anywhere in the hot loop.

* :class:`NegativeSampler` draws negatives for a whole epoch at once (uniform or popularity^alpha
  through an inverse CDF), optionally rejecting a user's own positives with a vectorised
  membership test on sorted ``user * n_items + item`` keys.
* :class:`PointwiseBatches` yields (user, item, label) batches for BCE, or (user, pos, neg) for BPR.
* :class:`SequenceBatches` yields padded item sequences with lengths and next-item targets.
* :class:`ShardedBatches` streams a large training split shard by shard (whole users per shard), one
  of the builders above per shard; DDP ranks train on disjoint shards.

* :class:`Prefetcher` runs any of them in a background thread a few batches ahead, so building
  the next batch overlaps the current training step instead of adding to it.

All are plain iterables of dicts of tensors; ``rectrain.tasks.datamodule`` wraps them for Lightning.
Each epoch's randomness comes from ``seed + epoch`` (and the rank), so a resumed run replays
exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from rectrain.utils.arrays import unique_ints


class NegativeSampler:
    """Sample item indices from uniform (alpha=0) or popularity^alpha, vectorised.

    Args:
        n_items: catalog size.
        popularity: (n_items,) counts; required when ``alpha != 0``.
        alpha: exponent on popularity (0 = uniform, 1 = proportional to popularity, 0.75 as word2vec).
        positive_keys: sorted int64 ``user * n_items + item`` of known positives; when given,
            :meth:`sample_for_users` redraws negatives that hit a user's positive.
    """

    def __init__(self, n_items: int, popularity: np.ndarray | None = None, alpha: float = 0.0,
                 positive_keys: np.ndarray | None = None, max_rounds: int = 20) -> None:
        self.n_items = int(n_items)
        self.alpha = float(alpha)
        self.cdf: torch.Tensor | None = None
        if self.alpha != 0.0:
            if popularity is None:
                raise ValueError("popularity is required when alpha != 0")
            weights = np.power(np.maximum(np.asarray(popularity, dtype=np.float64), 0.0), self.alpha)
            weights[np.asarray(popularity) <= 0] = 0.0
            cdf = np.cumsum(weights)
            self.cdf = torch.from_numpy(cdf / cdf[-1])
        self.probabilities = self._probabilities()
        self.positive_keys = None if positive_keys is None else torch.from_numpy(np.asarray(positive_keys, np.int64))
        self.max_rounds = max_rounds

    def _probabilities(self) -> torch.Tensor:
        if self.cdf is None:
            return torch.full((self.n_items,), 1.0 / self.n_items, dtype=torch.float64)
        return torch.diff(self.cdf, prepend=torch.zeros(1, dtype=torch.float64))

    def sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """Draw negatives of ``shape`` (int64) without looking at users."""
        n = math.prod(shape)
        if self.cdf is None:
            return torch.randint(0, self.n_items, shape, generator=generator)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        idx = torch.searchsorted(self.cdf, u, right=True).clamp_(max=self.n_items - 1)
        return idx.view(shape)

    def sample_for_users(self, users: torch.Tensor, n_per_user: int, generator: torch.Generator) -> torch.Tensor:
        """(len(users), n_per_user) negatives, redrawing those that are the user's own positives.

        After ``max_rounds`` rounds the few remaining collisions are kept (a user who consumed
        almost the whole catalog cannot be served otherwise).
        """
        neg = self.sample((users.shape[0], n_per_user), generator)
        if self.positive_keys is None or self.positive_keys.numel() == 0:
            return neg
        # only redrawn entries can become new hits: re-test those, not the whole epoch's array
        # (the same draws in the same order as re-testing everything, at a fraction of the cost)
        flat_users = users.view(-1, 1).expand_as(neg).reshape(-1)
        flat_neg = neg.view(-1)
        todo = torch.arange(flat_neg.numel())
        for _ in range(self.max_rounds):
            todo = todo[self._is_positive(flat_users[todo], flat_neg[todo])]
            if todo.numel() == 0:
                break
            flat_neg[todo] = self.sample((todo.numel(),), generator)
        return neg

    def _is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        keys = users * self.n_items + items
        pos = torch.searchsorted(self.positive_keys, keys).clamp_(max=self.positive_keys.numel() - 1)
        return self.positive_keys[pos] == keys


def positive_keys(users: np.ndarray, items: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted unique ``user * n_items + item`` keys, the membership table for negative rejection."""
    return unique_ints(np.asarray(users, np.int64) * n_items + np.asarray(items, np.int64))


def _epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + epoch * 7919 + rank) % (2**63 - 1))
    return gen


def _shard(perm: torch.Tensor, rank: int, world_size: int, batch_size: int, drop_last: bool) -> torch.Tensor:
    """This rank's share of an epoch permutation: equal length on every rank (DDP needs equal steps)."""
    if world_size > 1:
        per_rank = perm.numel() // world_size
        perm = perm[rank * per_rank:(rank + 1) * per_rank]
    if drop_last:
        perm = perm[: perm.numel() // batch_size * batch_size]
    return perm


#: positives whose negatives are drawn together (a multiple of the batch size is used; a block of 8M
#: measured ~1.9 GB of sampling temporaries at 4 negatives, 1M ~0.25 GB); every log
#: up to this size is one block, drawn exactly as before blocks existed
POSITIVES_PER_BLOCK = 1 << 20


@dataclass
class PointwiseSpec:
    """What an NCF task asks of its training batches."""

    n_negatives: int = 4
    alpha: float = 0.0
    exclude_positives: bool = True
    pairwise: bool = False  # BPR: (user, pos, neg) triples instead of labelled pairs


class PointwiseBatches:
    """An epoch of (user, item, label) batches: every positive once, with ``n_negatives`` fresh negatives.

    Positives are shuffled first and each batch carries ``batch_size`` positives plus their
    negatives, so the number of steps does not depend on ``n_negatives``. For BPR each positive
    is paired with each of its negatives.
    """

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int, spec: PointwiseSpec,
                 batch_size: int, sampler: NegativeSampler, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.users = torch.as_tensor(np.asarray(users, np.int64))
        self.items = torch.as_tensor(np.asarray(items, np.int64))
        self.n_items, self.spec, self.batch_size, self.sampler = n_items, spec, batch_size, sampler
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_rank = self.users.numel() // self.world_size
        return math.ceil(per_rank / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gen = _epoch_generator(self.seed, self.epoch, 0)
        perm = _shard(torch.randperm(self.users.numel(), generator=gen), self.rank, self.world_size,
                      self.batch_size, drop_last=False)
        k = self.spec.n_negatives
        # Negatives for a block of positives at a time, each block's in one vectorised call: a small
        # log is one block (drawn from the epoch's rank generator, as always); a log of a billion
        # events never holds more than one block's gathered positives and negatives.
        block = max(self.batch_size, POSITIVES_PER_BLOCK // self.batch_size * self.batch_size)
        for first in range(0, perm.numel(), block):
            rows = perm[first:first + block]
            users, items = self.users[rows], self.items[rows]
            rank_gen = _epoch_generator(self.seed, self.epoch, 1 + self.rank) if first == 0 else \
                _epoch_generator(self.seed * 7 + first // block, self.epoch, 1 + self.rank)
            negs = (self.sampler.sample_for_users(users, k, rank_gen) if self.spec.exclude_positives
                    else self.sampler.sample((users.numel(), k), rank_gen))
            yield from self._batches(users, items, negs)

    def _batches(self, users: torch.Tensor, items: torch.Tensor, negs: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
        k = self.spec.n_negatives
        for start in range(0, users.numel(), self.batch_size):
            u, i, n = users[start:start + self.batch_size], items[start:start + self.batch_size], negs[start:start + self.batch_size]
            if self.spec.pairwise:
                yield {"user": u.repeat_interleave(k), "pos_item": i.repeat_interleave(k), "neg_item": n.reshape(-1)}
            else:
                b = u.numel()
                yield {
                    "user": torch.cat([u, u.repeat_interleave(k)]),
                    "item": torch.cat([i, n.reshape(-1)]),
                    "label": torch.cat([torch.ones(b), torch.zeros(b * k)]),
                }


@dataclass
class SequenceSpec:
    """What a sequence task asks of its training batches (sequences per step: ``data.batch_size``)."""

    max_length: int = 50
    stride: int | None = None


def sequence_windows(group: np.ndarray, items: np.ndarray, max_length: int, stride: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cut each group's item sequence into windows of ``max_length + 1`` events for next-item training.

    Windows start every ``stride`` events (default ``max_length``: no overlap beyond the one event
    that is input of one window and target of the previous). With a smaller stride, later windows
    repeat earlier events as *context* only: targets before ``first_target`` were trained in the
    previous window, so every event after a group's first is a target exactly once, and targets
    late in a long sequence get ``max_length - stride`` events of context instead of none.
    ``group`` must be sorted, items in time order.

    Returns:
        (windows, lengths, first_target, window_group): (N, max_length + 1) int64 right-padded with
        0; (N,) valid lengths >= 2; (N,) index of the first input position whose target is trained;
        (N,) the group (user) each window belongs to.
    """
    stride = int(stride or max_length)
    n = group.shape[0]
    starts, seq_len, n_windows = _window_plan(group, max_length, stride)
    win_group_start = np.repeat(starts, n_windows)
    win_index = np.arange(n_windows.sum()) - np.repeat(np.r_[0, np.cumsum(n_windows)[:-1]], n_windows)
    win_start = win_group_start + win_index * stride
    win_end = np.minimum(win_start + max_length + 1, np.repeat(starts + seq_len, n_windows))
    lengths = win_end - win_start
    # targets already trained by the previous window (which ended at its start + max_length)
    first_target = np.where(win_index == 0, 0, max_length - stride).astype(np.int64)
    offsets = np.arange(max_length + 1)
    pos = win_start[:, None] + offsets[None, :]
    valid = offsets[None, :] < lengths[:, None]
    windows = np.where(valid, items[np.minimum(pos, n - 1)], 0).astype(np.int64)
    window_group = np.asarray(group)[win_group_start].astype(np.int64) if n else np.zeros(0, np.int64)
    return windows, lengths.astype(np.int64), first_target, window_group


def _window_plan(group: np.ndarray, max_length: int, stride: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(starts, lengths, windows) of every group with at least two events (see :func:`sequence_windows`)."""
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    group = np.asarray(group)
    n = group.shape[0]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if n else np.zeros(0, np.int64)
    seq_len = np.diff(np.r_[starts, n])
    usable = seq_len >= 2
    starts, seq_len = starts[usable], seq_len[usable]
    # windows w = 0, 1, ... start at w * stride; the last one reaches the end of the sequence
    n_windows = np.maximum(1, np.ceil((seq_len - 1 - max_length) / stride).astype(np.int64) + 1)
    n_windows = np.where(seq_len - 1 <= max_length, 1, n_windows)
    return starts, seq_len, n_windows


def count_windows(group: np.ndarray, max_length: int, stride: int | None = None) -> int:
    """How many windows :func:`sequence_windows` cuts, without cutting them."""
    return int(_window_plan(group, max_length, int(stride or max_length))[2].sum())


class SequenceBatches:
    """Padded next-item batches: ``items`` (B, L), ``lengths`` (B,), ``targets`` (B, L) with -1 as padding,
    and ``users`` (B,) when ``groups`` is given (the row's user, for user-side features).

    Input position t predicts target t (the event after it); context-only positions of overlapping
    windows (see :func:`sequence_windows`) have target -1 too. Windows are shuffled per epoch.
    """

    def __init__(self, windows: np.ndarray, lengths: np.ndarray, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 first_target: np.ndarray | None = None, groups: np.ndarray | None = None) -> None:
        windows_t = torch.as_tensor(windows)
        self.groups = None if groups is None else torch.as_tensor(np.asarray(groups, np.int64))
        lengths_t = torch.as_tensor(lengths)
        self.inputs = windows_t[:, :-1].contiguous()
        positions = torch.arange(windows_t.shape[1] - 1)[None, :]
        valid = positions < (lengths_t - 1)[:, None]
        if first_target is not None:
            valid &= positions >= torch.as_tensor(first_target)[:, None]
        self.targets = torch.where(valid, windows_t[:, 1:], torch.full_like(windows_t[:, 1:], -1))
        self.lengths = lengths_t - 1
        self.batch_size, self.seed, self.rank, self.world_size, self.shuffle = batch_size, seed, rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.lengths.numel() // self.world_size / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = self.lengths.numel()
        perm = torch.randperm(n, generator=_epoch_generator(self.seed, self.epoch, 0)) if self.shuffle else torch.arange(n)
        perm = _shard(perm, self.rank, self.world_size, self.batch_size, drop_last=False)
        for start in range(0, perm.numel(), self.batch_size):
            rows = perm[start:start + self.batch_size]
            lengths = self.lengths[rows]
            width = int(lengths.max())  # trim padding columns this batch does not need
            batch = {"items": self.inputs[rows, :width], "lengths": lengths, "targets": self.targets[rows, :width]}
            if self.groups is not None:
                batch["users"] = self.groups[rows]
            yield batch


#: training events per shard: an epoch streams the training split one shard (of whole users) at a
#: time and DDP ranks train on disjoint shards, so the batch builders hold a shard, never the log
SHARD_EVENTS = 1 << 23


def user_shards(users: np.ndarray, shard_events: int | None = None) -> np.ndarray:
    """(S+1,) row boundaries cutting the user-sorted ``users`` into shards of about ``shard_events``
    rows, each cut where a user's rows start: a user is never split, so negative rejection (a user's
    positives) and sequence windows (a user's history) stay inside one shard."""
    n = int(users.shape[0])
    size = int(shard_events or SHARD_EVENTS)
    marks = np.arange(size, n, size)
    cuts = np.searchsorted(users, np.asarray(users[marks]), "left") if marks.size else np.zeros(0, np.int64)
    return np.unique(np.r_[0, cuts, n]).astype(np.int64)


def balance_shards(sizes: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Disjoint shard indices per rank, balanced by size (largest shard to the least loaded rank);
    the same on every rank and every epoch."""
    loads = np.zeros(world_size, dtype=np.int64)
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for shard in np.argsort(-np.asarray(sizes), kind="stable"):
        rank = int(np.argmin(loads))
        owned[rank].append(int(shard))
        loads[rank] += int(sizes[shard])
    return [np.sort(np.asarray(o, dtype=np.int64)) for o in owned]


class ShardedBatches:
    """An epoch streamed one shard of the training split at a time.

    Each rank owns a fixed set of shards, disjoint from the other ranks' (:func:`balance_shards`),
    visits them in an order shuffled per epoch, and builds one shard's batch builder at a time with
    ``build(lo, hi, seed)`` (rows ``lo:hi`` of the user-sorted training split, memory-mapped; a seed
    per shard). Memory is one shard's, whatever the log's size. Every rank yields the same number of
    batches, DDP's requirement: the smallest rank's count (``steps(lo, hi)`` per shard), so a rank
    with more events leaves its epoch's last batches out (at most about one shard's difference,
    a different tail each epoch).
    """

    def __init__(self, bounds: np.ndarray, steps: Any, build: Any, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        self.bounds, self.build, self.seed, self.rank = np.asarray(bounds, np.int64), build, seed, rank
        owners = balance_shards(np.diff(self.bounds), world_size)
        per_shard = [int(steps(int(lo), int(hi))) for lo, hi in zip(self.bounds[:-1], self.bounds[1:])]
        self.steps = min(sum(per_shard[s] for s in shards) for shards in owners)
        self.owned = owners[rank]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        order = self.owned[torch.randperm(len(self.owned), generator=_epoch_generator(self.seed, self.epoch,
                                                                                      1_000 + self.rank)).numpy()]
        emitted = 0
        for shard in order:
            if emitted >= self.steps:
                return
            lo, hi = int(self.bounds[shard]), int(self.bounds[shard + 1])
            batches = self.build(lo, hi, (self.seed * 1_000_003 + int(shard)) % (2**62))
            batches.set_epoch(self.epoch)
            for batch in batches:
                if emitted >= self.steps:
                    return
                yield batch
                emitted += 1


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class Prefetcher:
    """Iterate ``batches`` in a background thread, up to ``depth`` batches ahead of the consumer.

    Why a thread and not DataLoader worker processes: the builders are a handful of torch/numpy
    calls per batch that release the GIL, so a thread overlaps them with the training step at no
    inter-process cost (worker processes would pickle every batch through shared memory and fork
    once per epoch). Batches, their order and their randomness are exactly those of ``batches``
    (every builder draws from its own seeded generator, never the global RNG). An exception in
    the thread is raised in the consumer; a consumer that stops early (``limit_train_batches``,
    an error) stops the thread. ``depth=0`` iterates inline.
    """

    def __init__(self, batches: Iterable[Any], depth: int = 2) -> None:
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.batches, self.depth = batches, depth

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:
        if self.depth == 0:
            yield from self.batches
            return
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def offer(item: Any) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self.batches:
                    if not offer(batch):
                        return
                offer(_END)
            except BaseException as exc:  # handed to the consumer, which raises it
                offer(_Failed(exc))

        worker = threading.Thread(target=produce, name="rectrain-batches", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is _END:
                    return
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            stop.set()
            worker.join()
