"""ANN retrieval: the index module against brute force, the export's index companion, the scorer's
candidate path against the exact graph, the exclusion fallback and reload pinning."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from rectrain.ann import (AnnError, AnnIndex, augment_items, augment_queries, build_index, exact_top_k, recall_at_k,
                          rerank, top_k_rows, tune)

pytest_plugins = ["tests.test_export_fixtures"]


def _vectors(n: int, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Items with a decaying spectrum and varied norms; queries are sums of a few items (as a
    session's query resembles the items it read), not isotropic noise, which no index is built for."""
    rng = np.random.default_rng(seed)
    scales = 1.0 / np.sqrt(np.arange(1, d + 1))
    items = (rng.standard_normal((n, d)) * scales * rng.gamma(4.0, 0.25, (n, 1))).astype(np.float32)
    queries = items[rng.integers(0, n, size=(200, 3))].sum(1) + 0.1 * rng.standard_normal((200, d)).astype(np.float32)
    return items, queries.astype(np.float32)


def _brute_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.array([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])


def test_augmentation_turns_the_highest_dot_product_into_the_nearest_item():
    items, queries = _vectors(500)
    augmented, radius = augment_items(items)
    assert augmented.shape == (500, 17) and radius == pytest.approx(float((items.astype(np.float64) ** 2).sum(1).max()))
    np.testing.assert_allclose((augmented ** 2).sum(1), radius, rtol=1e-5)  # every item on one sphere
    q = augment_queries(queries)
    distance = ((q[:, None, :] - augmented[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(distance.argmin(1), (queries @ items.T).argmax(1))


def test_exact_top_k_breaks_ties_by_lower_index_like_the_graph():
    scores = np.array([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k_rows(scores, 2), [[1, 2], [0, 1]])
    np.testing.assert_array_equal(top_k_rows(scores, 4), [[1, 2, 4, 5], [0, 1, 2, 3]])
    rng = np.random.default_rng(1)
    rounded = rng.integers(0, 5, size=(50, 40)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(top_k_rows(rounded, 7), _brute_top_k(rounded, 7))


def test_rerank_rescores_exactly_skips_padding_repeats_and_exclusions():
    items, queries = _vectors(60)
    q = queries[:3]
    candidates = np.array([[5, 7, 5, -1, 9, 11], [1, 2, 3, 4, 5, 6], [8, -1, -1, -1, -1, -1]])
    exclude = np.array([[7, -1], [2, 4], [-1, -1]])
    got_items, got_scores = rerank(candidates, q, items, k=3, exclude=exclude)
    for r in range(3):
        allowed = sorted({c for c in candidates[r] if c >= 0} - set(exclude[r]))
        scores = q[r] @ items[allowed].T
        order = np.lexsort((allowed, -scores))[:3]
        want = [allowed[i] for i in order]
        assert got_items[r, :len(want)].tolist() == want
        np.testing.assert_allclose(got_scores[r, :len(want)], np.sort(scores)[::-1][:len(want)], rtol=1e-6)
        assert (got_items[r, len(want):] == -1).all() and np.isneginf(got_scores[r, len(want):]).all()
    bonus_items, _ = rerank(candidates[1:2], q[1:2], items, k=1, bonus=lambda c: (c == 6) * 1e6)
    assert bonus_items.tolist() == [[6]]  # an additive bonus (the repeat mechanism) counts


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_index_reaches_the_tuned_recall_and_survives_a_round_trip(kind):
    items, queries = _vectors(4000)
    index = build_index(items, kind, m=16, ef_construction=40)
    tuning = tune(index, queries[:100], items, target_recall=0.97, fetch=40)
    assert tuning["reached"] and index.settings["recall_at_10"] >= 0.97
    held_out = queries[100:]
    found, _ = rerank(index.search(held_out, index.fetch), held_out, items, 10)
    assert recall_at_k(found, exact_top_k(held_out, items, 10)) >= 0.95  # on queries it was not tuned on
    again = AnnIndex.from_bytes(index.to_bytes(), json.loads(json.dumps(index.settings)))
    np.testing.assert_array_equal(again.search(held_out, 40), index.search(held_out, 40))
    assert again.kind == kind and again.n_items == 4000


def test_the_head_holds_the_largest_norms_and_is_always_searched():
    items, queries = _vectors(3000)
    index = build_index(items, "ivf", head=60)
    norms = np.linalg.norm(items, axis=1)
    assert sorted(index.head_ids.tolist()) == sorted(np.argsort(-norms)[:60].tolist())
    np.testing.assert_array_equal(index.head_vectors, items[index.head_ids])
    assert index.n_items == 3000 and index.index.ntotal == 2940 and index.settings["params"]["head"] == 60
    assert not set(index.head_ids.tolist()) & set(faiss_ids(index))  # each item lives in one place
    index.settings["search"] = {"nprobe": 1}
    got = index.search(queries[:50], 20)
    assert got.shape == (50, 40)  # 20 from the head, 20 from the lists read
    head_scores = queries[:50] @ index.head_vectors.T
    for row, scores in zip(got, head_scores):  # the head's best are found whatever the index's effort
        # (8-bit codes pick the head's 20; the margin of 5 covers their rounding at the boundary)
        assert set(index.head_ids[np.argsort(-scores)[:15]].tolist()) <= set(row.tolist())
    # a head of the whole catalog is exact search (its 8-bit picks are re-scored); a head of 0 is a plain index
    whole = build_index(items, "ivf", head=3000)
    assert whole.index is None and tune(whole, queries, items, fetch=30)["tried"][0]["recall"] == 1.0
    plain = build_index(items, "hnsw", head=0, m=8)
    assert len(plain.head_ids) == 0 and plain.index.ntotal == 3000
    with pytest.raises(AnnError, match="head must be between 0 and the 3000 items"):
        build_index(items, "ivf", head=3001)


def faiss_ids(index: AnnIndex) -> list[int]:
    """Every id stored in an IVF index's lists."""
    import faiss

    ivf = faiss.extract_index_ivf(index.index)
    invlists = ivf.invlists
    out = []
    for lst in range(ivf.nlist):
        size = invlists.list_size(lst)
        if size:
            out.extend(faiss.rev_swig_ptr(invlists.get_ids(lst), size).tolist())
    return out


def test_a_format_1_index_without_a_head_still_loads():
    import faiss

    from rectrain.ann import augment_items as augment

    items, queries = _vectors(500)
    data, _ = augment(items)
    bare = faiss.IndexIVFFlat(faiss.IndexFlatL2(17), 17, 4)
    bare.train(data)
    bare.add(data)
    settings = {"format": "1", "kind": "ivf", "params": {"nlist": 4}, "search": {"nprobe": 4}, "fetch": 10,
                "n_items": 500, "dim": 16}
    old = AnnIndex.from_bytes(faiss.serialize_index(bare).tobytes(), settings)
    assert len(old.head_ids) == 0 and old.n_items == 500
    found, _ = rerank(old.search(queries, 10), queries, items, 10)
    np.testing.assert_array_equal(found, exact_top_k(queries, items, 10))  # all 4 lists read: exact


def test_an_index_that_does_not_fit_the_model_is_refused():
    items, _ = _vectors(300)
    index = build_index(items, "hnsw", m=8, ef_construction=20)
    blob = index.to_bytes()
    with pytest.raises(AnnError, match="300 vectors of width 17; the model has 299 items"):
        AnnIndex.from_bytes(blob, {**index.settings, "n_items": 299})
    with pytest.raises(AnnError, match="not a rectrain index file"):
        AnnIndex.from_bytes(b"garbage" * 10, index.settings)
    with pytest.raises(AnnError, match="not a faiss index"):
        AnnIndex.from_bytes(b"garbage" * 10, {**index.settings, "format": "1"})
    with pytest.raises(AnnError, match="NaN or infinite"):
        build_index(np.full((10, 4), np.nan, np.float32))


# --- export and scorer ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ann_export(checkpoints, tmp_path_factory) -> Path:
    """The shared tiny two-tower model (128 items, repeat bonus) exported with an IVF index (the default kind)."""
    from rectrain.export import export_checkpoint
    from rectrain.export.onnx_export import AnnOptions

    out = tmp_path_factory.mktemp("ann") / "tt.onnx"
    report = export_checkpoint(checkpoints["two_tower"], out, ann=AnnOptions(kind="ivf", fetch=10, recall=0.99))
    assert report.ann is not None and report.files["ann_index"].name == "tt.ann.faiss"
    return out


def test_export_pins_the_index_and_records_its_settings(ann_export):
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(ann_export), load_external_data=False).metadata_props}
    companions = json.loads(meta["rectrain.companions"])
    settings = json.loads(meta["rectrain.ann"])
    index_file = ann_export.parent / companions["ann_index"]["file"]
    import hashlib

    assert hashlib.sha256(index_file.read_bytes()).hexdigest() == companions["ann_index"]["sha256"]
    assert settings["kind"] == "ivf" and settings["n_items"] == 128 and settings["params"]["nlist"] == 3
    assert settings["fetch"] == 10 and settings["recall_at_10"] >= 0.99 and settings["tuning"]["reached"]


def test_auto_builds_an_index_only_for_large_two_tower_catalogs():
    from rectrain.export.ann_index import AnnExportError, choose_kind

    assert choose_kind("auto", kind="two_tower", n_items=99_999, min_items=100_000, repeat_mode=None) is None
    assert choose_kind("auto", kind="two_tower", n_items=100_000, min_items=100_000, repeat_mode=None) == "ivf"
    assert choose_kind("auto", kind="two_tower", n_items=10**6, min_items=100_000, repeat_mode="mixture") is None
    assert choose_kind("auto", kind="ncf", n_items=10**6, min_items=100_000, repeat_mode=None) is None
    with pytest.raises(AnnExportError, match="NCF"):
        choose_kind("ivf", kind="ncf", n_items=10, min_items=1, repeat_mode=None)
    with pytest.raises(AnnExportError, match="mixture"):
        choose_kind("hnsw", kind="two_tower", n_items=10, min_items=1, repeat_mode="mixture")
    with pytest.raises(AnnExportError, match="ann must be one of"):
        choose_kind("faiss", kind="two_tower", n_items=10, min_items=1, repeat_mode=None)


def _requests(model, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    vocab = model.item_vocab
    out = []
    for i in range(n):
        history = [vocab[j] for j in rng.integers(0, len(vocab), size=rng.integers(1, 25))]
        exclude = [vocab[j] for j in rng.integers(0, len(vocab), size=rng.integers(0, 4))]
        out.append({"history": history, "k": int(rng.integers(1, 8)), "exclude": exclude,
                    "exclude_seen": bool(i % 2)})
    return out


def test_scorer_answers_from_the_index_as_the_exact_graph_does(ann_export):
    from rectrain.serving.scorer import Scorer

    ann = Scorer.load(ann_export)
    exact = Scorer.load(ann_export, exact=True)
    assert ann.model.ann is not None and ann.describe()["retrieval"] == "ann"
    requests = _requests(ann.model, 300)
    got, want = ann.recommend_many(requests), exact.recommend_many(requests)
    assert {a["retrieval"] for a in got} == {"ann"} and {a["retrieval"] for a in want} == {"exact"}
    same = sum(a["items"] == b["items"] for a, b in zip(got, want))
    assert same >= 297, f"{same} of 300 answers equal the exact graph's"
    for a, b in zip(got, want):
        assert len(a["items"]) == len(b["items"])
        if a["items"] == b["items"]:  # the same exact score, numpy against onnxruntime
            np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-5, atol=1e-5)
        assert not set(a["items"]) & set(requests[got.index(a)]["exclude"])


def test_exclusions_that_swallow_the_candidates_still_get_k_items(ann_export):
    from rectrain.serving.scorer import Scorer

    scorer = Scorer.load(ann_export)
    vocab = scorer.model.item_vocab
    history = [vocab[3], vocab[9]]
    first = scorer.recommend(history=history, k=5, exclude_seen=False)
    assert first["retrieval"] == "ann"
    # exclude the 100 best items of the exact ranking: the index's first candidates are all excluded
    ranked = Scorer.load(ann_export, exact=True).recommend(history=history, k=128, exclude_seen=False)["items"]
    answer = scorer.recommend(history=history, k=5, exclude=ranked[:100], exclude_seen=False)
    assert len(answer["items"]) == 5 and not set(answer["items"]) & set(ranked[:100])
    assert len(set(answer["items"]) & set(ranked[100:105])) >= 4 and answer["scores"] == sorted(answer["scores"], reverse=True)
    # all but three items excluded: three come back, from the exact fallback
    few = scorer.recommend(history=history, k=5, exclude=ranked[:125], exclude_seen=False)
    assert few["items"] == ranked[125:] and few["retrieval"] == "exact"


def test_batch_cli_uses_the_index_and_reports_requests_per_second(ann_export, tmp_path):
    import subprocess
    import sys

    from rectrain.serving.model import OnnxModel

    model = OnnxModel.load(ann_export)
    requests = tmp_path / "r.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in _requests(model, 50, seed=3)))
    out = tmp_path / "a.jsonl"
    result = subprocess.run([sys.executable, "serve_onnx.py", "batch", str(ann_export), str(requests), "-o", str(out)],
                            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "50 of 50 requests answered" in result.stderr and "requests/s" in result.stderr and "ann retrieval" in result.stderr
    answers = [json.loads(line) for line in out.read_text().splitlines()]
    assert [a["line"] for a in answers] == list(range(1, 51)) and all(a["retrieval"] == "ann" for a in answers)


def test_reload_swaps_graph_and_index_together(ann_export, exports, tmp_path):
    from rectrain.serving.model import ModelLoadError
    from rectrain.serving.scorer import Scorer

    folder = tmp_path / "serve"
    shutil.copytree(ann_export.parent, folder)
    main = folder / ann_export.name
    scorer = Scorer.load(main)
    serving = scorer.model.sha256
    index = folder / "tt.ann.faiss"
    # a missing index: the new set is incomplete, refused, the old pair keeps serving
    saved = index.read_bytes()
    index.unlink()
    with pytest.raises(ModelLoadError, match="tt.ann.faiss"):
        scorer.reload()
    assert scorer.model.sha256 == serving and scorer.model.ann is not None
    # an index of another export (same name, other bytes): refused by its sha256 pin
    items, _ = _vectors(128)
    index.write_bytes(build_index(items, "hnsw", m=8).to_bytes())
    with pytest.raises(ModelLoadError, match="sha256 does not match"):
        scorer.reload()
    assert scorer.recommend(history=[scorer.model.item_vocab[1]], k=3)["retrieval"] == "ann"
    # the right index back: reload succeeds; a set without any index (exact export) also loads
    index.write_bytes(saved)
    assert scorer.reload()["reloaded"]
    exact_main = exports["two_tower"]
    assert scorer.reload(exact_main)["reloaded"] and scorer.model.ann is None
    assert "retrieval" not in scorer.recommend(history=[scorer.model.item_vocab[1]], k=3)


def test_a_served_model_without_its_index_falls_back_to_exact_with_a_warning(ann_export, tmp_path):
    from rectrain.serving.scorer import Scorer

    folder = tmp_path / "noindex"
    shutil.copytree(ann_export.parent, folder)
    (folder / "tt.ann.faiss").unlink()
    scorer = Scorer.load(folder / ann_export.name)
    assert scorer.model.ann is None and any("ANN index tt.ann.faiss not found" in w for w in scorer.model.warnings)
    assert scorer.recommend(history=[scorer.model.item_vocab[2]], k=4)["items"]


def test_a_short_candidate_list_is_searched_again_with_more_candidates(ann_export, monkeypatch):
    from rectrain.serving.scorer import Scorer

    scorer, exact = Scorer.load(ann_export), Scorer.load(ann_export, exact=True)
    real_search, fetched = scorer.model.ann.search, []

    def stingy(queries, fetch, effort=1.0):  # the first search finds only 3 items (as an index at a low effort may)
        fetched.append((fetch, effort))
        ids = real_search(queries, fetch, effort)
        if len(fetched) == 1:
            ids[:, 3:] = -1
        return ids

    monkeypatch.setattr(scorer.model.ann, "search", stingy)
    history = [scorer.model.item_vocab[5]]
    answer = scorer.recommend(history=history, k=5, exclude_seen=False)
    assert fetched == [(10, 1.0), (40, 4.0)] and answer["retrieval"] == "ann"
    assert answer["items"] == exact.recommend(history=history, k=5, exclude_seen=False)["items"]


def test_exact_scoring_of_a_large_batch_runs_in_bounded_chunks(ann_export, monkeypatch):
    from rectrain.serving import scorer as scorer_module
    from rectrain.serving.scorer import Scorer

    scorer = Scorer.load(ann_export, exact=True)
    requests = _requests(scorer.model, 40, seed=5)
    whole = scorer.recommend_many(requests)
    monkeypatch.setattr(scorer_module, "EXACT_SCORES_PER_CALL", 128 * 7)  # 7 rows of 128 items per call
    calls = []
    real = scorer.model.run_recommend
    monkeypatch.setattr(scorer.model, "run_recommend", lambda feed: calls.append(len(feed["history"])) or real(feed))
    assert scorer.recommend_many(requests) == whole
    assert max(calls) == 7 and sum(calls) == sum(1 for r in requests if r["history"])


def test_an_hnsw_export_answers_as_the_exact_graph(checkpoints, tmp_path):
    from rectrain.export import export_checkpoint
    from rectrain.export.onnx_export import AnnOptions
    from rectrain.serving.scorer import Scorer

    report = export_checkpoint(checkpoints["two_tower"], tmp_path / "h.onnx",
                               ann=AnnOptions(kind="hnsw", fetch=10, m=8, recall=0.99))
    assert report.ann["kind"] == "hnsw" and report.ann["params"] == {"head": 2, "M": 8, "ef_construction": 80}
    ann, exact = Scorer.load(tmp_path / "h.onnx"), Scorer.load(tmp_path / "h.onnx", exact=True)
    requests = _requests(ann.model, 100, seed=7)
    same = sum(a["items"] == b["items"] for a, b in zip(ann.recommend_many(requests), exact.recommend_many(requests)))
    assert same >= 98
