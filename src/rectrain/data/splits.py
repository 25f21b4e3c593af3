"""Split labels shared by the preprocessing pipeline and everything that reads its output.

The splits themselves (leave-one-out, global time, whole sessions; ties broken by file order) are
computed by the engine pipeline, :mod:`rectrain.data.engine.pipeline`.
"""
from __future__ import annotations

TRAIN, VALID, TEST = 0, 1, 2
