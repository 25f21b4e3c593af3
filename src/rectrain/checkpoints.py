"""Loading checkpoints safely: ``weights_only=True`` means no arbitrary pickle is ever executed.

rectrain checkpoints hold only tensors and plain Python values (the model's constructor arguments,
item vocabulary and resolved config under the ``"rectrain"`` key), so the safe loader suffices.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rectrain.errors import RectrainError


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check it is a rectrain one."""
    p = Path(path)
    if not p.is_file():
        raise RectrainError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files
        raise RectrainError(f"{p}: not a loadable rectrain checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise RectrainError(f"{p}: not a Lightning checkpoint (no state_dict)")
    return ckpt


def rebuild_model(ckpt: dict[str, Any]) -> torch.nn.Module:
    """The trained plain ``nn.Module`` from a checkpoint, without the training config or data."""
    import importlib

    facts = ckpt.get("rectrain")
    if not facts:
        raise RectrainError("checkpoint has no 'rectrain' facts (was it written by rectrain?)")
    module_name, _, class_name = facts["model_class"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    net = cls(**facts["model_config"])
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()
