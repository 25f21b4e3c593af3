"""Segment profiles and the files a segmentation run writes.

A profile describes a segment by what its users consume, over every event in the data (train,
valid and test): size, activity (events per user), the categories and items over-represented in it
(lift), and the average popularity of what it consumes.

* lift of category c in segment s = (share of s's events whose item has category c) /
  (share of all events whose item has category c); > 1 means over-represented;
* lift of item i in s = (share of s's events on i) / (share of all events on i), only for items
  with at least ``min_item_events`` events in s (rare items give meaningless lifts);
* popularity of an item = number of users whose history holds it; a segment's average popularity is
  the mean over its events (so it weighs items as often as they are consumed).

Written by :func:`write_segment_report` (atomically): ``segments.md``, ``segments.csv`` (one row per
segment), ``segment_categories.csv`` and ``segment_items.csv`` (long format), ``segments.png``,
``segments.json`` / ``segments.npz`` (centroids, for export) and, for the data owner only,
``user_segments.csv`` (user *index* -> segment). No raw user id is written anywhere: the user index
maps back to a raw id only through ``user_vocab.json``, which stays with the owner.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from rectrain.utils.io import write_text_atomic

REPORT_FILES = ("segments.md", "segments.csv", "segment_categories.csv", "segment_items.csv", "segments.png",
                "segments.json", "segments.npz", "user_segments.csv")


@dataclass
class SegmentProfiles:
    """Per-segment summary (one row per segment) and the long tables behind it."""

    summary: pd.DataFrame
    categories: pd.DataFrame  # segment, category, events, share, population_share, lift
    items: pd.DataFrame  # segment, item_id, title, events, lift
    population: dict[str, float] = field(default_factory=dict)


def all_events(data: Any) -> tuple[np.ndarray, np.ndarray]:
    """(user, item) of every event of a PreparedData (order irrelevant here)."""
    user = np.concatenate([data.train.user, data.valid.user, data.test.user]).astype(np.int64)
    item = np.concatenate([data.train.item, data.valid.item, data.test.item]).astype(np.int64)
    return user, item


def segment_profiles(data: Any, labels: np.ndarray, *, top_items: int = 5, top_categories: int = 3,
                     min_item_events: int = 5, items_per_segment: int = 20) -> SegmentProfiles:
    """Profiles of the segments ``labels`` (n_users,) over the events of ``data`` (PreparedData)."""
    labels = np.asarray(labels, dtype=np.int64)
    k = int(labels.max()) + 1 if labels.size else 0
    user, item = all_events(data)
    seg = labels[user]  # segment of every event
    n_items = data.n_items
    events_total = user.size
    popularity = data.item_popularity("test").astype(np.float64)
    item_ids = np.asarray(data.item_vocab).astype(str)
    titles = np.asarray(data.item_titles).astype(str) if len(data.item_titles) == n_items else item_ids

    # events per (segment, item), one bincount
    seg_item = np.bincount(seg * n_items + item, minlength=k * n_items).reshape(k, n_items).astype(np.float64)
    seg_events = seg_item.sum(1)
    all_item = seg_item.sum(0)
    users_per_seg = np.bincount(labels, minlength=k)
    events_per_user = np.bincount(user, minlength=data.n_users)

    # categories: events x multi-hot -> (k, C)
    cat_matrix = data.item_category_matrix().astype(np.float64) if data.n_categories else np.zeros((n_items, 0))
    seg_cat = seg_item @ cat_matrix  # (k, C) events touching each category
    all_cat = all_item @ cat_matrix
    cat_share = seg_cat / np.maximum(seg_events[:, None], 1)
    pop_cat_share = all_cat / max(events_total, 1)
    cat_lift = np.divide(cat_share, pop_cat_share[None, :], out=np.zeros_like(cat_share),
                         where=pop_cat_share[None, :] > 0)
    item_share = seg_item / np.maximum(seg_events[:, None], 1)
    pop_item_share = all_item / max(events_total, 1)
    item_lift = np.divide(item_share, pop_item_share[None, :], out=np.zeros_like(item_share),
                          where=pop_item_share[None, :] > 0)
    avg_pop = (seg_item @ popularity) / np.maximum(seg_events, 1)
    pop_avg_pop = float(all_item @ popularity / max(events_total, 1))
    category_names = np.asarray(data.category_vocab).astype(str)

    rows, cat_rows, item_rows = [], [], []
    for s in range(k):
        members = labels == s
        acts = events_per_user[members]
        cats = [c for c in np.lexsort((-seg_cat[s], -cat_lift[s])) if seg_cat[s, c] >= min_item_events][:top_categories]
        eligible = np.flatnonzero(seg_item[s] >= min_item_events)
        ranked = eligible[np.lexsort((eligible, -seg_item[s, eligible], -item_lift[s, eligible]))]
        rows.append({
            "segment": s,
            "users": int(users_per_seg[s]),
            "user_share": users_per_seg[s] / max(labels.size, 1),
            "events": int(seg_events[s]),
            "events_per_user_mean": float(acts.mean()) if acts.size else 0.0,
            "events_per_user_median": float(np.median(acts)) if acts.size else 0.0,
            "avg_item_popularity": float(avg_pop[s]),
            "avg_item_popularity_vs_all": float(avg_pop[s] / pop_avg_pop) if pop_avg_pop else float("nan"),
            "top_categories": "; ".join(f"{category_names[c]} ({cat_lift[s, c]:.2f})" for c in cats),
            "top_items": "; ".join(f"{titles[i]} ({item_lift[s, i]:.2f})" for i in ranked[:top_items]),
        })
        for c in range(len(category_names)):
            cat_rows.append({"segment": s, "category": category_names[c], "events": int(seg_cat[s, c]),
                             "share": cat_share[s, c], "population_share": pop_cat_share[c], "lift": cat_lift[s, c]})
        for i in ranked[:items_per_segment]:
            item_rows.append({"segment": s, "item_id": item_ids[i], "title": titles[i], "events": int(seg_item[s, i]),
                              "share": item_share[s, i], "lift": item_lift[s, i], "popularity": int(popularity[i])})
    population = {"users": int(labels.size), "events": int(events_total),
                  "events_per_user_mean": float(events_per_user.mean()) if labels.size else 0.0,
                  "avg_item_popularity": pop_avg_pop}
    cat_columns = ["segment", "category", "events", "share", "population_share", "lift"]
    item_columns = ["segment", "item_id", "title", "events", "share", "lift", "popularity"]
    return SegmentProfiles(pd.DataFrame(rows), pd.DataFrame(cat_rows, columns=cat_columns),
                           pd.DataFrame(item_rows, columns=item_columns), population)


# --- rendering ------------------------------------------------------------------------------------
def profiles_markdown(profiles: SegmentProfiles, *, compact: bool = False) -> str:
    """The per-segment table in markdown (``compact``: without the top-items column)."""
    head = "| segment | users | share | events/user | avg popularity (x all) | top categories (lift) |"
    sep = "|---:|---:|---:|---:|---:|---|"
    if not compact:
        head += " top items (lift) |"
        sep += "---|"
    lines = [head, sep]
    for r in profiles.summary.itertuples():
        line = (f"| {r.segment} | {r.users} | {r.user_share:.1%} | {r.events_per_user_mean:.1f} | "
                f"{r.avg_item_popularity:.0f} ({r.avg_item_popularity_vs_all:.2f}) | {_md(r.top_categories)} |")
        if not compact:
            line += f" {_md(r.top_items)} |"
        lines.append(line)
    pop = profiles.population
    lines.append(f"| all | {pop['users']} | 100% | {pop['events_per_user_mean']:.1f} | "
                 f"{pop['avg_item_popularity']:.0f} (1.00) | |" + ("" if compact else " |"))
    return "\n".join(lines)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def plot_segments(profiles: SegmentProfiles, path: str | Path, *, title: str = "", max_categories: int = 15) -> None:
    """One PNG, two panels: segment sizes, and the lift of the top categories per segment (heatmap)."""
    from rectrain.analytics.common import pyplot, save_figure

    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm  # after pyplot(): the backend is chosen first

    summary, cats = profiles.summary, profiles.categories
    k = len(summary)
    fig, (ax_size, ax_lift) = plt.subplots(1, 2, figsize=(14, max(4.0, 0.45 * k + 2)),
                                           gridspec_kw={"width_ratios": [1, 2.6]})
    y = np.arange(k)
    ax_size.barh(y, summary["users"], color="#4c72b0")
    for yi, (n, share) in enumerate(zip(summary["users"], summary["user_share"])):
        ax_size.text(n, yi, f" {n} ({share:.0%})", va="center", fontsize=8)
    ax_size.set_yticks(y, [f"segment {s}" for s in summary["segment"]])
    ax_size.invert_yaxis()
    ax_size.set_xlabel("users")
    ax_size.set_title("segment sizes")
    ax_size.set_xlim(0, summary["users"].max() * 1.35 if k else 1)
    if len(cats):
        lift = cats.pivot(index="segment", columns="category", values="lift")
        events = cats.pivot(index="segment", columns="category", values="events")
        # the categories that are a top-3 of some segment, most over-represented first
        chosen: list[str] = []
        for s in range(k):
            row = lift.loc[s].where(events.loc[s] >= 5).dropna().sort_values(ascending=False)
            chosen += [c for c in row.index[:3] if c not in chosen]
        chosen = chosen[:max_categories]
        mat = np.log2(np.clip(lift.loc[:, chosen].to_numpy(dtype=float), 1 / 16, 16))
        bound = max(1.0, float(np.abs(mat).max()))
        im = ax_lift.imshow(mat, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -bound, bound))
        for (i, j), v in np.ndenumerate(lift.loc[:, chosen].to_numpy(dtype=float)):
            ax_lift.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
        ax_lift.set_xticks(np.arange(len(chosen)), chosen, rotation=45, ha="right", fontsize=8)
        ax_lift.set_yticks(y, [f"segment {s}" for s in summary["segment"]])
        ax_lift.set_title("category lift vs all users (top 3 per segment; colour log2)")
        fig.colorbar(im, ax=ax_lift, label="log2 lift")
    else:
        ax_lift.text(0.5, 0.5, "no item categories in this dataset", ha="center", va="center")
        ax_lift.set_axis_off()
    save_figure(fig, path, title)


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, float_format="%.6g")
    write_text_atomic(path, buffer.getvalue())


@dataclass
class SegmentReport:
    """What :func:`segment_checkpoint` produced."""

    output: Path
    fit: Any  # SegmentFit
    profiles: SegmentProfiles
    payload: dict[str, Any]
    files: list[Path]

    def summary(self) -> str:
        scores = ", ".join(f"k={k}: {v:.3f}" for k, v in sorted(self.fit.silhouette.items()))
        lines = [f"{self.fit.k} segments ({self.fit.chosen_by}; silhouette {scores})",
                 profiles_markdown(self.profiles, compact=True),
                 f"wrote {len(self.files)} files to {self.output}: " + ", ".join(p.name for p in self.files)]
        return "\n".join(lines)


def write_segment_report(output: str | Path, fit: Any, profiles: SegmentProfiles, payload: dict[str, Any], *,
                         title: str = "", notes: Sequence[str] = ()) -> list[Path]:
    """Write every report file into ``output`` (see the module docstring); returns their paths."""
    from rectrain.artifacts import write_segments_file

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    scores = "\n".join(f"| {k} | {v:.4f} | {'chosen' if k == fit.k else ''} |" for k, v in sorted(fit.silhouette.items()))
    vector = payload.get("vector", {})
    md = [f"# Customer segments{': ' + title if title else ''}", "",
          f"{fit.k} segments of {profiles.population['users']} users, k-means ({fit.algorithm}, seed {fit.seed}) on "
          f"{'L2-normalised ' if fit.normalize else ''}{vector.get('kind', '')} user vectors "
          f"({vector.get('vector', '')}: {vector.get('source', '')}); k {fit.chosen_by}.", "",
          "| k | silhouette | |", "|---:|---:|---|", scores, "",
          profiles_markdown(profiles), "",
          "Lift = share of the segment's events in the category (item) / share of all events in it; items need "
          "at least 5 events in the segment. Popularity = users whose history holds the item, averaged over the "
          "segment's events; (x all) is relative to all users.", "",
          "Files: `segments.csv` (this table), `segment_categories.csv`, `segment_items.csv`, `segments.png`, "
          "`segments.json`/`segments.npz` (centroids and the vector definition, for export). "
          "`user_segments.csv` maps user *index* -> segment and is for the data owner only; no raw user id is "
          "written here.", *notes, ""]
    files = [out / "segments.md", out / "segments.csv", out / "segment_categories.csv", out / "segment_items.csv",
             out / "user_segments.csv", out / "segments.png"]
    write_text_atomic(files[0], "\n".join(md))
    _write_csv(files[1], profiles.summary)
    _write_csv(files[2], profiles.categories)
    _write_csv(files[3], profiles.items)
    _write_csv(files[4], pd.DataFrame({"user_index": np.arange(fit.labels.size), "segment": fit.labels}))
    plot_segments(profiles, files[5], title=title)
    files += list(write_segments_file(out, payload))
    return files


def segment_checkpoint(ckpt_path: str | Path, *, k: int | None = 8, k_range: str | Sequence[int] = (2, 12),
                       output: str | Path | None = None, seed: int = 0, normalize: bool = True,
                       sample_size: int = 5000, data_overrides: Sequence[str] = (), loaded: Any = None) -> SegmentReport:
    """Segment a checkpoint's users and write the report (the work behind ``segment.py``).

    Args:
        ckpt_path: a checkpoint from ``train.py`` (NCF family or two-tower).
        k: number of segments; None chooses over ``k_range`` by silhouette.
        output: report directory (default: ``<checkpoint stem>-segments`` beside the checkpoint).
        data_overrides: ``data.<key>=<value>`` applied to the checkpoint's data config.
        loaded: an already opened :class:`rectrain.runs.Run` (skips opening).
    """
    from rectrain.analytics.common import load_model_and_data
    from rectrain.analytics.segments import fit_segments, segments_payload
    from rectrain.artifacts import default_segments_path
    from rectrain.analytics.user_vectors import user_vectors

    loaded = loaded or load_model_and_data(ckpt_path, data_overrides)
    vectors = user_vectors(loaded.net, loaded.data(), user_features=loaded.user_features)
    fit = fit_segments(vectors.vectors, k, k_range, seed=seed, normalize=normalize, sample_size=sample_size)
    profiles = segment_profiles(loaded.data(), fit.labels)
    payload = segments_payload(fit, vectors.definition, checkpoint_sha256=loaded.sha256,
                               extra={"checkpoint": loaded.path.name,
                                      "data_fingerprint": loaded.facts.get("data_fingerprint")})
    out = Path(output) if output else default_segments_path(loaded.path).parent
    title = f"{type(loaded.net).__name__}, {loaded.path.name}"
    files = write_segment_report(out, fit, profiles, payload, title=title)
    return SegmentReport(out, fit, profiles, payload, files)
