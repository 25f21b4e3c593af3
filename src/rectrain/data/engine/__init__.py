"""Preprocessing on an engine (DuckDB by default, Spark for a cluster), written once in Ibis.

:func:`run_prepare` is what :func:`rectrain.data.dataset.prepare` calls: connect the engine, put the
log on it (a RawLog in memory, or a Parquet scan the engine reads itself), run
:mod:`rectrain.data.engine.pipeline`, close the engine and remove its scratch folder.
"""
from __future__ import annotations

from typing import Any

from rectrain.data.engine.backends import ENGINES, Engine, EngineConfig, connect
from rectrain.data.engine.pipeline import Allocate, EngineOutput, run

__all__ = ["ENGINES", "Engine", "EngineConfig", "EngineOutput", "run_prepare"]


def run_prepare(events: Any, pre: Any, split: Any, source: str, allocate: Allocate, engine_cfg: EngineConfig,
                scratch_root: Any = None, test_events: Any = None) -> EngineOutput:
    """Prepare a log on a fresh engine connection.

    ``events``/``test_events``: a RawLog, or a callable ``engine -> ibis table`` (a file scan).
    """
    from rectrain.data.engine.scan import from_raw_log

    engine = connect(engine_cfg, scratch_root)
    try:
        def table(obj: Any) -> Any:
            if obj is None:
                return None
            return obj(engine) if callable(obj) else from_raw_log(engine, obj)

        return run(engine, table(events), pre, split, source, allocate, test_events=table(test_events))
    finally:
        engine.close()
