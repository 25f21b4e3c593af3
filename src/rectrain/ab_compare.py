"""Offline A/B comparison of two exported models on the same held-out log, replayed.

Torch-free (numpy + the serving Scorer): what a service team can run on its own replay logs.

A *replay log* is JSON lines, one request per line, in raw ids: ``{"history": [...], "target": id}``
(``"targets": [...]`` for several; NCF models read ``"user"``). Each line is sent to both models
(or to the popularity list) exactly as a service would, and the top-K answers give per-request
paired metrics (HR/NDCG/MRR@K). The difference B - A is summarised with a seeded bootstrap 95%
confidence interval (requests resampled with replacement) and a paired sign-flip permutation test;
the verdict reads the primary metric: ``B better``, ``A better`` or ``no significant difference``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import numpy as np

from rectrain.evaluation.metrics import topk_metrics
from rectrain.utils.io import write_json_atomic, write_text_atomic

PRIMARY = "ndcg"


class Recommender(Protocol):
    def recommend_many(self, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]: ...


@dataclass
class PopularityRecommender:
    """Most popular items (training popularity from a model's metadata), history excluded when the
    model's protocol masks seen items: the baseline an exported model must beat."""

    item_vocab: list[str]
    popularity: np.ndarray
    mask_seen: bool = True

    @classmethod
    def from_model(cls, model: Any) -> "PopularityRecommender":
        return cls(list(model.item_vocab), np.asarray(model.popularity, dtype=np.float64), bool(model.mask_seen))

    def recommend_many(self, requests: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        order = np.lexsort((np.arange(len(self.item_vocab)), -self.popularity))  # popular first, lower index on ties
        ranked = [self.item_vocab[i] for i in order]
        answers = []
        for r in requests:
            k = int(r.get("k", 10))
            seen = {str(x) for x in r.get("history", [])} if self.mask_seen else set()
            seen |= {str(x) for x in r.get("exclude", [])}
            items = []
            for raw in ranked:  # walks at most k + |seen| items
                if raw not in seen:
                    items.append(raw)
                    if len(items) == k:
                        break
            answers.append({"items": items})
        return answers


def read_replay(path: str | Path) -> list[dict[str, Any]]:
    """Read a replay log; each line needs a ``target``/``targets`` and a ``history`` or ``user``."""
    requests = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {line_no}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not ("target" in row or "targets" in row):
                raise ValueError(f"{path}, line {line_no}: needs a 'target' (or 'targets')")
            requests.append(row)
    if not requests:
        raise ValueError(f"{path}: the replay log is empty")
    return requests


def _targets(request: dict[str, Any]) -> list[str]:
    raw = request.get("targets", request.get("target"))
    return [str(t) for t in (raw if isinstance(raw, list) else [raw])]


def per_request_metrics(answers: Sequence[dict[str, Any]], requests: Sequence[dict[str, Any]], k: int
                        ) -> dict[str, np.ndarray]:
    """HR/NDCG/MRR@k per request from the answered top-k lists (targets ranked by list position;
    :func:`rectrain.evaluation.metrics.topk_metrics`, the int8 check's arithmetic too)."""
    lists = [[str(item) for item in answer["items"][:k]] for answer in answers]
    targets = [list(dict.fromkeys(_targets(request))) for request in requests]  # distinct, in order
    return topk_metrics(lists, targets, k)


def bootstrap_ci(diff: np.ndarray, n_boot: int, rng: np.random.Generator, level: float = 0.95,
                 chunk: int = 200) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``diff`` (requests resampled with replacement)."""
    means = []
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, diff.size, size=(b, diff.size))  # (b, n)
        means.append(diff[idx].mean(1))
    means = np.concatenate(means)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def permutation_p_value(diff: np.ndarray, n_perm: int, rng: np.random.Generator, chunk: int = 200) -> float:
    """Two-sided paired sign-flip permutation test of mean(diff) = 0 (exact under symmetry, no normality)."""
    observed = abs(diff.mean())
    if observed == 0:
        return 1.0
    hits = 0
    for start in range(0, n_perm, chunk):
        b = min(chunk, n_perm - start)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(b, diff.size))
        hits += int((np.abs((signs * diff).mean(1)) >= observed - 1e-15).sum())
    return (hits + 1) / (n_perm + 1)


def compare(a: Recommender, b: Recommender, requests: Sequence[dict[str, Any]], k: int = 10,
            n_boot: int = 2000, n_perm: int = 2000, seed: int = 0, batch: int = 256,
            names: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Replay ``requests`` through both recommenders and compare them request by request.

    Returns a JSON-ready dict: per-metric means of A and B, the mean difference B - A with its
    bootstrap CI and permutation p-value, catalog coverage of each, and the verdict on NDCG@k.
    """
    asked = [{key: v for key, v in r.items() if key in ("history", "user", "exclude")} | {"k": k} for r in requests]
    answers = {}
    for name, model in zip(names, (a, b)):
        out: list[dict[str, Any]] = []
        for start in range(0, len(asked), batch):
            out += model.recommend_many(asked[start:start + batch])
        answers[name] = out
    metrics = {name: per_request_metrics(answers[name], requests, k) for name in names}
    rng = np.random.default_rng(seed)
    rows = {}
    for metric in metrics[names[0]]:
        da, db = metrics[names[0]][metric], metrics[names[1]][metric]
        diff = db - da
        lo, hi = bootstrap_ci(diff, n_boot, rng)
        rows[metric] = {names[0]: float(da.mean()), names[1]: float(db.mean()), "diff": float(diff.mean()),
                        "ci95": [lo, hi], "p_value": permutation_p_value(diff, n_perm, rng)}
    coverage = {name: len({i for ans in answers[name] for i in ans["items"][:k]}) for name in names}
    primary = rows[f"{PRIMARY}@{k}"]
    significant = primary["p_value"] < 0.05 and not (primary["ci95"][0] <= 0.0 <= primary["ci95"][1])
    verdict = "no significant difference"
    if significant:
        verdict = f"{names[1]} better" if primary["diff"] > 0 else f"{names[0]} better"
    return {"k": k, "n_requests": len(requests), "seed": seed, "bootstrap": n_boot, "permutations": n_perm,
            "names": list(names), "metrics": rows, "distinct_items_recommended": coverage,
            "primary_metric": f"{PRIMARY}@{k}", "verdict": verdict}


def to_markdown(report: dict[str, Any], labels: dict[str, str] | None = None) -> str:
    a, b = report["names"]
    labels = labels or {}
    lines = [f"# Offline A/B: {labels.get(a, a)} (A) vs {labels.get(b, b)} (B)", "",
             f"{report['n_requests']} replayed requests, top-{report['k']}; difference = B - A; 95% bootstrap CI "
             f"({report['bootstrap']} resamples, seed {report['seed']}); paired sign-flip permutation test "
             f"({report['permutations']} permutations).", "",
             "| metric | A | B | B - A | 95% CI | p |", "|---|---:|---:|---:|---|---:|"]
    for metric, row in report["metrics"].items():
        lo, hi = row["ci95"]
        lines.append(f"| {metric} | {row[a]:.4f} | {row[b]:.4f} | {row['diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}] "
                     f"| {row['p_value']:.4f} |")
    cov = report["distinct_items_recommended"]
    lines += ["", f"Distinct items recommended (coverage): A {cov[a]}, B {cov[b]}.", "",
              f"**Verdict ({report['primary_metric']}): {report['verdict']}.**", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], output_dir: str | Path, labels: dict[str, str] | None = None) -> None:
    out = Path(output_dir)
    write_json_atomic(out / "comparison.json", {**report, "labels": labels or {}})
    write_text_atomic(out / "comparison.md", to_markdown(report, labels))


def replay_requests_from_queries(queries: Any, item_vocab: Sequence[str], user_vocab: Sequence[str] | None = None
                                 ) -> Iterable[dict[str, Any]]:
    """Replay lines (raw ids) from evaluation queries: history, targets and, for NCF, the user."""
    for row in range(len(queries)):
        h = queries.history_items[queries.history_indptr[row]:queries.history_indptr[row + 1]]
        t = queries.target_items[queries.target_indptr[row]:queries.target_indptr[row + 1]]
        line: dict[str, Any] = {"history": [item_vocab[i] for i in h], "targets": [item_vocab[i] for i in t]}
        if user_vocab is not None:
            line["user"] = user_vocab[int(queries.users[row])]
        yield line
