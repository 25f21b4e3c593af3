"""onnxruntime against PyTorch on generated inputs: the check every export must pass before writing.

Tolerance, stated once: a score passes when ``|onnx - torch| <= tol * max(1, |torch|)`` with
``tol = 1e-5``, i.e. absolute below magnitude 1 and relative above. Top-K lists must hold the same
item at every position whose torch score is not tied (within the same tolerance) with a neighbour
in the list or with the best item left out; among tied items either order is accepted. The padding
entries (-1, -inf) must sit at exactly the same positions.

The reference is computed from the original net (``forward``/``score_all``/``query``), not from the
export wrapper, so a mistake in the wrapper is caught too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from rectrain.evaluation.ranking import tie_ordered_topk
from rectrain.export.graphs import GraphSpec

DEFAULT_TOLERANCE = 1e-5
BATCH_SIZES = (1, 7, 256)
#: parity batches shrink so that (B, I) floats (NCF MLP/NeuMF: (B, I, hidden)) stay within this budget;
#: a case holds ~20 arrays of that size (onnx and torch scores, full sorts when k >= I, float64
#: comparisons), so 32 MB keeps a case under 1 GB: batches (1, 7, 8) at 1M items, (1,) at 5M
PARITY_MEMORY_BYTES = 32 * 2**20


class ParityError(AssertionError):
    """onnxruntime disagrees with PyTorch beyond the tolerance."""


@dataclass
class GraphParity:
    """What the parity check of one graph measured."""

    graph: str
    cases: list[str] = field(default_factory=list)
    max_abs_diff: float = 0.0
    max_rel_diff: float = 0.0
    topk_positions: int = 0
    tied_positions: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "cases": len(self.cases), "max_abs_diff": self.max_abs_diff,
                "max_rel_diff": self.max_rel_diff, "topk_positions_compared": self.topk_positions,
                "tied_positions_skipped": self.tied_positions}


def _within(onnx_values: np.ndarray, ref: np.ndarray, tol: float) -> tuple[np.ndarray, float, float]:
    """Elementwise pass mask plus max abs/rel difference; -inf must match -inf exactly."""
    onnx_values, ref = onnx_values.astype(np.float64), ref.astype(np.float64)
    both_inf = np.isneginf(onnx_values) & np.isneginf(ref)
    finite = np.isfinite(onnx_values) & np.isfinite(ref)
    diff = np.where(finite, np.abs(onnx_values - ref), 0.0)
    ok = both_inf | (finite & (diff <= tol * np.maximum(1.0, np.abs(np.where(finite, ref, 0.0)))))
    rel = np.where(finite, diff / np.maximum(np.abs(ref), 1e-30), 0.0)
    return ok, float(diff.max(initial=0.0)), float(rel[diff > 0].max(initial=0.0))


def _check_close(stats: GraphParity, what: str, onnx_values: np.ndarray, ref: np.ndarray, tol: float) -> None:
    if onnx_values.shape != ref.shape:
        raise ParityError(f"{stats.graph}: {what}: onnx shape {onnx_values.shape} != torch shape {ref.shape}")
    ok, abs_diff, rel_diff = _within(onnx_values, ref, tol)
    stats.max_abs_diff = max(stats.max_abs_diff, abs_diff)
    stats.max_rel_diff = max(stats.max_rel_diff, rel_diff)
    if not ok.all():
        bad = np.argwhere(~ok)[0]
        raise ParityError(f"{stats.graph}: {what}: onnx {onnx_values[tuple(bad)]!r} vs torch {ref[tuple(bad)]!r} "
                          f"at {tuple(int(b) for b in bad)}; max |diff| {abs_diff:.3g} exceeds "
                          f"{tol:g} * max(1, |torch|)")


def _check_topk(stats: GraphParity, what: str, masked: torch.Tensor, items: np.ndarray, scores: np.ndarray,
                tol: float) -> None:
    """Compare an onnx top-K (items, scores) with the masked torch scores (B, I) it should come from."""
    n_rows, n_items = masked.shape
    k = items.shape[1]
    ref_values, ref_items = tie_ordered_topk(masked, k)
    ref_values, ref_items = ref_values.numpy(), ref_items.numpy()
    ref_items = np.where(np.isneginf(ref_values), -1, ref_items)
    if items.shape != ref_items.shape:
        raise ParityError(f"{stats.graph}: {what}: onnx top-k shape {items.shape} != torch {ref_items.shape}")
    if not np.array_equal(items == -1, ref_items == -1):
        raise ParityError(f"{stats.graph}: {what}: padding (-1) positions differ from torch: some excluded item "
                          "was recommended, or an allowed one dropped")
    if not np.array_equal(np.isneginf(scores), items == -1):
        raise ParityError(f"{stats.graph}: {what}: -inf scores and -1 items do not coincide")
    # 1. the scores onnx reports for the items it chose are torch's scores for those items
    rows = np.repeat(np.arange(n_rows), k).reshape(n_rows, k)
    chosen = np.where(items >= 0, items, 0)
    torch_of_chosen = masked.numpy()[rows, chosen]
    torch_of_chosen = np.where(items >= 0, torch_of_chosen, -np.inf)
    _check_close(stats, f"{what} scores of the returned items", scores, torch_of_chosen, tol)
    # 2. the list has the same score profile as torch's top-K
    _check_close(stats, f"{what} sorted top-k scores", scores, ref_values, tol)
    # 3. identical items wherever torch's score is not tied with a neighbour (or the best item left out)
    beyond = np.full((n_rows, 1), -np.inf)
    if k < n_items:
        beyond = tie_ordered_topk(masked, k + 1)[0].numpy()[:, k:k + 1]
    padded = np.concatenate([np.full((n_rows, 1), np.inf), ref_values.astype(np.float64), beyond], axis=1)
    gap = tol * np.maximum(1.0, np.abs(np.where(np.isfinite(ref_values), ref_values, 0.0)))
    untied = (np.abs(padded[:, :-2] - ref_values) > gap) & (np.abs(padded[:, 2:] - ref_values) > gap)
    untied &= ref_items >= 0
    stats.topk_positions += int(untied.sum())
    stats.tied_positions += int(((ref_items >= 0) & ~untied).sum())
    if not np.array_equal(items[untied], ref_items[untied]):
        bad = np.argwhere(untied & (items != ref_items))[0]
        raise ParityError(f"{stats.graph}: {what}: row {bad[0]} position {bad[1]}: onnx item {items[tuple(bad)]} "
                          f"!= torch item {ref_items[tuple(bad)]} (scores not tied)")


def _check_k(stats: GraphParity, case: str, items: np.ndarray, k: int, n_items: int) -> None:
    if items.shape[1] != min(max(k, 1), n_items):
        raise ParityError(f"{stats.graph}: {case}: {items.shape[1]} items returned, expected "
                          f"clamp(k, 1, n_items) = {min(max(k, 1), n_items)}")


def _mask(scores: torch.Tensor, exclude: np.ndarray) -> torch.Tensor:
    """(B, I) scores with each row's valid excluded indices set to -inf (the torch reference)."""
    masked = scores.clone()
    rows, cols = np.nonzero((exclude >= 0) & (exclude < scores.shape[1]))
    masked[torch.from_numpy(rows), torch.from_numpy(exclude[rows, cols])] = float("-inf")
    return masked


def _batches(per_row_floats: int) -> list[int]:
    cap = max(1, PARITY_MEMORY_BYTES // max(1, 4 * per_row_floats))
    return sorted({min(b, cap) for b in BATCH_SIZES})


def _exclude(rng: np.random.Generator, batch: int, width: int, n_items: int) -> np.ndarray:
    """(B, E) random excluded indices with -1 padding and a few out-of-range values (must be ignored)."""
    ex = rng.integers(0, n_items, size=(batch, width))
    ex[rng.random((batch, width)) < 0.2] = -1
    if width:
        ex[0, -1] = -1
    if batch > 1 and width:
        ex[1, 0] = n_items + 3  # out of range: ignored, like padding
    return ex.astype(np.int64)


def _k_values(n_items: int) -> Iterator[int]:
    while True:
        yield from (10, n_items, 1, n_items + 5, 3)


class TorchReference:
    """Torch outputs of the original net per generated case, computed once and shared by every graph
    of a model (the two-tower recommend and query graphs run the same query tower)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net
        self._query: dict[tuple[int, int, int], torch.Tensor] = {}
        self._vectors: torch.Tensor | None = None

    def query(self, key: tuple[int, int, int], history: np.ndarray, lengths: np.ndarray,
              user_features: np.ndarray | None = None) -> torch.Tensor:
        """(B, d) query vectors (not divided by the temperature)."""
        if key not in self._query:
            features = None if user_features is None else torch.from_numpy(user_features)
            self._query[key] = self.net.query(torch.from_numpy(history), torch.from_numpy(lengths), features)
        return self._query[key]

    def item_vectors(self) -> torch.Tensor:
        if self._vectors is None:
            self._vectors = self.net.item_vectors()
        return self._vectors


def _two_tower_cases(n_items: int, max_length: int, seed: int, n_features: int = 0
                     ) -> Iterator[tuple[tuple[int, int, int], np.ndarray, np.ndarray, np.ndarray | None]]:
    """(key, history (B, L), lengths (B,), user features (B, F) or None) for batch sizes x history
    lengths; the same for every graph."""
    for batch in _batches(n_items):
        for length in sorted({1, 5, max_length}):
            rng = np.random.default_rng([seed, batch, length])
            history = rng.integers(0, n_items, size=(batch, length)).astype(np.int64)
            lengths = rng.integers(1, length + 1, size=batch).astype(np.int64)
            lengths[0] = length
            if batch > 1:
                lengths[1] = 1
            features = rng.normal(size=(batch, n_features)).astype(np.float32) if n_features else None
            yield (seed, batch, length), history, lengths, features


def check_graph(spec: GraphSpec, net: nn.Module, session: Any, kind: str, *, max_length: int | None = None,
                tol: float = DEFAULT_TOLERANCE, seed: int = 0, reference: TorchReference | None = None) -> GraphParity:
    """Run ``session`` and ``net`` on generated inputs; raise :class:`ParityError` on any disagreement.

    Two-tower graphs: batch sizes 1, 7, 256 x history lengths 1, 5 and ``max_length`` (rows of each
    batch get random lengths, always including the full width and 1). NCF: batch sizes 1, 7, 256
    with exclusion widths 0, 5 and n_items / 2. ``k`` cycles through 10, n_items, 1, n_items + 5, 3.
    Pass one ``reference`` to every graph of a model to compute torch's outputs once.
    """
    rng = np.random.default_rng(seed)
    stats = GraphParity(spec.name)
    reference = reference or TorchReference(net)
    n_items = int(net.n_items if kind == "two_tower" else net.config["n_items"])
    ks = _k_values(n_items)
    with torch.inference_mode(), np.errstate(invalid="ignore"):
        if kind == "two_tower":
            n_features = int(getattr(net, "n_user_features", 0) or 0)
            for key, history, lengths, features in _two_tower_cases(n_items, int(max_length or 5), seed, n_features):
                user = {"user_features": features} if n_features else {}
                case = f"batch {key[1]}, history length {key[2]}"
                stats.cases.append(case)
                if spec.name == "item_vectors":
                    items = history.reshape(-1)  # (B * L,) item indices, repeats included
                    (vectors,) = session.run(["item_vectors"], {"items": items})
                    _check_close(stats, f"{case}: item_vectors", vectors, reference.item_vectors().numpy()[items], tol)
                    continue
                query = reference.query(key, history, lengths, features)  # (B, d)
                if spec.name == "query":
                    (q_onnx,) = session.run(["query"], {"history": history, "lengths": lengths, **user})
                    _check_close(stats, f"{case}: query", q_onnx, (query / net.temperature).numpy(), tol)
                    if getattr(net, "repeat_bonus", None) is not None:
                        (r_onnx,) = session.run(["repeat_bonus"], {"history": history, "lengths": lengths, **user})
                        _check_close(stats, f"{case}: repeat_bonus", r_onnx, net.repeat_values(query).numpy(), tol)
                    continue
                exclude = _exclude(rng, key[1], [0, 3, max(1, n_items // 2)][len(stats.cases) % 3], n_items)
                k = next(ks)
                items, scores = session.run(["items", "scores"], {"history": history, "lengths": lengths, **user,
                                                                  "exclude": exclude, "k": np.array(k, np.int64)})
                _check_k(stats, case, items, k, n_items)
                h, n = torch.from_numpy(history), torch.from_numpy(lengths)
                full = net.score_histories(query, reference.item_vectors(), h, n)  # (B, I), as TwoTower.forward
                _check_topk(stats, f"{case}, k {k}", _mask(full, exclude), items, scores, tol)
        else:
            n_users = int(net.config["n_users"])
            hidden = int(max(net.config.get("layers") or [1]))
            for batch in _batches(n_items * hidden):
                users = rng.integers(0, n_users, size=batch).astype(np.int64)
                u = torch.from_numpy(users)
                if spec.name == "score":
                    items = rng.integers(0, n_items, size=batch).astype(np.int64)
                    case = f"batch {batch}"
                    stats.cases.append(case)
                    (scores,) = session.run(["scores"], {"user": users, "item": items})
                    _check_close(stats, f"{case}: scores", scores, net(u, torch.from_numpy(items)).numpy(), tol)
                    continue
                full = net.score_all(u)  # (B, I)
                for width in sorted({0, 5, max(1, n_items // 2)}):
                    exclude = _exclude(rng, batch, width, n_items)
                    k = next(ks)
                    case = f"batch {batch}, exclude width {width}, k {k}"
                    stats.cases.append(case)
                    items, scores = session.run(["items", "scores"], {"user": users, "exclude": exclude,
                                                                      "k": np.array(k, np.int64)})
                    _check_k(stats, case, items, k, n_items)
                    _check_topk(stats, case, _mask(full, exclude), items, scores, tol)
    return stats
