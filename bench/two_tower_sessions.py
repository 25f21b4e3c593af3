"""The two-tower model (GRU or transformer query tower) on yoochoose-clicks-100k (train_full -> test) beside popularity, item-kNN and session-kNN.

GRU4Rec's protocol: every test event after the first of its session is predicted from the session
prefix, ranked against the full catalog (items seen in training), **nothing masked** (a quarter of the
next clicks repeat the previous one); test items unseen in training are dropped. Recall@20 is the
evaluator's hr@20 (one target per query).

Tie rule: rectrain's evaluator breaks score ties by the *lower item index*, so a tied target counts
after every tied item of lower index. The reference figures in ../shared/data/README.md use
``rank = 1 + number of strictly greater scores`` (ties in the target's favour). Baselines with many
tied scores (item-kNN on the last click, popularity) come out lower here than there; their rows are
measured under our rule. A trained network's scores almost never tie, so the rule does not move it.

The two-tower model is trained from ``conf/experiment/yoochoose_two_tower.yaml`` (early stopping on
the latest ``data.split.valid_fraction`` of training sessions) once per seed; its best checkpoint is
evaluated on test.tsv. Table: mean ± sample sd over seeds.

    python bench/two_tower_sessions.py [--seeds 0,1,2] [--data ../shared/data/yoochoose-clicks-100k]
        [--threads 1] [--experiment yoochoose_two_tower | yoochoose_two_tower_transformer] [--sample-recent 500] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    start_seeded_bench,
    ready_datamodule,
    DEFAULT_DATA,
    LEAN_OVERRIDES,
    TrainEpochTimer,
    compose_train_config,
    encoder_name,
    mean_std,
    quiet_lightning,
)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rectrain.evaluation.baselines import ItemKNN, MostPopular, SessionKNN  # noqa: E402
from rectrain.evaluation.ranking import evaluate_ranking  # noqa: E402
from rectrain.training import train  # noqa: E402

METRICS = ("hr@20", "mrr@20", "hr@10", "coverage@20")
REFERENCE = {  # ../shared/data/README.md, rank = 1 + #strictly greater scores
    "most popular": (0.0894, 0.0264),
    "item-kNN (last item, self-sim 0)": (0.4622, 0.1931),
    "item-kNN (last item, self-sim 1)": (0.6818, 0.3714),
    "session-kNN (V-SKNN k=100, 500 recent)": (0.6980, 0.3509),
    "GRU4Rec official (mean of 3)": (0.680, 0.357),
    "GRU4Rec official, bpr-max": (0.684, 0.364),
}


def data_overrides(args: argparse.Namespace, tmp: Path) -> list[str]:
    return [f"data.source.path={args.data / 'train_full.tsv'}", f"data.source.test_path={args.data / 'test.tsv'}",
            f"paths.cache_dir={tmp / 'cache'}"]


def run_one(seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    overrides = [*LEAN_OVERRIDES, f"experiment={args.experiment}", *data_overrides(args, tmp), f"seed={seed}",
                 f"torch_threads={args.threads}", "+callbacks.epoch_timer._target_=common.TrainEpochTimer", *args.set]
    cfg = compose_train_config(overrides, tmp / f"seed{seed}")
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        results = train(cfg)
    timer = TrainEpochTimer.runs[-1]
    best = results["best_checkpoint"].rsplit("/", 1)[-1].removeprefix("best-epoch").removesuffix(".ckpt")
    return {"test": results["test"], "valid": results["valid"], "seconds": time.perf_counter() - start,
            "encoder": encoder_name(cfg),
            "epochs": results["epochs_trained"], "best": int(best) if best.isdigit() else -1,
            "epoch_s": statistics.median(timer.train_seconds) if timer.train_seconds else float("nan")}


def baselines(args: argparse.Namespace, tmp: Path) -> tuple[dict, dict]:
    """Popularity, item-kNN and session-kNN fitted on train + valid sessions (all of train_full)."""
    cfg = compose_train_config([*LEAN_OVERRIDES, f"experiment={args.experiment}", *data_overrides(args, tmp)],
                               tmp / "baselines")
    datamodule = ready_datamodule(cfg)
    data = datamodule.data
    hist = data.history("test")
    queries = data.ranking_queries("test")
    popularity = data.item_popularity("test")
    repeat = float(np.mean(queries.target_items == queries.history_items[queries.history_indptr[1:] - 1]))
    print(f"yoochoose-clicks-100k: {data.n_items} items; {len(data.train)} train / {len(data.valid)} valid "
          f"(latest sessions of train_full, early stopping) / {len(data.test)} test clicks; {len(queries)} test "
          f"queries; {repeat:.1%} of targets repeat the last click; {queries.protocol}; dropped: "
          f"{data.stats.get('eval_events_unseen_item_dropped', 0)} unseen-item and "
          f"{data.stats.get('short_session_events_dropped', 0)} short-session test events\n")
    models = {
        "most popular (every click counts)": MostPopular(distinct_users=False),
        "item-kNN (last item, self-sim 0)": ItemKNN(self_similarity=0.0, last_n=1),
        "item-kNN (last item, self-sim 1)": ItemKNN(self_similarity=1.0, last_n=1),
        f"session-kNN (V-SKNN k=100, {args.sample_recent} recent)": SessionKNN(k=100, sample_recent=args.sample_recent),
    }
    # session indices follow the file (session id) order; V-SKNN's "most recent" means by start time
    starts = np.full(data.n_users, np.inf)
    np.minimum.at(starts, hist.user, hist.timestamp)
    by_time = np.empty(data.n_users, dtype=np.int64)
    by_time[np.argsort(starts, kind="stable")] = np.arange(data.n_users)
    rows, seconds = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        users = by_time[hist.user] if isinstance(model, SessionKNN) else hist.user
        model.fit(users, hist.item, data.n_users, data.n_items)
        rows[name] = evaluate_ranking(model, queries, ks=(10, 20), item_popularity=popularity).summary()
        seconds[name] = time.perf_counter() - start
        rows[name]["ties"] = tie_views(model, queries)
    return rows, seconds


def tie_views(model, queries, k: int = 20, chunk: int = 1000) -> dict[str, float]:
    """Recall@k and MRR@k of a baseline with its score ties counted three ways: optimistic (rank =
    number of strictly greater scores: the reference's rule), in expectation over a random order of
    the tied items (the fair reading), and pessimistic. A trained network has no ties: all agree."""
    harmonic = np.r_[0.0, np.cumsum(1.0 / np.arange(1, len(queries.target_items) + queries.n_items + 2))]
    sums = dict.fromkeys(("hr_opt", "mrr_opt", "hr_rand", "mrr_rand", "hr_pess", "mrr_pess"), 0.0)
    for start in range(0, len(queries), chunk):
        rows = np.arange(start, min(len(queries), start + chunk))
        scores = np.asarray(model(queries, rows).cpu().numpy(), dtype=np.float64)
        target = scores[np.arange(rows.size), queries.target_items[rows]][:, None]
        greater = (scores > target).sum(1)
        ties = (scores == target).sum(1) - 1  # other items tied with the target
        last = np.minimum(greater + ties, k - 1)  # ranks greater..greater+ties are equally likely
        inside = np.maximum(last - greater + 1, 0)
        sums["hr_opt"] += (greater < k).sum()
        sums["mrr_opt"] += np.where(greater < k, 1.0 / (greater + 1), 0.0).sum()
        sums["hr_rand"] += (inside / (ties + 1)).sum()
        sums["mrr_rand"] += np.where(inside > 0, (harmonic[last + 1] - harmonic[greater]) / (ties + 1), 0.0).sum()
        sums["hr_pess"] += (greater + ties < k).sum()
        sums["mrr_pess"] += np.where(greater + ties < k, 1.0 / (greater + ties + 1), 0.0).sum()
    return {key: value / len(queries) for key, value in sums.items()}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_lightning()


def set_label(args: argparse.Namespace) -> str:
    return f"; --set {' '.join(args.set)}" if args.set else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "yoochoose-clicks-100k")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--experiment", default="yoochoose_two_tower")
    parser.add_argument("--sample-recent", type=int, default=500, help="session-kNN: recent sessions considered")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for the two-tower runs")
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel processes (seconds per "
                        "epoch then count shared cores)")
    parser.add_argument("--skip-model", action="store_true", help="baselines only")
    args = parser.parse_args()
    seeds = start_seeded_bench(args, "train_full.tsv", "yoochoose-clicks-100k")

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        base, base_seconds = baselines(args, tmp)
        if args.skip_model:
            runs = []
        elif args.jobs > 1:
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx, initializer=_worker_init,
                                                        initargs=(args.threads,)) as pool:
                runs = list(pool.map(run_one, seeds, [args] * len(seeds), [tmp] * len(seeds)))
        else:
            runs = [run_one(s, args, tmp) for s in seeds]

    print(f"Test (test.tsv), full ranking, session next-item, no masking; score ties -> lower item index "
          f"(stricter than the reference's rule, see the docstring); mean ± sd over seeds {seeds}; "
          f"torch.set_num_threads({args.threads}), {args.jobs} parallel job(s), CPU\n")
    print("| method | Recall@20 | MRR@20 | Recall@10 | coverage@20 | valid MRR@20 | epochs (best) | train s/epoch "
          "| seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in base.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4f}" for k in METRICS) +
              f" | - | - | - | {base_seconds[name]:.1f} |")
    if runs:
        cells = [mean_std([r["test"][k] for r in runs]) for k in METRICS]
        epochs = ", ".join(f"{r['epochs']} ({r['best']})" for r in runs)
        print(f"| two-tower {runs[0]['encoder']} (experiment={args.experiment}{set_label(args)}) | {' | '.join(cells)} | "
              f"{mean_std([r['valid']['mrr@20'] for r in runs])} | {epochs} | "
              f"{statistics.mean(r['epoch_s'] for r in runs):.1f} | {statistics.mean(r['seconds'] for r in runs):.0f} |")

    print("\nThe baselines' score ties, counted three ways (Recall@20 / MRR@20): optimistic = the reference's rule, "
          "random = expectation over a random order of tied items (the fair reading), pessimistic:\n")
    print("| method | optimistic | random order (expected) | pessimistic | our rule (lower index first) |")
    print("|---|---:|---:|---:|---:|")
    for name, row in base.items():
        t = row["ties"]
        print(f"| {name} | {t['hr_opt']:.4f} / {t['mrr_opt']:.4f} | {t['hr_rand']:.4f} / {t['mrr_rand']:.4f} "
              f"| {t['hr_pess']:.4f} / {t['mrr_pess']:.4f} | {row['hr@20']:.4f} / {row['mrr@20']:.4f} |")

    print("\nReference figures (../shared/data/README.md; rank = 1 + number of strictly greater scores, "
          "so tied baselines score higher there than under our rule):\n")
    print("| method | Recall@20 | MRR@20 |\n|---|---:|---:|")
    for name, (r20, m20) in REFERENCE.items():
        print(f"| {name} | {r20:.4f} | {m20:.4f} |")

    if not runs:
        return
    r20 = [r["test"]["hr@20"] for r in runs]
    m20 = [r["test"]["mrr@20"] for r in runs]
    print("\nPer seed (Recall@20 / MRR@20): " + ", ".join(f"seed {seed}: {r:.4f} / {m:.4f}"
                                                       for seed, r, m in zip(seeds, r20, m20)))
    print("\nTargets (test, Recall@20 and MRR@20):")
    contenders = {f"{name} (ours)": (row["hr@20"], row["mrr@20"]) for name, row in base.items()}
    contenders.update({f"{name} (ours, random tie order)": (row["ties"]["hr_rand"], row["ties"]["mrr_rand"])
                       for name, row in base.items()})
    contenders.update({f"{name} (reference)": v for name, v in REFERENCE.items()})
    for name, (c_r, c_m) in contenders.items():
        mean_ok = statistics.mean(r20) > c_r and statistics.mean(m20) > c_m
        every = min(r20) > c_r and min(m20) > c_m
        print(f"- two-tower beats {name}: {'yes' if mean_ok else 'NO'} on the mean ({statistics.mean(r20):.4f} vs "
              f"{c_r:.4f}, {statistics.mean(m20):.4f} vs {c_m:.4f}); every seed: {'yes' if every else 'no'}")


if __name__ == "__main__":
    main()
