"""Loading checkpoints safely: ``weights_only=True`` means no arbitrary pickle is ever executed.

rectrain checkpoints hold only tensors and plain Python values (the model's constructor arguments,
item vocabulary and resolved config under the ``"rectrain"`` key), so the safe loader suffices.
Lightning's own loads (resume with ``trainer.fit(ckpt_path=...)``, ``validate``/``test`` of the best
checkpoint) go through :class:`rectrain.tasks.callbacks.SafeCheckpointIO`, which pins this loader and
writes checkpoints atomically (it lives beside the callbacks: this module stays free of Lightning,
whose import costs export and analytics seconds).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from rectrain.errors import RectrainError


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check it is a rectrain one.

    ``weights_only=True`` is passed explicitly, so not even ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``
    (torch's switch back to the pre-2.6 unsafe default) makes it unpickle arbitrary objects.
    """
    p = Path(path)
    if not p.is_file():
        raise RectrainError(f"checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's message suggests weights_only=False: not for us
        raise RectrainError(f"{p}: refused: it holds pickled objects other than tensors and plain values, which "
                            "could run code (checkpoints load with weights_only=True; rectrain's never need more)"
                            ) from exc
    except Exception as exc:  # truncated or foreign files
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
