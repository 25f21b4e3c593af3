"""The in-process scoring API a service uses: raw ids in, raw ids and scores out. Torch-free.

Requests are plain dicts (the JSON bodies of the HTTP service and the lines of the batch CLI):

* two-tower ``recommend``: ``{"history": [raw item ids, oldest first], "k": 10, "exclude": [raw ids],
  "exclude_seen": true}``; ``score``: ``{"history": [...], "items": [raw ids to score]}``.
* NCF ``recommend``: ``{"user": raw user id, "k": 10, "exclude": [raw ids]}``; ``score``:
  ``{"user": ..., "items": [...]}``.
* any request may carry an ``"id"`` (string or integer), echoed in its answer.

Answers: ``items`` (raw ids, best first) and ``scores``, ``cold_start``, ``score_kind`` (``model``
or ``popularity``), ``model`` (sha256 prefix of the serving file), the request's ``id``; recommend
answers add ``unknown_items``, ``ignored_exclude`` (unknown ids in ``exclude``) and, two-tower,
``truncated``; score answers list unknown candidates in ``unknown_items`` (and ``unknown_history``).

Rules: ids are strings or integers (an integer is matched as its decimal string). Unknown history
items are skipped and listed in ``unknown_items``. Of the known history items the most recent
``max_length`` are read (``truncated`` says how many older ones were dropped). ``exclude_seen``
(default: the training protocol's, ``rectrain.mask_seen``) excludes every known history item from
the answer; ``exclude`` items are never recommended. An empty or fully unknown history (NCF: an
unknown user) is answered from training popularity with ``"cold_start": true`` and a
``cold_start_reason``; scores are then popularity counts. ``k`` must be an integer in
``1..max_k``; a list holds fewer than ``k`` items only when the catalog minus exclusions is smaller.
Any violation raises :class:`RequestError` (an HTTP 4xx with the reason).

Retrieval: a two-tower export with a faiss index (``export.py ann=...``) answers ``recommend`` by
searching the index for candidates (at least the tuned ``fetch``, twice ``k``, plus the request's
exclusions), adding the history items (the repeat bonus can lift them), re-scoring all of them
exactly as the recommend graph does and keeping the top ``k``; answers then say
``"retrieval": "ann"``. A request whose exclusions swallow the candidates is searched again with
four times the candidates and search effort, and after that answered exactly (``"retrieval": "exact"``), so it still
gets ``k`` items. ``Scorer(exact=True)`` (``serve_onnx.py --exact``) always scores exactly.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rectrain.ann import rerank
from rectrain.serving.model import ModelLoadError, OnnxModel

log = logging.getLogger(__name__)

DEFAULT_K = 10
DEFAULT_MAX_K = 1000
DEFAULT_MAX_BATCH = 1024
DEFAULT_MAX_SCORE_ITEMS = 10_000
EXACT_SCORES_PER_CALL = 1 << 25  # 128 MB of float32 scores per recommend-graph call

FIELDS = {
    ("recommend", "two_tower"): ({"history"}, {"id", "history", "k", "exclude", "exclude_seen", "user_features"}),
    ("recommend", "ncf"): ({"user"}, {"id", "user", "k", "exclude"}),
    ("score", "two_tower"): ({"history", "items"}, {"id", "history", "items", "calibrated", "user_features"}),
    ("score", "ncf"): ({"user", "items"}, {"id", "user", "items", "calibrated"}),
}


class RequestError(ValueError):
    """A request the service refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def brief(value: Any) -> str:
    """A short, always printable rendering of a request value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"an integer of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _raw_id(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(f"{where} must be a string or integer id, got {type(value).__name__} {brief(value)}")
    return str(value)


def _id_list(payload: dict[str, Any], key: str) -> list[str]:
    value = payload.get(key, [])
    if not isinstance(value, list):
        raise RequestError(f"'{key}' must be a list of ids, got {type(value).__name__}")
    return [_raw_id(v, f"'{key}[{i}]'") for i, v in enumerate(value)]


@dataclass
class Query:
    """A validated request mapped to indices."""

    endpoint: str
    k: int = DEFAULT_K
    history: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # the indices read, <= max_length
    user: int | None = None
    exclude: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    items: list[str] = field(default_factory=list)  # score: known raw ids in request order
    item_idx: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    answer: dict[str, Any] = field(default_factory=dict)  # fields known before running (unknowns, flags)
    cold_start_reason: str | None = None
    calibrated: bool = False  # score: also answer calibrated probabilities
    user_vector: np.ndarray | None = None  # two-tower with user features: (F,) encoded attributes


class Scorer:
    """Answers recommend/score requests with one :class:`OnnxModel`, swappable without downtime.

    Args:
        model: the loaded model.
        max_k: the largest ``k`` a request may ask for (larger: RequestError, HTTP 400).
        max_batch: the most requests in one batch call.
        max_score_items: the most candidate items in one score request.
        exact: never use the model's ANN index (score the whole catalog with the recommend graph).

    Example::

        scorer = Scorer.load("model.onnx", threads=1)
        scorer.recommend({"history": ["sku1", "sku7"], "k": 5})
        # {"items": [...], "scores": [...], "cold_start": False, "unknown_items": [], ...}
    """

    def __init__(self, model: OnnxModel, *, max_k: int = DEFAULT_MAX_K, max_batch: int = DEFAULT_MAX_BATCH,
                 max_score_items: int = DEFAULT_MAX_SCORE_ITEMS, threads: int = 1, exact: bool = False) -> None:
        self._model = model
        self.exact = exact
        self.max_k, self.max_batch, self.max_score_items, self.threads = max_k, max_batch, max_score_items, threads
        self._reload_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | Path, *, threads: int = 1, exact: bool = False, **limits: Any) -> "Scorer":
        """Load ``path`` (raises ModelLoadError) with ``threads`` onnxruntime intra-op threads."""
        return cls(OnnxModel.load(path, threads=threads), threads=threads, exact=exact, **limits)

    @property
    def model(self) -> OnnxModel:
        """The model now serving (one attribute read: a request holds on to the one it started with)."""
        return self._model

    # --- reload -------------------------------------------------------------------------------
    def reload(self, path: str | Path | None = None) -> dict[str, Any]:
        """Load ``path`` (default: the serving file again) and swap it in if it passes every check.

        All or nothing: the whole new file set is loaded into new sessions and verified (metadata,
        every companion's sha256 against the pins in the main file, self-check) before one reference
        is swapped. It must be of the same model kind (the request format must not change under
        clients) and must not lack a pinned companion the serving model has (``/score`` would stop
        working). On any failure ModelLoadError is raised and the old model keeps serving.
        """
        with self._reload_lock:  # one reload at a time; requests never wait for it
            old = self._model
            new = OnnxModel.load(path or old.path, threads=self.threads)
            if new.kind != old.kind:
                raise ModelLoadError(f"{new.path.name}: a {new.kind} model cannot replace the serving {old.kind} "
                                     "model (the request format would change); restart the service instead")
            lost = sorted(set(new.missing) - set(old.missing))
            if new.ann is None and "ann" in new.meta and not self.exact:
                lost = sorted({*lost, *new.missing})  # graph and index are swapped together, or not at all
            if lost:
                raise ModelLoadError(f"{new.path.name}: {', '.join(lost)} (pinned by it) not found; the serving "
                                     "model has it, so the new set is incomplete")
            self._model = new
            log.info("reloaded %s (sha256 %s -> %s)", new.path.name, old.sha256[:12], new.sha256[:12])
            return {"reloaded": True, "file": new.path.name, "sha256": new.sha256, "previous_sha256": old.sha256}

    # --- public calls ---------------------------------------------------------------------------
    def recommend(self, request: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Top-k raw item ids and scores for one request (a dict, or the same fields as keywords)."""
        return self.recommend_many([{**(request or {}), **fields}])[0]

    def recommend_many(self, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Answers for many requests, run as one batch; the first invalid one raises RequestError."""
        model = self._model
        self._check_batch(requests)
        queries = [self.parse(r, "recommend", model, f"requests[{i}]: " if len(requests) > 1 else "")
                   for i, r in enumerate(requests)]
        return self.run(queries, model)

    def score(self, request: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Scores of the given candidate ``items`` for a history (two-tower) or a user (NCF)."""
        model = self._model
        return self.run([self.parse({**(request or {}), **fields}, "score", model)], model)[0]

    def describe(self) -> dict[str, Any]:
        model = self._model
        described = model.describe()
        if self.exact:
            described["retrieval"] = "exact (--exact)"
        return {**described, "limits": {"max_k": self.max_k, "max_batch": self.max_batch,
                                        "max_score_items": self.max_score_items, "threads": self.threads}}

    # --- validation -----------------------------------------------------------------------------
    def _check_batch(self, requests: Sequence[Any]) -> None:
        if not isinstance(requests, (list, tuple)) or not requests:
            raise RequestError("expected a non-empty list of requests")
        if len(requests) > self.max_batch:
            raise RequestError(f"batch of {len(requests)} requests exceeds the limit of {self.max_batch}", 413)

    def parse(self, payload: Any, endpoint: str, model: OnnxModel, where: str = "") -> Query:
        """Validate one request and map its raw ids; RequestError (400) names the offending field."""
        try:
            return self._parse(payload, endpoint, model)
        except RequestError as exc:
            raise RequestError(where + str(exc), exc.status) from None

    def _parse(self, payload: Any, endpoint: str, model: OnnxModel) -> Query:
        if not isinstance(payload, dict):
            raise RequestError(f"a request must be a JSON object, got {type(payload).__name__}")
        required, allowed = FIELDS[(endpoint, model.kind)]
        unknown = sorted(set(payload) - allowed)
        if unknown:
            raise RequestError(f"unknown field '{unknown[0]}' for a {model.kind} {endpoint} request; "
                               f"fields: {', '.join(sorted(allowed))}")
        missing = sorted(required - set(payload))
        if missing:
            raise RequestError(f"missing field '{missing[0]}'")
        query = Query(endpoint)
        if "id" in payload:
            if payload["id"] is not None:
                _raw_id(payload["id"], "'id'")
            query.answer["id"] = payload["id"]  # echoed as given
        if endpoint == "recommend":
            k = payload.get("k", DEFAULT_K)
            if isinstance(k, bool) or not isinstance(k, int):
                raise RequestError(f"'k' must be an integer, got {type(k).__name__} {brief(k)}")
            if k < 1 or k > self.max_k:
                raise RequestError(f"'k' must be between 1 and {self.max_k}, got {brief(k)}")
            query.k = k
            exclude = _id_list(payload, "exclude")
            known_exclude = [model.item_index[e] for e in exclude if e in model.item_index]
            query.answer["ignored_exclude"] = [e for e in exclude if e not in model.item_index]
        else:
            calibrated = payload.get("calibrated", False)
            if not isinstance(calibrated, bool):
                raise RequestError(f"'calibrated' must be true or false, got {brief(calibrated)}")
            if calibrated and model.calibration is None:
                raise RequestError("this model carries no calibration (run calibrate.py, then export again)")
            query.calibrated = calibrated
            items = _id_list(payload, "items")
            if len(items) > self.max_score_items:
                raise RequestError(f"'items' holds {len(items)} ids; the limit is {self.max_score_items}", 413)
            query.items = [i for i in items if i in model.item_index]
            query.item_idx = np.array([model.item_index[i] for i in query.items], dtype=np.int64)
            query.answer["unknown_items"] = [i for i in items if i not in model.item_index]
            known_exclude = []
        if model.kind == "two_tower":
            history = _id_list(payload, "history")
            known = [model.item_index[h] for h in history if h in model.item_index]
            unknown_history = [h for h in history if h not in model.item_index]
            if endpoint == "recommend":
                query.answer["unknown_items"] = unknown_history
                exclude_seen = payload.get("exclude_seen", model.mask_seen)
                if not isinstance(exclude_seen, bool):
                    raise RequestError(f"'exclude_seen' must be true or false, got {brief(exclude_seen)}")
                if exclude_seen:
                    known_exclude += known
            else:
                query.answer["unknown_history"] = unknown_history
            assert model.max_length is not None
            query.answer["truncated"] = max(0, len(known) - model.max_length)
            query.history = np.array(known[-model.max_length:], dtype=np.int64)
            query.user_vector = self._user_vector(payload, model)
            if not history:
                query.cold_start_reason = "empty history"
            elif not known:
                query.cold_start_reason = "no known item in the history"
        else:
            user = _raw_id(payload["user"], "'user'")
            if model.user_index is None:
                query.cold_start_reason = "user vocabulary not loaded"
            elif user not in model.user_index:
                query.cold_start_reason = "unknown user"
            else:
                query.user = model.user_index[user]
        query.exclude = np.unique(np.array(known_exclude, dtype=np.int64))
        return query

    @staticmethod
    def _user_vector(payload: dict[str, Any], model: OnnxModel) -> np.ndarray | None:
        """The request's ``user_features`` object encoded as the model was trained (None: none read)."""
        given = payload.get("user_features")
        if model.user_encoder is None:
            if given is not None:
                raise RequestError("this model reads no user features; drop 'user_features'")
            return None
        if given is None:
            given = {}  # every attribute missing: encoded as unknown
        if not isinstance(given, dict):
            raise RequestError(f"'user_features' must be an object of attribute: value, got {type(given).__name__}")
        try:
            vector = model.user_encoder.encode_records([given])[0]
        except KeyError as exc:
            raise RequestError(f"unknown user feature {brief(exc.args[0])}; this model reads: "
                               f"{', '.join(model.user_encoder.attributes)}") from None
        except (ValueError, OverflowError, TypeError) as exc:  # OverflowError: an int too large for a float
            raise RequestError(f"'user_features': {str(exc)[:200]}") from None
        if not np.all(np.isfinite(vector.astype(np.float32))):  # finite in float64, infinite in the graph
            raise RequestError("'user_features' holds a number too large for the model")
        return vector

    @staticmethod
    def _with_user_features(feed: dict[str, np.ndarray], queries: Sequence[Query], model: OnnxModel
                            ) -> dict[str, np.ndarray]:
        if model.user_encoder is not None:
            feed["user_features"] = np.stack([q.user_vector for q in queries]).astype(np.float32)
        return feed

    # --- running --------------------------------------------------------------------------------
    def run(self, queries: list[Query], model: OnnxModel) -> list[dict[str, Any]]:
        """Answer validated queries: recommend rows in one graph call, cold-start rows from popularity."""
        answers: list[dict[str, Any] | None] = [None] * len(queries)
        warm = [i for i, q in enumerate(queries) if q.cold_start_reason is None and q.endpoint == "recommend"]
        if warm:
            for i, answer in zip(warm, self._recommend_rows([queries[i] for i in warm], model)):
                answers[i] = answer
        for i, q in enumerate(queries):
            if answers[i] is not None:
                continue
            if q.cold_start_reason is not None:
                answers[i] = self._cold_start(q, model)
            else:
                answers[i] = self._score_row(q, model)
        for q, answer in zip(queries, answers):
            answer.update(q.answer)
            answer["model"] = model.sha256[:12]
        if model.segment_centroids is not None:
            for q, answer, segment in zip(queries, answers, self._segments(queries, model)):
                if q.endpoint == "recommend":
                    answer["segment"] = segment
        for q, answer in zip(queries, answers):
            if q.calibrated and answer.get("score_kind") == "model":
                answer["probabilities"] = model.probabilities(np.asarray(answer["scores"])).tolist()
        return answers  # type: ignore[return-value]

    def segment(self, request: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """The customer segment of a history (two-tower) or a known user (NCF); None on cold start."""
        model = self._model
        if model.segment_centroids is None:
            raise RequestError("this model carries no segments (run segment.py, then export again)", 404)
        payload = {k: v for k, v in {**(request or {}), **fields}.items() if k in ("id", "history", "user", "user_features")}
        query = self.parse(payload, "recommend", model)
        return {"segment": self._segments([query], model)[0], "k": int(model.segment_centroids.shape[0]),
                "cold_start": query.cold_start_reason is not None}

    def _segments(self, queries: list[Query], model: OnnxModel) -> list[int | None]:
        """Segment per query: nearest centroid of the two-tower query vector, or the NCF user's segment."""
        out: list[int | None] = [None] * len(queries)
        warm = [i for i, q in enumerate(queries) if q.cold_start_reason is None]
        if not warm:
            return out
        if model.kind == "two_tower":
            if model.score_session is None:
                return out
            history, lengths = self._histories([queries[i] for i in warm])
            feed = self._with_user_features({"history": history, "lengths": lengths}, [queries[i] for i in warm], model)
            (vectors,) = model.score_session.run(["query"], feed)
            for i, s in zip(warm, model.segment_of_vectors(vectors).tolist()):
                out[i] = int(s)
        elif model.user_segments is not None and model.user_segments.size:
            for i in warm:
                out[i] = int(model.user_segments[queries[i].user])
        return out

    @staticmethod
    def _histories(queries: Sequence[Query]) -> tuple[np.ndarray, np.ndarray]:
        """(B, L) right-padded histories (item 0 as padding) and (B,) lengths."""
        length = max(len(q.history) for q in queries)
        history = np.zeros((len(queries), length), dtype=np.int64)
        for r, q in enumerate(queries):
            history[r, :len(q.history)] = q.history
        return history, np.array([len(q.history) for q in queries], np.int64)

    @staticmethod
    def _exclusions(queries: Sequence[Query]) -> np.ndarray:
        """(B, E) excluded item indices, -1 padded."""
        exclude = np.full((len(queries), max(len(q.exclude) for q in queries)), -1, dtype=np.int64)
        for r, q in enumerate(queries):
            exclude[r, :len(q.exclude)] = q.exclude
        return exclude

    def _recommend_rows(self, queries: list[Query], model: OnnxModel) -> list[dict[str, Any]]:
        if model.ann is not None and not self.exact and model.kind == "two_tower" and model.repeat_mode != "mixture":
            return self._recommend_rows_ann(queries, model)
        return self._recommend_rows_exact(queries, model)

    def _recommend_rows_ann(self, queries: list[Query], model: OnnxModel) -> list[dict[str, Any]]:
        """Index candidates re-scored exactly (see the module docstring); short rows retried, then exact."""
        ann, vectors = model.ann, model.item_vectors
        assert ann is not None and vectors is not None and model.score_session is not None
        history, lengths = self._histories(queries)
        feed = self._with_user_features({"history": history, "lengths": lengths}, queries, model)
        names = ["query"] + (["repeat_bonus"] if model.repeat_bonus is not None else [])
        outputs = model.score_session.run(names, feed)
        query_vectors = outputs[0]
        positions = np.arange(history.shape[1])[None, :]
        real = positions < lengths[:, None]
        seen = np.where(real, history, -1)  # (B, L): history items, candidates of their own
        per_position = None
        if len(outputs) > 1 and outputs[1].shape[1]:
            slots = outputs[1]  # (B, R) slot values; slot = positions back from the last item, capped
            back = np.clip(lengths[:, None] - 1 - positions, 0, slots.shape[1] - 1)
            per_position = np.where(real, np.take_along_axis(slots, back, 1), 0.0).astype(np.float32)
        exclude = self._exclusions(queries)
        ks = np.array([q.k for q in queries])
        wanted = np.minimum(ks, model.n_items - np.array([len(q.exclude) for q in queries]))
        answers: list[dict[str, Any] | None] = [None] * len(queries)
        todo = np.arange(len(queries))
        base = max(ann.fetch, 2 * int(ks.max()))
        # exclusions take candidates away: fetch as many more, and search as much more thoroughly
        fetch = base + exclude.shape[1]
        effort = fetch / base
        while len(todo) and fetch < model.n_items:
            candidates = np.concatenate([ann.search(query_vectors[todo], fetch, effort), seen[todo]], axis=1)
            bonus = None
            if per_position is not None:
                rows_seen, rows_values = seen[todo], per_position[todo]

                def bonus(c: np.ndarray) -> np.ndarray:
                    return ((c[:, :, None] == rows_seen[:, None, :]) * rows_values[:, None, :]).sum(-1)
            items, scores = rerank(candidates, query_vectors[todo], vectors, int(ks[todo].max()), bonus,
                                   exclude[todo])
            found = (items >= 0).sum(1)
            for row, r in enumerate(todo.tolist()):
                if found[row] >= wanted[r]:
                    answers[r] = self._answer(items[row, :ks[r]], scores[row, :ks[r]], model, "ann")
            todo = np.array([r for r in todo.tolist() if answers[r] is None], dtype=np.int64)
            fetch, effort = fetch * 4, effort * 4  # a retry reads four times as much of the index
        if len(todo):  # exclusions swallowed every candidate the index offered: the whole catalog, exactly
            exact = self._recommend_rows_exact([queries[r] for r in todo.tolist()], model)
            for r, answer in zip(todo.tolist(), exact):
                answers[r] = {**answer, "retrieval": "exact"}
        return answers  # type: ignore[return-value]

    @staticmethod
    def _answer(items: np.ndarray, scores: np.ndarray, model: OnnxModel, retrieval: str | None = None
                ) -> dict[str, Any]:
        keep = items >= 0  # -1 marks "fewer allowed items than k"
        answer = {"items": [model.item_vocab[i] for i in items[keep].tolist()], "scores": scores[keep].tolist(),
                  "cold_start": False, "score_kind": "model"}
        if retrieval is not None:
            answer["retrieval"] = retrieval
        return answer

    def _recommend_rows_exact(self, queries: list[Query], model: OnnxModel) -> list[dict[str, Any]]:
        """The recommend graph over the whole catalog, in calls of at most ``EXACT_SCORES_PER_CALL``
        scores (a batch of 1,024 requests over 5M items would otherwise hold 20 GB of scores)."""
        rows = max(1, EXACT_SCORES_PER_CALL // max(model.n_items, 1))
        if len(queries) > rows:
            return [a for i in range(0, len(queries), rows) for a in self._recommend_rows_exact(queries[i:i + rows], model)]
        feed: dict[str, np.ndarray] = {"exclude": self._exclusions(queries),
                                       "k": np.array(max(q.k for q in queries), np.int64)}
        if model.kind == "two_tower":
            feed["history"], feed["lengths"] = self._histories(queries)
            self._with_user_features(feed, queries, model)
        else:
            feed["user"] = np.array([q.user for q in queries], dtype=np.int64)
        items, scores = model.run_recommend(feed)
        retrieval = "exact" if model.ann is not None else None
        return [self._answer(items[r, :q.k], scores[r, :q.k], model, retrieval) for r, q in enumerate(queries)]

    def _cold_start(self, q: Query, model: OnnxModel) -> dict[str, Any]:
        if q.endpoint == "score":
            return {"items": list(q.items), "scores": model.popularity[q.item_idx].tolist(), "cold_start": True,
                    "cold_start_reason": q.cold_start_reason, "score_kind": "popularity"}
        order = model.popularity_order
        if q.exclude.size:
            order = order[~np.isin(order, q.exclude)]
        top = order[:q.k]
        return {"items": [model.item_vocab[i] for i in top.tolist()], "scores": model.popularity[top].tolist(),
                "cold_start": True, "cold_start_reason": q.cold_start_reason, "score_kind": "popularity"}

    def _score_row(self, q: Query, model: OnnxModel) -> dict[str, Any]:
        if model.score_session is None:
            raise RequestError(f"this model was loaded without its score graph ({'; '.join(model.warnings)})", 501)
        if not q.items:
            return {"items": [], "scores": [], "cold_start": False, "score_kind": "model"}
        if model.kind == "two_tower" and model.repeat_mode == "mixture":
            # a mixture score is a probability over the whole catalog: read it from the recommend graph
            feed = self._with_user_features({"history": q.history[None, :],
                                             "lengths": np.array([len(q.history)], np.int64),
                                             "exclude": np.zeros((1, 0), np.int64),
                                             "k": np.array(model.n_items, np.int64)}, [q], model)
            items, ranked = model.run_recommend(feed)
            by_item = np.empty(model.n_items, dtype=np.float32)
            by_item[items[0]] = ranked[0]
            scores = by_item[q.item_idx]
        elif model.kind == "two_tower":
            feed = self._with_user_features({"history": q.history[None, :],
                                             "lengths": np.array([len(q.history)], np.int64)}, [q], model)
            names = ["query"] + (["repeat_bonus"] if model.repeat_bonus is not None else [])
            outputs = model.score_session.run(names, feed)
            assert model.item_vectors is not None
            scores = model.item_vectors[q.item_idx] @ outputs[0][0]  # (n,)
            slot_values = outputs[1][0] if len(outputs) > 1 else None
            scores = scores + model.history_bonus(q.history, q.item_idx, slot_values)  # the recommend graph's score
        else:
            (scores,) = model.score_session.run(["scores"], {"user": np.full(len(q.items), q.user, np.int64),
                                                            "item": q.item_idx})
        return {"items": list(q.items), "scores": scores.tolist(), "cold_start": False, "score_kind": "model"}
