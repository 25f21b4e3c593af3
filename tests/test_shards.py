"""A large training split is streamed shard by shard (whole users per shard), DDP ranks on disjoint shards.

The shard size is shrunk to a few hundred events so a tiny log has several shards; the epoch must
still train every event exactly once (one rank), reject each user's own positives, cut the same
sequence windows as the whole-split builder, and give every rank the same number of steps.
"""
from __future__ import annotations

import numpy as np
import pytest

from rectrain.data import batching
from rectrain.data.batching import (
    PointwiseSpec,
    SequenceBatches,
    SequenceSpec,
    ShardedBatches,
    balance_shards,
    sequence_windows,
    user_shards,
)
from tests.conftest import TINY_DATA


def test_user_shards_cut_only_where_a_user_starts():
    users = np.repeat(np.arange(10), [3, 1, 7, 2, 2, 5, 1, 1, 4, 6])  # 32 rows
    # marks at rows 5, 10, 15, 20, 25, 30 move back to the start of the user holding them
    assert user_shards(users, 5).tolist() == [0, 4, 15, 20, 22, 26, 32]
    assert user_shards(users, 100).tolist() == [0, 32]
    assert user_shards(np.zeros(0, np.int64), 5).tolist() == [0]


def test_shards_are_balanced_disjoint_and_cover_every_shard():
    owned = balance_shards(np.array([5, 3, 3, 2, 1]), 2)
    assert [o.tolist() for o in owned] == [[0, 3], [1, 2, 4]]  # loads 7 and 7
    assert [o.tolist() for o in balance_shards(np.array([4, 4]), 3)] == [[0], [1], []]


SHARD, BATCH = 100, 32
MORE_ITEMS = ["data.source.n_items=400"]  # fewer repeats: ~950 training events, ~9 shards


@pytest.fixture
def sharded(compose_cfg, monkeypatch):
    """A data module over the tiny log, its training split in shards of about 300 events."""
    from rectrain.training import build

    monkeypatch.setattr(batching, "SHARD_EVENTS", SHARD)

    def make(spec, rank: int = 0, world: int = 1):
        datamodule = build(compose_cfg(*TINY_DATA, *MORE_ITEMS, f"data.batch_size={BATCH}").data)
        datamodule.setup()
        datamodule.train_spec = spec
        datamodule._rank_world = lambda: (rank, world)
        return datamodule

    return make


def pairs(users, items) -> list[tuple[int, int]]:
    return sorted(zip(np.asarray(users).tolist(), np.asarray(items).tolist()))


def test_a_sharded_epoch_trains_every_event_once_and_rejects_own_positives(sharded):
    datamodule = sharded(PointwiseSpec(n_negatives=2))
    batches = datamodule.train_batches()
    train = datamodule.data.train
    assert isinstance(batches, ShardedBatches) and len(batches.bounds) - 1 >= 6
    sizes = []
    build = batches.build
    batches.build = lambda lo, hi, seed: sizes.append(hi - lo) or build(lo, hi, seed)
    epoch = list(batches)
    assert len(epoch) == len(batches) == sum(-(-int(n) // BATCH) for n in np.diff(batches.bounds))
    assert max(sizes) <= SHARD + np.bincount(train.user).max()  # a builder never holds more than a shard
    users = np.concatenate([b["user"].numpy() for b in epoch])
    items = np.concatenate([b["item"].numpy() for b in epoch])
    labels = np.concatenate([b["label"].numpy() for b in epoch])
    assert pairs(users[labels == 1], items[labels == 1]) == pairs(train.user, train.item)
    positives = set(zip(train.user.tolist(), train.item.tolist()))
    negatives = list(zip(users[labels == 0].tolist(), items[labels == 0].tolist()))
    assert len(negatives) == 2 * len(train) and not positives.intersection(negatives)
    again = list(batches)
    assert all(np.array_equal(a["item"], b["item"]) for a, b in zip(epoch, again))  # seeded
    batches.set_epoch(1)
    assert not np.array_equal(next(iter(batches))["user"], epoch[0]["user"])  # another order next epoch


def test_ddp_ranks_read_disjoint_shards_with_equal_steps(sharded):
    spec = PointwiseSpec(n_negatives=1)
    ranks = [sharded(spec, rank, 2).train_batches() for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    assert not set(ranks[0].owned.tolist()) & set(ranks[1].owned.tolist())
    seen = []
    for batches in ranks:
        epoch = list(batches)
        assert len(epoch) == len(batches)
        seen.append({(u, i) for b in epoch for u, i, l in zip(b["user"].tolist(), b["item"].tolist(),
                                                              b["label"].tolist()) if l == 1})
    assert not seen[0] & seen[1]
    train = sharded(spec).data.train
    assert len(seen[0]) + len(seen[1]) >= len(train) - SHARD - BATCH  # at most about a shard's tail left out


def test_sharded_sequences_are_the_same_windows_as_the_whole_split(sharded):
    spec = SequenceSpec(max_length=6, stride=3)
    datamodule = sharded(spec)
    batches = datamodule.train_batches()
    assert isinstance(batches, ShardedBatches)

    def rows(stream) -> list[tuple]:
        out = []
        for b in stream:
            for items, targets, n in zip(b["items"].tolist(), b["targets"].tolist(), b["lengths"].tolist()):
                out.append((tuple(items[:n]), tuple(targets[:n])))
        return sorted(out)

    train = datamodule.data.train
    windows, lengths, first, _ = sequence_windows(train.user, train.item, 6, 3)
    whole = SequenceBatches(windows, lengths, BATCH, first_target=first)
    assert len(batches) >= len(whole)  # per-shard partial batches
    assert rows(batches) == rows(whole)


def test_training_streams_shards_end_to_end(compose_cfg, monkeypatch):
    from rectrain.training import train

    monkeypatch.setattr(batching, "SHARD_EVENTS", SHARD)
    results = train(compose_cfg(*TINY_DATA, *MORE_ITEMS, "model=mf", "trainer.max_epochs=2"))
    assert 0.0 < results["test"]["hr@10"] <= 1.0 and np.isfinite(results["valid"]["ndcg@10"])
