"""One vector per user from a trained model, the input of customer segmentation.

* NCF family: the learned user embedding (the row of the user table), as the model uses it:
  ``MF``/``MLP``: ``user.weight[u]``; ``GMF``: ``user.weight[u] * out.weight`` (the vector that is
  dot-multiplied with item embeddings); ``NeuMF``: ``[gmf.user.weight[u] * out.weight[:d],
  mlp.user.weight[u]]``.
* Two-tower: the query vector ``TwoTower.query`` of the user's whole known history (train, valid
  and test events, oldest first; the model reads the most recent ``max_length``): exactly what the
  serving query graph computes for a request whose ``history`` is that list.

:func:`vector_definition` states this in a JSON-able dict stored beside the centroids, so a scorer
can compute the same vector (and apply the same normalisation) before picking the nearest centroid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from rectrain.data.queries import pad_histories
from rectrain.errors import RectrainError
from rectrain.runs import NCF, TWO_TOWER


@dataclass
class UserVectors:
    """(n_users, d) float32 vectors, row = user index (the training vocabulary's order)."""

    vectors: np.ndarray
    kind: str
    definition: dict[str, Any] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return int(self.vectors.shape[0])


def model_kind(net: nn.Module) -> str:
    """``ncf`` or ``two_tower`` (:func:`rectrain.runs.model_kind`; RectrainError for anything else)."""
    from rectrain.runs import model_kind as kind_of

    return kind_of(net)


def ncf_user_vectors(net: nn.Module) -> UserVectors:
    """The user embedding table of an NCF-family model (:func:`rectrain.models.ncf.user_vectors`)."""
    from rectrain.models.ncf import user_vectors as ncf_vectors

    vectors, source = ncf_vectors(net)
    definition = {"kind": NCF, "vector": "user_embedding", "model_class": type(net).__name__, "source": source,
                  "input": "user index (the training user vocabulary)", "dim": int(vectors.shape[1])}
    return UserVectors(vectors, NCF, definition)


def full_histories(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(indptr, items)`` of every user's whole log (train + valid + test), oldest first."""
    from rectrain.data.dataset import Interactions
    from rectrain.data.queries import csr_from_groups

    everything = Interactions.concat(Interactions.concat(data.train, data.valid), data.test)
    return csr_from_groups(everything.user, everything.item, data.n_users)


@torch.no_grad()
def two_tower_user_vectors(net: nn.Module, indptr: np.ndarray, items: np.ndarray,
                           batch_size: int = 2048, user_features: np.ndarray | None = None) -> UserVectors:
    """Query vectors of the histories in CSR ``(indptr, items)`` (one row per user), in batches;
    ``user_features`` (one row per user) for a query tower that reads them."""
    n = indptr.shape[0] - 1
    net.eval()
    out = np.zeros((n, net.config["dim"]), dtype=np.float32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(n, start + batch_size))
        padded, lengths = pad_histories(indptr, items, rows, net.max_length)
        features = None if user_features is None else torch.from_numpy(user_features[rows])
        out[rows] = net.query(torch.from_numpy(padded), torch.from_numpy(lengths), features).cpu().numpy()
    definition = {"kind": TWO_TOWER, "vector": "query", "model_class": type(net).__name__,
                  "source": "TwoTower.query(history, lengths)",
                  "input": "the user's item history, oldest first (train + valid + test events when segmenting); "
                           "the most recent max_length items are read",
                  "max_length": int(net.max_length), "dim": int(out.shape[1]),
                  "model_normalizes_queries": bool(net.normalize)}
    return UserVectors(out, TWO_TOWER, definition)


def user_vectors(net: nn.Module, data: Any = None, batch_size: int = 2048,
                 user_features: np.ndarray | None = None) -> UserVectors:
    """One vector per user of ``data`` (a PreparedData; needed for two-tower only)."""
    kind = model_kind(net)
    if kind == NCF:
        vectors = ncf_user_vectors(net)
        if data is not None and vectors.n_users != data.n_users:
            raise RectrainError(f"the model has {vectors.n_users} users but the data has {data.n_users}: "
                                "not the data the checkpoint was trained on")
        return vectors
    if data is None:
        raise RectrainError("two-tower user vectors need the users' histories (data)")
    indptr, items = full_histories(data)
    return two_tower_user_vectors(net, indptr, items, batch_size, user_features)
