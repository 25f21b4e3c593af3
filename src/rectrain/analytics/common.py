"""Helpers shared by the analyses: opening a run, drawing report pictures.

A run (net, facts, the data it was trained on, checked) is opened by :func:`rectrain.runs.open_run`;
:func:`load_model_and_data` is that call with the data built up front, as every analysis needs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from rectrain.runs import Run, open_run


def load_model_and_data(ckpt_path: str | Path, data_overrides: Sequence[str] = ()) -> Run:
    """Open a run and rebuild its data now (fails early when the data is not the training data).

    Args:
        ckpt_path: a checkpoint written by ``train.py``.
        data_overrides: ``data.<key>=<value>`` strings merged into the checkpoint's data config.
    """
    run = open_run(ckpt_path, data_overrides)
    run.data()
    return run


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (reports are drawn on machines with no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, title: str = "") -> None:
    """Title, tight layout and an atomic PNG write (no half-written picture), then free the figure."""
    from rectrain.utils.io import atomic_path

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
