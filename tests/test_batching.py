import numpy as np
import pytest
import torch

from rectrain.data.batching import (
    NegativeSampler,
    PointwiseBatches,
    PointwiseSpec,
    SequenceBatches,
    positive_keys,
    sequence_windows,
)


def test_popularity_sampler_matches_target_distribution():
    popularity = np.array([100, 50, 25, 0, 25])
    sampler = NegativeSampler(5, popularity, alpha=1.0)
    draws = sampler.sample((200_000,), torch.Generator().manual_seed(0))
    freq = np.bincount(draws.numpy(), minlength=5) / draws.numel()
    np.testing.assert_allclose(freq, popularity / popularity.sum(), atol=0.005)
    assert freq[3] == 0  # never an item with zero popularity

    sqrt = NegativeSampler(5, popularity, alpha=0.5)
    expected = np.sqrt(popularity) / np.sqrt(popularity).sum()
    np.testing.assert_allclose(sqrt.probabilities.numpy(), expected, atol=1e-12)


def test_uniform_sampler_rejects_own_positives():
    users = np.array([0, 0, 0, 1])
    items = np.array([0, 1, 2, 3])
    sampler = NegativeSampler(5, positive_keys=positive_keys(users, items, 5))
    negs = sampler.sample_for_users(torch.tensor([0] * 1000 + [1] * 1000), 3, torch.Generator().manual_seed(1))
    assert set(negs[:1000].flatten().tolist()) == {3, 4}
    assert set(negs[1000:].flatten().tolist()) == {0, 1, 2, 4}


def test_pointwise_epoch_covers_every_positive_once_with_labels():
    users = np.arange(10) % 3
    items = np.arange(10)
    spec = PointwiseSpec(n_negatives=2, exclude_positives=True)
    sampler = NegativeSampler(20, positive_keys=positive_keys(users, items, 20))
    batches = PointwiseBatches(users, items, 20, spec, batch_size=4, sampler=sampler, seed=0)
    out = list(batches)
    assert len(out) == len(batches) == 3
    pos = torch.cat([b["item"][b["label"] == 1] for b in out])
    assert sorted(pos.tolist()) == list(range(10))
    assert sum(int((b["label"] == 0).sum()) for b in out) == 20
    for b in out:  # negatives follow their positive's user and are never its positives
        neg_users, neg_items = b["user"][b["label"] == 0], b["item"][b["label"] == 0]
        assert not np.isin(neg_users * 20 + neg_items, users * 20 + items).any()
    # same epoch -> same batches (resume replays them); next epoch -> new negatives
    again = list(batches)
    assert all(torch.equal(a["item"], b["item"]) for a, b in zip(out, again))
    batches.set_epoch(1)
    assert not all(torch.equal(a["item"], b["item"]) for a, b in zip(out, list(batches)))


def test_pointwise_negatives_in_blocks_cover_the_epoch_and_leave_small_logs_unchanged(monkeypatch):
    """A log above POSITIVES_PER_BLOCK draws negatives block by block (bounded memory at a billion
    events): every positive once in the same shuffled order, negatives never a user's positive,
    reproducible. A log within one block takes the code path it always took (one draw from the
    epoch generator), which the resume tests and the bench figures pin."""
    from rectrain.data import batching

    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 30, 500), rng.integers(0, 40, 500)
    spec = PointwiseSpec(n_negatives=3, exclude_positives=True)
    sampler = NegativeSampler(40, positive_keys=positive_keys(users, items, 40))
    whole = list(PointwiseBatches(users, items, 40, spec, batch_size=16, sampler=sampler, seed=3))
    monkeypatch.setattr(batching, "POSITIVES_PER_BLOCK", 100)  # blocks of 96 positives (6 batches)
    blocked = PointwiseBatches(users, items, 40, spec, batch_size=16, sampler=sampler, seed=3)
    out = list(blocked)
    assert len(out) == len(whole) == len(blocked) == 32
    for a, b in zip(out, whole):  # the same shuffled positives, batch for batch; other negatives
        assert torch.equal(a["item"][a["label"] == 1], b["item"][b["label"] == 1])
    assert any(not torch.equal(a["item"], b["item"]) for a, b in zip(out[6:], whole[6:]))
    pos = torch.cat([torch.stack([b["user"][b["label"] == 1], b["item"][b["label"] == 1]], 1) for b in out])
    assert sorted(map(tuple, pos.tolist())) == sorted(zip(users.tolist(), items.tolist()))
    keys = set((users * 40 + items).tolist())
    for b in out:
        negative = b["label"] == 0
        assert not set((b["user"][negative] * 40 + b["item"][negative]).tolist()) & keys
    assert all(torch.equal(a["item"], b["item"]) for a, b in zip(out, list(blocked)))  # reproducible


def test_pointwise_ranks_partition_the_data():
    users, items = np.zeros(10, dtype=int), np.arange(10)
    sampler = NegativeSampler(10)
    spec = PointwiseSpec(n_negatives=1, exclude_positives=False)
    seen = []
    for rank in range(2):
        b = PointwiseBatches(users, items, 10, spec, 3, sampler, seed=5, rank=rank, world_size=2)
        seen += [x["item"][x["label"] == 1] for x in b]
    seen = torch.cat(seen).tolist()
    assert sorted(seen) == list(range(10)) and len(seen) == 10  # no duplicates across ranks


def test_bpr_triples():
    sampler = NegativeSampler(6)
    spec = PointwiseSpec(n_negatives=3, pairwise=True, exclude_positives=False)
    b = next(iter(PointwiseBatches(np.array([0, 1]), np.array([2, 3]), 6, spec, 8, sampler)))
    assert b["user"].shape == b["pos_item"].shape == b["neg_item"].shape == (6,)


def test_sequence_windows_every_event_a_target_once():
    group = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3])
    items = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    windows, lengths, first, owner = sequence_windows(group, items, max_length=2)
    assert windows.tolist() == [[1, 2, 3], [4, 5, 0], [7, 8, 9], [9, 10, 11]]
    assert lengths.tolist() == [3, 2, 3, 3]  # group 2 (one event) has no target and is skipped
    assert first.tolist() == [0, 0, 0, 0]
    assert owner.tolist() == [0, 1, 3, 3]
    batch = next(iter(SequenceBatches(windows, lengths, batch_size=4, shuffle=False, first_target=first,
                                      groups=owner)))
    assert batch["users"].tolist() == [0, 1, 3, 3]
    assert batch["items"].tolist() == [[1, 2], [4, 5], [7, 8], [9, 10]]
    assert batch["lengths"].tolist() == [2, 1, 2, 2]
    assert batch["targets"].tolist() == [[2, 3], [5, -1], [8, 9], [10, 11]]
    targets = batch["targets"][batch["targets"] >= 0]
    assert sorted(targets.tolist()) == [2, 3, 5, 8, 9, 10, 11]


def test_overlapping_windows_add_context_not_duplicate_targets():
    group = np.zeros(9, dtype=int)
    items = np.arange(1, 10)  # one sequence 1..9
    windows, lengths, first, owner = sequence_windows(group, items, max_length=4, stride=2)
    assert windows.tolist() == [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7], [5, 6, 7, 8, 9]]
    assert first.tolist() == [0, 2, 2]
    batch = next(iter(SequenceBatches(windows, lengths, batch_size=8, shuffle=False, first_target=first)))
    assert batch["targets"].tolist() == [[2, 3, 4, 5], [-1, -1, 6, 7], [-1, -1, 8, 9]]
    trained = batch["targets"][batch["targets"] >= 0]
    assert sorted(trained.tolist()) == list(range(2, 10))  # each event after the first exactly once


def test_prefetcher_yields_the_same_batches_and_surfaces_errors():
    from rectrain.data.batching import Prefetcher

    users = np.repeat(np.arange(20), 5)
    items = np.tile(np.arange(5), 20)
    sampler = NegativeSampler(30, positive_keys=positive_keys(users, items, 30))
    batches = PointwiseBatches(users, items, 30, PointwiseSpec(n_negatives=3), batch_size=16, sampler=sampler, seed=4)
    batches.set_epoch(2)
    inline = list(batches)
    for depth in (0, 1, 3):
        ahead = list(Prefetcher(batches, depth))
        assert len(ahead) == len(inline) == len(Prefetcher(batches, depth))
        for a, b in zip(ahead, inline):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def broken():
        yield {"x": torch.zeros(1)}
        raise RuntimeError("builder failed")

    got = []
    with pytest.raises(RuntimeError, match="builder failed"):
        for batch in Prefetcher(broken(), 2):
            got.append(batch)
    assert len(got) == 1
    # a consumer that stops early stops the thread (no thread left blocked on a full queue)
    import threading
    endless = Prefetcher(iter(lambda: {"x": torch.ones(1)}, None), 2)
    for i, _ in enumerate(endless):
        if i == 5:
            break
    assert not [t for t in threading.enumerate() if t.name == "rectrain-batches"]


def test_unique_ints_equals_numpy_unique():
    """The sort-based distinct values used for pair keys (numpy's hash-based np.unique is ~80x slower)."""
    from rectrain.utils.arrays import unique_ints

    assert unique_ints(np.array([5, 1, 5, 3, 1], np.int64)).tolist() == [1, 3, 5]
    assert unique_ints(np.zeros(0, np.int64)).tolist() == [] and unique_ints(np.array([7])).tolist() == [7]
    rng = np.random.default_rng(0)
    for high in (3, 1000, 10**15):
        values = rng.integers(0, high, size=5000)
        np.testing.assert_array_equal(unique_ints(values), np.unique(values))
