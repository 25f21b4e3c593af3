"""Most-popular and item-kNN scorers: the floors a trained model must clear.

Both are plain ``score_fn`` callables for :func:`rectrain.evaluation.ranking.evaluate_ranking`, so
they are ranked by exactly the same code (masking, tie rule, metrics) as the neural models. They
are fitted from interaction index arrays; duplicates count once (a binary user x item matrix).

Item-kNN reads each query's history from the queries (not from the fit data), so one fitted object
serves user histories and session prefixes alike. Everything is vectorised over chunks of rows with
``torch.sparse``; no n_items x n_items dense matrix is built unless it fits ``dense_max_mb``.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from rectrain.data.queries import RankingQueries
from rectrain.evaluation.ranking import tie_ordered_topk
from rectrain.utils.arrays import unique_ints


def _coo(index: np.ndarray | torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Coalesced sparse COO (indices built here are valid by construction: skip torch's invariant checks)."""
    index = torch.as_tensor(index, dtype=torch.long)
    with warnings.catch_warnings():  # some torch versions warn even when told explicitly
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        return torch.sparse_coo_tensor(index, values, shape, check_invariants=False).coalesce()


def _sparse_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sparse x sparse product (torch routes it through CSR, which it still labels "beta")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse.mm(a, b)


def _binary_pairs(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user, item) pairs sorted by item then user (column order)."""
    users, items = np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)
    if users.shape != items.shape:
        raise ValueError("users and items must have the same shape")
    if users.size and (users.min() < 0 or users.max() >= n_users or items.min() < 0 or items.max() >= n_items):
        raise ValueError("user or item index outside 0..n_users-1 / 0..n_items-1")
    keys = unique_ints(items * n_users + users)
    return keys % n_users, keys // n_users


def history_matrix(queries: RankingQueries, rows: np.ndarray, last_n: int | None = None) -> torch.Tensor:
    """Binary (len(rows), n_items) sparse COO of the rows' histories (optionally their last ``last_n`` items)."""
    rows = np.asarray(rows, dtype=np.int64)
    starts, ends = queries.history_indptr[rows], queries.history_indptr[rows + 1]
    if last_n is not None:
        starts = np.maximum(starts, ends - last_n)
    lengths = ends - starts  # (b,)
    local = np.repeat(np.arange(rows.size), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    items = queries.history_items[np.repeat(starts, lengths) + offsets]
    keys = unique_ints(local * queries.n_items + items)  # binary: a repeated item counts once
    index = np.stack([keys // queries.n_items, keys % queries.n_items])
    return _coo(index, torch.ones(keys.size, dtype=torch.float64), (rows.size, queries.n_items))


class MostPopular:
    """Score every item by the number of distinct users who interacted with it (same list for all).

    Args:
        distinct_users: True (default) counts each user once per item; False counts every interaction,
            as GRU4Rec-style session baselines do (clicks, repeats included).
    """

    def __init__(self, distinct_users: bool = True) -> None:
        self.distinct_users = distinct_users
        self.popularity: np.ndarray | None = None  # (n_items,) int64
        self._scores: torch.Tensor | None = None

    def fit(self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> "MostPopular":
        if self.distinct_users:
            _, cols = _binary_pairs(users, items, n_users, n_items)
        else:
            _binary_pairs(users, items, n_users, n_items)  # validates the indices
            cols = np.asarray(items, dtype=np.int64)
        self.popularity = np.bincount(cols, minlength=n_items).astype(np.int64)
        self._scores = torch.from_numpy(self.popularity.astype(np.float32))
        return self

    def __call__(self, queries: RankingQueries, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), n_items) read-only broadcast view of the popularity counts."""
        if self._scores is None:
            raise RuntimeError("MostPopular.fit must be called before scoring")
        return self._scores[None, :].expand(len(rows), -1)


class ItemKNN:
    """Cosine item-kNN: score(q, j) = sum over the query's history items i of sim(i, j).

    sim(i, j) = |U_i ∩ U_j| / sqrt(|U_i| |U_j|) over the binary user x item matrix X of the fit data.

    Args:
        self_similarity: value used for sim(i, i) (1.0 would be cosine's own; 0 stops an item
            recommending itself, 1 lets a session model recommend a repeat).
        neighbours: keep only each item's ``neighbours`` most similar other items (ties: lower index).
        last_n: condition on the last ``last_n`` history items only (1 = last click, for sessions).
        dense_max_mb: build the dense n_items x n_items similarity when it fits this size; above it,
            score through X (factorised) so memory stays O(nnz(X) + rows x (users + items)).
        dtype: dtype of the returned scores (computation runs in float64).
        memory_budget_mb: bounds the item chunks used to pick neighbours.
    """

    def __init__(self, self_similarity: float = 0.0, neighbours: int | None = None, last_n: int | None = None,
                 dense_max_mb: float = 256.0, dtype: torch.dtype = torch.float32,
                 memory_budget_mb: float = 256.0) -> None:
        if neighbours is not None and neighbours < 1:
            raise ValueError("neighbours must be >= 1 or None")
        if last_n is not None and last_n < 1:
            raise ValueError("last_n must be >= 1 or None")
        self.self_similarity = float(self_similarity)
        self.neighbours, self.last_n = neighbours, last_n
        self.dense_max_mb, self.dtype, self.memory_budget_mb = dense_max_mb, dtype, memory_budget_mb
        self.n_items = 0
        self.mode = ""  # "dense" | "neighbours" | "factorised"

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> "ItemKNN":
        rows, cols = _binary_pairs(users, items, n_users, n_items)
        self.n_items, self.n_users = n_items, n_users
        counts = np.bincount(cols, minlength=n_items)  # (I,) users per item
        self.item_counts = counts
        norm = np.zeros(n_items)
        np.divide(1.0, np.sqrt(counts), out=norm, where=counts > 0)
        self._norm = torch.from_numpy(norm)  # (I,) D^-1/2, 0 for items unseen in fit
        ones = torch.ones(rows.size, dtype=torch.float64)
        # X (U, I) and X^T (I, U), coalesced COO
        self._x = _coo(np.stack([rows, cols]), ones, (n_users, n_items))
        self._xt = _coo(np.stack([cols, rows]), ones, (n_items, n_users))
        self._tol = 0.5 / max(int(counts.max(initial=1)), 1)  # smallest non-zero off-diagonal sim is 1/max count

        if self.neighbours is not None:
            self.mode = "neighbours"
            self._sim = self._neighbour_matrix()  # (I, I) sparse, row i holds i's neighbours
        elif n_items * n_items * 8 <= self.dense_max_mb * 2**20:
            self.mode = "dense"
            sim = self._cooccurrence(np.arange(n_items)) * self._norm[:, None] * self._norm[None, :]  # (I, I)
            sim.fill_diagonal_(self.self_similarity)
            self._sim = sim
        else:
            self.mode = "factorised"
        return self

    def _cooccurrence(self, item_rows: np.ndarray) -> torch.Tensor:
        """Dense (len(item_rows), I) float64 co-occurrence counts X[:, rows]^T X."""
        sub = torch.index_select(self._xt, 0, torch.from_numpy(item_rows))  # (c, U) sparse
        return _sparse_mm(sub, self._x).to_dense()

    def _neighbour_matrix(self) -> torch.Tensor:
        """Sparse (I, I): row i holds the ``neighbours`` largest sim(i, j), j != i, sim > 0."""
        n = self.n_items
        chunk = max(1, int(self.memory_budget_mb * 2**20 // (max(n, 1) * 8 * 4)))
        idx_parts, val_parts = [], []
        for a in range(0, n, chunk):
            items = np.arange(a, min(a + chunk, n))
            sim = self._cooccurrence(items) * self._norm[items, None] * self._norm[None, :]  # (c, I)
            local = torch.arange(items.size)
            sim[local, torch.from_numpy(items)] = -np.inf  # an item is not its own neighbour
            values, cols = tie_ordered_topk(sim, self.neighbours)  # (c, k)
            keep = values > 0
            idx_parts.append(torch.stack([torch.from_numpy(items)[:, None].expand_as(cols)[keep], cols[keep]]))
            val_parts.append(values[keep])
        index = torch.cat(idx_parts, 1) if idx_parts else torch.zeros(2, 0, dtype=torch.long)
        values = torch.cat(val_parts) if val_parts else torch.zeros(0, dtype=torch.float64)
        return _coo(index, values, (n, n))

    # -- scoring ---------------------------------------------------------------------------------
    def __call__(self, queries: RankingQueries, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), n_items) scores for the rows' histories."""
        if not self.mode:
            raise RuntimeError("ItemKNN.fit must be called before scoring")
        if queries.n_items != self.n_items:
            raise ValueError(f"queries have {queries.n_items} items, ItemKNN was fitted on {self.n_items}")
        h = history_matrix(queries, rows, self.last_n)  # (b, I) sparse binary
        if self.mode == "dense":
            scores = torch.sparse.mm(h, self._sim)  # (b, I); diagonal already self_similarity
        elif self.mode == "neighbours":
            scores = _sparse_mm(h, self._sim).to_dense()  # (b, I), no diagonal in sim
            scores = scores + self.self_similarity * h.to_dense()
        else:
            scores = self._factorised(h)
        return scores.to(self.dtype).contiguous()

    def _factorised(self, h: torch.Tensor) -> torch.Tensor:
        """((H D^-1/2) X^T) X D^-1/2 without an I x I matrix, with sim(i, i) replaced exactly.

        Both products are sparse x sparse, so the cost follows the histories' co-occurrences, not
        rows x users x items.
        """
        index = h.indices()
        a = _coo(index, h.values() * self._norm[index[1]], tuple(h.shape))  # (b, I)  A = H D^-1/2
        b = _sparse_mm(a, self._xt)  # (b, U) sparse  A X^T
        scores = _sparse_mm(b, self._x).to_dense()  # (b, I)
        scores *= self._norm[None, :]
        # at each history item i the product holds sim(i, i) = n_i / n_i: take it out, snap the rounding
        # residue to 0 (a true off-diagonal sum is 0 or >= 1 / max count), then put self_similarity in
        r, i = index[0], index[1]  # (nnz(H),) history positions
        diag = self._norm[i] * self._norm[i] * torch.from_numpy(self.item_counts).to(torch.float64)[i]
        at = scores[r, i] - diag
        at = torch.where(at.abs() < self._tol, torch.zeros_like(at), at)
        scores[r, i] = at + self.self_similarity
        return scores


class SessionKNN:
    """Session-based kNN (V-SKNN, Ludewig & Jannach 2018): recommend what similar past sessions held.

    The query session is a vector over items weighted by recency (linear: the i-th of L prefix items
    weighs i / L, so the last click counts most). Its similarity to each training session is the dot
    product with that session's binary item vector, normalised by sqrt(|query| * |session|) (cosine
    on the binary part). The ``k`` most similar sessions vote: score(j) = sum of their similarities
    over the sessions containing j. Known to be hard to beat on session data.

    Args:
        k: neighbour sessions that vote.
        sample_recent: consider only the ``sample_recent`` most recent training sessions sharing an
            item with the query (None: all); recency is the session index order given to ``fit``
            (sessions sorted by time give "most recent"). Sampling keeps scoring fast on big logs.
        weighting: ``linear`` position weights or ``none``.
    """

    def __init__(self, k: int = 100, sample_recent: int | None = None, weighting: str = "linear",
                 dtype: torch.dtype = torch.float32) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        if weighting not in ("linear", "none"):
            raise ValueError("weighting must be 'linear' or 'none'")
        self.k, self.sample_recent, self.weighting, self.dtype = k, sample_recent, weighting, dtype
        self.n_items = 0

    def fit(self, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> "SessionKNN":
        """``users`` are session indices (ordered by time when ``sample_recent`` is used)."""
        rows, cols = _binary_pairs(users, items, n_users, n_items)
        self.n_items, self.n_sessions = n_items, n_users
        sizes = np.bincount(rows, minlength=n_users).astype(np.float64)
        self._inv_sqrt_size = torch.from_numpy(np.divide(1.0, np.sqrt(sizes), out=np.zeros_like(sizes),
                                                         where=sizes > 0))
        ones = torch.ones(rows.size, dtype=torch.float64)
        self._x = _coo(np.stack([rows, cols]), ones, (n_users, n_items))  # (S, I) sessions x items
        self._xt = _coo(np.stack([cols, rows]), ones, (n_items, n_users))  # (I, S)
        return self

    def __call__(self, queries: RankingQueries, rows: np.ndarray) -> torch.Tensor:
        if not self.n_items:
            raise RuntimeError("SessionKNN.fit must be called before scoring")
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = queries.history_indptr[rows], queries.history_indptr[rows + 1]
        lengths = ends - starts
        local = np.repeat(np.arange(rows.size), lengths)
        position = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1  # 1..L
        items = queries.history_items[np.repeat(starts, lengths) + position - 1]
        weight = position / np.repeat(np.maximum(lengths, 1), lengths) if self.weighting == "linear" \
            else np.ones(position.size)
        # a repeated click keeps its most recent (largest) weight
        key = local * self.n_items + items
        order = np.lexsort((weight, key))
        last = np.r_[key[order][1:] != key[order][:-1], True]
        sel = order[last]
        q = _coo(np.stack([local[sel], items[sel]]), torch.from_numpy(weight[sel]), (rows.size, self.n_items))
        n_distinct = torch.from_numpy(np.bincount(local[sel], minlength=rows.size).astype(np.float64))
        sim = _sparse_mm(q, self._xt).to_dense()  # (b, S): weighted overlap with every session
        sim *= self._inv_sqrt_size[None, :]
        sim *= torch.where(n_distinct > 0, n_distinct.rsqrt(), torch.zeros_like(n_distinct))[:, None]
        if self.sample_recent is not None:
            # keep only the most recent sessions that share an item (higher session index = more recent)
            sharing = sim > 0
            rank_from_end = torch.flip(torch.cumsum(torch.flip(sharing, [1]).int(), 1), [1])
            sim = torch.where(sharing & (rank_from_end <= self.sample_recent), sim, torch.zeros_like(sim))
        k = min(self.k, self.n_sessions)
        values, neighbours = torch.topk(sim, k, dim=1)  # (b, k)
        keep = values > 0
        r = torch.arange(rows.size)[:, None].expand_as(neighbours)[keep]
        votes = _coo(torch.stack([r, neighbours[keep]]), values[keep], (rows.size, self.n_sessions))
        scores = _sparse_mm(votes, self._x).to_dense()  # (b, I)
        return scores.to(self.dtype).contiguous()
