"""Which graphs each model kind exports, with their input/output contract.

A :class:`GraphSpec` names the wrapper module, every input and output (dtype, shape with symbolic
axes as strings, meaning) and a small example to trace with. The same specs feed the exporter
(names, dynamic axes), the checks (symbolic dims), the metadata (``rectrain.inputs/outputs``) and
the README, so the contract is written down once.

The example batch is 3 and the example history 4 long on purpose: tracing with a batch or length
of 1 is how a dynamic axis silently freezes (see NOTES), and the saved model is checked for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rectrain.runs import NCF, TWO_TOWER, model_kind  # noqa: F401  (re-exported: the kinds have one home)
from rectrain.export.wrappers import (
    NCFRecommend,
    NCFScore,
    TwoTowerItemVectors,
    TwoTowerQuery,
    TwoTowerQueryWithUser,
    TwoTowerRecommend,
    TwoTowerRecommendWithUser,
)


EXCLUDE_MEANING = ("item indices never to recommend for the row (already purchased, seen), padded with -1; "
                   "indices outside 0..n_items-1 are ignored; shape (batch, 0) when there is nothing to exclude")
K_MEANING = "number of items to return; clamped in the graph to 1..n_items"
ITEMS_MEANING = ("recommended item indices (index into rectrain.item_vocab), best first; at equal scores the "
                 "lower index first; -1 marks padding when fewer than k items are allowed")
SCORES_MEANING = "scores of those items, descending; -inf exactly where items is -1"


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output. ``shape`` entries are ints (fixed) or axis names (dynamic)."""

    name: str
    dtype: str  # "int64" | "float32"
    shape: tuple[int | str, ...]
    meaning: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "meaning": self.meaning}


@dataclass(frozen=True)
class GraphSpec:
    """One exported graph: the module to trace, its contract and a trace example."""

    name: str  # "recommend" | "score" | "query" | "item_vectors"
    module: nn.Module
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: tuple[torch.Tensor, ...]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
                for t in (*self.inputs, *self.outputs) if any(isinstance(d, str) for d in t.shape)}


def graph_specs(net: nn.Module) -> list[GraphSpec]:
    """The graphs of ``net``: the first is the main (``recommend``) graph, then its companions
    (two-tower: ``query`` and ``item_vectors``; NCF: ``score``)."""
    if model_kind(net) == TWO_TOWER:
        return _two_tower_specs(net)
    return _ncf_specs(net)


def _example_exclude(n_items: int) -> torch.Tensor:
    return torch.tensor([[1 % n_items, -1], [2 % n_items, 3 % n_items], [-1, -1]])  # (3, 2)


def _two_tower_specs(net: nn.Module) -> list[GraphSpec]:
    n_items = int(net.n_items)
    dim = int(net.item_vectors(torch.zeros(1, dtype=torch.long)).shape[1])
    history = TensorSpec("history", "int64", ("batch", "history_length"),
                         "recent item indices, oldest first, right-padded (any index, e.g. 0); at most "
                         "rectrain.max_length are meaningful: send the most recent ones")
    lengths = TensorSpec("lengths", "int64", ("batch",),
                         "number of real items in each history row (1..history_length; clamped to that range)")
    history_ex = torch.arange(12).view(3, 4) % n_items  # (3, 4)
    lengths_ex = torch.tensor([4, 2, 1])
    # a query tower trained on user-side features takes them as a third input (never a user id)
    n_features = int(getattr(net, "n_user_features", 0) or 0)
    user = (TensorSpec("user_features", "float32", ("batch", n_features),
                       "encoded user attributes, as rectrain.user_features describes (the scorer encodes them)"),
            ) if n_features else ()
    user_ex = (torch.linspace(-1, 1, 3 * n_features).view(3, n_features),) if n_features else ()
    recommend = GraphSpec(
        "recommend", (TwoTowerRecommendWithUser if n_features else TwoTowerRecommend)(net),
        (history, lengths, *user, TensorSpec("exclude", "int64", ("batch", "n_exclude"), EXCLUDE_MEANING),
         TensorSpec("k", "int64", (), K_MEANING)),
        (TensorSpec("items", "int64", ("batch", "k"), ITEMS_MEANING),
         TensorSpec("scores", "float32", ("batch", "k"), SCORES_MEANING)),
        (history_ex, lengths_ex, *user_ex, _example_exclude(n_items), torch.tensor(5)))
    slots = int(net.repeat_bonus.shape[0]) if getattr(net, "repeat_bonus", None) is not None else 0
    repeat = (TensorSpec("repeat_bonus", "float32", ("batch", slots),
                         "added to the score of an item r positions back from the last history item, per "
                         "occurrence: repeat_bonus[row, min(r, slots - 1)]"),) if slots else ()
    query = GraphSpec(
        "query", (TwoTowerQueryWithUser if n_features else TwoTowerQuery)(net), (history, lengths, *user),
        (TensorSpec("query", "float32", ("batch", dim),
                    "query vector, already divided by the temperature: score = query . item_vectors[i]"
                    + (" (+ the repeat bonus of history items)" if slots else "")), *repeat),
        (history_ex, lengths_ex, *user_ex))
    item_vectors = GraphSpec(
        "item_vectors", TwoTowerItemVectors(net),
        (TensorSpec("items", "int64", ("n",), "item indices (0..n_items-1 for the whole catalog)"),),
        (TensorSpec("item_vectors", "float32", ("n", dim), "the items' vectors, row j = item items[j]"),),
        (torch.arange(3) % n_items,))
    return [recommend, query, item_vectors]


def _ncf_specs(net: nn.Module) -> list[GraphSpec]:
    n_items, n_users = int(net.config["n_items"]), int(net.config["n_users"])
    user = TensorSpec("user", "int64", ("batch",), "user indices (index into the user vocabulary sidecar)")
    users_ex = torch.arange(3) % n_users
    recommend = GraphSpec(
        "recommend", NCFRecommend(net),
        (user, TensorSpec("exclude", "int64", ("batch", "n_exclude"), EXCLUDE_MEANING),
         TensorSpec("k", "int64", (), K_MEANING)),
        (TensorSpec("items", "int64", ("batch", "k"), ITEMS_MEANING),
         TensorSpec("scores", "float32", ("batch", "k"), SCORES_MEANING)),
        (users_ex, _example_exclude(n_items), torch.tensor(5)))
    score = GraphSpec(
        "score", NCFScore(net),
        (user, TensorSpec("item", "int64", ("batch",), "item indices, one per user row")),
        (TensorSpec("scores", "float32", ("batch",), "the model's logit for each (user, item) pair; higher is better"),),
        (users_ex, torch.arange(3) % n_items))
    return [recommend, score]
