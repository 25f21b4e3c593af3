import pytest
import torch

from rectrain.models.ncf import GMF, MF, MLP, NeuMF

MODELS = [MF, GMF, MLP, NeuMF]


@pytest.mark.parametrize("cls", MODELS)
def test_forward_and_score_all_agree(cls):
    torch.manual_seed(0)
    net = cls(n_users=10, n_items=7, dim=4)
    users = torch.tensor([0, 3, 9])
    scores = net.score_all(users)
    assert scores.shape == (3, 7)
    pairwise = torch.stack([net(users, torch.full((3,), i)) for i in range(7)], dim=1)
    torch.testing.assert_close(scores, pairwise, atol=1e-6, rtol=1e-5)
    assert net(users, torch.tensor([1, 2, 3])).shape == (3,)
    assert net.item_embeddings().shape[0] == 7


@pytest.mark.parametrize("cls", MODELS)
def test_config_rebuilds_the_model(cls):
    net = cls(n_users=5, n_items=6, dim=4)
    clone = cls(**net.config)
    clone.load_state_dict(net.state_dict())
    u = torch.tensor([1, 2])
    torch.testing.assert_close(clone.score_all(u), net.score_all(u))


def test_mf_is_a_biased_dot_product():
    net = MF(2, 3, dim=2)
    with torch.no_grad():
        net.user.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
        net.item.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        net.item_bias.weight.copy_(torch.tensor([[0.5], [0.0], [-1.0]]))
        net.bias.fill_(0.1)
    expected = torch.tensor([[1.6, 2.1, 2.1], [0.6, 1.1, 0.1]])
    torch.testing.assert_close(net.score_all(torch.tensor([0, 1])), expected)


def test_neumf_from_pretrained_reproduces_the_mix():
    torch.manual_seed(1)
    gmf, mlp = GMF(4, 5, dim=3), MLP(4, 5, dim=3, layers=[6, 3])
    neumf = NeuMF(4, 5, dim=3, layers=[6, 3])
    neumf.load_pretrained(gmf.state_dict(), mlp.state_dict(), alpha=0.5)
    u, i = torch.tensor([0, 1, 3]), torch.tensor([4, 0, 2])
    torch.testing.assert_close(neumf(u, i), 0.5 * gmf(u, i) + 0.5 * mlp(u, i))


@pytest.mark.parametrize("cls", MODELS)
def test_loss_decreases_on_a_tiny_problem(cls):
    """Each model can fit 4 users with disjoint favourite items (BCE on all pairs)."""
    torch.manual_seed(0)
    net = cls(n_users=4, n_items=8, dim=8)
    u = torch.arange(4).repeat_interleave(8)  # every (user, item) pair, labelled
    i = torch.arange(8).repeat(4)
    y = (i // 2 == u).float()  # user k likes items 2k and 2k+1
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(u, i), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    top = net.score_all(torch.arange(4)).topk(2).indices.sort(1).values
    assert top.tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
