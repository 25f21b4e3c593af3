"""``nn.Module``s that wrap a trained net into the graphs rectrain exports to ONNX.

Every graph takes and returns plain tensors with fixed dtypes (int64 indices, float32 scores), so a
service in any language can feed it. Shapes: B batch, L history length, E excluded items per row,
K requested list length, I catalog size, d vector size.

Exclusion is a padded (B, E) int64 list of item indices per row; ``-1`` (or any index outside
``0..I-1``) is padding. It is applied with a scatter into one spare column, so the cost grows with
E, never with B x I, and a dense mask is never needed. Excluded items score ``-inf``; when fewer
than K items remain, the tail of a row is padded with item ``-1`` and score ``-inf``, so an excluded
item never appears in a top-K list.

``k`` is a 0-d int64 input, clamped in the graph to ``1..I``. Top-K ties follow ONNX ``TopK``: at
equal scores the lower item index comes first, which is the evaluator's tie rule.
"""
from __future__ import annotations

import torch
from torch import nn


def exclude_and_topk(scores: torch.Tensor, exclude: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, I) scores, (B, E) excluded indices (-1 padded), 0-d k -> (B, K) items, (B, K) scores.

    K is ``clamp(k, 1, I)``; rows with fewer than K allowed items end in (-1, -inf) entries.
    """
    n_items = scores.shape[1]
    # padding and out-of-range indices all land in the spare column I, which is cut off again:
    # a scatter with a negative index would otherwise wrap around onto the last item.
    outside = (exclude < 0) | (exclude >= n_items)
    index = torch.where(outside, torch.full_like(exclude, n_items), exclude)  # (B, E)
    spare = torch.zeros_like(scores[:, :1])  # (B, 1)
    masked = torch.cat([scores, spare], dim=1).scatter(1, index, float("-inf"))[:, :n_items]  # (B, I)
    values, items = torch.topk(masked, torch.clamp(k, 1, n_items), dim=1)  # (B, K)
    items = torch.where(values == float("-inf"), torch.full_like(items, -1), items)
    return items, values


class TwoTowerRecommend(nn.Module):
    """history (B, L) int64, lengths (B,) int64, exclude (B, E) int64, k () int64 -> items, scores (B, K).

    The catalog's item vectors are computed once at export and baked in as a constant (I, d), so
    the graph runs only the query tower, one (B, d) x (d, I) product and a top-K. ``lengths`` is
    clamped to ``1..L``: a length beyond the padded width reads the last column, never out of bounds.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()
        vectors = net.item_vectors()  # (I, d)
        if isinstance(vectors, nn.Parameter):
            # the id table itself (no item features, no normalisation), which the query tower also reads
            # when tied: shared, so the graph holds one copy of the catalog, not two
            self.item_vectors = vectors
        else:
            with torch.no_grad():
                self.register_buffer("item_vectors", vectors.detach().clone())

    @staticmethod
    def clamp_lengths(history: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        width = torch.full_like(lengths, history.shape[1])
        return torch.minimum(lengths.clamp(min=1), width)  # (B,) in 1..L

    def query(self, history: torch.Tensor, lengths: torch.Tensor, user_features: torch.Tensor | None = None
              ) -> torch.Tensor:
        return self.net.query(history, self.clamp_lengths(history, lengths), user_features)  # (B, d)

    def recommend(self, history: torch.Tensor, lengths: torch.Tensor, user_features: torch.Tensor | None,
                  exclude: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.clamp_lengths(history, lengths)
        query = self.net.query(history, lengths, user_features)  # (B, d)
        scores = self.net.score_histories(query, self.item_vectors, history, lengths)  # (B, I), repeat bonus included
        return exclude_and_topk(scores, exclude, k)

    def forward(self, history: torch.Tensor, lengths: torch.Tensor, exclude: torch.Tensor, k: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.recommend(history, lengths, None, exclude, k)


class TwoTowerRecommendWithUser(TwoTowerRecommend):
    """As :class:`TwoTowerRecommend` with a third input, user_features (B, F) float32, for a query
    tower trained on user-side features (encoded as ``rectrain.user_features`` describes)."""

    def forward(self, history: torch.Tensor, lengths: torch.Tensor, user_features: torch.Tensor,  # type: ignore[override]
                exclude: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.recommend(history, lengths, user_features, exclude, k)


class TwoTowerQuery(TwoTowerRecommend):
    """history (B, L), lengths (B,) -> query (B, d): the query tower alone, for services with their own ANN index.

    The query comes out divided by the model's temperature, so ``query . item_vector`` is exactly
    the recommend graph's score (an inner-product index needs nothing else) - except for a model
    trained with a repeat bonus (``repeat_slots``): the graph then has a second output,
    ``repeat_bonus`` (B, R), and an item found ``r`` positions back from the last history item
    gets ``repeat_bonus[row, min(r, R - 1)]`` added per occurrence.
    """

    def outputs(self, history: torch.Tensor, lengths: torch.Tensor, user_features: torch.Tensor | None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        query = self.query(history, lengths, user_features)  # (B, d)
        if self.net.repeat_bonus is None:
            return query / self.net.temperature
        return query / self.net.temperature, self.net.repeat_values(query)  # (B, d), (B, R)

    def forward(self, history: torch.Tensor, lengths: torch.Tensor  # type: ignore[override]
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.outputs(history, lengths, None)


class TwoTowerQueryWithUser(TwoTowerQuery):
    """history (B, L), lengths (B,), user_features (B, F) -> query (B, d) [, repeat_bonus]; see :class:`TwoTowerQuery`."""

    def forward(self, history: torch.Tensor, lengths: torch.Tensor,  # type: ignore[override]
                user_features: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.outputs(history, lengths, user_features)


class TwoTowerItemVectors(TwoTowerRecommend):
    """items (N,) int64 -> item_vectors (N, d): rows of the precomputed catalog table (build an index
    from ``items = 0..n_items-1`` once). A separate graph, so a query call never copies the table."""

    def forward(self, items: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.item_vectors[items]  # (N, d)


class NCFScore(nn.Module):
    """user (B,) int64, item (B,) int64 -> scores (B,) float32: the net's ``forward`` (a logit)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        return self.net(user, item)


class NCFRecommend(nn.Module):
    """user (B,) int64, exclude (B, E) int64, k () int64 -> items, scores (B, K) over the whole catalog."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.eval()

    def forward(self, user: torch.Tensor, exclude: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return exclude_and_topk(self.net.score_all(user), exclude, k)  # score_all: (B, I)
