"""Large catalogs: the scorer's ANN path beside its exact path and the numpy floor, at 100k-5M items.

Vectors: no public log here has a catalog of millions, so the catalogs are *drawn*: a two-tower GRU
is trained on ml-100k (``experiment=ml100k_two_tower``, or ``--ckpt``), a Gaussian mixture
(16 components, full covariance, sklearn) is fitted to its 1,682 item vectors, and N item vectors
are sampled from it. The model exported for each size is that trained model with its item table
replaced by the drawn vectors (tied embeddings: the GRU reads them too), so the query vectors come
from the trained query tower over drawn items. Popularity is Zipf (exponent 1) over a random order
of the items; request histories hold 1-20 items drawn by that popularity.

Per catalog size, each in a fresh process after the export:

* build seconds (2 threads), index MB, the search effort the export tuned (target recall@10 .98, the default);
* recall@10 of the scorer's ANN answers against its exact answers (same requests);
* one thread (onnxruntime, faiss, numpy BLAS): p50/p99 ms of a single request (batch 1; the paths take
  turns in blocks of 20 requests) and rows/s at batch 256 for the ANN path, the exact path (the recommend graph over the whole catalog) and the
  floor (numpy GEMM + argpartition + ordering of the top 10, on precomputed query vectors);
* the scorer's peak RSS after loading (ANN: the index, the graphs and the item vectors).

``--batch-queries N`` also runs ``serve_onnx.py batch`` over N generated requests at the
``--batch-size-items`` catalog and reports requests/s and peak RSS (streaming: RSS does not grow with N).

    python bench/ann.py [--sizes 100000,1000000,5000000] [--kinds ivf] [--batch-queries 1000000]
                        [--compare-head 1000000] [--compare-spaces] [--index-only-sizes 5000000]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread everywhere, before numpy/faiss load BLAS/OpenMP
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # common.py: imported where needed, so a measuring process stays torch-free

K = 10
BLOCK = 20  # requests timed in a row per path before the next path's turn


def rss_mb() -> float:
    """Peak RSS of this process image (VmHWM: unlike ru_maxrss it is not inherited from the forking parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the model and the drawn catalogs ------------------------------------------------------------
def train_ml100k(workdir: Path, data: Path) -> Path:
    from common import LEAN_OVERRIDES, compose_train_config, quiet_lightning

    from rectrain.training import train

    quiet_lightning()
    cfg = compose_train_config([*LEAN_OVERRIDES, "experiment=ml100k_two_tower", f"paths.data_dir={data}",
                                "trainer.max_epochs=8", "test=false", f"paths.cache_dir={workdir / 'cache'}"],
                               workdir / "ml100k")
    with contextlib.redirect_stdout(io.StringIO()):
        return Path(train(cfg)["best_checkpoint"])


def drawn_net(ckpt: Path, n_items: int, seed: int) -> tuple[Any, dict[str, Any], np.ndarray]:
    """The trained two-tower net with ``n_items`` drawn item vectors, its export facts, Zipf popularity."""
    import torch
    from sklearn.mixture import GaussianMixture

    from rectrain.runs import open_run

    run = open_run(ckpt)
    trained = run.net
    with torch.no_grad():
        trained_vectors = trained.item_vectors().numpy().astype(np.float64)
    mixture = GaussianMixture(16, covariance_type="full", random_state=seed).fit(trained_vectors)
    drawn, _ = mixture.sample(n_items)
    rng = np.random.default_rng(seed)
    drawn = drawn[rng.permutation(n_items)].astype(np.float32)
    config = {**trained.config, "n_items": n_items, "n_categories": 0}
    net = type(trained)(**config)
    per_item = [k for k, v in trained.state_dict().items()
                if k.startswith("item_tower.") or (v.ndim == 2 and v.shape[0] == trained.n_items)]
    state = {k: v for k, v in trained.state_dict().items() if k not in per_item}
    missing = net.load_state_dict(state, strict=False).missing_keys
    assert set(missing) <= set(per_item) | {k for k in net.state_dict() if k.startswith("item_tower.")}, missing
    with torch.no_grad():
        net.item_tower.id_embedding.weight.copy_(torch.from_numpy(drawn))
    popularity = np.zeros(n_items, np.int64)
    popularity[rng.permutation(n_items)] = np.maximum(1, (1e6 / np.arange(1, n_items + 1)).astype(np.int64))
    facts = {**run.facts, "n_items": n_items, "model_config": config,
             "item_vocab": [f"i{j}" for j in range(n_items)], "item_titles": [], "item_popularity": popularity.tolist()}
    facts.pop("config", None)
    return net, facts, popularity


def drawn_export(ckpt: Path, n_items: int, kind: str, out: Path, seed: int) -> dict[str, Any]:
    """Export the trained model with ``n_items`` drawn item vectors and an index of ``kind``."""
    from rectrain.export.onnx_export import AnnOptions, export_model

    net, facts, _ = drawn_net(ckpt, n_items, seed)
    started = time.perf_counter()
    report = export_model(net, facts, out, ann=AnnOptions(kind=kind, min_items=1, threads=2), seed=seed)
    return {"export_s": time.perf_counter() - started, "ann": report.ann,
            "index_mb": report.files["ann_index"].stat().st_size / 1e6,
            "graphs_mb": sum(p.stat().st_size for r, p in report.files.items() if r != "ann_index") / 1e6}


def requests_for(n_items: int, popularity: np.ndarray, n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    p = popularity / popularity.sum()
    lengths = rng.integers(1, 21, size=n)
    items = rng.choice(n_items, size=int(lengths.sum()), p=p)
    out, start = [], 0
    for length in lengths.tolist():
        out.append({"history": [f"i{j}" for j in items[start:start + length].tolist()], "k": K})
        start += length
    return out


# --- one size, measured in a fresh process -------------------------------------------------------
def measure(model_path: Path, requests: int, batches: int, seed: int) -> dict[str, Any]:
    """Runs in its own process: RSS after load, recall, latency and throughput of the three paths."""
    from rectrain.serving.scorer import Scorer

    ann = Scorer.load(model_path, threads=1, max_batch=4096)
    row: dict[str, Any] = {"rss_mb": rss_mb()}
    exact = Scorer(ann.model, threads=1, exact=True, max_batch=4096)  # the same loaded files, exact path
    model = ann.model
    vectors = model.item_vectors
    reqs = requests_for(model.n_items, model.popularity + 0.0, max(requests, 256 * batches, 1000), seed)

    def query_vectors(batch: list[dict[str, Any]]) -> np.ndarray:
        queries = [ann.parse(r, "recommend", model) for r in batch]
        history, lengths = ann._histories(queries)
        return model.score_session.run(["query"], {"history": history, "lengths": lengths})[0]

    def floor(q: np.ndarray) -> np.ndarray:
        scores = q @ vectors.T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        return np.take_along_axis(top, order, 1)

    # recall of the ANN answers against the exact ones, on 1,000 requests
    sample = reqs[:1000]
    got = ann.recommend_many(sample)
    want = [a for i in range(0, len(sample), 100) for a in exact.recommend_many(sample[i:i + 100])]
    row["recall@10"] = float(np.mean([len(set(a["items"]) & set(b["items"])) / max(len(b["items"]), 1)
                                      for a, b in zip(got, want)]))
    row["fallback_exact"] = sum(a.get("retrieval") == "exact" for a in got)
    # batch 1: the three paths take turns in blocks of BLOCK requests (each path meets the same noise of
    # the shared machine, and runs on its own warm caches, as a service doing only that would; every
    # request is timed, the first of a block too)
    singles = reqs[:requests]
    qv = query_vectors(singles)
    times: dict[str, list[float]] = {"ann": [], "exact": [], "floor": []}
    calls = {"ann": lambda i: ann.recommend(singles[i]), "exact": lambda i: exact.recommend(singles[i]),
             "floor": lambda i: floor(qv[i:i + 1])}
    for block in range(0, len(singles), BLOCK):
        for name, call in calls.items():
            for i in range(block, min(block + BLOCK, len(singles))):
                start = time.perf_counter()
                call(i)
                times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        warm = np.asarray(values[5:]) * 1e3
        row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = float(np.percentile(warm, 50)), float(np.percentile(warm, 99))
    # batch 256 (the exact path chunks by itself to bound memory; the floor in chunks of the same size)
    rows_per_exact = max(1, min(256, (1 << 25) // model.n_items))
    seconds = {"ann": 0.0, "exact": 0.0, "floor": 0.0}
    for b in range(batches):
        chunk = reqs[b * 256:(b + 1) * 256]
        q = query_vectors(chunk)
        start = time.perf_counter()
        ann.recommend_many(chunk)
        seconds["ann"] += time.perf_counter() - start
        start = time.perf_counter()
        exact.recommend_many(chunk)
        seconds["exact"] += time.perf_counter() - start
        start = time.perf_counter()
        for i in range(0, 256, rows_per_exact):
            floor(q[i:i + rows_per_exact])
        seconds["floor"] += time.perf_counter() - start
    for name, s in seconds.items():
        row[f"{name}_rows_s"] = 256 * batches / s
    row["exact_rows_per_call"] = rows_per_exact
    return row


def index_only(ckpt: Path, n_items: int, kind: str, seed: int, requests: int) -> dict[str, Any]:
    """The index alone (no ONNX export, whose memory grows ~10 GB per 1M items): drawn vectors,
    queries from the trained query tower (torch) on popularity-drawn histories, build + tune as the
    export does, then recall, single-thread p50/p99 of search + exact re-rank against the numpy floor."""
    import faiss
    import torch

    from rectrain.ann import build_index, exact_top_k, recall_at_k, rerank, tune
    from rectrain.export.ann_index import tuning_histories

    net, _, popularity = drawn_net(ckpt, n_items, seed)
    torch.set_num_threads(2)
    with torch.no_grad():
        vectors = net.item_vectors().numpy()

        def queries_for(n: int, s: int) -> np.ndarray:
            history, lengths = tuning_histories(popularity, int(net.max_length), n, s)
            history, lengths = torch.from_numpy(history), torch.from_numpy(lengths)
            return torch.cat([net.query(history[i:i + 256], lengths[i:i + 256]) / net.temperature
                              for i in range(0, n, 256)]).numpy()
        tuning, held_out = queries_for(2000, seed), queries_for(max(requests, 1000), seed + 1)
    index = build_index(vectors, kind, threads=2, seed=seed)
    tune(index, tuning, vectors, target_recall=0.98, fetch=100)
    faiss.omp_set_num_threads(1)
    found, _ = rerank(index.search(held_out, index.fetch), held_out, vectors, K)
    row = {"kind": kind, "items": n_items, "build_s": index.settings["build_seconds"], "search": index.settings["search"],
           "recall@10": recall_at_k(found, exact_top_k(held_out, vectors, K)), "index_mb": len(index.to_bytes()) / 1e6}
    times: dict[str, list[float]] = {"ann": [], "floor": []}
    for i in range(requests):
        q = held_out[i:i + 1]
        start = time.perf_counter()
        rerank(index.search(q, index.fetch), q, vectors, K)
        times["ann"].append(time.perf_counter() - start)
        start = time.perf_counter()
        scores = q @ vectors.T
        top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
        np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)
        times["floor"].append(time.perf_counter() - start)
    for name, values in times.items():
        warm = np.asarray(values[5:]) * 1e3
        row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = float(np.percentile(warm, 50)), float(np.percentile(warm, 99))
    return row


def compare_head(ckpt: Path, n_items: int, seed: int, requests: int) -> list[str]:
    """Why the index has an exact head: on one drawn catalog, where the exact top-10 answers sit in
    the norm order, and recall@10 / single-thread latency (search + exact re-rank of 100 candidates
    per source) of IVF without a head and with heads of 1% and 2%, over the same nprobe ladder."""
    import faiss
    import torch

    from rectrain.ann import build_index, exact_top_k, recall_at_k, rerank
    from rectrain.export.ann_index import tuning_histories

    net, _, popularity = drawn_net(ckpt, n_items, seed)
    torch.set_num_threads(2)
    with torch.no_grad():
        vectors = net.item_vectors().numpy()
        history, lengths = tuning_histories(popularity, int(net.max_length), 1000, seed + 1)
        queries = torch.cat([net.query(torch.from_numpy(history[i:i + 256]), torch.from_numpy(lengths[i:i + 256]))
                             / net.temperature for i in range(0, 1000, 256)]).numpy()
    exact = exact_top_k(queries, vectors, K)
    norms = np.einsum("ij,ij->i", vectors, vectors)
    norm_rank = np.empty(n_items, np.int64)
    norm_rank[np.argsort(-norms, kind="stable")] = np.arange(n_items)
    ranks = norm_rank[exact] / n_items * 100
    lines = [f"Exact top-10 answers of 1,000 queries over {n_items:,} drawn items, by the norm rank of the item: "
             f"median {np.percentile(ranks, 50):.2f}%, 90th percentile {np.percentile(ranks, 90):.2f}%, "
             f"99th {np.percentile(ranks, 99):.2f}%, largest {ranks.max():.2f}% of the catalog.", "",
             "| head | build s | nprobe: recall@10 (p50 ms) |", "|---|---|---|"]
    for head in (0, n_items // 100, n_items // 50):
        index = build_index(vectors, "ivf", head=head, threads=2, seed=seed)
        faiss.omp_set_num_threads(1)
        cells = []
        for nprobe in (1, 4, 16, 64, 256):
            index.settings["search"] = {"nprobe": nprobe}
            found, _ = rerank(index.search(queries, 100), queries, vectors, K)
            times = []
            for i in range(min(requests, 1000)):
                start = time.perf_counter()
                rerank(index.search(queries[i:i + 1], 100), queries[i:i + 1], vectors, K)
                times.append(time.perf_counter() - start)
            cells.append(f"{nprobe}: {recall_at_k(found, exact):.3f} ({np.percentile(times, 50) * 1e3:.2f})")
        lines.append(f"| {head:,} ({head / n_items:.0%}) | {index.settings['build_seconds']:.0f} | {', '.join(cells)} |")
    return lines


def compare_spaces(model_path: Path, seed: int) -> list[str]:
    """Why both index kinds search the L2 reduction: recall@10 (100 candidates re-ranked) of HNSW by
    inner product, HNSW on the reduction and IVF on it, on the same catalog and queries."""
    import faiss

    from rectrain.ann import augment_items, augment_queries, default_nlist, exact_top_k, recall_at_k, rerank
    from rectrain.serving.scorer import Scorer

    scorer = Scorer.load(model_path)
    model, vectors = scorer.model, scorer.model.item_vectors
    queries = [scorer.parse(r, "recommend", model) for r in requests_for(model.n_items, model.popularity + 0.0, 1000, seed + 1)]
    history, lengths = scorer._histories(queries)
    q = model.score_session.run(["query"], {"history": history, "lengths": lengths})[0]
    exact = exact_top_k(q, vectors, K)
    augmented, _ = augment_items(vectors)
    faiss.omp_set_num_threads(2)
    lines = [f"| index ({model.n_items:,} drawn items, 1,000 queries) | build s | effort: recall@10 |", "|---|---|---|"]

    def row(name: str, index: Any, queries: np.ndarray, params: list[Any], label: str, built: float) -> None:
        cells = []
        for p in params:
            _, ids = index.search(queries, 100, params=p)
            found, _ = rerank(ids.astype(np.int64), q, vectors, K)
            cells.append(f"{label} {getattr(p, 'efSearch', None) or p.nprobe}: {recall_at_k(found, exact):.3f}")
        lines.append(f"| {name} | {built:.0f} | {', '.join(cells)} |")

    for m in (32, 64):
        started = time.perf_counter()
        index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(vectors)
        row(f"HNSW by inner product, M {m}", index, q, [faiss.SearchParametersHNSW(efSearch=e) for e in (128, 256, 512)],
            "ef", time.perf_counter() - started)
    started = time.perf_counter()
    index = faiss.IndexHNSWFlat(augmented.shape[1], 32)
    index.hnsw.efConstruction = 80
    index.add(augmented)
    row("HNSW on the L2 reduction, M 32", index, augment_queries(q),
        [faiss.SearchParametersHNSW(efSearch=e) for e in (128, 256, 512)], "ef", time.perf_counter() - started)
    lists = default_nlist(model.n_items)
    started = time.perf_counter()
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(augmented.shape[1]), augmented.shape[1], lists)
    index.train(augmented[np.random.default_rng(seed).permutation(len(augmented))[:256 * lists]])
    index.add(augmented)
    row(f"IVF on the L2 reduction, {lists} lists", index, augment_queries(q),
        [faiss.SearchParametersIVF(nprobe=p) for p in (16, 32, 64)], "nprobe", time.perf_counter() - started)
    return lines


def batch_cli(model_path: Path, n: int, workdir: Path, seed: int) -> dict[str, Any]:
    """serve_onnx.py batch over ``n`` generated requests: requests/s and the scorer's peak RSS."""
    from rectrain.serving.model import OnnxModel

    model = OnnxModel.load(model_path)
    path = workdir / f"requests-{n}.jsonl"
    if not path.exists():
        with open(path, "w") as fh:
            for start in range(0, n, 100_000):
                for r in requests_for(model.n_items, model.popularity + 0.0, min(100_000, n - start), seed + start):
                    fh.write(json.dumps(r) + "\n")
    del model
    wrapper = ("import re, sys, runpy; sys.argv = ['serve_onnx.py'] + sys.argv[1:]\n"
               "try:\n    runpy.run_path('serve_onnx.py', run_name='__main__')\n"
               "finally:\n    print('peak_rss_kb', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1],"
               " file=sys.stderr)")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", wrapper, "batch", str(model_path), str(path),
                             "-o", str(workdir / "answers.jsonl"), "--batch-size", "256"],
                            capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"batch CLI failed: {result.stderr[-2000:]}")
    peak = int(result.stderr.rsplit("peak_rss_kb", 1)[1].split()[0])
    summary = [line for line in result.stderr.splitlines() if "requests answered" in line][-1]
    (workdir / "answers.jsonl").unlink()
    return {"queries": n, "wall_s": wall, "summary": summary, "peak_rss_mb": peak / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="100000,1000000,5000000")
    parser.add_argument("--kinds", default="ivf", help="index kinds, comma-separated (ivf, hnsw)")
    parser.add_argument("--ckpt", type=Path, help="a two-tower checkpoint (default: train one on ml-100k)")
    parser.add_argument("--data", type=Path, help="folder holding ml-100k/ (default: ../shared/data)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/rectrain-bench-ann"))
    parser.add_argument("--requests", type=int, default=300, help="single requests timed per path")
    parser.add_argument("--batches", type=int, default=8, help="batches of 256 timed per path")
    parser.add_argument("--batch-queries", type=int, default=0, help="also run the batch CLI over this many requests")
    parser.add_argument("--batch-size-items", type=int, default=1_000_000, help="catalog size of the batch CLI run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index-only-sizes", default="",
                        help="catalog sizes measured on the index alone, without an export (e.g. 5000000)")
    parser.add_argument("--compare-spaces", action="store_true",
                        help="also compare HNSW by inner product with HNSW and IVF on the L2 reduction (first size)")
    parser.add_argument("--compare-head", type=int, default=0, metavar="ITEMS",
                        help="also compare IVF without and with an exact head on a drawn catalog of ITEMS items")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)  # internal: one size in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.requests, args.batches, args.seed)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = args.ckpt
    if ckpt is None:
        from common import DEFAULT_DATA, require_dataset

        args.data = args.data or DEFAULT_DATA
        require_dataset(args.data.resolve() / "ml-100k" / "u.data", "MovieLens 100K")
        ckpt = train_ml100k(args.workdir, args.data.resolve())
    rows = []
    for kind in args.kinds.split(","):
        for size in [int(s) for s in args.sizes.split(",") if s]:
            out = args.workdir / f"{kind}-{size}" / "model.onnx"
            built = drawn_export(ckpt, size, kind, out, args.seed)
            measured = subprocess.run([sys.executable, __file__, "--measure", str(out), "--requests", str(args.requests),
                                       "--batches", str(args.batches), "--seed", str(args.seed)],
                                      capture_output=True, text=True, cwd=ROOT)
            if measured.returncode != 0:
                raise SystemExit(measured.stderr[-3000:])
            row = {"kind": kind, "items": size, **built, **json.loads(measured.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ann"} | {"search": row["ann"]["search"],
                             "build_s": row["ann"]["build_seconds"], "tuned_recall": row["ann"].get("recall_at_10")}),
                  flush=True)
    print()
    print("| index | items | build s | index MB | search | recall@10 | ANN p50 / p99 ms | exact p50 / p99 ms | "
          "floor p50 / p99 ms | ANN speed-up (p50) | exact / floor (p50) | ANN rows/s | exact rows/s | floor rows/s | scorer RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        search = ", ".join(f"{k} {v}" for k, v in r["ann"]["search"].items()) + f", fetch {r['ann']['fetch']}"
        print(f"| {r['kind']} | {r['items']:,} | {r['ann']['build_seconds']:.0f} | {r['index_mb']:.0f} | {search} | "
              f"{r['recall@10']:.4f} | {r['ann_p50_ms']:.2f} / {r['ann_p99_ms']:.2f} | "
              f"{r['exact_p50_ms']:.2f} / {r['exact_p99_ms']:.2f} | {r['floor_p50_ms']:.2f} / {r['floor_p99_ms']:.2f} | "
              f"{r['exact_p50_ms'] / r['ann_p50_ms']:.0f}x | {r['exact_p50_ms'] / r['floor_p50_ms']:.2f} | "
              f"{r['ann_rows_s']:,.0f} | {r['exact_rows_s']:,.0f} | {r['floor_rows_s']:,.0f} | {r['rss_mb']:,.0f} |")
    if args.index_only_sizes:
        print()
        print("| index alone | items | build s | index MB | search | recall@10 | search + re-rank p50 / p99 ms | "
              "floor p50 / p99 ms | speed-up (p50) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for size in [int(x) for x in args.index_only_sizes.split(",")]:
            r = index_only(ckpt, size, args.kinds.split(",")[0], args.seed, args.requests)
            search = ", ".join(f"{k} {v}" for k, v in r["search"].items())
            print(f"| {r['kind']} | {size:,} | {r['build_s']:.0f} | {r['index_mb']:.0f} | {search}, fetch 100 | "
                  f"{r['recall@10']:.4f} | {r['ann_p50_ms']:.2f} / {r['ann_p99_ms']:.2f} | "
                  f"{r['floor_p50_ms']:.2f} / {r['floor_p99_ms']:.2f} | {r['floor_p50_ms'] / r['ann_p50_ms']:.0f}x |",
                  flush=True)
    if args.compare_head:
        print()
        print("\n".join(compare_head(ckpt, args.compare_head, args.seed, args.requests)))
    if args.compare_spaces:
        first = args.workdir / f"{args.kinds.split(',')[0]}-{args.sizes.split(',')[0]}" / "model.onnx"
        print()
        print("\n".join(compare_spaces(first, args.seed)))
    if args.batch_queries:
        model = args.workdir / f"{args.kinds.split(',')[0]}-{args.batch_size_items}" / "model.onnx"
        if not model.exists():
            drawn_export(ckpt, args.batch_size_items, args.kinds.split(",")[0], model, args.seed)
        result = batch_cli(model, args.batch_queries, args.workdir, args.seed)
        print()
        print(f"batch CLI, {args.batch_size_items:,} items, {result['queries']:,} requests: {result['summary']}; "
              f"peak RSS {result['peak_rss_mb']:,.0f} MB; wall {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
