"""Sparse embedding gradients: LazyAdam equals Adam on dense parameters and SparseAdam on sparse ones,
a sparse model trains like a dense one (its ONNX export: tests/test_export.py), and the settings
that cannot work are refused by key."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rectrain.errors import ConfigError
from rectrain.models.ncf import MF, NeuMF
from rectrain.models.optim import LazyAdam, needs_sparse_support
from tests.conftest import TINY_DATA


def _steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, n: int = 5) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(n):
        users = torch.randint(0, 30, (16,), generator=gen)
        items = torch.randint(0, 20, (16,), generator=gen)
        optimizer.zero_grad()
        (model(users, items) - 1.0).square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("decay", [0.0, 0.01])
def test_lazy_adam_is_adam_on_dense_parameters(decay):
    torch.manual_seed(0)
    a = NeuMF(30, 20, dim=8, layers=(16, 8))
    b = NeuMF(30, 20, dim=8, layers=(16, 8))
    b.load_state_dict(a.state_dict())
    _steps(a, torch.optim.Adam(a.parameters(), lr=0.01, weight_decay=decay, foreach=False))
    _steps(b, LazyAdam(b.parameters(), lr=0.01, weight_decay=decay))
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-7, rtol=1e-6), name


def test_lazy_adam_is_sparse_adam_on_sparse_embeddings_and_leaves_untouched_rows():
    torch.manual_seed(0)
    a, b = MF(30, 20, dim=8, sparse=True), MF(30, 20, dim=8, sparse=True)
    b.load_state_dict(a.state_dict())
    start = {k: v.clone() for k, v in a.state_dict().items()}
    embeddings = [p for n, p in a.named_parameters() if n != "bias"]
    # eps: SparseAdam adds it to sqrt(v), Adam (and LazyAdam, on both kinds) to sqrt(v / bias correction);
    # a negligible eps makes the two the same arithmetic
    reference = [torch.optim.SparseAdam(embeddings, lr=0.01, eps=1e-12),
                 torch.optim.Adam([a.bias], lr=0.01, eps=1e-12, foreach=False)]

    class Both:
        def zero_grad(self):
            for o in reference:
                o.zero_grad()

        def step(self):
            for o in reference:
                o.step()

    _steps(a, Both())
    _steps(b, LazyAdam(b.parameters(), lr=0.01, eps=1e-12))
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(x, y, atol=1e-6, rtol=1e-5), name  # float rounding only
    gen = torch.Generator().manual_seed(0)
    touched = set()
    for _ in range(5):
        touched |= set(torch.randint(0, 30, (16,), generator=gen).tolist())
        torch.randint(0, 20, (16,), generator=gen)
    untouched = sorted(set(range(30)) - touched)
    assert untouched and torch.equal(b.user.weight[untouched], start["user.weight"][untouched])
    assert b.user.weight.grad.is_sparse


def test_a_sparse_mf_trains_exports_and_refuses_what_cannot_work(compose_cfg, tmp_path):
    from rectrain.training import build, build_net_and_task, train

    sparse = [*TINY_DATA, "model=mf", "model.net.sparse=true", "trainer.max_epochs=2"]
    results = train(compose_cfg(*sparse, "model.optimizer._target_=rectrain.models.optim.LazyAdam"))
    assert results["valid"]["hr@10"] > 0.0 and np.isfinite(results["test"]["ndcg@10"])
    cfg = compose_cfg(*sparse)  # torch.optim.Adam: no sparse gradients
    datamodule = build(cfg.data)
    datamodule.setup()
    with pytest.raises(ConfigError, match="model.net.sparse.*model.optimizer._target_=rectrain.models.optim.LazyAdam"):
        build_net_and_task(cfg, datamodule)
    task = build_net_and_task(compose_cfg(*sparse, "model.optimizer._target_=rectrain.models.optim.LazyAdam"),
                              datamodule)
    assert needs_sparse_support(task.net) and not needs_sparse_support(MF(3, 3))


def test_a_sparse_two_tower_trains_with_sampled_softmax_and_dp_refuses_sparse(compose_cfg):
    from rectrain.training import train

    lazy = "model.optimizer._target_=rectrain.models.optim.LazyAdam"
    results = train(compose_cfg(*TINY_DATA, "model=two_tower", "model.loss=sampled", "model.net.sparse=true", lazy,
                                "trainer.max_epochs=1"))
    assert results["valid"]["hr@10"] > 0.0
    with pytest.raises(ConfigError, match="model.net.sparse"):
        train(compose_cfg(*TINY_DATA, "model=mf", "model.net.sparse=true", lazy, "privacy=dp",
                          "trainer.max_epochs=1"))
