"""Crash consistency of export: a SIGKILL mid-export never leaves a file a service would trust,
and its temporaries are removed by the next export into the folder."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_export_fixtures import ROOT, sha256

pytest_plugins = ["tests.test_export_fixtures"]

# Runs export.py with os.replace patched to SIGKILL the process at the N-th rename: every
# temporary file is complete by then (all are written before the first rename), so this is the
# moment that leaves the most debris; N=1 kills before anything is renamed.
KILL_AT_RENAME = """
import os, signal, sys
calls, kill_at = [0], int(sys.argv[1])
real_replace = os.replace
def replace(src, dst):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
os.replace = replace
sys.argv = ["export.py", *sys.argv[2:]]
sys.path.insert(0, {root!r})
import export
sys.exit(export.main())
"""


def _killed_export(ckpt: Path, output: Path, at: int) -> None:
    proc = subprocess.run([sys.executable, "-c", KILL_AT_RENAME.format(root=str(ROOT)), str(at),
                           f"ckpt_path={ckpt}", f"output={output}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.crash
def test_killed_export_leaves_old_files_and_the_next_export_removes_its_debris(checkpoints, exports, tmp_path):
    from rectrain.export import export_checkpoint
    from rectrain.serving.scorer import Scorer

    folder = tmp_path / "models"
    shutil.copytree(exports["two_tower"].parent, folder)
    main = folder / exports["two_tower"].name
    before = {p.name: sha256(p) for p in folder.glob("*.onnx")}

    _killed_export(checkpoints["two_tower"], main, at=1)
    debris = _hidden(folder)
    assert debris and all(".rectrain-tmp." in name and name.endswith(".tmp") for name in debris)
    assert {p.name: sha256(p) for p in folder.glob("*.onnx")} == before  # nothing was renamed
    Scorer.load(main)  # the old set still loads

    report = export_checkpoint(checkpoints["two_tower"], main)
    assert _hidden(folder) == []  # the dead writer's temporaries are gone, the new export left none
    assert all(Path(path).exists() for path in report.files.values())
    Scorer.load(main)


@pytest.mark.crash
def test_killed_export_of_a_fresh_folder_leaves_no_model_file(checkpoints, tmp_path):
    from rectrain.export import export_checkpoint

    folder = tmp_path / "fresh"
    main = folder / "nm.onnx"
    _killed_export(checkpoints["neumf"], main, at=1)
    assert not list(folder.glob("*.onnx")) and _hidden(folder)
    export_checkpoint(checkpoints["neumf"], main)
    assert _hidden(folder) == [] and main.exists()


def test_a_live_writers_temporaries_are_left_alone(tmp_path):
    from rectrain.utils.io import remove_stale_temporaries, temp_prefix

    mine = tmp_path / f"{temp_prefix('a.onnx')}x.tmp"
    mine.write_bytes(b"in progress")
    # a dead writer on this host: pid of a process that has exited
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    theirs = tmp_path / f"{temp_prefix('a.onnx').replace(f'.{os.getpid()}.', f'.{dead.pid}.')}y.tmp"
    theirs.write_bytes(b"debris")
    unrelated = tmp_path / ".a.onnx.abc.tmp"  # not a rectrain temporary: never touched
    unrelated.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path) == [theirs]
    assert mine.exists() and unrelated.exists() and not theirs.exists()
