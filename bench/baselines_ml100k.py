"""Popularity and item-kNN on ml-100k through rectrain's pipeline and evaluator.

Leave-one-out by time (ties in file order), full-catalog ranking with training+validation items
masked, score ties broken by the lower item index. The reference figures in
../shared/data/README.md were computed independently under the same protocol.

    python bench/baselines_ml100k.py [--data ../shared/data/ml-100k]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_DATA, require_dataset, timed  # noqa: E402

from rectrain.data.dataset import SplitConfig, load_or_prepare  # noqa: E402
from rectrain.data.preprocess import PreprocessConfig  # noqa: E402
from rectrain.data.sources import MovieLensSource  # noqa: E402
from rectrain.evaluation.baselines import ItemKNN, MostPopular  # noqa: E402
from rectrain.evaluation.ranking import evaluate_ranking, format_table  # noqa: E402
from rectrain.evaluation.sampled import evaluate_sampled  # noqa: E402

REFERENCE = {
    "most popular (reference)": {"hr@10": 0.0859, "ndcg@10": 0.0449, "mrr@10": 0.0326, "coverage@10": 0.054},
    "item-kNN (reference)": {"hr@10": 0.1092, "ndcg@10": 0.0563, "mrr@10": 0.0404, "coverage@10": 0.141},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "ml-100k")
    args = parser.parse_args()
    require_dataset(args.data / "u.data", "ml-100k")

    times: dict[str, float] = {}
    with timed(times, "read + preprocess + split"):
        data = load_or_prepare(MovieLensSource(str(args.data)), PreprocessConfig(dedup="first"),
                               SplitConfig("leave_one_out"), cache_dir=None)
    hist = data.history("test")
    queries = data.ranking_queries("test")
    popularity = data.item_popularity("test")
    rows, sampled_rows = {}, {}
    for name, model in (("most popular", MostPopular()), ("item-kNN (cosine, full)", ItemKNN())):
        start = time.perf_counter()
        model.fit(hist.user, hist.item, data.n_users, data.n_items)
        result = evaluate_ranking(model, queries, ks=(10,), item_popularity=popularity)
        times[f"{name}: fit + evaluate"] = time.perf_counter() - start
        rows[name] = result.summary()
        sampled = evaluate_sampled(model, queries, n_negatives=99, ks=(10,), seed=0)
        sampled_rows[name] = sampled.summary()
    rows.update(REFERENCE)

    print(f"ml-100k: {data.n_users} users, {data.n_items} items, {len(data.train)} train / {len(data.valid)} valid"
          f" / {len(data.test)} test events\n")
    print(format_table(rows, ["hr@10", "ndcg@10", "mrr@10", "coverage@10"], f"Test, {queries.protocol}"))
    print()
    print(format_table(sampled_rows, ["hr@10", "ndcg@10", "mrr@10"],
                       "Test, sampled protocol (1 positive + 99 sampled negatives) - comparison with papers only"))
    print()
    print("| stage | seconds |\n|---|---:|")
    for stage, seconds in times.items():
        print(f"| {stage} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
