"""What a sweep leaves behind: one summary table of every run, sorted by the validation metric.

:class:`SweepSummary` is a Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``): at the end of
``python train.py -m ...`` it reads each run's ``results.json`` under the sweep directory and writes
``summary.csv`` and ``summary.md`` there. Failed runs stay in the table with their reason.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rectrain.utils.io import write_text_atomic

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("hr@10", "ndcg@10", "mrr@10", "coverage@10")


def collect_results(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``results.json`` below ``sweep_dir``, in job order."""
    found = []
    for path in sorted(Path(sweep_dir).rglob("results.json")):
        try:
            found.append({"dir": str(path.parent.relative_to(sweep_dir)), **json.loads(path.read_text())})
        except (OSError, json.JSONDecodeError) as exc:
            found.append({"dir": str(path.parent), "status": "failed", "reason": f"unreadable results: {exc}"})
    return found


def summary_table(results: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """One row per run: status, overrides, validation and test metrics; best validation first."""
    rows = []
    for r in results:
        row = {"run": r.get("dir"), "status": r.get("status", "completed"),
               "overrides": " ".join(r.get("overrides", [])), "model": r.get("model", "")}
        for split, prefix in (("valid", "val"), ("test", "test")):
            for name in dict.fromkeys((metric, *SUMMARY_METRICS)):
                row[f"{prefix}/{name}"] = (r.get(split) or {}).get(name, math.nan)
        row["seconds"] = r.get("seconds", math.nan)
        row["reason"] = r.get("reason", "")
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(f"val/{metric}", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def write_summary(sweep_dir: str | Path, metric: str) -> pd.DataFrame:
    """Write ``summary.csv`` and ``summary.md`` in ``sweep_dir`` and return the table."""
    table = summary_table(collect_results(sweep_dir), metric)
    sweep_dir = Path(sweep_dir)
    write_text_atomic(sweep_dir / "summary.csv", table.to_csv(index=False))
    write_text_atomic(sweep_dir / "summary.md", _markdown(table, metric))
    return table


def _markdown(table: pd.DataFrame, metric: str) -> str:
    if table.empty:
        return "No runs finished.\n"
    cols = list(table.columns)
    lines = [f"# Sweep summary (sorted by validation {metric})", "", "| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        cells = [f"{v:.4f}" if isinstance(v, float) and not math.isnan(v) else ("" if isinstance(v, float) else str(v))
                 for v in row.tolist()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback writing the sweep summary when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table = write_summary(sweep_dir, str(config.get("optimized_metric", "ndcg@10")))
        failed = int((table["status"] != "completed").sum()) if not table.empty else 0
        log.info("sweep summary: %d runs (%d failed) -> %s", len(table), failed, sweep_dir / "summary.md")
