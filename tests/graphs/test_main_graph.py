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


def test_shipped_model_graphs_run_end_to_end_small(tmp_path):
    """The shipped base loads, samples, is evaluated, and a GRPO teacher trains on it (tiny settings)."""
    run_dir = tmp_path / "teacher"
    args = [
        "run", str(ROOT / "graphs" / "grpo_teacher.yaml"), "--run-dir", str(run_dir), "--no-progress",
        "--set", "teacher.epochs=1", "--set", "teacher.group_size=2", "--set", "teacher.prompts_per_epoch=2",
        "--set", "teacher.steps=3", "--set", "test.per_task=3", "--set", "eval.steps=3",
    ]
    assert runner.main(args) == 0
    table = (run_dir / "nodes" / "eval" / "results.md").read_text()
    assert "| base |" in table and "| grpo-compose |" in table
    assert (run_dir / "nodes" / "teacher" / "adapter" / "adapter_model.safetensors").is_file()
    assert (run_dir / "nodes" / "teacher" / "curves.png").is_file()
    assert runner.main(args) == 0
    assert json.loads((run_dir / "status.json").read_text())["executed"] == 0


def _tiny_full_opd(run_dir: Path) -> list[str]:
    args = ["run", str(ROOT / "graphs" / "full_opd.yaml"), "--run-dir", str(run_dir), "--no-progress",
            "--set", "test.per_task=3", "--set", "eval.steps=3"]
    for node in ("teacher_compose", "teacher_text", "teacher_quality", "grpo_mix"):
        args += ["--set", f"{node}.epochs=1", "--set", f"{node}.group_size=2", "--set", f"{node}.prompts_per_epoch=2",
                 "--set", f"{node}.steps=3"]
    for node in ("opd_no_mar", "opd"):
        args += ["--set", f"{node}.epochs=2", "--set", f"{node}.prompts_per_epoch=3", "--set", f"{node}.steps=3",
                 "--set", f"{node}.step_subset=2"]  # of the 2 trainable steps (int(3 x 0.99))
    return args


def test_full_opd_pipeline_runs_end_to_end_small(tmp_path, monkeypatch, capsys):
    """Teachers -> pool -> router -> merge cold start -> OPD with and without MAR -> Evaluator (tiny settings).
    The run folder is given relative to the working folder, as `runs/...` is by default: adapter paths must
    survive being passed on through several nodes' cache entries."""
    monkeypatch.chdir(tmp_path)
    run_dir = Path("runs") / "full"
    assert runner.main(_tiny_full_opd(run_dir)) == 0
    captured = capsys.readouterr()
    summary = captured.out  # outputs shown through the run folder's nodes/<node> links
    assert "it/s" not in captured.err and "s/it" not in captured.err  # --no-progress: no node's bar either
    assert f"eval.table: {run_dir / 'nodes' / 'eval' / 'results.md'}" in summary and "/cache/" not in summary
    assert "image(s) of" in summary and "tensor (" not in summary
    table = (run_dir / "nodes" / "eval" / "results.md").read_text()
    for label in ("base", "grpo-compose", "grpo-text", "grpo-quality", "grpo-mix", "flow-opd-no-mar", "flow-opd"):
        assert f"| {label} |" in table
    for row in ("flow-opd vs grpo-compose @ compose", "flow-opd vs grpo-mix", "flow-opd vs flow-opd-no-mar"):
        assert f"| {row} |" in table  # the method-vs-method rows the graph asks for
    for node in ("opd", "opd_no_mar"):
        assert (run_dir / "nodes" / node / "adapter" / "adapter_model.safetensors").is_file()
        history = json.loads((run_dir / "nodes" / node / "metrics.json").read_text())
        assert len(history) == 2 and all(np.isfinite(h["kl"]) for h in history)
    assert json.loads((run_dir / "nodes" / "opd" / "metrics.json").read_text())[-1]["anchor_kl"] > 0
    assert np.isnan(json.loads((run_dir / "nodes" / "opd_no_mar" / "metrics.json").read_text())[-1]["anchor_kl"])
    report = json.loads((run_dir / "nodes" / "cold_start" / "cold_start.json").read_text())
    assert report["method"] == "factor_mean" and report["teachers"] == ["compose", "text", "quality"]
    assert runner.main(_tiny_full_opd(run_dir)) == 0
    assert json.loads((run_dir / "status.json").read_text())["executed"] == 0
