"""Dynamic int8 quantisation (onnxruntime's quantiser) and what it costs in ranking quality.

The cost is measured, not assumed: the float and the int8 ``recommend`` graphs both rank the
validation split of the data the checkpoint was trained on (rebuilt from the checkpoint's config
and checked against its data fingerprint), under the evaluator's protocol: full catalog, seen items
excluded when the protocol masks them, a row's own targets never excluded, ties to the lower index.
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

from rectrain.errors import RectrainError
from rectrain.evaluation import metrics as M
from rectrain.data.queries import RankingQueries
from rectrain.features import user_feature_matrix


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


def load_validation_queries(facts: dict[str, Any]) -> RankingQueries:
    """The validation queries of the data behind a checkpoint; fails when that data has changed."""
    return rebuild_data(facts).ranking_queries("valid")


def rebuild_data(facts: dict[str, Any]) -> Any:
    """The PreparedData behind a checkpoint (from the cache when present); fails when it has changed."""
    from hydra.utils import instantiate

    from rectrain.data.dataset import SplitConfig, load_or_prepare
    from rectrain.data.preprocess import PreprocessConfig

    data_cfg = (facts.get("config") or {}).get("data")
    if not data_cfg or "source" not in data_cfg:
        raise RectrainError("the checkpoint carries no data config: cannot measure validation quality")
    try:
        source = instantiate(data_cfg["source"])
        pre = PreprocessConfig(**(data_cfg.get("preprocess") or {}))
        split = SplitConfig(**(data_cfg.get("split") or {}))
        data = load_or_prepare(source, pre, split, data_cfg.get("cache_dir"))
    except RectrainError:
        raise
    except Exception as exc:  # a moved file, a missing source class
        raise RectrainError(f"cannot rebuild the training data to measure quality: {type(exc).__name__}: {exc}") from exc
    if facts.get("data_fingerprint") and data.fingerprint != facts["data_fingerprint"]:
        raise RectrainError(f"the training data changed since the checkpoint was written (fingerprint "
                            f"{data.fingerprint} != {facts['data_fingerprint']}): quality cannot be compared")
    return data


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
    ranks = np.empty(queries.target_items.size, dtype=np.int64)
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
        for i, t in enumerate(targets):
            lo = queries.target_indptr[rows[i]]
            for j, item in enumerate(t):
                hit = np.flatnonzero(items[i] == item)
                ranks[lo + j] = hit[0] if hit.size else k
    per_query = M.ranking_metrics(ranks, (k,), queries.target_indptr)
    return {name: math.fsum(values.tolist()) / max(values.size, 1) for name, values in per_query.items()
            if name in (f"hr@{k}", f"ndcg@{k}")}
