"""`pip install -e .` gives a `flowopd` command that does what `python runner.py` does."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}


def test_flowopd_command_equals_runner_py():
    (entry,) = entry_points(group="console_scripts", name="flowopd")
    assert entry.value == "flowopd_nodes.cli:run"
    script = Path(sys.executable).parent / "flowopd"  # installed next to the interpreter (the venv's bin/)
    assert script.is_file(), "the project is installed without its console script"
    for args in (["validate", "graphs/full_opd.yaml"], ["validate", "tests/fixtures/graphs/many_errors.yaml"]):
        ours = subprocess.run([str(script), *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
        shim = subprocess.run([sys.executable, "runner.py", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=ENV)
        assert (ours.returncode, ours.stdout, ours.stderr) == (shim.returncode, shim.stdout, shim.stderr)
    assert ours.returncode == 2 and "many_errors" in ours.stderr + ours.stdout
