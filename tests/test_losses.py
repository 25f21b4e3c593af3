"""Every training loss by hand on hand-made batches (BCE, BPR, full softmax, the logQ term, the
accidental-hit mask, BPR-max), and the tasks' losses are these functions' values."""
import math

import torch

from rectrain.losses import (
    NEG_INF,
    bce_loss,
    bpr_loss,
    bpr_max_loss,
    candidate_logits,
    expected_count_log_q,
    full_softmax_loss,
    sampled_softmax_loss,
)


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_by_hand_mean_and_weighted():
    logits, labels = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.0])
    each = [-math.log(_sig(2.0)), -math.log(1 - _sig(-1.0)), -math.log(1 - _sig(0.5))]
    assert math.isclose(bce_loss(logits, labels).item(), sum(each) / 3, rel_tol=1e-6)
    # weight 0 is padding: the weighted mean counts the others only
    weight = torch.tensor([1.0, 1.0, 0.0])
    assert math.isclose(bce_loss(logits, labels, weight).item(), (each[0] + each[1]) / 2, rel_tol=1e-6)


def test_bpr_by_hand_mean_and_weighted():
    pos, neg = torch.tensor([3.0, 0.0]), torch.tensor([1.0, 2.0])
    each = [-math.log(_sig(2.0)), -math.log(_sig(-2.0))]
    assert math.isclose(bpr_loss(pos, neg).item(), sum(each) / 2, rel_tol=1e-6)
    assert math.isclose(bpr_loss(pos, neg, torch.tensor([0.0, 1.0])).item(), each[1], rel_tol=1e-6)
    # all-padding record: weight sum clamped to 1, loss 0 (no division by zero)
    assert bpr_loss(pos, neg, torch.zeros(2)).item() == 0.0


def test_logq_subtracts_log_expected_counts_exactly():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([3, 5])
    vectors = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    unigram = torch.zeros(6)
    unigram[3], unigram[5] = 0.8, 0.2
    log_q = expected_count_log_q(targets, n_in_batch=2, unigram=unigram)
    torch.testing.assert_close(log_q, torch.log(torch.tensor([1.6, 0.4])))
    logits = candidate_logits(q, targets, targets, vectors, log_q)
    expected = torch.tensor([[2.0 - math.log(1.6), 0.0 - math.log(0.4)],
                             [0.0 - math.log(1.6), 3.0 - math.log(0.4)]])
    torch.testing.assert_close(logits, expected)
    # the loss is plain cross-entropy on those corrected logits
    manual = -(torch.log_softmax(expected, 1).diagonal()).mean()
    torch.testing.assert_close(sampled_softmax_loss(logits), manual)


def test_logq_with_extra_negatives_adds_their_expected_count():
    unigram = torch.tensor([0.5, 0.5, 0.0])
    extra_p = torch.tensor([0.2, 0.3, 0.5])
    cands = torch.tensor([0, 1, 2, 0])  # two in-batch, two extra
    log_q = expected_count_log_q(cands, 2, unigram, n_extra=2, extra_probabilities=extra_p)
    torch.testing.assert_close(log_q.exp(), torch.tensor([1.0 + 0.4, 1.0 + 0.6, 1.0, 1.4]))


def test_accidental_hits_are_masked_but_the_positive_is_kept():
    # rows 0 and 2 share target item 7: column 2 is row 0's item again and vice versa
    targets = torch.tensor([7, 4, 7])
    extra = torch.tensor([4, 9])
    cands = torch.cat([targets, extra])
    q = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    vecs = torch.randn(5, 5, generator=torch.Generator().manual_seed(1))
    logits = candidate_logits(q, targets, cands, vecs)
    raw = q @ vecs.T
    masked = logits <= NEG_INF / 2
    assert masked.tolist() == [
        [False, False, True, False, False],  # row 0: column 2 holds its own item 7
        [False, False, False, True, False],  # row 1: extra negative 4 is its positive
        [True, False, False, False, False],  # row 2: column 0 holds item 7
    ]
    torch.testing.assert_close(logits[~masked], raw[~masked])
    # the loss equals cross-entropy computed with the masked columns removed
    loss = sampled_softmax_loss(logits)
    per_row = []
    for i in range(3):
        keep = ~masked[i]
        per_row.append(-torch.log_softmax(raw[i][keep], 0)[keep[: i + 1].sum() - 1])
    torch.testing.assert_close(loss, torch.stack(per_row).mean())


def test_logq_removes_popularity_bias_of_in_batch_negatives():
    """Free logits trained with in-batch negatives recover the true next-item distribution only
    with the correction; uncorrected, popular items are pushed down (they are negatives too often)."""
    torch.manual_seed(0)
    n_items = 12
    true_p = torch.softmax(torch.linspace(2.5, -2.5, n_items), 0)  # skewed popularity
    results = {}
    for correct in (True, False):
        logits_param = torch.zeros(n_items, requires_grad=True)
        opt = torch.optim.Adam([logits_param], lr=0.05)
        gen = torch.Generator().manual_seed(1)
        for _ in range(400):
            targets = torch.multinomial(true_p, 64, replacement=True, generator=gen)
            q = torch.ones(64, 1)
            vecs = logits_param[targets].unsqueeze(1)  # score of item j = its free logit
            log_q = expected_count_log_q(targets, 64, true_p) if correct else None
            loss = sampled_softmax_loss(candidate_logits(q, targets, targets, vecs, log_q))
            opt.zero_grad()
            loss.backward()
            opt.step()
        learned = torch.log_softmax(logits_param.detach(), 0)
        results[correct] = (learned - true_p.log()).abs().max().item()
    assert results[True] < 0.5
    assert results[False] > 2 * results[True]


def test_bpr_max_prefers_a_higher_positive_and_ignores_masked_columns():
    good = torch.tensor([[5.0, 0.0, 1.0]])
    bad = torch.tensor([[0.0, 5.0, 1.0]])
    assert bpr_max_loss(good, 0.0) < bpr_max_loss(bad, 0.0)
    masked = torch.tensor([[2.0, NEG_INF, 1.0]])
    only = torch.tensor([[2.0, 1.0]])
    torch.testing.assert_close(bpr_max_loss(masked, 0.5), bpr_max_loss(only, 0.5))


def test_full_softmax_is_cross_entropy_over_the_catalog():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, math.log(2.0)]])
    row0 = -math.log(math.exp(2.0) / (math.exp(1.0) + math.exp(2.0) + math.exp(3.0)))
    row1 = -math.log(2.0 / 4.0)
    targets = torch.tensor([1, 2])
    assert math.isclose(full_softmax_loss(logits, targets).item(), (row0 + row1) / 2, rel_tol=1e-6)
    assert math.isclose(full_softmax_loss(logits, targets, torch.tensor([0.0, 1.0])).item(), row1, rel_tol=1e-6)


def _ncf_task(loss: str):
    from rectrain.models.ncf import MF
    from rectrain.tasks.ncf import NCFTask

    torch.manual_seed(0)
    return NCFTask(MF(n_users=3, n_items=4, dim=2), loss=loss)


def test_ncf_task_trains_with_bce_and_bpr_from_losses():
    task = _ncf_task("bce")
    batch = {"user": torch.tensor([0, 1, 2]), "item": torch.tensor([1, 2, 3]), "label": torch.tensor([1.0, 0.0, 1.0])}
    logits = task.net(batch["user"], batch["item"]).detach()
    loss, n = task.compute_loss(batch)
    by_hand = sum(-math.log(_sig(x)) if y else -math.log(1 - _sig(x)) for x, y in zip(logits.tolist(), [1, 0, 1])) / 3
    assert n == 3 and math.isclose(loss.item(), by_hand, rel_tol=1e-5)
    task = _ncf_task("bpr")
    batch = {"user": torch.tensor([0, 2]), "pos_item": torch.tensor([1, 3]), "neg_item": torch.tensor([0, 0])}
    pos = task.net(batch["user"], batch["pos_item"]).detach()
    neg = task.net(batch["user"], batch["neg_item"]).detach()
    by_hand = sum(-math.log(_sig(p - q)) for p, q in zip(pos.tolist(), neg.tolist())) / 2
    assert math.isclose(task.compute_loss(batch)[0].item(), by_hand, rel_tol=1e-5)
    # a user's record (user-level DP): the weighted mean, padding excluded
    record = {"user": torch.tensor(0), "pos_item": torch.tensor([1, 3, 0]), "neg_item": torch.tensor([0, 0, 0]),
              "weight": torch.tensor([1.0, 1.0, 0.0])}
    user = torch.zeros(3, dtype=torch.long)
    d = (task.net(user, record["pos_item"]) - task.net(user, record["neg_item"])).detach().tolist()
    assert math.isclose(task.record_loss(record).item(), (-math.log(_sig(d[0])) - math.log(_sig(d[1]))) / 2,
                        rel_tol=1e-5)


def test_two_tower_task_full_loss_is_catalog_cross_entropy():
    from rectrain.models.two_tower import TwoTower
    from rectrain.tasks.two_tower import TwoTowerTask

    torch.manual_seed(0)
    net = TwoTower(n_items=6, dim=4, hidden=8, max_length=3, embedding_dropout=0.0, dropout=0.0).eval()
    task = TwoTowerTask(net, loss="full")
    items = torch.tensor([[1, 2, 3], [4, 5, 0]])
    targets = torch.tensor([[2, 3, 4], [5, -1, -1]])  # -1: no target (padding)
    batch = {"items": items, "lengths": torch.tensor([3, 1]), "targets": targets}
    loss, n = task.compute_loss(batch)
    with torch.no_grad():
        queries = net.query_all_positions(items)  # (B, L, d): position p has read items[:, :p+1]
        scores = queries @ net.item_vectors().T / net.temperature  # (B, L, I)
    picked = [(0, 0), (0, 1), (0, 2), (1, 0)]
    by_hand = sum(-torch.log_softmax(scores[b, p], 0)[targets[b, p]].item() for b, p in picked) / 4
    assert n == 4 and math.isclose(loss.item(), by_hand, rel_tol=1e-5)


def test_history_bonus_reaches_every_column_holding_the_item():
    from rectrain.losses import history_bonus_columns

    candidates = torch.tensor([4, 2, 4, 9])  # item 4 fills columns 0 and 2
    history = torch.tensor([[4, 4, 7], [2, 0, 0]])
    values = torch.tensor([[1.0, 0.5, 3.0], [2.0, 0.0, 0.0]])
    out = history_bonus_columns(candidates, history, values)
    assert out.tolist() == [[1.5, 0.0, 1.5, 0.0], [0.0, 2.0, 0.0, 0.0]]  # item 7 is no candidate: dropped
