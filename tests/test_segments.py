"""Customer segments: k-means recovery of planted groups, profiles by hand, the report files."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from sklearn.metrics import adjusted_rand_score  # noqa: E402

from rectrain.analytics.segments import fit_segments, parse_k_range  # noqa: E402
from rectrain.artifacts import assign_segments, load_segments  # noqa: E402
from rectrain.errors import RectrainError  # noqa: E402
from tests.conftest import ROOT, TINY_DATA  # noqa: E402


def planted_blobs(n_per_group: int = 100, groups: int = 4, dim: int = 16, noise: float = 0.25, seed: int = 0):
    """Users around ``groups`` random directions, each at a random length (activity must not matter)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(groups, dim))
    truth = np.repeat(np.arange(groups), n_per_group)
    x = centers[truth] + noise * rng.normal(size=(truth.size, dim))
    x *= rng.uniform(0.2, 5.0, size=(truth.size, 1))  # vector length: irrelevant after normalisation
    return x.astype(np.float32), truth


def test_kmeans_recovers_planted_groups_and_chooses_k_by_silhouette():
    x, truth = planted_blobs()
    fit = fit_segments(x, None, "2-8", seed=0)
    assert fit.k == 4 and fit.chosen_by == "silhouette"
    assert sorted(fit.silhouette) == list(range(2, 9))
    assert fit.silhouette[4] == max(fit.silhouette.values())
    assert adjusted_rand_score(truth, fit.labels) > 0.9
    # segments are numbered by size, and a scorer's numpy assignment reproduces the labels
    assert (np.diff(fit.sizes) <= 0).all()
    np.testing.assert_array_equal(assign_segments(x, fit.centroids, normalize=True), fit.labels)
    np.testing.assert_array_equal(fit.assign(x * 3.0), fit.labels)  # scale-free after L2 normalisation
    # deterministic for a seed
    again = fit_segments(x, None, (2, 8), seed=0)
    np.testing.assert_array_equal(again.labels, fit.labels)
    np.testing.assert_allclose(again.centroids, fit.centroids)


def test_segment_recovery_on_a_generated_log():
    """The project's generator with sharp taste groups: k-means on behaviour recovers them."""
    from rectrain.data.synthetic import generate_synthetic

    log = generate_synthetic(n_users=300, n_items=200, n_categories=12, n_groups=4, mean_length=60, min_length=30,
                             taste_concentration=0.05, seed=1)
    user = log.interactions["user"].astype(int).to_numpy()
    item = log.interactions["item"].astype(int).to_numpy()
    truth = log.extra["user_group"]
    by_category = np.zeros((300, 12))
    np.add.at(by_category, (user, log.extra["item_category"][item]), 1.0)
    by_item = np.zeros((300, 200))
    np.add.at(by_item, (user, item), 1.0)
    chosen = fit_segments(by_category, None, (2, 6), seed=0)
    assert chosen.k == 4
    assert adjusted_rand_score(truth, chosen.labels) > 0.9
    assert adjusted_rand_score(truth, fit_segments(by_item, 4, seed=0).labels) > 0.9
    random = np.random.default_rng(0).integers(0, 4, truth.size)
    assert abs(adjusted_rand_score(truth, random)) < 0.05


def test_bad_segment_requests_name_the_problem():
    x, _ = planted_blobs(n_per_group=5, groups=2)
    with pytest.raises(RectrainError, match="k must be >= 2"):
        fit_segments(x, 1)
    with pytest.raises(RectrainError, match="needs more than 10 users"):
        fit_segments(x, 10)
    with pytest.raises(RectrainError, match="NaN"):
        fit_segments(np.full((4, 2), np.nan), 2)
    assert parse_k_range("2-12") == (2, 12) and parse_k_range("5") == (5, 5)
    for bad in ("x-3", "1-4", "6-3"):
        with pytest.raises(RectrainError, match="k_range"):
            parse_k_range(bad)


def _prepared(train, valid, test, n_items, categories, cat_vocab):
    from rectrain.data.dataset import Interactions, PreparedData

    def inter(rows):
        rows = sorted(rows)
        u = np.array([r[0] for r in rows], np.int64)
        return Interactions(u, np.array([r[1] for r in rows], np.int64), np.arange(len(rows), dtype=np.float64))

    n_users = 1 + max(r[0] for r in train + valid + test)
    indptr = np.r_[0, np.cumsum([len(c) for c in categories])]
    return PreparedData(train=inter(train), valid=inter(valid), test=inter(test),
                        user_vocab=np.array([f"u{i}" for i in range(n_users)]),
                        item_vocab=np.array([f"i{i}" for i in range(n_items)]), split="leave_one_out", mask_seen=True,
                        item_titles=np.array([f"title {i}" for i in range(n_items)]),
                        category_vocab=np.array(cat_vocab), item_category_indptr=indptr.astype(np.int64),
                        item_category_index=np.array([c for cs in categories for c in cs], np.int64))


def test_profiles_lift_and_popularity_by_hand():
    from rectrain.analytics.reports import segment_profiles

    # items 0, 1: category A; item 2: category B. Users 0, 1 (segment 0) watch A; user 2 (segment 1) watches B.
    train = [(0, 0), (0, 1), (1, 0), (2, 2), (2, 0)]
    valid = [(0, 2), (1, 1), (2, 1)]
    test = [(0, 0), (2, 2)]
    data = _prepared(train, valid, test, 3, [[0], [0], [1]], ["A", "B"])
    profiles = segment_profiles(data, np.array([0, 0, 1]), min_item_events=1, top_categories=2)
    s = profiles.summary.set_index("segment")
    assert s.loc[0, "users"] == 2 and s.loc[1, "users"] == 1
    assert s.loc[0, "events"] == 6 and s.loc[1, "events"] == 4
    assert s.loc[0, "events_per_user_mean"] == pytest.approx(3.0)
    cats = profiles.categories.set_index(["segment", "category"])
    # segment 0: 5 of 6 events in A; all: 7 of 10 in A -> lift (5/6)/(7/10)
    assert cats.loc[(0, "A"), "lift"] == pytest.approx((5 / 6) / (7 / 10))
    assert cats.loc[(1, "B"), "lift"] == pytest.approx((2 / 4) / (3 / 10))
    assert s.loc[1, "top_categories"].startswith("B (1.67)")
    # popularity = users whose history holds the item: item 0 -> 3, item 1 -> 3, item 2 -> 2
    # segment 1's events: 2, 0, 1, 2 -> (2 + 3 + 3 + 2) / 4
    assert s.loc[1, "avg_item_popularity"] == pytest.approx(2.5)
    items = profiles.items[profiles.items.segment == 1].set_index("item_id")
    assert items.loc["i2", "lift"] == pytest.approx((2 / 4) / (3 / 10))


# --- end to end on tiny trained models ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A tiny MF and a tiny two-tower checkpoint trained for one epoch (a few seconds each)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rectrain.training import train

    base = tmp_path_factory.mktemp("segments")
    out = {}
    for model in ("mf", "two_tower"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=[
                f"paths.output_dir={base / model}", f"paths.cache_dir={base / 'cache'}", "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "callbacks.item_embeddings=null",
                "trainer.enable_model_summary=false", "logger=none", "trainer.max_epochs=1", f"model={model}",
                "test=false", *TINY_DATA])
        GlobalHydra.instance().clear()
        out[model] = Path(train(cfg)["best_checkpoint"])
    return out


@pytest.mark.parametrize("model", ["mf", "two_tower"])
def test_segment_checkpoint_writes_the_report(tiny_checkpoints, model, tmp_path):
    from rectrain.analytics.common import load_model_and_data
    from rectrain.analytics.reports import REPORT_FILES, segment_checkpoint
    from rectrain.analytics.user_vectors import user_vectors
    from rectrain.utils.io import file_sha256

    ckpt = tiny_checkpoints[model]
    loaded = load_model_and_data(ckpt)
    report = segment_checkpoint(ckpt, k=3, output=tmp_path / "seg", loaded=loaded)
    assert {p.name for p in report.files} == set(REPORT_FILES)
    for name in REPORT_FILES:
        assert (tmp_path / "seg" / name).stat().st_size > 0
    assert (tmp_path / "seg" / "segments.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the owner's map: user index -> segment, every user once
    with open(tmp_path / "seg" / "user_segments.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["user_index", "segment"]
    assert [int(r["user_index"]) for r in rows] == list(range(loaded.data().n_users))
    labels = np.array([int(r["segment"]) for r in rows])
    # no raw user id column in any shared file
    for name in ("segments.md", "segments.csv", "segment_categories.csv", "segment_items.csv", "segments.json"):
        assert "user_vocab" not in (tmp_path / "seg" / name).read_text()
    header = (tmp_path / "seg" / "segments.csv").read_text().splitlines()[0]
    assert "user" not in header.replace("users", "").replace("user_share", "").replace("events_per_user", "")

    # what export embeds: kind, centroids (k, d), the vector definition; nearest centroid = the segment
    for fname in ("segments.json", "segments.npz"):
        payload = load_segments(tmp_path / "seg" / fname)
        assert payload["kind"] == ("ncf" if model == "mf" else "two_tower")
        assert payload["centroids"].shape == (3, payload["dim"]) and payload["normalize"] == "l2"
        assert payload["vector"]["kind"] == payload["kind"]
        assert payload["checkpoint_sha256"] == file_sha256(ckpt)
    vectors = user_vectors(loaded.net, loaded.data()).vectors
    np.testing.assert_array_equal(assign_segments(vectors, payload["centroids"]), labels)
    assert sum(payload["sizes"]) == loaded.data().n_users


def test_two_tower_vectors_read_the_whole_history_like_training(tiny_checkpoints):
    from rectrain.analytics.common import load_model_and_data
    from rectrain.analytics.user_vectors import full_histories, pad_histories, user_vectors
    from rectrain.data.queries import RankingQueries
    from rectrain.tasks.two_tower import padded_histories

    loaded = load_model_and_data(tiny_checkpoints["two_tower"])
    data, net = loaded.data(), loaded.net
    indptr, items = full_histories(data)
    assert indptr[-1] == len(data.train) + len(data.valid) + len(data.test)
    rows = np.arange(data.n_users)
    n = data.n_users
    queries = RankingQueries(users=rows, target_indptr=np.zeros(n + 1, np.int64), target_items=np.zeros(0, np.int64),
                             exclude_indptr=np.zeros(n + 1, np.int64), exclude_items=np.zeros(0, np.int64),
                             history_indptr=indptr, history_items=items, n_items=data.n_items)
    for max_length in (3, net.max_length):
        ours = pad_histories(indptr, items, rows, max_length)
        theirs = padded_histories(queries, rows, max_length)
        np.testing.assert_array_equal(ours[0], theirs[0].numpy())
        np.testing.assert_array_equal(ours[1], theirs[1].numpy())
    vectors = user_vectors(net, data).vectors
    with torch.no_grad():
        one = net.query(*padded_histories(queries, np.array([5]), net.max_length))
    np.testing.assert_allclose(vectors[5], one[0].numpy(), rtol=1e-5, atol=1e-6)
    # the last test event is the most recent item read
    last = data.test.item[data.test.user == 5][-1]
    assert items[indptr[6] - 1] == last


def test_segment_command(tiny_checkpoints, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("segment_cli", ROOT / "segment.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli"
    code = cli.main([f"ckpt_path={tiny_checkpoints['mf']}", "k=null", "k_range=2-3", f"output={out}", "seed=1"])
    printed = capsys.readouterr().out
    assert code == 0 and "silhouette" in printed and (out / "segments.json").is_file()
    assert json.loads((out / "segments.json").read_text())["chosen_by"] == "silhouette"
    for argv, message in ((["k=8"], "ckpt_path=<checkpoint> is required"),
                          ([f"ckpt_path={tmp_path / 'none.ckpt'}"], "checkpoint not found"),
                          ([f"ckpt_path={tiny_checkpoints['mf']}", "k=1"], "k must be >= 2"),
                          ([f"ckpt_path={tiny_checkpoints['mf']}", "colour=red"], "unknown key 'colour'"),
                          ([f"ckpt_path={tiny_checkpoints['mf']}", "data.source.seed=5"], "not the data it was trained on")):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1
