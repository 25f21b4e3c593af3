"""Dynamic int8 quantisation (onnxruntime's quantiser) and what it costs in ranking quality.

The cost is measured, not assumed: the float and the int8 ``recommend`` graphs both rank the
validation split of the data the checkpoint was trained on (:meth:`rectrain.runs.Run.data`), under
the evaluator's protocol: full catalog, seen items excluded when the protocol masks them, a row's own
targets never excluded, ties to the lower index.
"""
from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx

from rectrain.data.queries import RankingQueries
from rectrain.evaluation.metrics import topk_metrics


def quantize_int8(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights of MatMul/Gather (and friends) to int8, activations quantised on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="rectrain-quant-") as tmp, _quiet_root_logger():
        src, dst = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        return onnx.load(dst)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """The quantiser logs a pre-processing hint to the root logger on every call; keep the console clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _rows_csr(indptr: np.ndarray, values: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    return [values[indptr[r]:indptr[r + 1]] for r in rows]


def _pad(rows: list[np.ndarray], width: int | None = None, fill: int = -1) -> np.ndarray:
    width = max([len(r) for r in rows] + [0]) if width is None else width
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def onnx_ranking_metrics(session: Any, kind: str, queries: RankingQueries, *, max_length: int = 50,
                         k: int = 10, batch: int = 256, user_features: np.ndarray | None = None) -> dict[str, float]:
    """hr@k and ndcg@k of an exported ``recommend`` graph on evaluation queries (the evaluator's protocol).

    ``user_features``: (n_users, F) rows fed to a graph with a ``user_features`` input."""
    n = len(queries)
    answered: list[np.ndarray] = []
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        targets = _rows_csr(queries.target_indptr, queries.target_items, rows)
        # a row's own targets are never excluded (the evaluator's rule)
        excluded = [np.setdiff1d(e, t) for e, t in zip(_rows_csr(queries.exclude_indptr, queries.exclude_items, rows),
                                                      targets)]
        feed = {"exclude": _pad(excluded), "k": np.array(k, dtype=np.int64)}
        if kind == "two_tower":
            histories = [h[-max_length:] for h in _rows_csr(queries.history_indptr, queries.history_items, rows)]
            feed["history"] = _pad(histories, max(1, max(len(h) for h in histories)), fill=0)
            feed["lengths"] = np.array([max(1, len(h)) for h in histories], dtype=np.int64)
            if user_features is not None:
                feed["user_features"] = user_features[queries.users[rows]]
        else:
            feed["user"] = queries.users[rows].astype(np.int64)
        items, _ = session.run(["items", "scores"], feed)
        answered += list(items)
    targets = _rows_csr(queries.target_indptr, queries.target_items, np.arange(n))
    per_query = topk_metrics(answered, targets, k)
    return {name: math.fsum(values.tolist()) / max(values.size, 1) for name, values in per_query.items()
            if name in (f"hr@{k}", f"ndcg@{k}")}
