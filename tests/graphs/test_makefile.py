"""`make run`: make exits 2 whenever its recipe fails, so the recipe names the runner's own exit code and its
meaning (a stand-in runner here: nothing is built or run)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")


def _make_run(tmp_path: Path, code: int) -> subprocess.CompletedProcess:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True, exist_ok=True)
    python = venv / "bin" / "python"
    python.write_text('#!/bin/sh\necho "runner called with: $*"\nexit $CODE\n')
    python.chmod(0o755)
    return subprocess.run(  # -o: take the virtual environment as built, never build it
        ["make", "-s", "-C", str(ROOT), "-o", "setup", "-o", f"{venv}/bin/.installed", "run", f"VENV={venv}",
         "MAIN_GRAPH=graphs/x.yaml"],
        env={**os.environ, "CODE": str(code)}, capture_output=True, text=True, timeout=60,
    )


@pytest.mark.parametrize(("code", "meaning"), [
    (1, "a node failed"), (2, "the graph is invalid"), (130, "stopped by a signal after its checkpoint"),
    (143, "stopped by a signal after its checkpoint; run it again to resume"),
])
def test_make_run_names_the_runners_exit_code(tmp_path, code, meaning):
    done = _make_run(tmp_path, code)
    assert "runner called with: runner.py graphs/x.yaml" in done.stdout
    assert done.returncode == 2  # make's own code for any failed recipe
    assert f"make run: runner.py exited with {code}: {meaning}" in done.stderr
    assert f"Error {code}" in done.stderr  # make's own line names it too
    assert "for the runner's own exit code run" in done.stderr


def test_make_run_succeeds_quietly(tmp_path):
    done = _make_run(tmp_path, 0)
    assert done.returncode == 0 and "runner called with" in done.stdout and "make run:" not in done.stderr
    assert not (tmp_path / "venv" / "bin" / ".installed").exists()
