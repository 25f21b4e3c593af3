"""Torch-free serving of rectrain ONNX exports: numpy, onnxruntime, Starlette and uvicorn only.

* :class:`Scorer`: in-process API (``recommend``, ``recommend_many``, ``score``, ``reload``).
* :func:`create_app`: the HTTP JSON service as an ASGI app (``/recommend``, ``/score``, ``/healthz``,
  ``/metadata``, ``/admin/reload``); :func:`serve_in_thread` runs it under uvicorn.
* ``serve_onnx.py`` (:mod:`rectrain.serving.cli`): the service and a batch scorer from the shell.
"""
from rectrain.serving.model import ModelLoadError, OnnxModel
from rectrain.serving.runner import RunningServer, serve_in_thread
from rectrain.serving.scorer import RequestError, Scorer
from rectrain.serving.server import ServiceLimits, create_app

__all__ = ["ModelLoadError", "OnnxModel", "RequestError", "RunningServer", "Scorer", "ServiceLimits",
           "create_app", "serve_in_thread"]
