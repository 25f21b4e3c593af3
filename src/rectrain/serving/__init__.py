"""Torch-free serving of rectrain ONNX exports: numpy, onnxruntime and the standard library only.

* :class:`Scorer`: in-process API (``recommend``, ``recommend_many``, ``score``, ``reload``).
* :func:`make_server`: the HTTP JSON service (``/recommend``, ``/score``, ``/healthz``, ``/metadata``,
  ``/admin/reload``).
* ``serve_onnx.py`` (:mod:`rectrain.serving.cli`): the service and a batch scorer from the shell.
"""
from rectrain.serving.model import ModelLoadError, OnnxModel
from rectrain.serving.scorer import RequestError, Scorer
from rectrain.serving.server import ScoringServer, make_server

__all__ = ["ModelLoadError", "OnnxModel", "RequestError", "Scorer", "ScoringServer", "make_server"]
