"""Serve a rectrain ONNX export over HTTP, or score a file of requests; torch is never imported.

    python serve_onnx.py serve model.onnx [--host 127.0.0.1] [--port 8000] [--threads 1]
    python serve_onnx.py batch model.onnx requests.jsonl [--output answers.jsonl] [--endpoint recommend|score]

A thin entry point: rectrain.serving.cli does the work (see its docstring for formats and exit codes).
"""
from __future__ import annotations

import sys

from rectrain.serving.cli import main

if __name__ == "__main__":
    sys.exit(main())
