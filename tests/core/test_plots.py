"""Curves are drawn without touching the host process's matplotlib state (ComfyUI's backend stays its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_plot_curves_writes_a_png_without_pyplot_or_a_backend_switch(tmp_path):
    script = (
        "import sys, matplotlib\n"
        "before = matplotlib.rcParams._get_backend_or_none()\n"
        "from flowopd_core.eval.plots import plot_curves\n"
        "history = [{'loss': 1.0}, {'loss': float('nan')}, {'loss': 0.5}]\n"
        f"out = plot_curves(history, ['loss'], {str(tmp_path / 'c.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert matplotlib.rcParams._get_backend_or_none() == before, 'backend switched'\n"
        "print(out)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "MPLBACKEND": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
