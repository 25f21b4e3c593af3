"""One loaded ONNX model and everything needed to answer with raw ids: torch-free.

:meth:`OnnxModel.load` reads the file once (the sha256 is of exactly the bytes loaded), checks its
``rectrain.*`` metadata and graph signature, maps the vocabularies, opens the companion graphs it
pins by sha256 (``score`` for NCF, ``query`` and ``item_vectors`` for two-tower, and a two-tower
export's faiss ANN index when it has one) and the NCF user vocabulary sidecar, and runs a self-check. A file that fails any of these raises :class:`ModelLoadError`; a
service that is reloading keeps its old model.

Only numpy, onnxruntime, faiss (through :mod:`rectrain.ann`, when a file pins an index) and the
standard library are imported here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from rectrain.ann import AnnError, AnnIndex
from rectrain.artifacts import (ArtifactError, assign_segments, centroids_of, check_calibration_metadata,
                                platt_probability)
from rectrain.features import UserFeatureEncoder

log = logging.getLogger(__name__)

PREFIX = "rectrain."
SUPPORTED_FORMATS = ("1",)
INPUTS = {"two_tower": ("history", "lengths", "exclude", "k"), "ncf": ("user", "exclude", "k")}


class ModelLoadError(Exception):
    """A file cannot serve: unreadable, not a rectrain recommend graph, inconsistent, or fails its self-check."""


def session_options(threads: int) -> ort.SessionOptions:
    """onnxruntime options with the thread count set deliberately (no oversubscription)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    return options


def _open_session(blob: bytes, threads: int, what: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(blob, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelLoadError(f"{what}: onnxruntime cannot load it ({type(exc).__name__}: {exc})") from exc


def _json_meta(meta: dict[str, str], key: str, path: Path) -> Any:
    if key not in meta:
        raise ModelLoadError(f"{path.name}: metadata key {PREFIX}{key} missing: not a rectrain export")
    try:
        return json.loads(meta[key])
    except ValueError as exc:
        raise ModelLoadError(f"{path.name}: metadata {PREFIX}{key} is not valid JSON ({exc})") from exc


@dataclass
class OnnxModel:
    """A loaded rectrain ``recommend`` graph plus its vocabularies and optional companions.

    Attributes:
        path: the ONNX file.
        sha256: sha256 of the bytes loaded.
        kind: ``two_tower`` or ``ncf``.
        meta: every ``rectrain.*`` metadata value (keys without the prefix; strings as stored).
        session: the recommend graph.
        item_vocab: index -> raw item id; ``item_index`` the reverse.
        popularity: (I,) training popularity; ``popularity_order`` item indices by popularity
            descending, lower index first on ties (the cold-start list).
        user_index: NCF raw user id -> index, or None when the sidecar is absent.
        max_length: two-tower: the most recent items a query reads.
        mask_seen: the training protocol's default for excluding history items.
        score_session: NCF ``score`` graph or two-tower ``query`` graph (None if absent).
        item_vectors: two-tower (I, d) item vectors from the ``item_vectors`` graph (None if absent).
        user_encoder: two-tower query towers trained on user attributes: how a request's attributes
            become the graph's ``user_features`` input (None: the graph has no such input).
        repeat_bonus: two-tower learned constant bonus per recency slot for items already in the
            history (None: the model has none); the recommend graph applies it, ``/score`` adds the
            query graph's per-query ``repeat_bonus`` output.
        ann: two-tower faiss index over ``item_vectors`` (None: the export wrote none, or it was
            not found, which ``warnings`` says); the scorer retrieves candidates with it and
            re-scores them exactly.
    """

    path: Path
    sha256: str
    kind: str
    meta: dict[str, str]
    session: ort.InferenceSession
    item_vocab: list[str]
    item_index: dict[str, int]
    popularity: np.ndarray
    popularity_order: np.ndarray
    mask_seen: bool
    max_length: int | None = None
    user_index: dict[str, int] | None = None
    score_session: ort.InferenceSession | None = None
    item_vectors: np.ndarray | None = None
    repeat_bonus: np.ndarray | None = None
    repeat_mode: str = "bonus"
    user_encoder: UserFeatureEncoder | None = None
    warnings: list[str] = field(default_factory=list)
    loaded_at: float = field(default_factory=time.time)
    segment_centroids: np.ndarray | None = None  # (k, d), unit-norm space when segments_normalize
    segments_normalize: bool = True
    user_segments: np.ndarray | None = None  # NCF: (n_users,) segment per user index
    calibration: dict[str, Any] | None = None  # {"a", "b", ...}: p = sigmoid(a * score + b)
    missing: list[str] = field(default_factory=list)  # files the main file pins that were not found
    ann: AnnIndex | None = None

    @property
    def n_items(self) -> int:
        return len(self.item_vocab)

    @staticmethod
    def history_bonus(history: np.ndarray, items: np.ndarray, slot_values: np.ndarray | None) -> np.ndarray:
        """(n,) repeat bonus of ``items`` given the (L,) history and the query's (R,) ``slot_values``
        (the query graph's ``repeat_bonus`` row), as the recommend graph adds it."""
        if slot_values is None or not len(slot_values) or not len(history):
            return np.zeros(len(items), dtype=np.float32)
        back = np.arange(len(history))[::-1]  # positions back from the last item
        per_position = slot_values[np.minimum(back, len(slot_values) - 1)]  # (L,)
        return (items[:, None] == history[None, :]).astype(np.float32) @ per_position  # (n,)

    @classmethod
    def load(cls, path: str | Path, threads: int = 1) -> "OnnxModel":
        """Load and verify ``path``; raise :class:`ModelLoadError` with the reason on any problem.

        Messages name files, never directories: a service passes them on to its clients.
        """
        path = Path(path)
        try:
            return cls._load(path, threads)
        except ModelLoadError:
            raise
        except Exception as exc:  # metadata of the wrong shape, a file vanishing mid-read: still a refused file
            raise ModelLoadError(f"{path.name}: not loadable ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _load(cls, path: Path, threads: int) -> "OnnxModel":
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{path.name}: cannot read ({exc.strerror or exc})") from exc
        session = _open_session(blob, threads, path.name)
        meta = {k.removeprefix(PREFIX): v for k, v in session.get_modelmeta().custom_metadata_map.items()
                if k.startswith(PREFIX)}
        if meta.get("format") not in SUPPORTED_FORMATS:
            raise ModelLoadError(f"{path.name}: not a rectrain export (metadata {PREFIX}format is "
                                 f"{meta.get('format')!r}; supported: {SUPPORTED_FORMATS})")
        kind = meta.get("model_kind")
        if kind not in INPUTS:
            raise ModelLoadError(f"{path.name}: unknown model kind {kind!r}")
        if meta.get("graph") != "recommend":
            raise ModelLoadError(f"{path.name}: this is the {meta.get('graph')!r} graph; serve the main (recommend) file")
        names = tuple(i.name for i in session.get_inputs())
        encoder = UserFeatureEncoder.from_dict(_json_meta(meta, "user_features", path)) if "user_features" in meta else None
        expected = INPUTS[kind]
        if encoder is not None and encoder.width:
            expected = (*expected[:2], "user_features", *expected[2:])
        if names != expected or [o.name for o in session.get_outputs()] != ["items", "scores"]:
            raise ModelLoadError(f"{path.name}: graph inputs {names} do not match a {kind} recommend graph {expected}")
        item_vocab = [str(v) for v in _json_meta(meta, "item_vocab", path)]
        n_items = int(meta.get("n_items", len(item_vocab)))
        if len(item_vocab) != n_items:
            raise ModelLoadError(f"{path.name}: item vocabulary has {len(item_vocab)} ids, the model {n_items} items")
        popularity = np.asarray(_json_meta(meta, "item_popularity", path), dtype=np.float64)
        if popularity.shape != (n_items,):
            popularity = np.zeros(n_items)
        model = cls(path=path, sha256=hashlib.sha256(blob).hexdigest(), kind=kind, meta=meta, session=session,
                    item_vocab=item_vocab, item_index={raw: i for i, raw in enumerate(item_vocab)},
                    popularity=popularity, popularity_order=np.lexsort((np.arange(n_items), -popularity)),
                    mask_seen=bool(_json_meta(meta, "mask_seen", path)),
                    max_length=int(meta["max_length"]) if kind == "two_tower" else None)
        model.user_encoder = encoder if encoder is not None and encoder.width else None
        if "repeat_bonus" in meta:
            model.repeat_bonus = np.asarray(_json_meta(meta, "repeat_bonus", path), dtype=np.float32).reshape(-1)
            model.repeat_mode = meta.get("repeat_mode", "bonus")
        if len(model.item_index) != n_items:
            raise ModelLoadError(f"{path.name}: the item vocabulary holds duplicate raw ids")
        model._load_companions(threads)
        if kind == "ncf":
            model._load_user_vocab()
        model._load_analytics()
        model.self_check()
        return model

    def _load_analytics(self) -> None:
        """Optional customer segments and probability calibration carried in the metadata
        (formats and checks: :mod:`rectrain.artifacts`, shared with analytics and export)."""
        if "segments" in self.meta:
            seg = _json_meta(self.meta, "segments", self.path)
            self.segment_centroids, self.segments_normalize = centroids_of(seg)
            if self.kind == "ncf":
                self.user_segments = np.asarray(seg.get("user_segments", []), dtype=np.int64)
        if "calibration" in self.meta:
            cal = _json_meta(self.meta, "calibration", self.path)
            try:
                check_calibration_metadata(cal, self.path.name)
            except ArtifactError as exc:
                raise ModelLoadError(str(exc)) from None
            self.calibration = cal

    def segment_of_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Nearest centroid (squared Euclidean, after L2 normalisation when the segments used it)."""
        assert self.segment_centroids is not None
        return assign_segments(vectors, self.segment_centroids, self.segments_normalize)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of the graph's scores: sigmoid(a * score + b)."""
        assert self.calibration is not None
        return platt_probability(scores, self.calibration["a"], self.calibration["b"])

    # --- companions -------------------------------------------------------------------------
    def _companion_bytes(self, name: str, ref: dict[str, Any]) -> bytes | None:
        file = self.path.parent / Path(str(ref.get("file"))).name
        try:
            blob = file.read_bytes()
        except FileNotFoundError:
            self.missing.append(file.name)
            self.warnings.append(f"companion {name} graph {file.name} not found: /score is unavailable")
            return None
        except OSError as exc:
            raise ModelLoadError(f"{file.name}: cannot read ({exc.strerror or exc})") from exc
        if hashlib.sha256(blob).hexdigest() != ref.get("sha256"):
            raise ModelLoadError(f"{file.name}: sha256 does not match the one pinned in {self.path.name}: the files "
                                 "come from different exports")
        return blob

    def _load_companions(self, threads: int) -> None:
        companions = _json_meta(self.meta, "companions", self.path) if "companions" in self.meta else {}
        wanted = ("query", "item_vectors") if self.kind == "two_tower" else ("score",)
        missing = [w for w in wanted if w not in companions]
        if missing:
            self.warnings.append(f"no {' or '.join(missing)} companion graph recorded: /score is unavailable")
            return
        blobs = {name: self._companion_bytes(name, companions[name]) for name in wanted}
        if any(blob is None for blob in blobs.values()):
            return
        sessions = {name: _open_session(blob, threads, f"{name} companion of {self.path.name}")
                    for name, blob in blobs.items()}
        if self.kind == "ncf":
            self.score_session = sessions["score"]
            return
        self.score_session = sessions["query"]
        # the catalog's vectors, read once: a score request is then one query call and a dot product
        (vectors,) = sessions["item_vectors"].run(["item_vectors"], {"items": np.arange(self.n_items, dtype=np.int64)})
        self.item_vectors = vectors
        if "ann_index" in companions:
            self._load_ann(companions["ann_index"], threads)

    def _load_ann(self, ref: dict[str, Any], threads: int) -> None:
        """The pinned faiss index: absent -> exact scoring with a warning; different or unreadable -> refused."""
        blob = self._companion_bytes("ann_index", ref)
        if blob is None:
            self.warnings[-1] = (f"ANN index {Path(str(ref.get('file'))).name} not found: recommendations are "
                                 "scored exactly over the whole catalog")
            return
        settings = _json_meta(self.meta, "ann", self.path)
        try:
            index = AnnIndex.from_bytes(blob, settings)
        except AnnError as exc:
            raise ModelLoadError(f"{Path(str(ref.get('file'))).name}: {exc}") from exc
        if self.item_vectors is None or index.settings.get("dim") != self.item_vectors.shape[1]:
            raise ModelLoadError(f"{Path(str(ref.get('file'))).name}: index width {index.index.d} does not fit "
                                 "the item vectors")
        import faiss

        faiss.omp_set_num_threads(max(1, int(threads)))  # a search of a batch uses the service's thread budget
        self.ann = index

    def _load_user_vocab(self) -> None:
        ref = _json_meta(self.meta, "user_vocab", self.path) or {}
        file = self.path.parent / Path(str(ref.get("file"))).name
        try:
            if not ref.get("file"):
                raise FileNotFoundError
            blob = file.read_bytes()
        except FileNotFoundError:
            self.missing.append(file.name)
            self.warnings.append(f"user vocabulary sidecar {file.name} not found: every user is served cold start")
            return
        except OSError as exc:
            raise ModelLoadError(f"{file.name}: cannot read ({exc.strerror or exc})") from exc
        if hashlib.sha256(blob).hexdigest() != ref.get("sha256"):
            raise ModelLoadError(f"{file.name}: sha256 does not match the one pinned in {self.path.name}")
        try:
            vocab = [str(u) for u in json.loads(blob)["user_vocab"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{file.name}: not a rectrain user vocabulary ({exc})") from exc
        n_users = int(self.meta.get("n_users") or len(vocab))
        if len(vocab) != n_users:
            raise ModelLoadError(f"{file.name}: {len(vocab)} users, the model was trained on {n_users}")
        self.user_index = {raw: i for i, raw in enumerate(vocab)}

    # --- running ------------------------------------------------------------------------------
    def run_recommend(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Run the recommend graph: (B, K) int64 item indices (-1 padding), (B, K) float32 scores."""
        items, scores = self.session.run(["items", "scores"], feed)
        return items, scores

    def self_check(self) -> None:
        """One recommend call on a known input; its shape and values must make sense."""
        k = min(3, self.n_items)
        feed: dict[str, np.ndarray] = {"exclude": np.full((1, 1), -1, np.int64), "k": np.array(k, np.int64)}
        if self.kind == "two_tower":
            feed.update(history=np.zeros((1, 1), np.int64), lengths=np.ones(1, np.int64))
            if self.user_encoder is not None:
                feed["user_features"] = self.user_encoder.encode_records([{}])
        else:
            feed["user"] = np.zeros(1, np.int64)
        try:
            items, scores = self.run_recommend(feed)
        except Exception as exc:
            raise ModelLoadError(f"{self.path.name}: self-check run failed ({type(exc).__name__}: {exc})") from exc
        if items.shape != (1, k) or scores.shape != (1, k) or not np.all((items >= 0) & (items < self.n_items)) \
                or not np.all(np.isfinite(scores)) or np.any(np.diff(scores[0]) > 0):
            raise ModelLoadError(f"{self.path.name}: self-check returned implausible top-{k}: items {items.tolist()}, "
                                 f"scores {scores.tolist()}")

    def describe(self) -> dict[str, Any]:
        """What /metadata shows: every metadata value, with the long lists summarised."""
        out: dict[str, Any] = {}
        for key, value in sorted(self.meta.items()):
            if key in ("item_vocab", "item_titles", "item_popularity"):
                out[key] = f"<{self.n_items} entries>"
                continue
            try:
                out[key] = json.loads(value) if value[:1] in "[{" else value
            except ValueError:
                out[key] = value
        out.update(file=self.path.name, sha256=self.sha256, loaded_at=self.loaded_at,
                   score_available=self.score_session is not None,
                   retrieval="ann" if self.ann is not None else "exact",
                   user_vocab_loaded=self.user_index is not None if self.kind == "ncf" else None,
                   warnings=list(self.warnings))
        return out
