"""Neural collaborative filtering: MF, GMF, MLP and NeuMF (He et al. 2017), and the MF baseline
that Rendle et al. (2020) showed a tuned dot product is.

Every model has the same interface, which the training task, the evaluator and the ONNX export use:

* ``forward(user, item) -> logits``: (B,), (B,) -> (B,) for pointwise/pairwise training;
* ``score_all(user) -> logits``: (B,) -> (B, n_items), the full-catalog scores for ranking;
* ``item_embeddings() -> (n_items, d)`` for the TensorBoard projector.

``sparse=True`` builds the embeddings with sparse gradients (train with
:class:`rectrain.models.optim.LazyAdam`): a step then costs the rows it touched, not the tables.
Sizes learned from data (``n_users``, ``n_items``) are constructor arguments, and every model
keeps its constructor arguments in ``self.config`` so a checkpoint can rebuild it without the
training configuration.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def _init_embedding(emb: nn.Embedding, std: float) -> None:
    nn.init.normal_(emb.weight, std=std)


class MF(nn.Module):
    """Dot-product matrix factorisation with user, item and global biases.

    score(u, i) = <p_u, q_i> + b_u + b_i + b
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 64, init_std: float = 0.01, sparse: bool = False) -> None:
        super().__init__()
        self.config = {"n_users": n_users, "n_items": n_items, "dim": dim, "init_std": init_std, "sparse": sparse}
        self.user = nn.Embedding(n_users, dim, sparse=sparse)
        self.item = nn.Embedding(n_items, dim, sparse=sparse)
        self.user_bias = nn.Embedding(n_users, 1, sparse=sparse)
        self.item_bias = nn.Embedding(n_items, 1, sparse=sparse)
        self.bias = nn.Parameter(torch.zeros(()))
        for emb in (self.user, self.item):
            _init_embedding(emb, init_std)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        dot = (self.user(user) * self.item(item)).sum(-1)  # (B,)
        return dot + self.user_bias(user).squeeze(-1) + self.item_bias(item).squeeze(-1) + self.bias

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        # (B, d) @ (d, I) -> (B, I); the user bias does not change a user's ranking but keeps
        # scores identical to forward(), which the ONNX parity check relies on.
        scores = self.user(user) @ self.item.weight.T
        return scores + self.item_bias.weight.T + self.user_bias(user) + self.bias

    def item_embeddings(self) -> torch.Tensor:
        return self.item.weight


class GMF(nn.Module):
    """Generalised MF: an element-wise product of embeddings through a learned linear output."""

    def __init__(self, n_users: int, n_items: int, dim: int = 64, init_std: float = 0.01, sparse: bool = False) -> None:
        super().__init__()
        self.config = {"n_users": n_users, "n_items": n_items, "dim": dim, "init_std": init_std, "sparse": sparse}
        self.user = nn.Embedding(n_users, dim, sparse=sparse)
        self.item = nn.Embedding(n_items, dim, sparse=sparse)
        self.out = nn.Linear(dim, 1)
        for emb in (self.user, self.item):
            _init_embedding(emb, init_std)

    def hidden(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.user(user) * self.item(item)  # (B, d)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(user, item)).squeeze(-1)

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        # <p_u * q_i, w> = <p_u * w, q_i>: one matrix product instead of B x I x d products.
        weighted = self.user(user) * self.out.weight  # (B, d)
        return weighted @ self.item.weight.T + self.out.bias  # (B, I)

    def item_embeddings(self) -> torch.Tensor:
        return self.item.weight


class MLP(nn.Module):
    """Concatenated user and item embeddings through a ReLU tower (the NCF "MLP" model).

    ``dim`` is the size of each embedding; ``layers`` the widths of the hidden layers (the NCF
    paper halves the width at each layer).
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 32, layers: Sequence[int] = (64, 32, 16),
                 dropout: float = 0.0, init_std: float = 0.01, sparse: bool = False) -> None:
        super().__init__()
        layers = [int(w) for w in layers]
        if not layers:
            raise ValueError("model.net.layers must list at least one hidden layer width")
        self.config = {"n_users": n_users, "n_items": n_items, "dim": dim, "layers": layers,
                       "dropout": dropout, "init_std": init_std, "sparse": sparse}
        self.user = nn.Embedding(n_users, dim, sparse=sparse)
        self.item = nn.Embedding(n_items, dim, sparse=sparse)
        for emb in (self.user, self.item):
            _init_embedding(emb, init_std)
        self.first = nn.Linear(2 * dim, layers[0])
        rest: list[nn.Module] = []
        for width_in, width_out in zip(layers[:-1], layers[1:]):
            rest += [nn.ReLU(), nn.Dropout(dropout), nn.Linear(width_in, width_out)]
        rest += [nn.ReLU(), nn.Dropout(dropout)]
        self.tower = nn.Sequential(*rest)
        self.out = nn.Linear(layers[-1], 1)
        self.dim = dim

    def hidden(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.user(user), self.item(item)], dim=-1)  # (B, 2d)
        return self.tower(self.first(x))  # (B, layers[-1])

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(user, item)).squeeze(-1)

    def hidden_all(self, user: torch.Tensor) -> torch.Tensor:
        """(B, I, layers[-1]) hidden states for every item.

        The first layer is split as W [p_u; q_i] = W_u p_u + W_i q_i, so its two halves are computed
        once per user and once per item and only added per pair.
        """
        w_user, w_item = self.first.weight[:, : self.dim], self.first.weight[:, self.dim:]
        user_part = self.user(user) @ w_user.T + self.first.bias  # (B, h)
        item_part = self.item.weight @ w_item.T  # (I, h)
        return self.tower(user_part[:, None, :] + item_part[None, :, :])  # (B, I, h_last)

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden_all(user)).squeeze(-1)

    def item_embeddings(self) -> torch.Tensor:
        return self.item.weight


class NeuMF(nn.Module):
    """GMF and MLP branches with their own embeddings, fused by one linear output (NCF's NeuMF).

    ``from_pretrained`` initialises both branches from trained GMF and MLP models and sets the
    output to ``[alpha * h_gmf, (1 - alpha) * h_mlp]`` as in the paper.
    """

    def __init__(self, n_users: int, n_items: int, dim: int = 32, mlp_dim: int | None = None,
                 layers: Sequence[int] = (64, 32, 16), dropout: float = 0.0, init_std: float = 0.01,
                 sparse: bool = False) -> None:
        super().__init__()
        mlp_dim = mlp_dim or dim
        layers = [int(w) for w in layers]
        self.config = {"n_users": n_users, "n_items": n_items, "dim": dim, "mlp_dim": mlp_dim, "layers": layers,
                       "dropout": dropout, "init_std": init_std, "sparse": sparse}
        self.gmf = GMF(n_users, n_items, dim, init_std, sparse)
        self.mlp = MLP(n_users, n_items, mlp_dim, layers, dropout, init_std, sparse)
        self.gmf.out = None  # the branches' own outputs are replaced by the fused one
        self.mlp.out = None
        self.out = nn.Linear(dim + layers[-1], 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.gmf.hidden(user, item), self.mlp.hidden(user, item)], dim=-1)
        return self.out(h).squeeze(-1)

    def score_all(self, user: torch.Tensor) -> torch.Tensor:
        d = self.gmf.user.embedding_dim
        w_gmf, w_mlp = self.out.weight[0, :d], self.out.weight[0, d:]
        gmf_scores = (self.gmf.user(user) * w_gmf) @ self.gmf.item.weight.T  # (B, I)
        mlp_scores = self.mlp.hidden_all(user) @ w_mlp  # (B, I)
        return gmf_scores + mlp_scores + self.out.bias

    def item_embeddings(self) -> torch.Tensor:
        return torch.cat([self.gmf.item.weight, self.mlp.item.weight], dim=-1)

    @torch.no_grad()
    def load_pretrained(self, gmf_state: dict[str, torch.Tensor], mlp_state: dict[str, torch.Tensor],
                        alpha: float = 0.5) -> None:
        """Copy trained GMF and MLP weights in (state dicts of the plain models)."""
        gmf_body = {k: v for k, v in gmf_state.items() if not k.startswith("out.")}
        mlp_body = {k: v for k, v in mlp_state.items() if not k.startswith("out.")}
        self.gmf.load_state_dict(gmf_body, strict=True)
        self.mlp.load_state_dict(mlp_body, strict=True)
        self.out.weight.copy_(torch.cat([alpha * gmf_state["out.weight"], (1 - alpha) * mlp_state["out.weight"]], dim=1))
        self.out.bias.copy_(alpha * gmf_state["out.bias"] + (1 - alpha) * mlp_state["out.bias"])


@torch.no_grad()
def user_vectors(net: nn.Module) -> tuple["np.ndarray", str]:
    """(n_users, d) float32 vector of every user index as the model uses it, and where it comes from.

    MF/MLP: the user embedding row; GMF: ``user.weight * out.weight`` (what is dot-multiplied with
    the item embedding); NeuMF: ``[gmf.user.weight * out.weight[:d], mlp.user.weight]``. Customer
    segments cluster these vectors, and export assigns every user index its segment from them.
    """
    import numpy as np

    if isinstance(net, (MF, MLP)):
        vectors, source = net.user.weight, "user.weight"
    elif isinstance(net, GMF):
        vectors, source = net.user.weight * net.out.weight[0], "user.weight * out.weight"
    elif isinstance(net, NeuMF):
        d = net.gmf.user.embedding_dim
        vectors = torch.cat([net.gmf.user.weight * net.out.weight[0, :d], net.mlp.user.weight], dim=1)
        source = "concat(gmf.user.weight * out.weight[:dim], mlp.user.weight)"
    else:
        raise TypeError(f"{type(net).__name__} is not an NCF-family model")
    return vectors.detach().cpu().numpy().astype(np.float32), source
