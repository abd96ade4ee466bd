"""The README's main graph runs end to end, writes its grids, and a second run executes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

import runner

ROOT = Path(__file__).resolve().parents[2]


def test_miniworld_preview_runs_and_reruns_from_cache(tmp_path):
    graph = ROOT / "graphs" / "miniworld_preview.yaml"
    run_dir = tmp_path / "run"
    assert runner.main(["run", str(graph), "--run-dir", str(run_dir), "--no-progress"]) == 0
    status = json.loads((run_dir / "status.json").read_text())
    assert status["failed"] == 0 and status["executed"] == len(status["nodes"])
    for name in ("compose", "text", "quality"):
        grid = np.asarray(Image.open(run_dir / "nodes" / f"{name}_grid" / f"{name}.png").convert("L"))
        assert grid.shape[0] > 200 and grid.std() > 10  # a real picture, not a blank canvas
    assert runner.main(["run", str(graph), "--run-dir", str(run_dir), "--no-progress"]) == 0
    again = json.loads((run_dir / "status.json").read_text())
    assert again["executed"] == 0 and again["cached"] == len(status["nodes"])
