"""MF, GMF, MLP and NeuMF on ml-100k with their tuned settings, beside popularity and item-kNN.

Each model is trained from its experiment file (``conf/experiment/ml100k_<model>.yaml``) through
``rectrain.training.train`` for every seed; the best checkpoint (by validation NDCG@10) is evaluated on
the test split: leave-one-out by time (ties in file order), full ranking of all 1,682 items with the
user's training + validation items masked, score ties broken by the lower item index. Table: mean ± sample
standard deviation over seeds. The sampled protocol (target + 99 sampled negatives, seed 0) is run on the
same checkpoints for comparison with papers only.

    python bench/ncf_ml100k.py [--models mf,gmf,mlp,neumf] [--seeds 0,1,2] [--data ../shared/data/ml-100k]
        [--threads 1] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import multiprocessing
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    DEFAULT_DATA,
    LEAN_OVERRIDES,
    compose_train_config,
    quiet_lightning,
    ready_datamodule,
    start_seeded_bench,
    trained_net,
)

import torch  # noqa: E402

from rectrain.evaluation.baselines import ItemKNN, MostPopular  # noqa: E402
from rectrain.evaluation.ranking import evaluate_ranking  # noqa: E402
from rectrain.evaluation.sampled import evaluate_sampled  # noqa: E402
from rectrain.training import train  # noqa: E402

METRICS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10")
SAMPLED_METRICS = ("hr@10", "ndcg@10", "mrr@10")
NAMES = {"mf": "MF", "gmf": "GMF", "mlp": "MLP", "neumf": "NeuMF"}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def net_score_fn(net: torch.nn.Module):
    @torch.no_grad()
    def score(queries, rows):
        return net.score_all(torch.as_tensor(queries.users[rows], dtype=torch.long))
    return score


def run_one(model: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Train one seed of one experiment; returns test metrics, sampled metrics and timings."""
    out_dir = tmp / f"{model}-seed{seed}"
    overrides = [*LEAN_OVERRIDES, f"experiment=ml100k_{model}", f"data.source.root={args.data}",
                 f"paths.cache_dir={tmp / 'cache'}", f"seed={seed}", *args.set]
    cfg = compose_train_config(overrides, out_dir)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = train(cfg)
    seconds = time.perf_counter() - start

    # the same prepared data as the run (same data config, cached), for the sampled protocol
    net, data = trained_net(results)
    queries = data.ranking_queries("test")
    sampled = evaluate_sampled(net_score_fn(net), queries, n_negatives=99, ks=(10,), seed=0).summary()
    return {"test": results["test"], "valid": results["valid"], "sampled": sampled, "seconds": seconds,
            "epochs": results["epochs_trained"], "best": results["best_checkpoint"].rsplit("/", 1)[-1]}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_lightning()



def baselines(args: argparse.Namespace, tmp: Path) -> tuple[dict, dict]:
    """Most popular and item-kNN through the same data and evaluator (as bench/baselines_ml100k.py)."""
    cfg = compose_train_config([*LEAN_OVERRIDES, "experiment=ml100k_mf", f"data.source.root={args.data}",
                                f"paths.cache_dir={tmp / 'cache'}"], tmp / "baselines")
    datamodule = ready_datamodule(cfg)
    data = datamodule.data
    hist = data.history("test")
    queries = data.ranking_queries("test")
    popularity = data.item_popularity("test")
    full, sampled = {}, {}
    for name, model in (("most popular", MostPopular()), ("item-kNN (cosine, full)", ItemKNN())):
        start = time.perf_counter()
        model.fit(hist.user, hist.item, data.n_users, data.n_items)
        full[name] = {**evaluate_ranking(model, queries, ks=(10,), item_popularity=popularity).summary(),
                      "seconds": time.perf_counter() - start}
        sampled[name] = evaluate_sampled(model, queries, n_negatives=99, ks=(10,), seed=0).summary()
    print(f"ml-100k: {data.n_users} users, {data.n_items} items, {len(data.train)} train / {len(data.valid)} valid"
          f" / {len(data.test)} test events; {queries.protocol}\n")
    return full, sampled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mf,gmf,mlp,neumf")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "ml-100k")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (per job)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (seconds/run then "
                        "counts shared cores)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for every run (e.g. trainer.max_epochs=5)")
    args = parser.parse_args()
    seeds = start_seeded_bench(args, "u.data", "ml-100k")
    models = [m.strip() for m in args.models.split(",") if m.strip()]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base_full, base_sampled = baselines(args, tmp)
        if args.jobs > 1:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init,
                                                        initargs=(args.threads,)) as pool:
                futures = {m: [pool.submit(run_one, m, s, args, tmp) for s in seeds] for m in models}
                runs = {m: [f.result() for f in fs] for m, fs in futures.items()}
        else:
            runs = {m: [run_one(m, s, args, tmp) for s in seeds] for m in models}

    print(f"Test, full ranking (leave-one-out, seen items masked), mean ± sd over seeds {seeds}; "
          f"torch.set_num_threads({args.threads}), {args.jobs} parallel job(s), CPU\n")
    print("| method | HR@10 | NDCG@10 | MRR@10 | coverage@10 | valid NDCG@10 | epochs run (best epoch, from 0) per seed | seconds/run |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in base_full.items():
        print(f"| {name} | {row['hr@10']:.4f} | {row['ndcg@10']:.4f} | {row['mrr@10']:.4f} | {row['coverage@10']:.4f} "
              f"| - | - | {row['seconds']:.1f} |")
    for m, rs in runs.items():
        cells = [mean_std([r["test"][k] for r in rs]) for k in METRICS]
        valid = mean_std([r["valid"]["ndcg@10"] for r in rs])
        epochs = ", ".join(f"{r['epochs']} ({r['best'].removeprefix('best-epoch').removesuffix('.ckpt').lstrip('0') or '0'})"
                           for r in rs)
        secs = statistics.mean(r["seconds"] for r in rs)
        print(f"| {NAMES.get(m, m)} (experiment=ml100k_{m}) | {' | '.join(cells)} | {valid} | {epochs} | {secs:.0f} |")

    print(f"\nTest, sampled protocol (target + 99 sampled negatives, seed 0) — **comparison with papers only**, "
          f"same checkpoints\n")
    print("| method | HR@10 | NDCG@10 | MRR@10 |\n|---|---:|---:|---:|")
    for name, row in base_sampled.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in SAMPLED_METRICS) + " |")
    for m, rs in runs.items():
        print(f"| {NAMES.get(m, m)} | " + " | ".join(mean_std([r["sampled"][k] for r in rs]) for k in SAMPLED_METRICS)
              + " |")

    pop, knn = base_full["most popular"], base_full["item-kNN (cosine, full)"]
    print("\nTargets (full ranking, test):")
    best_m, best_ndcg = None, -1.0
    for m, rs in runs.items():
        ndcg = [r["test"]["ndcg@10"] for r in rs]
        hr = [r["test"]["hr@10"] for r in rs]
        ok = min(ndcg) > pop["ndcg@10"] and min(hr) > pop["hr@10"]
        print(f"- {NAMES.get(m, m)} beats most popular on NDCG@10 and HR@10 in every seed: {'yes' if ok else 'NO'} "
              f"(worst seed NDCG@10 {min(ndcg):.4f} vs {pop['ndcg@10']:.4f}, HR@10 {min(hr):.4f} vs {pop['hr@10']:.4f})")
        if statistics.mean(ndcg) > best_ndcg:
            best_m, best_ndcg = m, statistics.mean(ndcg)
    if best_m is not None:
        worst = min(r["test"]["ndcg@10"] for r in runs[best_m])
        print(f"- best model {NAMES.get(best_m, best_m)} beats item-kNN on NDCG@10: "
              f"{'yes' if best_ndcg > knn['ndcg@10'] else 'NO'} (mean {best_ndcg:.4f}, worst seed {worst:.4f} "
              f"vs {knn['ndcg@10']:.4f})")


if __name__ == "__main__":
    main()
