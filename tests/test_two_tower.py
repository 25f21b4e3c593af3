import numpy as np
import pytest
import torch

from rectrain.data.queries import RankingQueries
from rectrain.models.two_tower import TwoTower, last_valid
from rectrain.tasks.two_tower import padded_histories
from rectrain.training import train
from tests.conftest import TINY_DATA


@pytest.mark.parametrize("cell", ["gru", "lstm", "transformer"])
def test_query_is_the_state_at_the_last_valid_position(cell):
    torch.manual_seed(0)
    net = TwoTower(n_items=30, n_categories=4, dim=8, cell=cell, hidden=12, layers=2, max_length=6).eval()
    histories = [[3], [4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [1, 2]]  # lengths 1, 5, max, 2
    lengths = torch.tensor([len(h) for h in histories])
    padded = torch.zeros(4, 6, dtype=torch.long)
    garbage = torch.randint(0, 30, (4, 6))
    for i, h in enumerate(histories):
        padded[i, : len(h)] = torch.tensor(h)
        garbage[i, : len(h)] = torch.tensor(h)
    batched = net.query(padded, lengths)
    assert batched.shape == (4, 8)
    for i, h in enumerate(histories):  # each row alone, unpadded
        alone = net.query(torch.tensor([h]), torch.tensor([len(h)]))
        torch.testing.assert_close(batched[i], alone[0], atol=1e-6, rtol=1e-5)
    # whatever sits in the padding cannot change the query
    torch.testing.assert_close(net.query(garbage, lengths), batched, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[3])  # (and the query does depend on the history)
    assert net(padded, lengths).shape == (4, 30)
    # a padded width beyond max_length (more padding) reads the same
    wider = torch.cat([garbage, torch.randint(0, 30, (4, 3))], dim=1)
    torch.testing.assert_close(net.query(wider, lengths), batched, atol=1e-6, rtol=1e-5)


def test_transformer_positions_count_from_the_window_start_and_attention_is_causal():
    """Every position's output is what its prefix alone gives (all-position training = evaluation), and
    the learned positions matter: the same items in another order give another query."""
    torch.manual_seed(0)
    net = TwoTower(n_items=20, dim=8, cell="transformer", hidden=16, layers=2, heads=4, max_length=5).eval()
    with torch.no_grad():
        net.query_tower.position_embedding.weight.normal_()
        items = torch.tensor([[3, 7, 1, 9, 4]])
        every = net.query_all_positions(items)  # (1, 5, 8)
        for p in range(5):
            torch.testing.assert_close(every[0, p], net.query(items[:, :p + 1], torch.tensor([p + 1]))[0],
                                       atol=1e-6, rtol=1e-5)
        swapped = net.query(torch.tensor([[7, 3]]), torch.tensor([2]))[0]
        assert (swapped - every[0, 1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="heads"):
        TwoTower(n_items=5, dim=6, cell="transformer", heads=4)
    with pytest.raises(ValueError, match="cell"):
        TwoTower(n_items=5, dim=4, cell="rnn")


def test_last_valid_gathers_by_length():
    states = torch.arange(24.0).view(2, 4, 3)
    out = last_valid(states, torch.tensor([1, 4]))
    assert out.tolist() == [[0.0, 1.0, 2.0], [21.0, 22.0, 23.0]]


def test_item_tower_uses_categories_for_cold_items():
    net = TwoTower(n_items=4, n_categories=2, dim=4)
    net.set_item_features(torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0], [0, 1.0]]))
    with torch.no_grad():
        net.item_tower.id_embedding.weight.zero_()  # no id signal: a cold catalog
    v = net.item_vectors()
    torch.testing.assert_close(v[0], v[1])
    torch.testing.assert_close(v[2], v[3])
    assert not torch.allclose(v[0], v[2])


def test_weight_tying_shares_the_table():
    tied = TwoTower(n_items=5, dim=4, tie_embeddings=True)
    untied = TwoTower(n_items=5, dim=4, tie_embeddings=False)
    assert tied.query_tower.item_embedding is tied.item_tower.id_embedding
    assert untied.query_tower.item_embedding is not untied.item_tower.id_embedding
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == 20


def test_padded_histories_keep_the_most_recent_items():
    q = RankingQueries(users=np.arange(3), target_indptr=np.arange(4), target_items=np.zeros(3, np.int64),
                       exclude_indptr=np.zeros(4, np.int64), exclude_items=np.zeros(0, np.int64),
                       history_indptr=np.array([0, 1, 6, 8]), history_items=np.array([5, 1, 2, 3, 4, 6, 7, 8]),
                       n_items=10)
    items, lengths = padded_histories(q, np.array([0, 1, 2]), max_length=3)
    assert items.tolist() == [[5, 0, 0], [3, 4, 6], [7, 8, 0]]
    assert lengths.tolist() == [1, 3, 2]


@pytest.mark.parametrize("cell", ["gru", "transformer"])
def test_loss_decreases_on_a_deterministic_sequence(cell):
    """Item i is always followed by item (i + 1) mod 6: the model must learn the successor."""
    torch.manual_seed(0)
    net = TwoTower(n_items=6, dim=8, cell=cell, hidden=16, embedding_dropout=0.0, dropout=0.0, max_length=5)
    starts = torch.arange(6).repeat(4)
    seqs = (starts[:, None] + torch.arange(6)[None, :]) % 6  # (24, 6)
    items, targets = seqs[:, :-1], seqs[:, 1:]
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(80):
        q = net.query_all_positions(items)
        loss = torch.nn.functional.cross_entropy(q.reshape(-1, 8) @ net.item_vectors().T, targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    pred = net(torch.tensor([[2, 3, 0]]), torch.tensor([2])).argmax(1)
    assert pred.item() == 4


@pytest.mark.parametrize("overrides", [
    ["model.net.cell=gru"],
    ["model.net.cell=lstm", "model.loss=sampled", "model.extra_negatives=16"],
    ["model.loss=bpr_max", "model.extra_negatives=16", "model.positions=last"],
    ["model.net.cell=transformer", "model.net.layers=2", "model.net.heads=2"],
    ["model.net.cell=transformer", "model.loss=sampled", "model.extra_negatives=16", "model.stride=4"],
])
def test_two_tower_trains_end_to_end(compose_cfg, overrides):
    cfg = compose_cfg("model=two_tower", *TINY_DATA, "trainer.max_epochs=2", "logger=none", "model.dim=16",
                      "model.net.hidden=16", "model.net.max_length=10", "data.batch_size=64", *overrides)
    results = train(cfg)
    assert results["model"] == "TwoTower"
    assert 0 < results["valid"]["hr@10"] <= 1


def test_two_tower_trains_on_session_logs_without_item_features(compose_cfg, tmp_path):
    """Session clicks carry no item features: the item tower runs on ids alone."""
    import numpy as np

    rng = np.random.default_rng(0)
    lines = ["SessionId\tItemId\tTime"]
    t = 0.0
    for session in range(150):
        item = int(rng.integers(0, 30))
        for _ in range(int(rng.integers(2, 7))):
            t += 10
            lines.append(f"{session}\t{item}\t{t}")
            item = (item + 1) % 30 if rng.random() < 0.7 else int(rng.integers(0, 30))
    path = tmp_path / "clicks.tsv"
    path.write_text("\n".join(lines) + "\n")
    cfg = compose_cfg("model=two_tower", "data=sessions", f"data.source.path={path}", "trainer.max_epochs=2",
                      "logger=none", "model.dim=16", "model.net.hidden=16", "model.net.max_length=10")
    results = train(cfg)
    assert "session next-item" in results["protocol"] and "no masking" in results["protocol"]
    assert results["valid"]["hr@10"] > 0.3  # the successor rule is learnable


def test_repeat_bonus_adds_the_recency_slot_value_per_occurrence():
    torch.manual_seed(0)
    net = TwoTower(n_items=20, dim=8, hidden=8, repeat_slots=3).eval()
    with torch.no_grad():
        net.repeat_bonus.copy_(torch.tensor([1.0, 0.5, 0.25]))
    items = torch.tensor([[3, 4, 3, 5, 9], [7, 9, 9, 9, 9]])  # 9s are padding beyond the lengths
    lengths = torch.tensor([4, 1])
    with torch.no_grad():
        extra = net(items, lengths) - net.score(net.query(items, lengths), net.item_vectors())
    # row 0: item 5 is the last (slot 0), 3 is 1 back (0.5) and 3 back (slot 2: 0.25), 4 is 2 back
    torch.testing.assert_close(extra[0, [5, 3, 4, 9]], torch.tensor([1.0, 0.75, 0.25, 0.0]))
    torch.testing.assert_close(extra[1, [7, 9]], torch.tensor([1.0, 0.0]))
    assert int((extra.abs() > 1e-6).sum()) == 4  # nothing else moved
    # training rows: the query at position p sees items 0..p only
    table = net._bonus_by_distance(torch.arange(4).view(-1, 1) - torch.arange(4).view(1, -1), torch.zeros(4, 8))
    assert table.tolist() == [[1.0, 0, 0, 0], [0.5, 1.0, 0, 0], [0.25, 0.5, 1.0, 0], [0.25, 0.25, 0.5, 1.0]]
    plain = TwoTower(n_items=20, dim=4).eval()  # no repeat bonus: a pure dot product
    with torch.no_grad():
        torch.testing.assert_close(plain(items, lengths), plain.score(plain.query(items, lengths), plain.item_vectors()))


@pytest.mark.parametrize("loss, gate, mode, cell", [("full", False, "bonus", "gru"), ("sampled", False, "bonus", "gru"),
                                                   ("full", True, "bonus", "gru"), ("full", True, "mixture", "gru"),
                                                   ("full", True, "bonus", "transformer"),
                                                   ("sampled", False, "bonus", "transformer")])
def test_training_loss_with_repeat_bonus_equals_scoring_each_prefix(loss, gate, mode, cell):
    """The batched all-positions loss gives every example exactly the score evaluation gives its prefix."""
    from rectrain.losses import candidate_logits
    from rectrain.tasks.two_tower import TwoTowerTask

    torch.manual_seed(0)
    net = TwoTower(n_items=12, dim=6, cell=cell, hidden=8, layers=2, heads=3, embedding_dropout=0.0, dropout=0.0,
                   repeat_slots=2, repeat_gate=gate, repeat_mode=mode, max_length=4)
    with torch.no_grad():
        net.repeat_bonus.copy_(torch.tensor([0.7, -0.3]))
        if gate:  # a query-dependent bonus: each example must use its own position's query
            net.repeat_gate.weight.normal_()
    task = TwoTowerTask(net, loss=loss, logq_correction=False)
    items = torch.tensor([[1, 2, 1, 3], [4, 4, 0, 0], [5, 0, 0, 0]])
    targets = torch.tensor([[2, 1, 3, 1], [4, 6, -1, -1], [7, -1, -1, -1]])
    loss_value, n = task.compute_loss({"items": items, "lengths": torch.tensor([4, 2, 1]), "targets": targets})
    assert n == 7
    expected = []
    for b, p in (targets >= 0).nonzero().tolist():
        scores = net(items[b:b + 1, :p + 1], torch.tensor([p + 1]))[0]  # what evaluation scores
        expected.append((scores, targets[b, p]))
    if loss == "full":
        want = torch.stack([torch.nn.functional.cross_entropy(s[None], t[None]) for s, t in expected]).mean()
    else:  # candidates are the batch's targets: gather the prefix scores at them, mask accidental hits
        t = torch.stack([t for _, t in expected])
        logits = torch.stack([s[t] for s, _ in expected])
        plain = candidate_logits(torch.eye(7), t, t, torch.zeros(7, 7))  # only the accidental-hit mask
        logits = logits.masked_fill(plain < -1, -1e9)
        want = torch.nn.functional.cross_entropy(logits, torch.arange(7))
    torch.testing.assert_close(loss_value, want, atol=1e-5, rtol=1e-5)
    loss_value.backward()
    assert net.repeat_bonus.grad is not None and net.repeat_bonus.grad.abs().sum() > 0
    if gate:
        assert net.repeat_gate.weight.grad.abs().sum() > 0


def test_repeat_boost_is_chosen_on_validation_and_saved(compose_cfg, tmp_path):
    """Sessions that re-click the last item: the tuned boost is the validation-best one, kept in the checkpoint."""
    from rectrain.runs import load_checkpoint, rebuild_model
    from rectrain.evaluation.ranking import evaluate_ranking
    from rectrain.training import build

    rng = np.random.default_rng(1)
    lines, t = ["SessionId\tItemId\tTime"], 0.0
    for session in range(300):
        item = int(rng.integers(0, 40))
        for _ in range(int(rng.integers(3, 8))):
            t += 10
            lines.append(f"{session}\t{item}\t{t}")
            item = item if rng.random() < 0.5 else int(rng.integers(0, 40))
    path = tmp_path / "clicks.tsv"
    path.write_text("\n".join(lines) + "\n")
    cfg = compose_cfg("model=two_tower", "data=sessions", f"data.source.path={path}", "trainer.max_epochs=2",
                      "logger=none", "model.dim=16", "model.net.hidden=16", "model.net.max_length=10",
                      "model.net.repeat_slots=2", "model.tune_repeat_boost=[0,1,3]")
    results = train(cfg)
    net = rebuild_model(load_checkpoint(results["best_checkpoint"])).eval()
    chosen = float(net.repeat_boost)
    assert chosen in (0.0, 1.0, 3.0)
    datamodule = build(cfg.data)
    datamodule.setup()
    queries = datamodule.queries("valid")

    def mrr(boost: float) -> float:
        net.repeat_boost.fill_(boost)
        with torch.no_grad():
            return evaluate_ranking(lambda q, rows: net(*padded_histories(q, rows, net.max_length)), queries,
                                    (10,)).summary()["mrr@10"]

    scores = {b: mrr(b) for b in (0.0, 1.0, 3.0)}
    assert scores[chosen] == max(scores.values())
    assert results["valid"]["mrr@10"] == pytest.approx(scores[chosen], abs=1e-6)


@pytest.mark.parametrize("cell", ["gru", "transformer"])
def test_query_tower_reads_user_features_at_every_position(cell):
    torch.manual_seed(0)
    net = TwoTower(n_items=10, dim=4, cell=cell, hidden=8, n_user_features=2, max_length=4).eval()
    items, lengths = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 0]]), torch.tensor([3, 3])
    with torch.no_grad():
        q = net.query(items, lengths, torch.tensor([[0.0, 0.0], [1.0, -1.0]]))
        expected_shift = net.query_tower.project.weight[:, -2:] @ torch.tensor([1.0, -1.0])  # linear in the features
    torch.testing.assert_close(q[1] - q[0], expected_shift, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="user features"):
        net.query(items, lengths)
