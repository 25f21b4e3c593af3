"""Approximate nearest-neighbour retrieval over a two-tower model's item vectors: numpy + faiss, no torch.

Shared by the export (which builds, tunes and writes the index) and the scorer (which loads it and
searches it). A two-tower score is a dot product, ``query . item_vector`` (maximum inner product
search, not nearest neighbours: item norms differ and matter).

Both index kinds search the standard inner-product-to-L2 reduction (Bachrach et al. 2014): an
item vector gets one more coordinate, ``sqrt(R^2 - |v|^2)`` with ``R`` the largest item norm, a
query gets 0 there; ``|q' - v'|^2 = |q|^2 + R^2 - 2 q.v``, so the nearest items are exactly the
highest-scoring ones. ``python bench/ann.py --compare-spaces`` measures the alternatives on a
drawn catalog (README, Large catalogs): HNSW searched by inner product directly can stall below
the target whatever the effort (items never reached in an inner-product graph).

An exact head before either kind. A two-tower model's top answers come from few items: training
gives popular, broadly liked items the largest norms, and ``q . v = |q| |v| cos`` favours them. On
the drawn 1M-item catalog of ``bench/ann.py`` 99% of exact top-10 answers are among the 1.6% of
items with the largest norms, while the reduction puts those items far from everything else and
an IVF over the whole catalog had to read 5-6% of it to reach recall .97. So the ``head`` items
with the largest norms (default 2% of the catalog, at most 32,768) are scored exactly on every
query (one small GEMV), and the index covers only the other items, reduced with *their* largest
norm (a smaller radius: less distortion). The union of the head's and the index's candidates is
re-scored. On catalogs whose norms are all alike the head is one more 2% sample scanned exactly;
the search effort is tuned for the target recall either way. ``head=0`` is a plain index.

Index kinds (over the items outside the head):

* ``ivf`` (``IndexIVFFlat``): items bucketed by k-means into ``nlist`` lists, ``nprobe`` lists
  read per query. Recall grows steadily with ``nprobe`` up to exact (all lists), so a target is
  always reachable. The export's default.
* ``hnsw`` (``IndexHNSWFlat``): a navigable small-world graph; no training; memory: the vectors
  plus ``2 M`` links per item; it builds 7x slower than IVF at 1M items. On the drawn catalogs
  its recall stalled without a head (.88 at 1M items, ef 1024).

The index returns candidates only: the scorer re-scores them exactly (repeat bonus, exclusions,
the documented tie rule) and keeps the top K (:func:`rerank`). How many it fetches and the search
effort are tuned at export on queries from the model's own query graph (:func:`tune`).

File format 2 (``to_bytes``): an uncompressed ``.npz`` (read with ``allow_pickle=False``) holding
``head_ids``, ``head_vectors`` and ``index`` (the serialised faiss index, whose ids are catalog
indices). Format 1 files (a bare faiss index, no head) still load.
"""
from __future__ import annotations

import functools
import io
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

KINDS = ("hnsw", "ivf")
FORMAT_VERSION = "2"
MAX_HEAD = 32_768
HNSW_EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
IVF_NPROBE_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class AnnError(ValueError):
    """An index that cannot be built, read or used with the given vectors."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - faiss-cpu is a dependency
        raise AnnError("faiss is not installed: pip install faiss-cpu (or serve with --exact)") from exc
    return faiss


def augment_items(vectors: np.ndarray) -> tuple[np.ndarray, float]:
    """(N, d) item vectors -> (N, d + 1) float32 for an L2 index, and ``R^2`` (largest squared norm)."""
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = checked_norms(v)
    radius = float(norms.max())
    extra = np.sqrt(np.maximum(radius - norms, 0.0)).astype(np.float32)
    return np.hstack([v, extra[:, None]]), radius


def checked_norms(v: np.ndarray) -> np.ndarray:
    """Squared norms of a non-empty (items, dim) matrix of finite values (else AnnError)."""
    if v.ndim != 2 or not len(v):
        raise AnnError(f"item vectors must be a non-empty (items, dim) matrix, got shape {v.shape}")
    norms = squared_norms(v)
    if not np.all(np.isfinite(norms)):
        raise AnnError("item vectors hold NaN or infinite values")
    return norms


def squared_norms(vectors: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """(N,) squared norms summed in float64, a chunk of rows at a time (no float64 copy of the table)."""
    out = np.empty(len(vectors), dtype=np.float64)
    for start in range(0, len(vectors), chunk):
        rows = vectors[start:start + chunk].astype(np.float64)
        out[start:start + chunk] = np.einsum("ij,ij->i", rows, rows)
    return out


def augment_queries(queries: np.ndarray) -> np.ndarray:
    """(B, d) queries -> (B, d + 1) float32 with a zero last coordinate."""
    q = np.asarray(queries, dtype=np.float32)
    return np.ascontiguousarray(np.hstack([q, np.zeros((len(q), 1), np.float32)]))


@dataclass
class AnnIndex:
    """An exact head plus a faiss index over the other items, with the settings they were built and tuned with.

    Attributes:
        index: the faiss index over the items outside the head (its ids are catalog indices), or
            None when the head holds the whole catalog.
        settings: JSON-able build and search settings (``kind``, ``params``, ``search``, ``fetch``,
            ``n_items``, ``dim``, ``head``, ``recall_at_10``, ...): what goes into the model's metadata.
        head_ids: (H,) catalog indices of the items scored exactly on every query (largest norms).
        head_vectors: (H, d) float32 vectors of those items.
    """

    index: Any
    settings: dict[str, Any] = field(default_factory=dict)
    head_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    head_vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    @property
    def kind(self) -> str:
        return str(self.settings["kind"])

    @property
    def n_items(self) -> int:
        return len(self.head_ids) + (int(self.index.ntotal) if self.index is not None else 0)

    @property
    def fetch(self) -> int:
        """Candidates fetched per query before re-scoring (at least; the scorer adds exclusions)."""
        return int(self.settings.get("fetch", 100))

    @functools.cached_property
    def head_index(self) -> Any:
        """The head as a flat faiss index of 8-bit scalar-quantised vectors (per-dimension ranges): it
        only picks candidates, which are re-scored in float32. A quarter of the bytes (20k x 64 dims:
        1.3 MB, which stays in a core's L2 cache beside the rest of a request): the same answers on
        1,000 requests at 1M items and 12% less time a request than float16 (numpy float32: 0.29 ms
        for the scan alone)."""
        faiss = _faiss()
        index = faiss.IndexScalarQuantizer(self.head_vectors.shape[1], faiss.ScalarQuantizer.QT_8bit,
                                           faiss.METRIC_INNER_PRODUCT)
        index.train(self.head_vectors)
        index.add(self.head_vectors)
        return index

    def search_params(self, fetch: int, effort: float = 1.0) -> Any:
        """Per-call search parameters (thread-safe: nothing on the shared index is mutated): the tuned
        effort times ``effort`` (a retry after exclusions swallowed the candidates), HNSW ef >= ``fetch``."""
        search = self.settings.get("search", {})
        if self.kind == "hnsw":
            ef = int(np.ceil(int(search.get("ef_search", 64)) * effort))
            return self._params("hnsw", max(ef, int(fetch)))
        nprobe = int(np.ceil(int(search.get("nprobe", 8)) * effort))
        return self._params("ivf", min(nprobe, int(self.settings["params"]["nlist"])))

    def _params(self, kind: str, value: int) -> Any:
        """One faiss parameter object per (kind, value), made once (a SWIG object per request costs more
        than reading a list)."""
        made = self.__dict__.setdefault("_made_params", {})
        if (kind, value) not in made:
            faiss = _faiss()
            made[kind, value] = (faiss.SearchParametersHNSW(efSearch=value) if kind == "hnsw"
                                 else faiss.SearchParametersIVF(nprobe=value))
        return made[kind, value]

    def search(self, queries: np.ndarray, fetch: int, effort: float = 1.0) -> np.ndarray:
        """(B, d) queries -> (B, C) int64 candidate item indices (the head's best ``fetch`` and the
        index's), in no particular order; -1 where fewer were found. ``effort`` scales the search effort."""
        q = np.asarray(queries, dtype=np.float32)
        fetch = int(min(max(fetch, 1), self.n_items))
        parts = []
        if len(self.head_ids):
            _, best = self.head_index.search(q, min(fetch, len(self.head_ids)))
            parts.append(self.head_ids[best])
        if self.index is not None:
            take = min(fetch, int(self.index.ntotal))
            _, ids = self.index.search(augment_queries(q), take, params=self.search_params(take, effort))
            parts.append(ids.astype(np.int64, copy=False))
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)

    def to_bytes(self) -> bytes:
        """File format 2: an uncompressed npz of the head and the serialised faiss index."""
        buffer = io.BytesIO()
        index = _faiss().serialize_index(self.index) if self.index is not None else np.zeros(0, np.uint8)
        np.savez(buffer, head_ids=self.head_ids.astype(np.int64), head_vectors=self.head_vectors.astype(np.float32),
                 index=np.asarray(index, dtype=np.uint8))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes, settings: dict[str, Any]) -> "AnnIndex":
        """Read a serialised index; its size and width must match ``settings`` (else AnnError)."""
        faiss = _faiss()
        if settings.get("kind") not in KINDS:
            raise AnnError(f"unknown index kind {settings.get('kind')!r}; known: {KINDS}")
        head_ids, head_vectors, raw = np.zeros(0, np.int64), np.zeros((0, int(settings.get("dim", 0))), np.float32), blob
        if str(settings.get("format", "1")) != "1":
            try:
                with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
                    head_ids, head_vectors = arrays["head_ids"], arrays["head_vectors"]
                    raw = arrays["index"].tobytes()
            except Exception as exc:  # zipfile/ValueError/KeyError on a damaged or foreign file
                raise AnnError(f"not a rectrain index file ({type(exc).__name__}: {str(exc)[:200]})") from exc
        index = None
        if raw:
            try:
                index = faiss.deserialize_index(np.frombuffer(raw, dtype=np.uint8))
            except Exception as exc:  # faiss raises RuntimeError with a C++ message
                raise AnnError(f"not a faiss index ({str(exc).splitlines()[0][:200]})") from exc
        out = cls(index, dict(settings), np.asarray(head_ids, np.int64), np.ascontiguousarray(head_vectors, np.float32))
        width = index.d - 1 if index is not None else (head_vectors.shape[1] if head_vectors.ndim == 2 else -1)
        if out.n_items != int(settings.get("n_items", -1)) or width != int(settings.get("dim", -2)):
            raise AnnError(f"index holds {out.n_items} vectors of width {width + 1}; the model has "
                           f"{settings.get('n_items')} items of width {settings.get('dim')} (+1 for the transform)")
        if len(head_ids) and (head_ids.min() < 0 or head_ids.max() >= out.n_items):
            raise AnnError(f"index head names items outside the catalog of {out.n_items}")
        return out


def default_head(n_items: int) -> int:
    """Items scored exactly on every query: 2% of the catalog, at most MAX_HEAD (a float16 scan of
    ~0.1-0.2 ms). On the drawn 1M catalog a 1% head left recall@10 at .97-.98 whatever the IVF effort
    (answers beyond it are spread thin over the lists), 2% reached .99 at nprobe 1."""
    return int(min(MAX_HEAD, n_items // 50))


def default_nlist(n_items: int) -> int:
    """IVF lists: about 4 sqrt(N) (faiss's guideline), at least 1 and at most N / 39 (k-means needs 39 points a list)."""
    return int(max(1, min(round(4 * np.sqrt(n_items)), n_items // 39)))


def build_index(vectors: np.ndarray, kind: str = "hnsw", *, m: int = 32, ef_construction: int = 80,
                nlist: int | None = None, head: int | None = None, threads: int = 1, seed: int = 0) -> AnnIndex:
    """Build an exact head and an index over the other (N, d) item vectors (item ``i`` has id ``i``).

    Args:
        kind: ``hnsw`` or ``ivf`` (the index over the items outside the head).
        m, ef_construction: HNSW graph degree and build-time search width.
        nlist: IVF lists (default :func:`default_nlist` of the indexed items); k-means (10
            iterations) on at most 100 points a list.
        head: items with the largest norms scored exactly on every query (default :func:`default_head`; 0: none).
        threads: OpenMP threads for the build.
        seed: k-means seed (IVF); HNSW's level draws use faiss's fixed seed, so a build is repeatable.
    """
    faiss = _faiss()
    if kind not in KINDS:
        raise AnnError(f"unknown index kind {kind!r}; choose one of {KINDS}")
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = checked_norms(v)
    n, dim = v.shape
    head = default_head(n) if head is None else int(head)
    if not 0 <= head <= n:
        raise AnnError(f"head must be between 0 and the {n} items, got {head}")
    by_norm = np.argsort(-norms, kind="stable")  # largest first; ties: lower index first
    head_ids, rest_ids = np.sort(by_norm[:head]), np.sort(by_norm[head:])
    started = time.perf_counter()
    previous_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(max(1, int(threads)))
    index, radius = None, 0.0
    params: dict[str, Any] = {"head": head}
    search: dict[str, Any] = {}
    try:
        if len(rest_ids):
            data, radius = augment_items(v[rest_ids])
            width = data.shape[1]
            if kind == "hnsw":
                graph = faiss.IndexHNSWFlat(width, int(m))
                graph.hnsw.efConstruction = int(ef_construction)
                index = faiss.IndexIDMap(graph)
                index.add_with_ids(data, rest_ids)
                params.update({"M": int(m), "ef_construction": int(ef_construction)})
                search = {"ef_search": 64}
            else:
                lists = int(nlist or default_nlist(len(data)))
                index = faiss.IndexIVFFlat(faiss.IndexFlatL2(width), width, lists, faiss.METRIC_L2)
                index.cp.seed = int(seed)
                index.cp.niter = 10
                sample = data
                if len(data) > 100 * lists:  # k-means on 100 points a list: plenty for bucketing, minutes less at 5M
                    sample = data[np.random.default_rng(seed).choice(len(data), 100 * lists, replace=False)]
                index.train(sample)
                index.add_with_ids(data, rest_ids)
                params.update({"nlist": lists, "train_points": int(len(sample)), "seed": int(seed)})
                search = {"nprobe": min(8, lists)}
        elif kind == "ivf":
            params["nlist"] = 1
    finally:
        faiss.omp_set_num_threads(previous_threads)
    settings = {"format": FORMAT_VERSION, "kind": kind, "metric": "inner_product",
                "space": "exact head + l2 augmented index", "radius_sq": radius, "params": params, "search": search,
                "fetch": 50, "n_items": int(n), "dim": int(dim),
                "build_seconds": round(time.perf_counter() - started, 3),
                "build_threads": int(threads), "faiss": getattr(faiss, "__version__", "unknown")}
    return AnnIndex(index, settings, head_ids.astype(np.int64), np.ascontiguousarray(v[head_ids]))


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, chunk: int | None = None) -> np.ndarray:
    """(B, k) exact top-k item indices by ``q . v`` (score descending, lower index first on ties).

    The reference the index is measured against: numpy GEMM + argpartition, in chunks of queries
    (default: as many as keep a chunk's scores near 128 MB: 256 rows at 100k items, 6 at 5M).
    """
    q = np.asarray(queries, dtype=np.float32)
    v = np.asarray(vectors, dtype=np.float32)
    chunk = chunk or max(1, min(256, (1 << 25) // max(len(v), 1)))
    k = int(min(k, len(v)))
    out = np.empty((len(q), k), dtype=np.int64)
    for start in range(0, len(q), chunk):
        scores = q[start:start + chunk] @ v.T
        out[start:start + chunk] = top_k_rows(scores, k)
    return out


def top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """(B, N) scores -> (B, k) indices of the k best per row, score descending, lower index first on ties.

    ``argpartition`` picks an arbitrary member of a tie at the k-th place; every item tied with the
    k-th score is therefore taken back in before the final ordering, so the tie rule holds exactly.
    """
    b, n = scores.shape
    k = int(min(k, n))
    if k == n:
        part = np.broadcast_to(np.arange(n), (b, n))
    else:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    out = np.empty((b, k), dtype=np.int64)
    for r in range(b):
        cand = part[r]
        kth = scores[r, cand].min()
        if k < n and np.count_nonzero(scores[r] >= kth) > k:  # ties at the boundary: take all of them
            cand = np.flatnonzero(scores[r] >= kth)
        order = np.lexsort((cand, -scores[r, cand]))[:k]
        out[r] = cand[order]
    return out


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over rows of |found ∩ exact| / |exact| (rows of item indices; -1 entries never match)."""
    hits = [np.intersect1d(f[f >= 0], e).size / max(len(e), 1) for f, e in zip(found, exact)]
    return float(np.mean(hits)) if hits else 1.0


def rerank(candidates: np.ndarray, queries: np.ndarray, vectors: np.ndarray, k: int,
           bonus: Callable[[np.ndarray], np.ndarray] | None = None,
           exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact re-scoring of candidate items and the top ``k`` of each row, as the recommend graph ranks.

    Args:
        candidates: (B, C) item indices; -1 entries and repeats within a row are ignored.
        queries: (B, d); vectors: (N, d) the catalog's item vectors.
        bonus: optional (B, C) candidates -> (B, C) additive scores (the repeat bonus of history items).
        exclude: (B, E) item indices never returned (-1 padded).

    Returns:
        (B, k) items and (B, k) float32 scores, score descending, lower index first on ties; rows
        with fewer than ``k`` usable candidates end in item -1 with score -inf.
    """
    b, c = candidates.shape
    valid = candidates >= 0
    safe = np.where(valid, candidates, 0)
    scores = np.einsum("bcd,bd->bc", vectors[safe], np.asarray(queries, dtype=np.float32))
    if bonus is not None:
        scores = scores + bonus(safe)
    if exclude is not None and exclude.size:
        valid &= ~(safe[:, :, None] == exclude[:, None, :]).any(-1)
    scores = np.where(valid, scores, -np.inf).astype(np.float32)
    keyed_items = np.where(valid, safe, np.iinfo(np.int64).max)
    order = np.lexsort((keyed_items, -scores), axis=-1)  # score descending, then lower index
    items = np.take_along_axis(keyed_items, order, 1)
    ranked = np.take_along_axis(scores, order, 1)
    repeat = np.zeros_like(valid)
    repeat[:, 1:] = items[:, 1:] == items[:, :-1]  # a repeated candidate sorts next to itself
    keep = (ranked > -np.inf) & ~repeat
    out_items = np.full((b, k), -1, dtype=np.int64)
    out_scores = np.full((b, k), -np.inf, dtype=np.float32)
    slot = np.cumsum(keep, axis=1) - 1  # place of each kept candidate in its row's answer
    rows, cols = np.nonzero(keep & (slot < k))
    out_items[rows, slot[rows, cols]] = items[rows, cols]
    out_scores[rows, slot[rows, cols]] = ranked[rows, cols]
    return out_items, out_scores


def tune(index: AnnIndex, queries: np.ndarray, vectors: np.ndarray, *, target_recall: float = 0.98,
         k: int = 10, fetch: int = 50) -> dict[str, Any]:
    """Pick the least search effort whose re-ranked top-``k`` reaches ``target_recall`` against exact.

    Measured the way the scorer answers: ``fetch`` candidates from the index, re-scored exactly,
    top ``k`` kept. Sets ``index.settings["search"]``, ``["fetch"]`` and ``["recall_at_10"]``;
    returns what was tried. When no setting reaches the target the most thorough one is kept and
    ``reached`` is False (the caller decides whether that is acceptable).
    """
    exact = exact_top_k(queries, vectors, k)
    ladder: tuple[int, ...] = HNSW_EF_LADDER if index.kind == "hnsw" else IVF_NPROBE_LADDER
    key = "ef_search" if index.kind == "hnsw" else "nprobe"
    if index.kind == "ivf":
        ladder = tuple(p for p in ladder if p < index.settings["params"]["nlist"]) + (index.settings["params"]["nlist"],)
    else:
        ladder = tuple(e for e in ladder if e >= fetch) or (fetch,)
    if index.index is None:  # the head is the whole catalog: exact, nothing to tune
        ladder = ladder[:1]
    index.settings["fetch"] = int(fetch)
    tried: list[dict[str, Any]] = []
    chosen, recall = ladder[-1], 0.0
    for value in ladder:
        index.settings["search"] = {key: int(value)}
        candidates = index.search(queries, fetch)
        found, _ = rerank(candidates, queries, vectors, k)
        recall = recall_at_k(found, exact)
        tried.append({key: int(value), "recall": round(recall, 5)})
        if recall >= target_recall:
            chosen = value
            break
    index.settings["search"] = {key: int(chosen)}
    index.settings["fetch"] = int(fetch)
    index.settings["recall_at_10" if k == 10 else f"recall_at_{k}"] = round(recall, 5)
    index.settings["tuning"] = {"target_recall": target_recall, "k": k, "queries": int(len(queries)),
                                "reached": bool(recall >= target_recall), "tried": tried}
    return index.settings["tuning"]
