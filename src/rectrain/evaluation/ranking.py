"""Full-catalog ranking evaluation: the protocol whose figures we trust.

Every query ranks *all* items. Excluded items (seen items under the user-history protocol) score
-inf, but a row's own targets never do. Ties are broken one way everywhere: at equal score the
lower item index ranks first, both for target ranks and for top-K lists, so a target is in the
top-K list exactly when its rank is below K.

Rows are scored in chunks sized from a memory budget, so Q x n_items scores never exist at once.
Results keep per-query values and per-item recommendation counts, both of which merge exactly
across chunks and DDP shards (:meth:`RankingResult.merge`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence, Union

import numpy as np
import torch

from rectrain.evaluation import metrics as M
from rectrain.data.queries import LazyQueries, RankingQueries

ScoreFn = Callable[[RankingQueries, np.ndarray], Union[torch.Tensor, np.ndarray]]

# Buffers of (chunk x n_items) x 4 bytes alive at the peak of a chunk: the score_fn output, the masked
# copy, and boolean/comparison temporaries. The budget covers all of them, not only the score block.
_PEAK_BUFFERS = 4


@dataclass
class RankingResult:
    """Per-query metric values and per-item recommendation counts of one evaluation (or shard).

    Attributes:
        per_query: metric name (``"hr@10"``, ``"ndcg@10"``, ...) -> (Q,) float64, one value per query.
        rec_counts: K -> (n_items,) int64, how many top-K lists hold each item (empty for sampled runs).
        n_queries: number of queries evaluated.
        protocol: label stated with every table of these figures.
        ks: the cut-offs evaluated.
        item_popularity: (n_items,) training popularity, for ``avg_pop@K`` (optional).
        n_users_popularity: users behind ``item_popularity``, for ``avg_pop_norm@K`` (optional).
    """

    per_query: dict[str, np.ndarray]
    rec_counts: dict[int, np.ndarray]
    n_queries: int
    protocol: str
    ks: tuple[int, ...] = ()
    item_popularity: np.ndarray | None = field(default=None, repr=False)
    n_users_popularity: int | None = None

    def summary(self) -> dict[str, float]:
        """Means of per-query metrics plus catalog metrics (coverage, popularity, Gini) per K.

        Means use an exactly rounded sum (``math.fsum``), so the order in which shards were gathered
        cannot change a single bit of the result.
        """
        out: dict[str, float] = {}
        for name, values in self.per_query.items():
            out[name] = math.fsum(values.tolist()) / values.size if values.size else float("nan")
        for k, counts in self.rec_counts.items():
            out[f"coverage@{k}"] = M.coverage(counts)
            if self.item_popularity is not None:
                out[f"avg_pop@{k}"] = M.average_popularity(counts, self.item_popularity)
                if self.n_users_popularity:
                    out[f"avg_pop_norm@{k}"] = M.average_popularity(
                        counts, self.item_popularity, self.n_users_popularity)
            out[f"gini@{k}"] = M.gini(counts)
        return out

    @classmethod
    def merge(cls, results: Sequence["RankingResult"]) -> "RankingResult":
        """Combine shards (e.g. gathered from DDP ranks): concatenate per-query values, add counts."""
        if not results:
            raise ValueError("merge needs at least one result")
        first = results[0]
        for r in results[1:]:
            if r.protocol != first.protocol or tuple(r.ks) != tuple(first.ks) \
                    or set(r.per_query) != set(first.per_query) or set(r.rec_counts) != set(first.rec_counts):
                raise ValueError("cannot merge results of different protocols, cut-offs or metrics")
        per_query = {name: np.concatenate([r.per_query[name] for r in results]) for name in first.per_query}
        rec_counts = {k: np.sum([r.rec_counts[k] for r in results], axis=0).astype(np.int64)
                      for k in first.rec_counts}
        return cls(per_query, rec_counts, sum(r.n_queries for r in results), first.protocol, tuple(first.ks),
                   first.item_popularity, first.n_users_popularity)


# ---- the tie rule -------------------------------------------------------------------------------

def tie_ordered_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` (values, indices) per row, ordered by (-score, item index): exactly ``k`` per row.

    ``torch.topk`` picks arbitrarily among tied values. Rows whose k-th and (k+1)-th largest values
    differ have a unique top-k set, only reordered here; the other rows take every item strictly above
    the k-th largest value, then the items tied at it in index order. NaN counts as the largest value.
    """
    n_rows, n_items = scores.shape  # (B, I)
    k = min(int(k), n_items)
    if k <= 0 or n_rows == 0:
        return scores.new_empty(n_rows, 0), torch.empty(n_rows, 0, dtype=torch.long, device=scores.device)
    if k == n_items:  # full order: a stable sort keeps index order among ties
        values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
        return values, indices
    top_values, top_indices = torch.topk(scores, k + 1, dim=1, sorted=True)  # (B, k+1)
    indices = top_indices[:, :k].sort(dim=1).values  # (B, k) ascending item index
    ambiguous = torch.nonzero(top_values[:, k - 1] == top_values[:, k]).flatten()  # a tie straddles the cut
    if ambiguous.numel():
        sub = scores[ambiguous]  # (a, I)
        threshold = top_values[ambiguous, k - 1:k]  # (a, 1) k-th largest value
        selected = sub > threshold  # fewer than k per row
        need = k - selected.sum(1, keepdim=True)  # (a, 1) >= 1 slots for the tied items
        ties = sub == threshold
        selected |= ties & (torch.cumsum(ties, dim=1, dtype=torch.int32) <= need)
        indices[ambiguous] = torch.nonzero(selected)[:, 1].view(-1, k)  # ascending item index per row
    values = scores.gather(1, indices)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices  # stable: index order on ties
    return values.gather(1, order), indices.gather(1, order)


def target_ranks(scores: torch.Tensor, rows: torch.Tensor, items: torch.Tensor, block: int | None = None
                 ) -> torch.Tensor:
    """0-based rank of ``items[t]`` in row ``rows[t]`` of ``scores``: greater scores + equal scores at lower index.

    Args:
        scores: (B, I) scores, already masked.
        rows, items: (T,) row (within ``scores``) and item of each target.
        block: targets compared at once (bounds the (block x I) temporaries); default B.
    """
    n_rows, n_items = scores.shape
    n_targets = rows.numel()
    block = max(1, block or n_rows)
    columns = torch.arange(n_items, device=scores.device)
    out = torch.empty(n_targets, dtype=torch.long, device=scores.device)
    identity = n_targets == n_rows and bool(torch.equal(rows, torch.arange(n_rows, device=rows.device)))
    for b0 in range(0, n_targets, block):
        r, it = rows[b0:b0 + block], items[b0:b0 + block]
        part = scores[b0:b0 + block] if identity else scores[r]  # (b, I)
        t = part.gather(1, it[:, None])  # (b, 1)
        above = (part > t).sum(1)
        tied_before = ((part == t) & (columns[None, :] < it[:, None])).sum(1)
        out[b0:b0 + block] = above + tied_before
    return out


# ---- the evaluator ------------------------------------------------------------------------------

def chunk_rows(n_items: int, memory_budget_mb: float) -> int:
    """Rows per chunk so that the evaluator's (chunk x n_items) buffers fit in the budget."""
    per_row = max(n_items, 1) * 4 * _PEAK_BUFFERS
    return max(1, int(memory_budget_mb * 2**20 // per_row))


def check_queries(queries: RankingQueries) -> None:
    """Raise ValueError on queries the evaluator cannot rank (missing targets, out-of-range items)."""
    n_targets = np.diff(queries.target_indptr)
    if n_targets.size != len(queries) or queries.exclude_indptr.size != len(queries) + 1:
        raise ValueError("RankingQueries CSR lengths do not match the number of rows")
    if np.any(n_targets < 1):
        raise ValueError(f"query row {int(np.argmax(n_targets < 1))} has no target item")
    for name in ("target_items", "exclude_items", "history_items"):
        values = getattr(queries, name)
        if values.size and (values.min() < 0 or values.max() >= queries.n_items):
            raise ValueError(f"RankingQueries.{name} holds an item index outside 0..{queries.n_items - 1}")


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """Cut-offs as a tuple of positive ints (ValueError otherwise)."""
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty list of positive cut-offs, got {ks}")
    return ks


def score_chunk(score_fn: ScoreFn, queries: RankingQueries, rows: np.ndarray, device: str | torch.device
                ) -> torch.Tensor:
    """``score_fn`` output for ``rows`` as a fresh float tensor on ``device`` (safe to modify in place)."""
    scores = score_fn(queries, rows)
    copy = not isinstance(scores, np.ndarray)
    if not copy:
        scores = torch.tensor(scores, device=device)  # already a private copy
    if tuple(scores.shape) != (rows.size, queries.n_items):
        raise ValueError(f"score_fn returned shape {tuple(scores.shape)}, expected ({rows.size}, {queries.n_items})")
    dtype = scores.dtype if scores.dtype.is_floating_point else torch.float64
    return scores.to(device=device, dtype=dtype, copy=copy)


def check_nan(values: torch.Tensor, rows: np.ndarray) -> None:
    """Raise on NaN scores: a NaN would rank arbitrarily. ``values`` row i belongs to ``rows[i]``."""
    nan_rows = torch.isnan(values).any(1)
    if bool(nan_rows.any()):
        raise ValueError(f"score_fn returned NaN scores (query row {int(rows[int(torch.nonzero(nan_rows)[0])])})")


def _csr_slice(indptr: np.ndarray, values: np.ndarray, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
    """(local row, value) pairs of rows ``start..end-1`` of a CSR."""
    lo, hi = int(indptr[start]), int(indptr[end])
    local = np.repeat(np.arange(end - start), np.diff(indptr[start:end + 1]))
    return local, values[lo:hi]


#: rows built at a time when the queries are lazy (a large log: only this many users' histories exist at once)
LAZY_CHUNK_QUERIES = 50_000


def evaluate_ranking(
    score_fn: ScoreFn,
    queries: RankingQueries | LazyQueries,
    ks: Sequence[int] = (10, 20),
    item_popularity: np.ndarray | None = None,
    n_users_popularity: int | None = None,
    memory_budget_mb: float = 256,
    device: str | torch.device = "cpu",
) -> RankingResult:
    """Rank the whole catalog for every query and measure where its targets land.

    Args:
        score_fn: ``score_fn(queries, rows) -> (len(rows), n_items)`` float scores (tensor or numpy);
            ``rows`` index into ``queries``. Higher is better.
        queries: rows to rank, their targets, excluded items and histories; :class:`LazyQueries` are
            built and evaluated LAZY_CHUNK_QUERIES rows at a time (``rows`` then index into a chunk).
        ks: cut-offs; per-query hr/ndcg/mrr/recall/precision and per-item top-K counts for each.
        item_popularity: (n_items,) training popularity for the ``avg_pop@K`` summary (optional).
        n_users_popularity: divides ``avg_pop@K`` into ``avg_pop_norm@K`` (optional).
        memory_budget_mb: bound on the evaluator's per-chunk working memory.
        device: where ranks and top-K lists are computed.

    Excluded items score -inf. A row with fewer than K non-excluded items gets a shorter top-K list:
    -inf items are never counted as recommended. Target ranks are only resolved below ``max(ks)``
    (read off the tie-ordered top-K list), which is all any @K metric needs.
    """
    if isinstance(queries, LazyQueries):
        return RankingResult.merge([
            evaluate_ranking(score_fn, chunk, ks, item_popularity, n_users_popularity, memory_budget_mb, device)
            for chunk in queries.chunks(LAZY_CHUNK_QUERIES)])
    check_queries(queries)
    ks = check_ks(ks)
    n_items, n_q = queries.n_items, len(queries)
    k_max = min(max(ks), n_items)
    chunk = chunk_rows(n_items, memory_budget_mb)
    ranks_all = np.empty(queries.target_items.size, dtype=np.int64)  # (T,)
    counts = {k: torch.zeros(n_items, dtype=torch.long, device=device) for k in ks}

    for start in range(0, n_q, chunk):
        end = min(start + chunk, n_q)
        rows = np.arange(start, end)
        scores = score_chunk(score_fn, queries, rows, device)  # (c, I)
        t_rows, t_items = (torch.tensor(a, dtype=torch.long, device=device) for a in
                           _csr_slice(queries.target_indptr, queries.target_items, start, end))
        e_rows, e_items = (torch.tensor(a, dtype=torch.long, device=device) for a in
                           _csr_slice(queries.exclude_indptr, queries.exclude_items, start, end))
        target_scores = scores[t_rows, t_items]
        scores[e_rows, e_items] = -math.inf
        scores[t_rows, t_items] = target_scores  # a row's own targets are never excluded

        values, top = tie_ordered_topk(scores, k_max)  # (c, k_max); NaN would sort first
        check_nan(values[:, :1], rows)
        # a target's rank is its position in the tie-ordered list (same rule), or "k_max" if absent:
        # every metric is cut at some K <= k_max, so ranks beyond the list need no full-width pass
        match = top[t_rows] == t_items[:, None]  # (T_c, k_max)
        position = torch.where(match.any(1), match.to(torch.int8).argmax(1), k_max)
        lo, hi = int(queries.target_indptr[start]), int(queries.target_indptr[end])
        ranks_all[lo:hi] = position.cpu().numpy()

        for k in ks:
            v, i = values[:, :k], top[:, :k]
            counts[k] += torch.bincount(i[v > -math.inf], minlength=n_items)
        del scores

    per_query = M.ranking_metrics(ranks_all, ks, queries.target_indptr)
    return RankingResult(per_query, {k: c.cpu().numpy().astype(np.int64) for k, c in counts.items()},
                         n_q, queries.protocol, ks,
                         None if item_popularity is None else np.asarray(item_popularity),
                         n_users_popularity)


# ---- tables -------------------------------------------------------------------------------------

def format_table(rows: dict[str, dict[str, float]], metrics: list[str], title: str) -> str:
    """A markdown table: one row per method, one column per metric (4 decimals; blank if missing)."""
    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return ""
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            return str(int(value))
        if isinstance(value, (float, np.floating)):
            return f"{float(value):.4f}"
        return str(value)

    lines = [title, "", "| method | " + " | ".join(metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, values in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(values.get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n"
