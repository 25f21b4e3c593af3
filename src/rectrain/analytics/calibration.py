"""Calibrated interaction probabilities: Platt scaling fitted on the validation split.

A model trained with sampled negatives (NCF + BCE with ``n`` negatives per positive) or a softmax
(two-tower) outputs scores, not probabilities: BCE on a mix of 1 positive to ``n`` sampled negatives
learns P(positive | a pair from that mix), which over-states the real rate by orders of magnitude.
Here the question is "the probability that this user interacts with this item", for items the user
has not consumed yet, and

    p = sigmoid(a * score + b)

with ``score`` exactly what the scorer computes (NCF: the logit of ``forward``/``score_all``; two-tower:
``query . item_vector / temperature``). ``a`` and ``b`` minimise the *weighted* log loss on a
validation set that reflects the true base rate: for each validation user, the held-out item(s)
(label 1, weight 1) and ``m`` items sampled uniformly from the items the user never interacted with
(label 0, weight ``n_never / m``), so the weighted set stands for every (user, not-yet-consumed item)
pair. The test split is built the same way (another seed) to report ECE (15 equal-width bins,
weighted) and log loss before and after.

The negative-sampling rate of NCF training, ``r = n * train positives / unobserved pairs``, gives the
prior correction ``sigmoid(logit + log r)`` (what the model would output had it seen every pair);
it is reported as its own row and is the starting point of the Platt fit. The rate differs per user
(heavy users get more sampled negatives) and per item with popularity negatives (``alpha > 0``), which
a global correction cannot undo: that residual is what ``a`` and ``b`` fit.

Stored (:func:`rectrain.artifacts.write_calibration`) in ``calibration.json`` beside the checkpoint, keyed by the
checkpoint file's sha256: ``{"format": 1, "checkpoints": {sha256: entry}}``; ``entry["method"]``,
``entry["a"]``, ``entry["b"]`` is all a scorer needs (see :meth:`Calibration.metadata`).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rectrain.artifacts import (CALIBRATION_FORMAT, Calibration, default_calibration_path, sigmoid,
                                stored_calibration, write_calibration)
from rectrain.errors import RectrainError
from rectrain.utils.arrays import unique_ints

N_BINS = 15
FORMAT_VERSION = CALIBRATION_FORMAT
METHODS = ("platt", "temperature")
#: reliability diagrams leave out equal-width bins holding fewer pairs (their frequency is noise)
MIN_PLOTTED = 20


# --- metrics --------------------------------------------------------------------------------------
def _weights(y: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    return np.ones(y.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)


def log_loss(p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, eps: float = 1e-15) -> float:
    """Weighted mean binary cross-entropy of probabilities ``p`` for labels ``y``."""
    y = np.asarray(y, dtype=np.float64)
    w = _weights(y, weights)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1 - eps)
    return float(-(w * (y * np.log(p) + (1 - y) * np.log1p(-p))).sum() / w.sum())


def reliability_bins(p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, n_bins: int = N_BINS
                     ) -> dict[str, np.ndarray]:
    """Equal-width bins on [0, 1]: per bin the weight, the weighted mean prediction and outcome."""
    y = np.asarray(y, dtype=np.float64)
    p = np.asarray(p, dtype=np.float64)
    w = _weights(y, weights)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)  # p == 1 goes to the last bin
    weight = np.bincount(index, weights=w, minlength=n_bins)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, weights=w * p, minlength=n_bins) / weight
        mean_y = np.bincount(index, weights=w * y, minlength=n_bins) / weight
    return {"lower": edges[:-1], "upper": edges[1:], "weight": weight, "count": count, "mean_p": mean_p,
            "mean_y": mean_y}


def expected_calibration_error(p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None,
                               n_bins: int = N_BINS) -> float:
    """ECE: sum over equal-width bins of (bin weight / total) * |mean prediction - mean outcome|."""
    bins = reliability_bins(p, y, weights, n_bins)
    filled = bins["weight"] > 0
    total = bins["weight"].sum()
    gap = np.abs(bins["mean_p"][filled] - bins["mean_y"][filled])
    return float((bins["weight"][filled] / total * gap).sum())


def calibration_metrics(p: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """ECE (15 bins), log loss, weighted mean prediction and base rate."""
    y = np.asarray(y, dtype=np.float64)
    w = _weights(y, weights)
    return {"ece": expected_calibration_error(p, y, w), "log_loss": log_loss(p, y, w),
            "mean_p": float((w * np.asarray(p, dtype=np.float64)).sum() / w.sum()),
            "base_rate": float((w * y).sum() / w.sum())}


# --- fitting --------------------------------------------------------------------------------------
def fit_platt(scores: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None, *, init: tuple[float, float] = (1.0, 0.0),
              fit_bias: bool = True, max_iter: int = 100, tol: float = 1e-10) -> tuple[float, float]:
    """(a, b) minimising the weighted log loss of ``sigmoid(a * scores + b)`` (Newton's method).

    A two-parameter logistic regression: convex, so Newton with step halving converges from any
    start; ``fit_bias=False`` keeps ``b`` at ``init[1]`` (temperature scaling around a fixed offset).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    w = _weights(y, weights)
    if s.shape != y.shape or s.ndim != 1 or not s.size:
        raise RectrainError("fit_platt needs 1-d scores and labels of the same length")
    if not np.isfinite(s).all():
        raise RectrainError("scores hold NaN or inf")
    if not ((y == 0) | (y == 1)).all() or y.min() == y.max():
        raise RectrainError("calibration needs both positive and negative labels (0/1)")
    w = w / w.sum()
    theta = np.array(init, dtype=np.float64)
    features = np.stack([s, np.ones_like(s)], axis=1)  # (n, 2)
    free = np.array([True, fit_bias])

    def loss(t: np.ndarray) -> float:
        z = features @ t
        return float((w * (np.logaddexp(0.0, z) - y * z)).sum())

    current = loss(theta)
    for _ in range(max_iter):
        z = features @ theta
        p = sigmoid(z)
        grad = features.T @ (w * (p - y))
        hess = (features * (w * p * (1 - p))[:, None]).T @ features + 1e-12 * np.eye(2)
        step = np.zeros(2)
        step[free] = np.linalg.solve(hess[np.ix_(free, free)], grad[free])
        t = 1.0
        while t > 1e-8:
            candidate = theta - t * step
            new = loss(candidate)
            if new <= current + 1e-15:
                break
            t /= 2
        else:
            break
        theta, previous, current = candidate, current, new
        if np.abs(t * step).max() < tol or previous - current < 1e-14:
            break
    return float(theta[0]), float(theta[1])


def negative_sampling_rate(n_negatives: int, n_positive_events: int, n_unobserved_pairs: int) -> float:
    """Fraction of the unobserved (user, item) pairs an epoch of pointwise training samples as negatives."""
    if n_unobserved_pairs <= 0:
        raise RectrainError("no unobserved (user, item) pairs: every user consumed the whole catalog")
    return float(n_negatives) * float(n_positive_events) / float(n_unobserved_pairs)


def training_sampling_rate(data: Any, n_negatives: int) -> float:
    """``negative_sampling_rate`` of a PreparedData's training split (negatives exclude the user's positives)."""
    train = data.train
    distinct = unique_ints(train.user.astype(np.int64) * data.n_items + train.item).size
    return negative_sampling_rate(n_negatives, len(train), data.n_users * data.n_items - distinct)


# --- the evaluation pairs -------------------------------------------------------------------------
@dataclass
class PairSet:
    """(user/query row, item, label, weight) pairs standing for every not-yet-consumed pair of a split."""

    rows: np.ndarray  # index into ``queries``
    items: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    queries: Any  # RankingQueries of the stage, restricted to the sampled rows

    def __len__(self) -> int:
        return int(self.items.shape[0])


def calibration_pairs(data: Any, stage: str, negatives: int = 100, seed: int = 0,
                      max_users: int | None = None) -> PairSet:
    """Held-out positives of ``stage`` plus ``negatives`` uniform never-consumed items per user, weighted.

    A negative of user u gets weight ``n_never(u) / negatives``, where ``n_never(u)`` is the number
    of items u never interacted with (in any split): the weighted set then has the true base rate
    of "the user interacts with this not-yet-consumed item" among all such pairs. Items the user
    consumes later (e.g. the test item when ``stage`` is valid) are never labelled negative.
    """
    import torch

    from rectrain.data.batching import NegativeSampler, positive_keys

    if negatives < 1:
        raise RectrainError(f"negatives must be >= 1, got {negatives}")
    queries = data.ranking_queries(stage)
    rng = np.random.default_rng(seed)
    rows = np.arange(len(queries))
    if max_users is not None and rows.size > max_users:
        rows = np.sort(rng.choice(rows, size=max_users, replace=False))
        queries = queries.subset(rows)
        rows = np.arange(len(queries))
    if not rows.size:
        raise RectrainError(f"the {stage} split has no users to calibrate on")
    users = np.asarray(queries.users, np.int64)
    all_user = np.concatenate([data.train.user, data.valid.user, data.test.user]).astype(np.int64)
    all_item = np.concatenate([data.train.item, data.valid.item, data.test.item]).astype(np.int64)
    keys = positive_keys(all_user, all_item, data.n_items)
    consumed = np.bincount(keys // data.n_items, minlength=data.n_users)
    n_never = data.n_items - consumed[users]
    # positives: the stage's targets
    n_targets = np.diff(queries.target_indptr)
    pos_rows = np.repeat(rows, n_targets)
    pos_items = np.asarray(queries.target_items, np.int64)
    # negatives: uniform over never-consumed items (rejection sampling on sorted keys)
    sampler = NegativeSampler(data.n_items, positive_keys=keys, max_rounds=50)
    gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    neg = sampler.sample_for_users(torch.from_numpy(users), negatives, gen).numpy()  # (R, m)
    neg_rows = np.repeat(rows, negatives)
    neg_items = neg.reshape(-1)
    neg_keys = users[neg_rows] * data.n_items + neg_items
    at = np.minimum(np.searchsorted(keys, neg_keys), keys.size - 1)
    ok = keys[at] != neg_keys  # the few collisions left after rejection sampling are dropped
    ok &= n_never[neg_rows] > 0
    neg_rows, neg_items = neg_rows[ok], neg_items[ok]
    neg_weights = n_never[neg_rows] / float(negatives)
    return PairSet(rows=np.concatenate([pos_rows, neg_rows]), items=np.concatenate([pos_items, neg_items]),
                   labels=np.concatenate([np.ones(pos_items.size), np.zeros(neg_items.size)]),
                   weights=np.concatenate([np.ones(pos_items.size), neg_weights]), queries=queries)


def score_pairs(net: Any, pairs: PairSet, batch_size: int = 65536, user_features: np.ndarray | None = None
                ) -> np.ndarray:
    """The raw score the scorer computes for every pair (NCF logit; the two-tower recommend graph's
    score). ``user_features``: (n_users, F), for a query tower reading them."""
    import torch

    from rectrain.data.queries import pad_histories
    from rectrain.runs import NCF, model_kind

    net.eval()
    out = np.empty(len(pairs), dtype=np.float64)
    with torch.no_grad():
        if model_kind(net) == NCF:
            users = torch.from_numpy(np.asarray(pairs.queries.users, np.int64)[pairs.rows])
            items = torch.from_numpy(pairs.items)
            for start in range(0, len(pairs), batch_size):
                sl = slice(start, start + batch_size)
                out[sl] = net(users[sl], items[sl]).double().numpy()
            return out
        # two-tower: the model's own full-catalog scores of each query row (repeat mechanism included),
        # read at the pairs' items; rows in chunks, pairs sorted by row once
        q = pairs.queries
        order = np.argsort(pairs.rows, kind="stable")
        sorted_rows = pairs.rows[order]
        item_vectors = net.item_vectors()
        chunk = max(1, batch_size // max(int(item_vectors.shape[0]), 1))
        for start in range(0, len(q), chunk):
            rows = np.arange(start, min(len(q), start + chunk))
            lo, hi = np.searchsorted(sorted_rows, [rows[0], rows[-1] + 1])
            if lo == hi:
                continue
            padded, lengths = pad_histories(q.history_indptr, q.history_items, rows, net.max_length)
            h, n = torch.from_numpy(padded), torch.from_numpy(lengths)
            features = None if user_features is None else torch.from_numpy(user_features[q.users[rows]])
            full = net.score_histories(net.query(h, n, features), item_vectors, h, n)  # (chunk, I)
            picked = order[lo:hi]
            out[picked] = full[pairs.rows[picked] - start, pairs.items[picked]].double().numpy()
        return out


# --- the whole step -------------------------------------------------------------------------------
def fit_calibration(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None, *,
                    method: str = "platt", score: str = "score", sampling_rate: float | None = None) -> Calibration:
    """Fit ``method`` (platt: a and b; temperature: a only, b = log(sampling_rate) or 0) on weighted pairs."""
    if method not in METHODS:
        raise RectrainError(f"method must be one of {METHODS}, got {method!r}")
    prior = math.log(sampling_rate) if sampling_rate else None
    init_b = prior if prior is not None else 0.0
    a, b = fit_platt(scores, labels, weights, init=(1.0, init_b), fit_bias=method == "platt")
    return Calibration(method=method, a=a, b=b, score=score, negative_sampling_rate=sampling_rate,
                       prior_correction=prior)


@dataclass
class CalibrationReport:
    calibration: Calibration
    metrics: dict[str, dict[str, dict[str, float]]]  # split -> variant (raw/prior/calibrated) -> metrics
    calibration_file: Path | None
    files: list[Path]
    checkpoint_sha256: str

    def table(self) -> str:
        lines = ["| split | scores | ECE (15 bins) | log loss | mean p | base rate |", "|---|---|---:|---:|---:|---:|"]
        for split, variants in self.metrics.items():
            for variant, m in variants.items():
                lines.append(f"| {split} | {VARIANT_NAMES.get(variant, variant)} | {m['ece']:.5f} | {m['log_loss']:.5f} | "
                             f"{m['mean_p']:.5f} | {m['base_rate']:.5f} |")
        return "\n".join(lines)

    def summary(self) -> str:
        c = self.calibration
        head = f"{c.method}: p = sigmoid({c.a:.4f} * score + {c.b:.4f}) (fitted on {c.fitted_on}"
        head += f"; negative sampling rate {c.negative_sampling_rate:.3g})" if c.negative_sampling_rate else ")"
        where = f"stored in {self.calibration_file} under {self.checkpoint_sha256[:12]}" if self.calibration_file else ""
        return "\n".join([head, self.table(), where, "report: " + ", ".join(str(p) for p in self.files)])


VARIANT_NAMES = {"raw": "raw sigmoid(score)", "prior": "prior-corrected sigmoid(score + log r)",
                 "calibrated": "calibrated (Platt)"}


def calibrate_checkpoint(ckpt_path: str | Path, *, negatives: int = 100, method: str = "platt", seed: int = 0,
                         max_users: int | None = None, output: str | Path | None = None,
                         report_dir: str | Path | None = None, into_checkpoint: bool = False,
                         data_overrides: Sequence[str] = (), loaded: Any = None) -> CalibrationReport:
    """Fit the calibration of a checkpoint on its validation split, measure it on test, store it.

    Args:
        ckpt_path: a checkpoint written by ``train.py``.
        negatives: never-consumed items sampled per user (validation and test sets).
        method: ``platt`` (a, b) or ``temperature`` (a; b fixed at the prior correction).
        max_users: calibrate on at most this many users per split (sampled; None: all).
        output: the calibration file (default ``calibration.json`` beside the checkpoint); entries of
            other checkpoints in it are kept.
        report_dir: reliability diagram and markdown (default ``<checkpoint stem>-calibration`` beside it).
        into_checkpoint: also write ``<stem>.calibrated.ckpt``, a copy carrying
            ``ckpt["rectrain"]["calibration"]``.
        data_overrides: ``data.<key>=<value>`` applied to the checkpoint's data config.
    """
    from rectrain.analytics.common import load_model_and_data
    from rectrain.runs import NCF

    loaded = loaded or load_model_and_data(ckpt_path, data_overrides)
    data, net = loaded.data(), loaded.net
    kind = loaded.kind
    model_cfg = (loaded.config.get("model") or {}) if loaded.config is not None else {}
    rate = None
    training: dict[str, Any] = {"kind": kind}
    if kind == NCF:
        neg_cfg = model_cfg.get("negatives") or {}
        n_neg, alpha, loss = int(neg_cfg.get("n", 4)), float(neg_cfg.get("alpha", 0.0)), model_cfg.get("loss", "bce")
        training.update({"loss": loss, "negatives_per_positive": n_neg, "negatives_alpha": alpha})
        if loss == "bce":
            rate = training_sampling_rate(data, n_neg)
    else:
        training.update({"loss": model_cfg.get("loss"), "extra_negatives": model_cfg.get("extra_negatives")})
    valid = calibration_pairs(data, "valid", negatives, seed, max_users)
    test = calibration_pairs(data, "test", negatives, seed + 1, max_users)
    features = loaded.user_features
    s_valid, s_test = score_pairs(net, valid, user_features=features), score_pairs(net, test, user_features=features)
    calibration = fit_calibration(s_valid, valid.labels, valid.weights, method=method,
                                  score="ncf_logit" if kind == NCF else "two_tower_score", sampling_rate=rate)

    metrics: dict[str, dict[str, dict[str, float]]] = {}
    predictions: dict[str, np.ndarray] = {}
    for split, pairs, s in (("valid", valid, s_valid), ("test", test, s_test)):
        variants = {"raw": sigmoid(s)}
        if calibration.prior_correction is not None:
            variants["prior"] = sigmoid(s + calibration.prior_correction)
        variants["calibrated"] = calibration.probability(s)
        metrics[split] = {v: calibration_metrics(p, pairs.labels, pairs.weights) for v, p in variants.items()}
        if split == "test":
            predictions = variants
    calibration.details = {
        "checkpoint": loaded.path.name, "checkpoint_sha256": loaded.sha256, "model_class": type(net).__name__,
        "training": training, "negatives_per_user": negatives, "seed": seed, "max_users": max_users,
        "pairs": {"valid": len(valid), "test": len(test)}, "n_bins": N_BINS, "metrics": metrics,
        "event": "the user interacts with the item (an item the user has not consumed yet), at the next "
                 "held-out step of the split protocol",
    }

    calibration_file = Path(output) if output else default_calibration_path(loaded.path)
    write_calibration(calibration_file, loaded.sha256, calibration)
    files = [calibration_file]
    if into_checkpoint:
        files.append(write_calibrated_checkpoint(loaded, calibration))
    out = Path(report_dir) if report_dir else loaded.path.parent / f"{loaded.path.stem}-calibration"
    report = CalibrationReport(calibration, metrics, calibration_file, files, loaded.sha256)
    files += write_calibration_report(out, report, predictions, test, title=f"{type(net).__name__}, {loaded.path.name}")
    return report


# --- storage --------------------------------------------------------------------------------------
def load_calibration(ckpt_path: str | Path, calibration_file: str | Path | None = None) -> Calibration | None:
    """The calibration stored for a checkpoint (by its sha256), or None when there is none.

    Looks in ``calibration_file`` (default: ``calibration.json`` beside the checkpoint) first, then in
    ``ckpt["rectrain"]["calibration"]`` of the checkpoint (a ``.calibrated.ckpt`` copy).
    """
    from rectrain.runs import load_checkpoint
    from rectrain.utils.io import file_sha256

    ckpt = Path(ckpt_path)
    found = stored_calibration(calibration_file or default_calibration_path(ckpt), file_sha256(ckpt))
    if found is not None:
        return found
    entry = (load_checkpoint(ckpt).get("rectrain") or {}).get("calibration")
    return Calibration.from_dict(entry) if entry else None


def write_calibrated_checkpoint(loaded: Any, calibration: Calibration) -> Path:
    """A copy of the checkpoint with ``ckpt["rectrain"]["calibration"]`` (still weights_only-loadable)."""
    import torch

    from rectrain.utils.io import atomic_path

    ckpt = dict(loaded.ckpt)
    ckpt["rectrain"] = {**loaded.facts, "calibration": json.loads(json.dumps(calibration.to_dict()))}
    path = loaded.path.with_name(f"{loaded.path.stem}.calibrated.ckpt")
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def write_calibration_report(output: str | Path, report: CalibrationReport, test_predictions: dict[str, np.ndarray],
                             test_pairs: PairSet, *, title: str = "") -> list[Path]:
    """``reliability.png`` and ``calibration.md`` in ``output``."""
    from rectrain.utils.io import write_text_atomic

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "reliability.png"
    plot_reliability(test_predictions, test_pairs.labels, test_pairs.weights, png, title=title)
    c = report.calibration
    md = [f"# Calibration{': ' + title if title else ''}", "",
          f"`p = sigmoid(a * score + b)`, method {c.method}, a = {c.a:.6g}, b = {c.b:.6g}, fitted on {c.fitted_on}; "
          f"score = {c.score}; negative sampling rate = {c.negative_sampling_rate}.", "",
          report.table(), "",
          "Pairs: each user's held-out item(s) plus sampled never-consumed items, weighted to the true base rate "
          f"({c.details.get('negatives_per_user')} per user). ECE over 15 equal-width bins, weighted.", ""]
    write_text_atomic(out / "calibration.md", "\n".join(md))
    return [png, out / "calibration.md"]


def plot_reliability(predictions: dict[str, np.ndarray], labels: np.ndarray, weights: np.ndarray,
                     path: str | Path, *, title: str = "") -> None:
    """Reliability diagram: 15 equal-width bins (the ECE's), and equal-weight bins on log axes
    (where almost all the mass of a rare event lies)."""
    from rectrain.analytics.common import pyplot, save_figure

    plt = pyplot()
    colors = {"raw": "#c44e52", "prior": "#dd8452", "calibrated": "#4c72b0"}
    fig, (ax_lin, ax_log) = plt.subplots(1, 2, figsize=(12, 5))
    ax_lin.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    lows, highs = [], []
    for name, p in predictions.items():
        bins = reliability_bins(p, labels, weights)
        filled = bins["count"] >= MIN_PLOTTED
        ece = expected_calibration_error(p, labels, weights)
        label = f"{VARIANT_NAMES.get(name, name)} (ECE {ece:.3g})"
        ax_lin.plot(bins["mean_p"][filled], bins["mean_y"][filled], marker="o", color=colors.get(name), label=label)
        # equal-weight bins (20), log-log
        order = np.argsort(p, kind="stable")
        cw = np.cumsum(weights[order])
        edges = np.searchsorted(cw, np.linspace(0, cw[-1], 21)[1:-1])
        mp, my = [], []
        for chunk in np.split(order, edges):
            if chunk.size:
                w = weights[chunk]
                mp.append(float((w * p[chunk]).sum() / w.sum()))
                my.append(float((w * labels[chunk]).sum() / w.sum()))
        mp_a, my_a = np.array(mp), np.array(my)
        keep = (mp_a > 0) & (my_a > 0)
        ax_log.plot(mp_a[keep], my_a[keep], marker="o", color=colors.get(name), label=VARIANT_NAMES.get(name, name))
        if keep.any():
            lows.append(min(mp_a[keep].min(), my_a[keep].min()))
            highs.append(max(mp_a[keep].max(), my_a[keep].max()))
    ax_lin.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability (bin)", ylabel="observed frequency (weighted)",
               title=f"reliability, 15 equal-width bins (test; bins of >= {MIN_PLOTTED} pairs)")
    ax_lin.legend(fontsize=8, loc="upper left")
    if lows:
        lo, hi = min(lows) / 2, min(1.0, max(highs) * 2)
        ax_log.plot([lo, hi], [lo, hi], ls="--", color="grey", lw=1)
        ax_log.set_xscale("log")
        ax_log.set_yscale("log")
    ax_log.set(xlabel="mean predicted probability", ylabel="observed frequency",
               title="20 equal-weight bins, log scale (test)")
    ax_log.legend(fontsize=8, loc="upper left")
    save_figure(fig, path, title)
