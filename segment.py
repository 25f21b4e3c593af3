"""Customer segments from a checkpoint: `python segment.py ckpt_path=<.ckpt> [k=8 | k=null k_range=2-12] [key=value ...]`.

Same `key=value` style as train.py and export.py. Keys:
  ckpt_path    checkpoint written by train.py, NCF family or two-tower (required)
  k            number of segments (default 8); k=null chooses k over k_range by silhouette score
  k_range      lo-hi, both included, for k=null (default 2-12)
  output       report directory (default: <checkpoint stem>-segments beside the checkpoint)
  seed         k-means initialisation and the silhouette sample (default 0)
  normalize    L2-normalise user vectors before clustering (default true)
  sample_size  users sampled for silhouette scores (default 5000)
  threads      torch intra-op threads (default 1)
  data.<key>   overrides of the checkpoint's data config, e.g. data.source.root=/moved/ml-100k

User vectors: NCF user embeddings, or the two-tower query vector of each user's whole history.
Writes segments.md/.csv/.png, segment_categories.csv, segment_items.csv, segments.json/.npz (centroids
and the vector definition, for export) and user_segments.csv (user index -> segment, for the data
owner; no raw user ids anywhere). Needs the `analytics` extra (scikit-learn, matplotlib).
A thin entry point: rectrain.analytics.reports.segment_checkpoint does the work. Bad input ends with
a one-line message and exit code 2.
"""
from __future__ import annotations

import sys
from typing import Any

from rectrain.cli import UsageError, parse_key_values, require_extra, run_command

KEYS: dict[str, Any] = {"ckpt_path": None, "k": 8, "k_range": "2-12", "output": None, "seed": 0, "normalize": True,
                        "sample_size": 5000, "threads": 1}


def parse(argv: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` arguments -> (settings, data overrides)."""
    values, overrides = parse_key_values(argv, KEYS, types={"k": int, "output": str}, passthrough_prefix="data.")
    if not values["ckpt_path"]:
        raise UsageError("ckpt_path=<checkpoint> is required, e.g. "
                         "python segment.py ckpt_path=outputs/mf/<date>/checkpoints/last.ckpt k=8")
    if values["k"] is not None and values["k"] < 2:
        raise UsageError(f"k must be >= 2 (or null to choose over k_range), got {values['k']}")
    if values["threads"] < 1 or values["sample_size"] < 2:
        raise UsageError("threads must be >= 1 and sample_size >= 2")
    return values, overrides


def segment(parsed: tuple[dict[str, Any], list[str]]) -> str:
    settings, overrides = parsed
    require_extra(("sklearn", "matplotlib"), "segment.py", "analytics")
    import torch

    from rectrain.analytics.reports import segment_checkpoint

    torch.set_num_threads(settings["threads"])
    report = segment_checkpoint(settings["ckpt_path"], k=settings["k"], k_range=settings["k_range"],
                                output=settings["output"], seed=settings["seed"], normalize=settings["normalize"],
                                sample_size=settings["sample_size"], data_overrides=overrides)
    return report.summary()


def main(argv: list[str] | None = None) -> int:
    return run_command(sys.argv[1:] if argv is None else argv, __doc__, parse, segment)

if __name__ == "__main__":
    sys.exit(main())
