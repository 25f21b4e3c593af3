"""``debug=fast`` composes and runs with every data group (it once set generator sizes on file sources)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from rectrain.data.synthetic import generate_synthetic
from rectrain.training import train


def _synthetic_frame():
    log = generate_synthetic(n_users=60, n_items=40, mean_length=12, seed=3)
    return log.interactions, log.items


def _write_interactions(root: Path) -> list[str]:
    frame, _ = _synthetic_frame()
    path = root / "events.csv"
    frame.rename(columns={"user": "customer", "item": "sku", "timestamp": "ts"}).to_csv(path, index=False)
    return ["data=interactions", f"data.source.path={path}", "data.source.columns.user=customer",
            "data.source.columns.item=sku", "data.source.columns.timestamp=ts",
            "data.preprocess.min_user_interactions=2", "data.preprocess.min_item_interactions=2"]


def _write_movielens(root: Path) -> list[str]:
    frame, items = _synthetic_frame()
    folder = root / "ml-latest-small"
    folder.mkdir()
    ratings = frame.rename(columns={"user": "userId", "item": "movieId"}).assign(rating=4.0)
    ratings["timestamp"] = ratings["timestamp"].astype("int64")
    ratings[["userId", "movieId", "rating", "timestamp"]].to_csv(folder / "ratings.csv", index=False)
    movies = items.rename(columns={"item": "movieId"})
    movies["genres"] = movies["categories"].apply("|".join)
    movies[["movieId", "title", "genres"]].to_csv(folder / "movies.csv", index=False)
    return ["data=movielens", f"data.source.root={folder}"]


def _write_sessions(root: Path) -> list[str]:
    frame, _ = _synthetic_frame()
    path = root / "clicks.tsv"
    # every user's events as one session each (ids as SessionId), in time order
    frame.rename(columns={"user": "SessionId", "item": "ItemId", "timestamp": "Time"}).to_csv(
        path, sep="\t", index=False)
    return ["data=sessions", f"data.source.path={path}", "model=two_tower"]


@pytest.mark.parametrize("writer", [None, _write_interactions, _write_movielens, _write_sessions],
                         ids=["synthetic", "interactions", "movielens", "sessions"])
def test_debug_fast_runs_with_every_data_group(compose_cfg, tmp_path, writer):
    overrides = writer(tmp_path) if writer else []
    results = train(compose_cfg("debug=fast", "logger=none", *overrides))
    assert results["status"] == "completed" and results["epochs_trained"] == 1
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["test"] and all(0.0 <= v <= 1.0 for k, v in saved["test"].items() if "@" in k and "pop" not in k)
